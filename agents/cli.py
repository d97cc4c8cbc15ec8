"""The `diffenv` command, built in one place from config dataclasses (CleanRL's `Args` idea).

Every flag is a field of a dataclass — the env's (`EnvConfig`), the trainer's (`TrainConfig`), or a command's
own options (`diffenv.cli.SampleOptions`, `diffenv.ab.ABOptions`, `TrainOptions`, `CompareOptions` below) —
and `add_field` makes it: `--field-name`, its type and range from the field (`diffenv.validation.flag_type`),
its help from the field's docstring, its default from the field (shown in `--help`); a bool field that is on
by default becomes `--no-field-name`. A subcommand is a list of `(dataclass, field, overrides)`; overrides
only adapt a flag to its command (a required flag, a default, the help's live lists of models and rewards).
`sample` and `ab` run `diffenv`'s functions; `diffenv` itself never imports `agents`.

`run` is the one place errors reach the user: a user error prints one line and exits 2, a run that stopped
(folder in use, disk full, NaN/inf) exits 1, never with a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agents.algos import ALGORITHMS
from agents.runfolder import RunError
from agents.tracking import LoggerKind, TrackerSpec
import rewards
from agents.trainer import TrainConfig
from diffenv import ab
from diffenv import cli as sample_cli
from diffenv.quiet import quiet_third_party
from diffenv.cli import CommonOptions, ModelOptions, SampleOptions, condition_token, model_help, reward_help
from diffenv.config import EnvConfig
from diffenv.validation import field_docs, field_specs, flag_type, parse_assignments

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)


@dataclass
class TrainOptions:
    """`diffenv train`'s options beyond `TrainConfig`."""

    resume: bool = False
    """continue the run in --out exactly where it stopped"""
    set: list[str] = field(default_factory=list)
    """algorithm option, typed and range-checked, e.g. --set lr=1e-4 --set group_size=4 (repeatable)"""
    logger: LoggerKind = "csv"
    """experiment tracker next to log.csv: csv (log.csv only), tensorboard, wandb or mlflow (files under
    OUT/tracking/; each needs its extra, e.g. pip install 'diffusion-steer[tensorboard]')"""


@dataclass
class CompareOptions:
    """`diffenv compare`'s options; the tasks themselves are `agents.benchmark.compare.Task` tables in the TOML."""

    config: str = "examples/compare.toml"
    """TOML file: defaults and [[task]] tables"""
    out: str = "runs/compare"
    """output folder (cache/ and runs/ make it resumable)"""
    quick: bool = False
    """tiny budgets and eval sets (CI smoke run, < 5 min)"""
    tasks: list[str] | None = None
    """run only these [[task]] names of the config (default: all)"""
    seeds: list[int] | None = None
    """run only these training seeds of each task (default: all); processes sharing one --out can split the seeds"""
    progress: bool = True
    """progress bars"""
    logger: LoggerKind = "csv"
    """experiment tracker: csv (files only), tensorboard, wandb or mlflow: every training run (named
    TASK/ALGO/seedN) and the comparison's figures and results.md (OUT/tracking/)"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says what the default means
    or there is none to show (required options, on/off flags, unset options)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == []  # 0 is a default
        if "default:" in text or action.required or unset:
            return text
        return super()._get_help_string(action)


# ---------------------------------------------------------------------- flags from dataclass fields
def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _literal_choices(tp) -> tuple | None:
    for alt in typing.get_args(tp) if typing.get_origin(tp) is not Literal else (tp,):
        if typing.get_origin(alt) is Literal:
            return typing.get_args(alt)
    return None


def _is_list(tp) -> bool:
    """list[X] or list[X] | None: a flag that takes its items one per word."""
    return any(typing.get_origin(alt) is list for alt in (tp, *typing.get_args(tp)))


def add_field(p: argparse.ArgumentParser, cls: type, name: str, **overrides: Any) -> argparse.Action:
    """The flag of field `name` of dataclass `cls` (see the module docstring); `overrides` are argparse kwargs."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    tp, meta = field_specs(cls)[name]
    default = _default(f)
    flag = "--" + name.replace("_", "-")
    kwargs: dict[str, Any] = {"help": field_docs(cls).get(name), "dest": name}
    if tp is bool:  # a switch: off by default -> --NAME; on by default -> --NAME/--no-NAME
        kwargs.update(action="store_true" if default is not True else argparse.BooleanOptionalAction, default=default)
    else:
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        choices = _literal_choices(tp)
        if choices is not None:
            kwargs["choices"] = list(choices)
        elif tp is Any and not meta:
            kwargs["type"] = str  # a name (model, reward); not parsed as a Python literal
        elif _is_list(tp):
            kwargs.update(nargs="+", type=flag_type(cls, name, each=True))
        else:
            kwargs["type"] = flag_type(cls, name)
    kwargs.update(overrides)
    if kwargs.get("action") == "append":
        kwargs.pop("nargs", None)
    if kwargs.get("help"):  # prose from docstrings: argparse reads help as a %-format string
        kwargs["help"] = kwargs["help"].replace("%", "%%")
    return p.add_argument(flag, **kwargs)


