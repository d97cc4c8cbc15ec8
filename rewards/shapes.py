"""Rewards of the shapes task: `shapes_verifier` (the training reward) and `shapes_judge` (evaluation only).

Both are scene readers trained in the repo (`python -m retrain.train_shapes_rewards`) on rendered images of
`rewards.shapes_task`: centre-grid detectors that say, for every cell of a grid, which of the 18 objects (colour,
shape) has its box centre there and where. From that they read P(count_k = n) for each object (n = 0…3, exact
over the cells) and each object's centre in px. A prompt is then scored from the scene:

| term | value |
|---|---|
| object k of the prompt, wanted n_k times | `P(count_k = n_k)` |
| nothing else | `Π_{j not named} P(count_j = 0)` |
| relation `A rel B` | `sigmoid((signed offset of B from A along the axis − 2 px) / 1 px)` |
| `shapes_verifier` reward (`mode="partial"`) | the mean of these terms: partial credit, so RL has signal on hard prompts |
| `prompt_prob` component (`mode="prompt_prob"`) | Π over all 18 objects of P(count = wanted) × the relation term: the probability that the prompt holds |
| `mode="correct"` | 1.0 where `satisfied`, else 0.0 |
| `satisfied(images, conditions)` | the exact decision: per-cell argmax counts equal the prompt's and the relation holds by ≥ 2 px |

The two differ in architecture (verifier: a plain ReLU CNN on an 8×8 grid of 4-px cells; judge: CoordConv +
GroupNorm + GELU with dilated context, no colour maps), data seed and degradations (the judge also
trains on reconstructions of the shapes autoencoder), so that a policy exploiting one is caught by the other.
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


class CentreGridNet(nn.Module):
    """A centre-grid detector (CenterNet-style, Zhou et al. 2019, one cell per object): the image is cut into G×G
    cells of `stride` px; each cell says which object's box centre lies in it (18 objects + background) and where
    in the cell (offset in [0, 1]²). Boxes are ≥ 7 px and ≥ 2 px apart, so two centres never share a 4-px cell.

    forward: images [B, 3, 32, 32] in [0, 1] -> class logits [B, 19, G, G], offsets [B, 2, G, G] in [0, 1].
    """

    stride: int

    def read(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The scene: log P(count_k = n) [B, 18, 4] (Poisson-binomial over cells, n = 3 meaning ≥ 3), argmax counts
        [B, 18], and each object's most likely centre [B, 18, 2] in px (x, y)."""
        logits, offsets = self(images)
        b, _, g, _ = logits.shape
        p = logits.float().softmax(1).flatten(2)  # [B, 19, G*G]
        p_obj = p[:, :N_OBJ]  # [B, 18, cells]
        dist = torch.zeros(b, N_OBJ, N_COUNT, device=images.device)
        dist[..., 0] = 1
        for j in range(g * g):  # exact count distribution: cells independent given the image
            q = p_obj[..., j:j + 1]
            shifted = torch.cat([torch.zeros_like(dist[..., :1]), dist[..., :-1]], -1)
            shifted[..., -1] += dist[..., -1]  # the last bin absorbs ≥ 3
            dist = dist * (1 - q) + shifted * q
        hard = torch.zeros(b, N_OBJ + 1, device=images.device).scatter_add_(
            1, p.argmax(1), torch.ones(b, g * g, device=images.device))[:, :N_OBJ].clamp(max=N_COUNT - 1)
        best = p_obj.argmax(-1)  # [B, 18] most likely cell of each object
        cell = torch.stack([best % g, best // g], -1).float()  # (col, row)
        off = offsets.float().flatten(2).transpose(1, 2)  # [B, cells, 2]
        centres = (cell + off.gather(1, best.unsqueeze(-1).expand(-1, -1, 2))) * self.stride
        return {"log_p_counts": dist.clamp_min(1e-12).log(), "counts": hard.long(), "centres": centres}


def colour_maps(x: torch.Tensor) -> torch.Tensor:
    """Fuzzy membership of every pixel in each of the 6 colours and the black background: [B, 3, H, W] in [0, 1] ->
    [B, 7, H, W], the product over channels of x_c (colour channel on) or 1 − x_c (off). A plain CNN trained on RGB
    alone confused complementary colours (cyan read as red: 92 % of its cell errors); these maps make colour
    identity explicit, so the network learns shape and position."""
    x = x.clamp(0, 1)
    on = torch.tensor([*task.COLORS.values(), (0, 0, 0)], dtype=x.dtype, device=x.device)  # [7, 3]
    per_channel = torch.where(on[None, :, :, None, None] > 0, x[:, None], 1 - x[:, None])  # [B, 7, 3, H, W]
    return per_channel.prod(2)


class VerifierNet(CentreGridNet):
    """The reward's reader: a plain ReLU CNN on RGB + colour-membership maps, 8×8 cells of 4 px."""

    stride = 4

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3 + 7, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4 * w, 4 * w, 3, padding=1),
            nn.ReLU(), nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(4 * w, N_OBJ + 1 + 2, 1)

    def forward(self, x):
        out = self.head(self.body(torch.cat([x * 2 - 1, colour_maps(x) * 2 - 1], dim=1)))
        return out[:, :N_OBJ + 1], torch.sigmoid(out[:, N_OBJ + 1:])


class JudgeNet(CentreGridNet):
    """The held-out judge: CoordConv + GroupNorm + GELU with dilated context, 8×8 cells of 4 px."""

    stride = 4

    def __init__(self, width: int = 32):
        super().__init__()
        w = width

        def block(i, o, stride=1, dilation=1):
            return [nn.Conv2d(i, o, 3, stride=stride, padding=dilation, dilation=dilation), nn.GroupNorm(8, o),
                    nn.GELU()]

        self.body = nn.Sequential(nn.Conv2d(5, w, 5, padding=2), nn.GELU(), *block(w, 2 * w, stride=2),
                                  *block(2 * w, 2 * w, dilation=2), *block(2 * w, 4 * w, stride=2),
                                  *block(4 * w, 4 * w, dilation=2), *block(4 * w, 4 * w, dilation=1))
        self.head = nn.Conv2d(4 * w, N_OBJ + 1 + 2, 1)
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, task.SIZE), torch.linspace(-1, 1, task.SIZE), indexing="ij")
        self.register_buffer("coords", torch.stack([xx, yy])[None], persistent=False)

    def forward(self, x):
        x = torch.cat([x * 2 - 1, self.coords.expand(x.shape[0], -1, -1, -1)], dim=1)
        out = self.head(self.body(x))
        return out[:, :N_OBJ + 1], torch.sigmoid(out[:, N_OBJ + 1:])


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
                                    f"`python -m retrain.train_shapes_rewards`")
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

    def terms(self, scene: dict[str, torch.Tensor], conditions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image terms [B] of a read scene (`net.read`): mean named-object probability, nothing-else probability,
        relation probability (1 where the prompt has none), the prompt probability, and the exact decision."""
        logp, centres = scene["log_p_counts"], scene["centres"]
        want, rel = self.want[conditions], self.rel[conditions]  # [B, 18], [B, 4]
        p_want = logp.gather(-1, want.unsqueeze(-1)).squeeze(-1).exp()  # [B, 18]
        named = want > 0
        rows = torch.arange(len(conditions), device=conditions.device)
        has_rel = rel[:, 0] >= 0
        a, b, axis = rel[:, 0].clamp(min=0), rel[:, 1].clamp(min=0), rel[:, 2].clamp(min=0)
        offset = (centres[rows, b, axis] - centres[rows, a, axis]) * rel[:, 3].float()
        relation = torch.where(has_rel, torch.sigmoid((offset - MARGIN) / TEMPERATURE), torch.ones_like(offset))
        named_sum = (p_want * named).sum(-1)
        nothing_else = torch.where(named, torch.ones_like(p_want), p_want).prod(-1)
        return {"objects": named_sum / named.sum(-1), "nothing_else": nothing_else,
                "relation": relation, "prompt_prob": p_want.prod(-1) * relation,
                "partial": (named_sum + nothing_else + torch.where(has_rel, relation, torch.zeros_like(relation)))
                / (named.sum(-1) + 1 + has_rel.long()),
                "correct": ((scene["counts"] == want).all(-1) & (~has_rel | (offset >= MARGIN))).float()}

    def score(self, images, conditions):
        return self.terms(self.net.read(images.float()), conditions)[self.mode]

    def components(self, images, conditions):
        images, conditions = self.check_inputs(images, conditions)
        with torch.no_grad():
            t = self.terms(self.net.read(images.float()), conditions)
        return {self.name: self.check_output(t[self.mode], images), "objects": t["objects"],
                "nothing_else": t["nothing_else"], "relation": t["relation"], "prompt_prob": t["prompt_prob"]}

    @torch.no_grad()
    def satisfied(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """Exact decision per image [B] bool: argmax counts equal the prompt's, relation offset ≥ 2 px."""
        images, conditions = self.check_inputs(images, conditions)
        return self.terms(self.net.read(images.float()), conditions)["correct"].bool()

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


def grid_targets(layouts: list[list[tuple[int, int, int, int]]], stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training targets of rendered layouts for a centre grid of `stride` px: the class of each cell [N, G, G]
    (object index whose box centre is in it, 18 = background) and the centre's offset in the cell [N, 2, G, G]."""
    g = task.SIZE // stride
    classes = np.full((len(layouts), g, g), N_OBJ, np.int64)
    offsets = np.zeros((len(layouts), 2, g, g), np.float32)
    for i, layout in enumerate(layouts):
        for obj, x0, y0, side in layout:
            cx, cy = (x0 + side / 2) / stride, (y0 + side / 2) / stride
            col, row = min(int(cx), g - 1), min(int(cy), g - 1)
            classes[i, row, col] = obj
            offsets[i, :, row, col] = (cx - col, cy - row)
    return torch.from_numpy(classes), torch.from_numpy(offsets)
