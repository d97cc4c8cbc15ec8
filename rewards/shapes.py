"""Rewards of the shapes task: `shapes_verifier` (the training reward) and `shapes_judge` (evaluation only).

Both are scene readers trained in the repo (`python -m rewards.train_shapes_rewards`) on rendered images of
`rewards.shapes_task`: for each of the 18 objects (colour, shape) they predict how many are in the image
(0–3, a softmax) and where the first one is (box centre in px). A prompt is then scored from the scene:

| term | value |
|---|---|
| object k of the prompt, wanted n_k times | `P(count_k = n_k)` |
| nothing else | `Π_{j not named} P(count_j = 0)` |
| relation `A rel B` | `sigmoid((signed offset of B from A along the axis − 2 px) / 1 px)` |
| `shapes_verifier` reward (`mode="partial"`) | the mean of these terms: partial credit, so RL has signal on hard prompts |
| `prompt_prob` component (`mode="prompt_prob"`) | Π over all 18 objects of P(count = wanted) × the relation term: the probability that the prompt holds |
| `mode="correct"` | 1.0 where `satisfied`, else 0.0 |
| `satisfied(images, conditions)` | the exact decision: argmax counts equal the prompt's and the relation holds by ≥ 2 px |

The two differ in architecture (verifier: a plain ReLU CNN with a dense head; judge: CoordConv + GroupNorm +
GELU, wider, dropout), data seed and augmentation, so that a policy exploiting one is caught by the other.
Conditions are indices into `prompts` (default: `shapes_task.model_prompts()`, the condition set of the
embedded `shapes` model: the 1,155 training prompts, then the 276 held-out ones).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from rewards import shapes_task as task
from rewards.base import Reward
from rewards.registry import register

WEIGHTS_DIR = Path(__file__).parent / "weights"
N_OBJ, N_COUNT = len(task.OBJECTS), 4
MARGIN, TEMPERATURE = 2.0, 1.0
#: what the reward returns: the partial-credit mean, the prompt probability, or 1/0 exact satisfaction
MODES = ("partial", "prompt_prob", "correct")


class VerifierNet(nn.Module):
    """Plain CNN: [B, 3, 32, 32] -> count logits [B, 18, 4], centres [B, 18, 2] in px."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
            nn.ReLU(), nn.Flatten(), nn.Linear(4 * w * 64, 256), nn.ReLU())
        self.head = nn.Linear(256, N_OBJ * (N_COUNT + 2))

    def forward(self, x):
        out = self.head(self.features(x * 2 - 1)).view(-1, N_OBJ, N_COUNT + 2)
        return out[..., :N_COUNT], 16 + 16 * out[..., N_COUNT:]


class JudgeNet(nn.Module):
    """CoordConv + GroupNorm + GELU CNN with dropout: same outputs as `VerifierNet`, a different family."""

    def __init__(self, width: int = 48):
        super().__init__()
        w = width

        def block(i, o, stride):
            return [nn.Conv2d(i, o, 3, stride=stride, padding=1), nn.GroupNorm(8, o), nn.GELU()]

        self.features = nn.Sequential(
            nn.Conv2d(5, w, 5, padding=2), nn.GELU(), *block(w, 2 * w, 2), *block(2 * w, 2 * w, 1),
            *block(2 * w, 4 * w, 2), *block(4 * w, 4 * w, 1), nn.AvgPool2d(2), nn.Flatten(), nn.Dropout(0.2),
            nn.Linear(4 * w * 16, 384), nn.GELU(), nn.Dropout(0.2))
        self.head = nn.Linear(384, N_OBJ * (N_COUNT + 2))
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, task.SIZE), torch.linspace(-1, 1, task.SIZE), indexing="ij")
        self.register_buffer("coords", torch.stack([xx, yy])[None], persistent=False)

    def forward(self, x):
        x = torch.cat([x * 2 - 1, self.coords.expand(x.shape[0], -1, -1, -1)], dim=1)
        out = self.head(self.features(x)).view(-1, N_OBJ, N_COUNT + 2)
        return out[..., :N_COUNT], 16 + 16 * out[..., N_COUNT:]


ARCHS = {"shapes_verifier": VerifierNet, "shapes_judge": JudgeNet}


