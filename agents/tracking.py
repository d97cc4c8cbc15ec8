"""Experiment tracking: `--logger tensorboard|wandb|mlflow` sends what a run writes to the tool RL people already open.

The trackers are TorchRL's (`torchrl.record.loggers`: `TensorboardLogger`, `WandbLogger`, `MLFlowLogger`), not
hand-written writers. They are an extra sink: `log.csv`, the grids and the checkpoint stay the run's record
(`csv`, the default, is that record alone and needs no extra package). Per epoch a tracker gets every
`log.csv` column of the row as a scalar under the same name, at step = images generated so far; every
`grid_every` epochs the epoch's image grid (prompts under the images on text-to-image tasks; W&B also gets one
image per prompt with the prompt as its caption); `diffenv compare` adds its figures and `results.md`.
TorchRL's `Logger` has no image call (it logs videos), so images go through each logger's experiment object.

| `--logger` | package (extra) | where, under `<run folder>/tracking/` |
|---|---|---|
| `tensorboard` | tensorboard (`[tensorboard]`) | event files: `tensorboard --logdir runs` |
| `wandb` | wandb (`[wandb]`) | `wandb/`; `WANDB_MODE=offline` keeps it local (`wandb sync` later); the run id is kept in `wandb_run_id`, so `--resume` continues the same W&B run |
| `mlflow` | mlflow (`[mlflow]`) | `mlflow.db` (sqlite) and `artifacts/` unless `MLFLOW_TRACKING_URI` is set: `mlflow ui --backend-store-uri sqlite:///.../mlflow.db` |

Nothing here draws random numbers, so a tracked run resumes bit for bit like an untracked one.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agents.runfolder import TRACKING  # the folder of a run (or comparison) that holds the trackers' files

LoggerKind = Literal["csv", "tensorboard", "wandb", "mlflow"]
#: --logger choice -> (module that must import, the pyproject extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def check_logger(kind: str) -> None:
    """ValueError naming the extra to install when `kind`'s package is missing (before any work)."""
    if kind == "csv":
        return
    if kind not in PACKAGES:
        raise ValueError(f"--logger {kind!r}: expected one of csv, {', '.join(PACKAGES)}")
    module, extra = PACKAGES[kind]
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"--logger {kind} needs the {module} package, which is not installed: "
                         f"pip install 'diffusion-steer[{extra}]' (or pip install {module})")


@dataclass
class TrackerSpec:
    """Which tracker a run opens, and under what name; `open` makes the `Tracker` once the run owns its folder."""

    kind: LoggerKind = "csv"
    name: str | None = None
    """the run's name in the tool (default: the run folder's name)"""
    group: str | None = None
    """runs that belong together, e.g. one `diffenv compare` (W&B group, MLflow experiment)"""

    def __post_init__(self):
        check_logger(self.kind)

    def open(self, folder: Path, config: dict[str, Any] | None = None) -> Tracker | None:
        if self.kind == "csv":
            return None
        return Tracker(self.kind, Path(folder) / TRACKING, self.name or Path(folder).resolve().name, self.group,
                       config)


class Tracker:
    """One run in TensorBoard, W&B or MLflow, through a TorchRL logger."""

    def __init__(self, kind: str, folder: Path, name: str, group: str | None = None,
                 config: dict[str, Any] | None = None):
        self.kind, self.folder = kind, folder
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "tensorboard":
            from torchrl.record.loggers import TensorboardLogger

            self.logger = TensorboardLogger(exp_name="tensorboard", log_dir=str(folder))
        elif kind == "wandb":
            from torchrl.record.loggers import WandbLogger

            id_file = folder / "wandb_run_id"  # a resumed run (or the next budget of a comparison) continues it
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
            self.logger = WandbLogger(exp_name=name, save_dir=str(folder), id=run_id, group=group,
                                      project=os.environ.get("WANDB_PROJECT", "diffusion-steer"),
                                      log_env_packages=False)
        elif kind == "mlflow":
            from torchrl.record.loggers import MLFlowLogger

            uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(folder / 'mlflow.db').resolve()}"
            self.logger = MLFlowLogger(exp_name=group or name, tracking_uri=uri,
                                       artifact_location=(folder / "artifacts").resolve().as_uri())
            import mlflow

            mlflow.set_tag("mlflow.runName", name)
        else:
            raise ValueError(f"unknown tracker {kind!r}; expected one of {sorted(PACKAGES)}")
        if config:
            self.log_config(config)

    def log_config(self, config: dict[str, Any]) -> None:
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
        if self.kind == "tensorboard":
            self.logger.experiment.add_text("config", "\n".join(f"    {k} = {v}" for k, v in sorted(flat.items())))
        elif self.kind == "wandb":
            self.logger.log_hparams(flat)
        else:  # TorchRL's MLFlowLogger.log_hparams imports omegaconf even for a plain dict
            import mlflow

            mlflow.log_params(flat)

    def log_scalars(self, row: dict[str, Any], step: int) -> None:
        """Every numeric value of `row` (a log.csv row) under its column name, at `step` (images generated)."""
        scalars = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.logger.log_metrics(scalars, step=step)

    def log_image(self, tag: str, image: np.ndarray, tiles: np.ndarray | None = None,
                  captions: list[str] | None = None, *, step: int) -> None:
        """A figure `image` [H, W, 3] uint8 (e.g. a captioned grid); W&B also gets `tiles` [N, h, w, 3] with
        `captions` (one per tile, e.g. the prompts) as its own captioned images."""
        if self.kind == "tensorboard":
            self.logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")
        elif self.kind == "wandb":
            import wandb

            payload = {tag: wandb.Image(image)}
            if tiles is not None and captions is not None:
                payload[f"{tag}_captioned"] = [wandb.Image(t, caption=c) for t, c in zip(tiles, captions)]
            self.logger.log_metrics(payload, step=step)
        else:
            import mlflow

            mlflow.log_image(image, key=tag.replace("/", "_"), step=step)

    def log_png(self, tag: str, path: Path, step: int = 0) -> None:
        """A PNG the run wrote (learning curves, frontier, grids of a comparison)."""
        from PIL import Image

        self.log_image(tag, np.asarray(Image.open(path).convert("RGB")), step=step)

    def log_text(self, tag: str, text: str) -> None:
        if self.kind == "tensorboard":
            self.logger.experiment.add_text(tag, text)
        elif self.kind == "wandb":
            import wandb

            self.logger.experiment.log({tag: wandb.Html(f"<pre>{text}</pre>")})
        else:
            import mlflow

            mlflow.log_text(text, f"{tag}.md")

    def close(self) -> None:
        self.logger.shutdown()
        if self.kind == "mlflow":
            import mlflow

            mlflow.end_run()


__all__ = ["PACKAGES", "TRACKING", "LoggerKind", "Tracker", "TrackerSpec", "check_logger"]
