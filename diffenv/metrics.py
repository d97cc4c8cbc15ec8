"""Each task's metrics and report protocol (docs/design.md §6): what the trainer's probes, `compare` and the
benchmarks score a task's images with.

For a set of generated images with their conditions:
- `reward_mean`: the training reward;
- `judge_accuracy`, `judge_log_prob`: a held-out judge (`digit_judge`, an MLP — not the CNN reward),
  its argmax accuracy and calibrated mean log p(c | x);
- `fd`: Fréchet distance (Heusel et al. 2017, eq. 6) to real digits in a fixed feature space — the
  judge's penultimate activations (96-d) — against all 1,797 scikit-learn digits;
- `class_variance`: mean over classes of the per-pixel variance within the class (diversity);
- `indep_accuracy`, `indep_fd`: the independent judge `digit_judge_indep` (other data, family and features than the
  reward; rewards/independent_judge.py): its argmax accuracy, and the FD in its own 64-d features against the
  1,437 train-split digits (real digits it never trained on);
- `nfe_per_image`, `seconds_per_image` from the sampler.

A task protocol (`TaskProtocol`: digits, shapes) names a task's metrics and how the report ranks and draws them;
each `diffenv.tasks.Task` holds its own (`Task.protocol`, found by `diffenv.tasks.task_protocol(model_name)`), and
`PROBE_SEED`/`PROBE_BATCH`/`PROBE_REPEATS` fix the validation probe set. `agents.benchmark.evaluation` evaluates
one comparison entry with them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

import rewards


@lru_cache(maxsize=1)
def _judge():
    return rewards.make("digit_judge", mode="log_prob")


def judge_features(images: torch.Tensor) -> torch.Tensor:
    """[B, 96] penultimate activations of the judge MLP for images in [0, 1]."""
    net = _judge().network.net
    with torch.no_grad():
        return net[:-1](images.float().cpu() * 2.0 - 1.0).double()


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if len(features) < 2:
        raise ValueError(f"a covariance needs at least 2 images, got {len(features)}")
    mu = features.mean(0)
    centred = features - mu
    return mu, centred.T @ centred / (len(features) - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2}), via the symmetric form √Σ1 Σ2 √Σ1."""
    evals, evecs = torch.linalg.eigh(sigma1)
    sqrt1 = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(sqrt1 @ sigma2 @ sqrt1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + sigma1.trace() + sigma2.trace() - 2 * cross)


@lru_cache(maxsize=1)
def reference_stats() -> tuple[torch.Tensor, torch.Tensor]:
    from diffenv.data import load_digits_split, to_unit

    images, _ = load_digits_split("all")
    return gaussian_stats(judge_features(to_unit(images)))


def class_variance(images: torch.Tensor, conditions: torch.Tensor) -> float:
    """Mean over classes with >= 2 images of the within-class pixel variance (NaN if no class has 2)."""
    flat = images.flatten(1).double().cpu()
    conditions = conditions.cpu()
    per_class = [flat[conditions == c].var(0, unbiased=True).mean() for c in conditions.unique() if
                 (conditions == c).sum() > 1]
    return float(torch.stack(per_class).mean()) if per_class else float("nan")


@lru_cache(maxsize=1)
def _indep_judge():
    return rewards.make("digit_judge_indep")


@lru_cache(maxsize=1)
def indep_reference_stats() -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian fit of the independent judge's features of the train split: real digits it never trained on."""
    from diffenv.data import load_digits_split, to_unit

    images, _ = load_digits_split("train")
    with torch.no_grad():
        return gaussian_stats(_indep_judge().network.features(to_unit(images)).double())


def indep_metrics(images: torch.Tensor, conditions: torch.Tensor) -> dict[str, float]:
    """`indep_accuracy` and `indep_fd` (module docstring) of images [N, 1, 8, 8] in [0, 1]."""
    net = _indep_judge().network
    with torch.no_grad():
        acc = (net(images).argmax(1) == conditions).float().mean()  # the temperature does not move the argmax
        mu, sigma = gaussian_stats(net.features(images).double())
    return {"indep_accuracy": float(acc), "indep_fd": frechet_distance(mu, sigma, *indep_reference_stats())}


def image_metrics(images: torch.Tensor, conditions: torch.Tensor) -> dict[str, float]:
    """Judge accuracy / log-prob, FD, within-class variance and the independent judge's accuracy and FD of images
    [N, 1, 8, 8] in [0, 1]."""
    judge = _judge()
    images, conditions = images.float().cpu(), conditions.long().cpu()
    with torch.no_grad():
        log_p = judge(images, conditions)
        acc = (judge.logits(images).argmax(1) == conditions).float().mean()
    mu, sigma = gaussian_stats(judge_features(images))
    return {"judge_accuracy": float(acc), "judge_log_prob": float(log_p.mean()),
            "fd": frechet_distance(mu, sigma, *reference_stats()),
            "class_variance": class_variance(images, conditions), **indep_metrics(images, conditions)}