def add_fields(p: argparse.ArgumentParser, spec: list[tuple]) -> None:
    """`spec`: `(cls, name)` or `(cls, name, {overrides})` per flag, in `--help` order."""
    for cls, name, *rest in spec:
        add_field(p, cls, name, **(rest[0] if rest else {}))


def _algo_help() -> str:
    """`--set` help: every algorithm's options with their defaults (from the config dataclasses)."""
    return "; ".join(f"{name}: " + ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(algo.Config))
                     for name, algo in sorted(ALGORITHMS.items()))


def _task_help() -> str:
    """`--config` help: the keys of a [[task]] table (`agents.benchmark.compare.Task`) with their defaults."""
    from agents.benchmark.compare import Task

    return ", ".join(f.name if _default(f) is dataclasses.MISSING else f"{f.name}={_default(f)}"
                     for f in dataclasses.fields(Task))


def _model_flags(cls: type, conditions_help: str) -> list[tuple]:
    """Naming the model, its prompts, the reward, the device and the conditions: `sample` and `train`."""
    return [(cls, "model", {"help": model_help()}),
            (ModelOptions, "prompts"),
            (cls, "reward", {"type": str, "help": reward_help()}),
            (cls, "device"),
            (cls, "conditions", {"type": condition_token, "nargs": "+", "metavar": "ID_OR_SPLIT",
                                 "help": field_docs(cls)["conditions"] + conditions_help})]


#: `train`'s TrainConfig fields (in --help order); `cmd_train` builds the config from exactly these
#: (every field but `algo_overrides`, from `--set`, and `model_kwargs`, from `--prompts`)
TRAIN_FIELDS = ("algo", "model", "reward", "device", "conditions", "images", "out", "seed", "num_steps",
                "eval_num_steps", "guidance_scale", "lora_rank", "grid_every", "eval_images", "kl_samples",
                "probe_every", "probe_images", "keep_probe_loras", "progress")


def subcommands() -> dict[str, tuple[dict, list[tuple], Any]]:
    """name -> (add_parser kwargs, flags, function): the whole command line."""
    algos = sorted(ALGORITHMS)
    sample = [*_model_flags(EnvConfig, "; images balanced over them (--conditions 3 7 --n 200: 100 of each)"),
              (EnvConfig, "num_steps"), (EnvConfig, "sampler"), (EnvConfig, "eta"), (EnvConfig, "guidance_scale"),
              (EnvConfig, "seed", {"default": 0, "help": "seed of x_T and the noise"}),
              *[(SampleOptions, f.name) for f in dataclasses.fields(SampleOptions)]]
    train = [(TrainConfig, "algo", {"required": True, "choices": algos,
                                    "help": f"{field_docs(TrainConfig)['algo']}: " + ", ".join(algos)}),
             *_model_flags(TrainConfig, ""),
             *[(TrainConfig, name, {"required": True} if name in ("images", "out") else {})
               for name in TRAIN_FIELDS[5:]],
             (TrainOptions, "resume"),
             (TrainOptions, "logger"),
             (TrainOptions, "set", {"action": "append", "type": str, "metavar": "KEY=VALUE",
                                    "help": field_docs(TrainOptions)["set"] + ". Options and defaults: "
                                            + _algo_help()})]
    abflags = [(ab.ABOptions, f.name, {"metavar": "SEED"} if f.name == "seeds" else {})
               for f in dataclasses.fields(ab.ABOptions)]
    abflags[[f.name for f in dataclasses.fields(ab.ABOptions)].index("reward")] = (
        ab.ABOptions, "reward", {"action": "append", "type": str,
                                 "help": field_docs(ab.ABOptions)["reward"] + ". NAME: " + " | ".join(rewards.names())})
    compare = [(CompareOptions, f.name, {"tasks": {"metavar": "NAME"}, "seeds": {"metavar": "SEED"}}.get(f.name, {}))
               for f in dataclasses.fields(CompareOptions)]
    compare[0] = (CompareOptions, "config", {"help": field_docs(CompareOptions)["config"] + ". Keys and defaults: "
                                                    + _task_help()})
    return {
        "sample": (dict(help="sample the (base or --lora tuned) model and score the images",
                        description="Sample the model with its own sampler, write images/grid, print reward, NFE, "
                                    "time."), sample, sample_cli.cmd_sample),
        "ab": (dict(help="A/B: base pipeline with CFG vs guidance-free LoRA, same prompts and seeds",
                    description=ab.DESCRIPTION), abflags, ab.cmd_ab),
        "train": (dict(help="post-train a LoRA with a diffusion-RL algorithm",
                       description="Post-train a LoRA adapter on the denoiser with online RL, on a budget of images "
                                   "generated; the run folder (--out) holds log.csv, grids, lora.safetensors and "
                                   "checkpoint.pt."), train, cmd_train),
        "compare": (dict(help="the RL-vs-CFG benchmark, from a TOML config (resumable)",
                         description="CFG sweep, best-of-N and every algorithm x budget x seed of a TOML config, "
                                     "evaluated on the same images; writes results.csv/.md and plots to --out."),
                    compare, cmd_compare),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffenv", description="DiffusionSteer: steer diffusion models with RL",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (kwargs, flags, func) in subcommands().items():
        p = sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)
        add_fields(p, [*flags, (CommonOptions, "threads")])
        p.set_defaults(func=func)
    return parser