def prompt_tables(prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per-prompt targets: wanted counts [P, 18], relation (a, b, axis, sign) [P, 4] (a = -1: none), kind ids [P]."""
    want = torch.zeros(len(prompts), N_OBJ, dtype=torch.long)
    rel = torch.full((len(prompts), 4), -1, dtype=torch.long)
    kind = torch.zeros(len(prompts), dtype=torch.long)
    axis_sign = {"left of": (0, 1), "right of": (0, -1), "above": (1, 1), "below": (1, -1)}
    for i, text in enumerate(prompts):
        p = task.parse_prompt(text)
        for o, n in p.objects:
            want[i, o] = n
        if p.relation is not None:
            a, r, b = p.relation
            rel[i] = torch.tensor([a, b, *axis_sign[r]])
        kind[i] = task.KINDS.index(p.kind)
    return {"want": want, "rel": rel, "kind": kind}


class ShapesSceneReward(Reward):
    """A scene reader scoring images against their prompts (module docstring); `name` picks the network."""

    def __init__(self, name: str = "shapes_verifier", prompts: Sequence[str] | None = None,
                 path: str | Path | None = None, mode: str = "partial"):
        super().__init__()
        if name not in ARCHS:
            raise ValueError(f"unknown shapes reward {name!r}; expected one of {sorted(ARCHS)}")
        if mode not in MODES:
            raise ValueError(f"reward {name!r}: mode={mode!r}; expected one of {MODES}")
        self.name, self.mode = name, mode
        self.prompts = list(prompts) if prompts is not None else task.model_prompts()
        file = Path(path) if path is not None else WEIGHTS_DIR / f"{name}.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"reward {name!r}: {file} is missing; train it with "
                                    f"`python -m rewards.train_shapes_rewards`")
        meta_file = file.with_suffix(".json")
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        self.net = ARCHS[name](**meta.get("arch", {}))
        self.net.load_state_dict(load_file(str(file)))
        self.net.eval().requires_grad_(False)
        for key, value in prompt_tables(self.prompts).items():
            self.register_buffer(key, value, persistent=False)

    def check_inputs(self, images, conditions):
        images, conditions = super().check_inputs(images, conditions)
        if tuple(images.shape[1:]) != (3, task.SIZE, task.SIZE):
            raise ValueError(f"reward {self.name!r}: images must be [B, 3, 32, 32] in [0, 1], got {tuple(images.shape)}")
        return images, conditions

    def _scene(self, images: torch.Tensor):
        logits, centres = self.net(images.float())
        return logits.log_softmax(-1), centres  # [B, 18, 4], [B, 18, 2]

    def terms(self, images: torch.Tensor, conditions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image terms [B]: mean named-object probability, nothing-else probability, relation probability (1
        where the prompt has none), and how many terms the prompt has."""
        logp, centres = self._scene(images)
        want, rel = self.want[conditions], self.rel[conditions]  # [B, 18], [B, 4]
        p_want = logp.gather(-1, want.unsqueeze(-1)).squeeze(-1).exp()  # [B, 18]
        named = want > 0
        objects = (p_want * named).sum(-1) / named.sum(-1)
        none_else = torch.where(named, torch.ones_like(p_want), p_want).prod(-1)
        has_rel = rel[:, 0] >= 0
        a, b = rel[:, 0].clamp(min=0), rel[:, 1].clamp(min=0)
        rows = torch.arange(len(conditions), device=images.device)
        axis, sign = rel[:, 2].clamp(min=0), rel[:, 3].float()
        offset = (centres[rows, b, axis] - centres[rows, a, axis]) * sign
        relation = torch.where(has_rel, torch.sigmoid((offset - MARGIN) / TEMPERATURE), torch.ones_like(offset))
        n_terms = named.sum(-1) + 1 + has_rel.long()
        return {"objects": objects, "nothing_else": none_else, "relation": relation, "named": named.sum(-1),
                "n_terms": n_terms, "has_rel": has_rel}

    def score(self, images, conditions):
        if self.mode == "correct":
            return self.satisfied(images, conditions).float()
        if self.mode == "prompt_prob":
            return self._prompt_prob(images, conditions)
        t = self.terms(images, conditions)
        rel = torch.where(t["has_rel"], t["relation"], torch.zeros_like(t["relation"]))
        return (t["objects"] * t["named"] + t["nothing_else"] + rel) / t["n_terms"]

    def _prompt_prob(self, images, conditions):
        """Π over the 18 objects of P(count = wanted) × P(relation): the probability that the prompt holds."""
        logp, _ = self._scene(images)
        p_counts = logp.gather(-1, self.want[conditions].unsqueeze(-1)).squeeze(-1).exp().prod(-1)
        return p_counts * self.terms(images, conditions)["relation"]

    def components(self, images, conditions):
        images, conditions = self.check_inputs(images, conditions)
        with torch.no_grad():
            t = self.terms(images, conditions)
            p_all = self._prompt_prob(images, conditions)
        return {self.name: self(images, conditions), "objects": t["objects"], "nothing_else": t["nothing_else"],
                "relation": t["relation"], "prompt_prob": p_all}

    @torch.no_grad()
    def satisfied(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """Exact decision per image [B] bool: argmax counts equal the prompt's, relation offset ≥ 2 px."""
        images, conditions = self.check_inputs(images, conditions)
        logp, centres = self._scene(images)
        want, rel = self.want[conditions], self.rel[conditions]
        counts_ok = (logp.argmax(-1) == want).all(-1)
        rows = torch.arange(len(conditions), device=images.device)
        a, b, axis = rel[:, 0].clamp(min=0), rel[:, 1].clamp(min=0), rel[:, 2].clamp(min=0)
        offset = (centres[rows, b, axis] - centres[rows, a, axis]) * rel[:, 3].float()
        return counts_ok & ((rel[:, 0] < 0) | (offset >= MARGIN))

    def kinds(self, conditions: torch.Tensor) -> list[str]:
        """The prompt kind of each condition id."""
        return [task.KINDS[k] for k in self.kind[conditions.to(self.kind.device)].tolist()]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prompts={len(self.prompts)}"


@register("shapes_verifier")
def shapes_verifier(prompts: Sequence[str] | None = None, path=None, mode: str = "partial") -> ShapesSceneReward:
    """Partial-credit prompt satisfaction from the verifier CNN (the shapes task's training reward)."""
    return ShapesSceneReward("shapes_verifier", prompts=prompts, path=path, mode=mode)


@register("shapes_judge")
def shapes_judge(prompts: Sequence[str] | None = None, path=None, mode: str = "partial") -> ShapesSceneReward:
    """The held-out judge (another architecture), for evaluation only (`mode="correct"`: 1/0 exact)."""
    return ShapesSceneReward("shapes_judge", prompts=prompts, path=path, mode=mode)


def scene_targets(scenes: list[task.Scene]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training targets of rendered scenes: counts [N, 18] (capped at 3), centres [N, 18, 2], centre mask [N, 18]."""
    counts = torch.from_numpy(np.stack([np.minimum(s.counts, N_COUNT - 1) for s in scenes]))
    centres = torch.from_numpy(np.nan_to_num(np.stack([s.centres for s in scenes])))
    return counts, centres, counts == 1