# ---------------------------------------------------------------------------------------------- shapes
@lru_cache(maxsize=1)
def _shapes_judge():
    return rewards.make("shapes_judge")


def within_prompt_distance(images: torch.Tensor, conditions: torch.Tensor) -> float:
    """Diversity: mean over conditions with ≥ 2 images of the mean pairwise RMS pixel distance between its images
    (0 = identical images; two independent uniform images are ≈ 0.41 apart). NaN if no condition has 2 images."""
    flat = images.flatten(1).double().cpu()
    conditions = conditions.cpu()
    per = []
    for c in conditions.unique():
        x = flat[conditions == c]
        if len(x) > 1:
            d = torch.cdist(x, x) / x.shape[1] ** 0.5
            per.append(d.sum() / (len(x) * (len(x) - 1)))
    return float(torch.stack(per).mean()) if per else float("nan")


def shapes_metrics(images: torch.Tensor, conditions: torch.Tensor, prompts: list[str] | None = None
                   ) -> dict[str, float]:
    """The shapes task's protocol for images [N, 3, 32, 32]: held-out judge (`shapes_judge`) exact prompt accuracy
    overall, per prompt kind on training prompts and on held-out prompts (`judge_acc_<kind>_<split>`), the
    judge's prompt probability, and within-prompt diversity (`within_prompt_distance`)."""
    from rewards import shapes_task

    judge = _shapes_judge()
    images, conditions = images.float().cpu(), conditions.long().cpu()
    prompts = list(prompts) if prompts is not None else judge.prompts
    if prompts != judge.prompts:
        raise ValueError("shapes_metrics: the images' prompt set differs from the judge's; expected the `shapes` "
                         "model's condition set (rewards.shapes_task.model_prompts())")
    images, conditions = judge.check_inputs(images, conditions)
    with torch.no_grad():  # one read of the images serves the exact decision and the prompt probability
        terms = judge.terms(judge.net.read(images), conditions)
    ok = terms["correct"].double()
    row = {"judge_accuracy": float(ok.mean()), "judge_prompt_prob": float(terms["prompt_prob"].mean()),
           "within_prompt_distance": within_prompt_distance(images, conditions)}
    held = set(shapes_task.split_prompts("heldout"))
    kinds = judge.kinds(conditions)
    split = ["heldout" if prompts[c] in held else "train" for c in conditions.tolist()]
    for kind in shapes_task.KINDS:
        for s in ("train", "heldout"):
            mask = torch.tensor([k == kind and sp == s for k, sp in zip(kinds, split)])
            if mask.any():
                row[f"judge_acc_{kind}_{s}"] = float(ok[mask].mean())
    return row


@dataclass(frozen=True)
class TaskProtocol:
    """How a model's task is evaluated and reported (the benchmark reads this instead of checking model names).

    `metrics(images, conditions) -> dict` computes the task's metrics; `columns` are the (key, header) pairs of its
    results table after the reward; entries rank by `judge_accuracy`, then by the diversity metric `diversity`
    (lower is better when `diversity_lower_is_better`, e.g. a distance to real data); `captions`: grids show each
    image's condition name (its prompt).
    """

    name: str
    metrics: Callable[[torch.Tensor, torch.Tensor], dict]
    columns: tuple[tuple[str, str], ...]
    diversity: str
    diversity_label: str
    diversity_lower_is_better: bool
    captions: bool = False


DIGITS = TaskProtocol("digits", image_metrics,
                      (("judge_accuracy", "judge acc"), ("judge_log_prob", "judge log p"), ("fd", "FD ↓"),
                       ("class_variance", "class var"), ("indep_accuracy", "indep acc"),
                       ("indep_fd", "indep FD ↓")),
                      diversity="fd", diversity_label="FD to real digits (lower is better)",
                      diversity_lower_is_better=True)
SHAPES = TaskProtocol("shapes", shapes_metrics,
                      (("judge_accuracy", "judge acc"), ("judge_acc_single_train", "single"),
                       ("judge_acc_counting_train", "counting"), ("judge_acc_binding_train", "binding"),
                       ("judge_acc_relation_train", "relation"), ("judge_acc_binding_heldout", "binding (held-out)"),
                       ("judge_acc_relation_heldout", "relation (held-out)"), ("judge_prompt_prob", "judge p(prompt)"),
                       ("within_prompt_distance", "diversity ↑")),
                      diversity="within_prompt_distance",
                      diversity_label="within-prompt distance (higher = more diverse)",
                      diversity_lower_is_better=False, captions=True)


#: the validation probe set (docs/design.md §6): the trainer's probes and compare's CFG reference points on it;
#: every probed condition gets ≥ PROBE_REPEATS images, so within-prompt diversity is defined on `shapes`
PROBE_SEED, PROBE_BATCH, PROBE_REPEATS = 999, 256, 4