# ---------------------------------------------------------------------- train and compare
def cmd_train(a: argparse.Namespace) -> int:
    overrides = parse_assignments(ALGORITHMS[a.algo].Config, a.set, flag="--set", owner=a.algo)
    cfg = TrainConfig(**{name: getattr(a, name) for name in TRAIN_FIELDS}, algo_overrides=overrides,
                      model_kwargs=sample_cli.model_kwargs(a))
    from agents.trainer import Trainer

    trainer = Trainer(cfg, resume=a.resume, tracker=TrackerSpec(a.logger))
    before = trainer.evaluate(a.eval_images) if a.eval_images and not a.resume else None
    rows = trainer.train()
    if not trainer.dist.is_main:
        return 0
    if rows:
        print(f"{a.algo}: {len(rows)} epoch(s), {trainer.images_seen} images, train reward "
              f"{rows[0]['reward_mean']:.4f} (first epoch) -> {rows[-1]['reward_mean']:.4f} (last epoch), "
              f"kl_to_base {rows[-1]['kl_to_base']:.3f}, {trainer.wall_time:.1f} s")
    else:
        print(f"{a.algo}: budget of {a.images} images already reached ({trainer.images_seen}); nothing to do")
    if a.eval_images:
        after = trainer.evaluate(a.eval_images)
        b = f"{before['reward_mean']:.4f} -> " if before else ""
        print(f"eval reward ({a.eval_images} images, guidance {a.guidance_scale}, seed 12345): "
              f"{b}{after['reward_mean']:.4f}")
    print(f"wrote {trainer.out}/lora.safetensors, checkpoint.pt, log.csv")
    decline = trainer.probe_decline()
    if decline:
        print(f"warning: {decline}", file=sys.stderr)
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from agents.benchmark.compare import Comparison, load_tasks

    tracker = TrackerSpec(a.logger, group=Path(a.out).resolve().name)  # a missing package: before any work
    tasks = load_tasks(a.config, quick=a.quick, names=a.tasks, seeds=a.seeds)
    start = time.perf_counter()
    Comparison(tasks, a.out, progress=a.progress, tracker=tracker).run()
    print((Path(a.out) / "results.md").read_text())
    print(f"wrote {a.out}/results.csv, results.md, reward_vs_images.png, frontier.png, grids_*.png "
          f"in {time.perf_counter() - start:.0f} s")
    return 0


# ---------------------------------------------------------------------- running a command
def run(a: argparse.Namespace) -> int:
    """Run a parsed subcommand; user errors become one clear line on stderr and exit code 2."""
    quiet_third_party()  # again: `import diffenv` installed them, but a host (pytest) may reset warning filters
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    try:
        return a.func(a)
    except USER_ERRORS as e:
        print(f"diffenv {a.command}: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:  # the run stopped (folder in use, disk full, NaN/inf): one line, exit 1
        print(f"diffenv {a.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"diffenv {a.command}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
