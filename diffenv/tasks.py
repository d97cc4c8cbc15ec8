"""Tasks: what belongs to a benchmark task, in one place, asked by the env, `sample`, `train` and `compare`.

A task names the models it is defined on, the reward a run of those models gets when none is given, the held-out
judge that scores it (never a training reward), the condition split it is evaluated on, and whether its images are
captioned with their prompts, and its benchmark protocol (`diffenv.metrics.TaskProtocol`: the metrics of its images,
the diversity measure and frontier axes the report ranks and draws by; the probe set is `diffenv.metrics.PROBE_*`).

| task | models | default reward | judge | eval conditions |
|---|---|---|---|---|
| `digits` | `digits-eps`, `digits-flow` | `digit_classifier` | `digit_judge` | all ten digits |
| `shapes` | `shapes` | `shapes_verifier` | `shapes_judge` | `eval` (50 prompts over every kind and split) |

A model without a task (your own `sd:PATH` pipeline, a backend object) has no default reward: pass `reward=`.
Register a task of your own with `register_task(Task(...))` (docs/extending.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffenv.metrics import DIGITS as DIGITS_PROTOCOL
from diffenv.metrics import SHAPES as SHAPES_PROTOCOL
from diffenv.metrics import TaskProtocol
from rewards.registry import Registry

#: the `reward` default of the env, `train` and `compare`: the model's task's default reward (`Task.reward`)
TASK_REWARD = "task"


@dataclass(frozen=True)
class Task:
    name: str
    """the task's name (the key of its benchmark protocol)"""
    models: tuple[str, ...]
    """model names (`diffenv.models.load_backend`) the task is defined on"""
    reward: str
    """the reward a run gets when none is given (`rewards.names()`)"""
    judge: str | None = None
    """the held-out judge that scores the task (evaluation only, never trained on)"""
    eval_conditions: str | None = None
    """condition split the task is evaluated on (None: the model's default set)"""
    captions: bool = False
    """image grids show each image's prompt"""
    protocol: TaskProtocol | None = None
    """the benchmark's metrics and report rules (None: runs are scored and reported by their reward alone)"""


#: name -> Task; `register_task` adds one, or the entry-point group `diffusion_steer.tasks` (docs/extending.md)
TASKS = Registry("task")


def register_task(task: Task, *, overwrite: bool = False) -> Task:
    """Make `task` findable by name and by each of its models; a model may belong to one task only."""
    if not isinstance(task, Task):
        raise TypeError(f"register_task expects a diffenv.tasks.Task, got {type(task).__name__}")
    taken = {m: t.name for t in TASKS.values() if t.name != task.name for m in t.models}
    clash = sorted(m for m in task.models if m in taken)
    if clash:
        raise ValueError(f"task {task.name!r}: model(s) {clash} already belong to task(s) "
                         f"{sorted({taken[m] for m in clash})}; expected models of no other task")
    return TASKS.register(task.name, task, overwrite=overwrite)


def task_names() -> list[str]:
    return TASKS.names()


def get_task(name: str) -> Task:
    return TASKS.get(name)


def model_name(model: Any) -> str | None:
    """A model's registered name: the string itself, or a backend's `name` (None if it has none)."""
    return model if isinstance(model, str) else getattr(model, "name", None)


def task_for_model(model: Any) -> Task | None:
    """The task a model (name or backend) belongs to, or None."""
    name = model_name(model)
    return next((t for t in TASKS.values() if name in t.models), None)


def task_protocol(model: Any) -> TaskProtocol | None:
    """The benchmark protocol of a model's task, or None for a model without one (e.g. your own `sd:` model)."""
    task = task_for_model(model)
    return task.protocol if task is not None else None


def task_metrics(model: Any):
    """The image metrics of a model's task (`fn(images, conditions) -> dict`), or None for a model without one."""
    protocol = task_protocol(model)
    return protocol.metrics if protocol is not None else None


def resolve_reward(reward: Any, model: Any) -> Any:
    """`reward`, with `TASK_REWARD` replaced by the model's task's default reward; a model without a task is an
    error naming the fix, raised before anything is sampled."""
    if not (isinstance(reward, str) and reward == TASK_REWARD):
        return reward
    task = task_for_model(model)
    if task is None:
        if isinstance(model, str):  # a misspelt name is named as such first
            from diffenv.models import check_model_name

            check_model_name(model)
        raise ValueError(f"model {model_name(model)!r} belongs to no task (tasks: {task_names()}), so it has no "
                         "default reward; pass a reward: reward='NAME' (Python) or --reward NAME (CLI), e.g. "
                         "clip_score, or None / 'none' for no reward")
    return task.reward


DIGITS = register_task(Task("digits", models=("digits-eps", "digits-flow"), reward="digit_classifier",
                            judge="digit_judge", protocol=DIGITS_PROTOCOL))
SHAPES = register_task(Task("shapes", models=("shapes",), reward="shapes_verifier", judge="shapes_judge",
                            eval_conditions="eval", captions=True, protocol=SHAPES_PROTOCOL))
