"""The trainer every algorithm shares: collect → reward → advantages → update, on a budget of images.

It owns what CleanRL repeats per file: rollout collection from the env, minibatching, the optimizer,
gradient sync under `torchrun`, CSV logging, image grids, checkpoints and exact resume; the run folder's
lock, crash-safe writes and checksummed checkpoints live in `agents.runfolder`, the checks of a checkpoint's
fields before a resume in `agents.checkpoint`.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from agents.algos import ALGORITHMS, make_algorithm_config
from agents.checkpoint import CHECKPOINT_FORMAT, check_optimizer, check_resumable
from agents.distributed import init_distributed
from agents.losses import DeviceMeans, gaussian_kl_equal_std, total_loss
from agents.policy import DiffusionPolicy
from agents.rollout import collect_rollout, random_step_subset
from agents.runfolder import CHECKPOINT, GRIDS, LOG, LORA, RunError, RunFolder, non_finite
from agents.tracking import TrackerSpec
from diffenv.paths import check_path
from diffenv.tasks import TASK_REWARD, resolve_reward
from diffenv.validation import DEVICE, SEED, bounds, validate_fields

#: the phases of an epoch `Trainer.phase_times` splits its time into (the env's reward call is inside `rollout`)
PHASES = ("rollout", "prepare", "loss", "backward", "diagnostics")
#: the LoRA of the probe after `images` images, kept with `keep_probe_loras` (for checkpoint selection, §6)
PROBE_LORA = "lora_probe_{images}.safetensors"


@dataclass
class TrainConfig:
    """A training run. Types come from the annotations and ranges from the field metadata
    (`diffenv.validation`); `validate` checks them, the algorithm's options and the budget."""

    algo: str = "grpo"
    """algorithm (agents/algos/NAME.py)"""
    model: str = "digits-eps"
    """the base model: a registered name or 'sd:PATH'-style diffusers spec"""
    reward: Any = TASK_REWARD
    """a reward name or a {name: weight} table (default: the model's task's reward, `diffenv.tasks`)"""
    images: int = field(default=20000, metadata=bounds(ge=1))
    """budget: images generated for training (all ranks together), a multiple of images_per_epoch"""
    out: str = "runs/run"
    """run folder (checkpoint, LoRA, log.csv, grids)"""
    seed: int = field(default=0, metadata=SEED)
    """seed of the LoRA init, rollouts and shuffling"""
    num_steps: int | None = field(default=None, metadata=bounds(ge=1))
    """sampler steps per training rollout (default: the model's, 10 for digits, 20 for shapes)"""
    eval_num_steps: int | None = field(default=None, metadata=bounds(ge=1))
    """sampler steps of the probes and the before/after evaluation, i.e. of the model you deploy (default:
    num_steps). Fewer rollout steps than this trains cheaper (Flow-GRPO's denoising reduction: train 10, eval 40)"""
    guidance_scale: float = field(default=1.0, metadata=bounds(ge=0))
    """CFG weight while training (1.0: the guidance-free model RL is meant to produce)"""
    lora_rank: int = field(default=8, metadata=bounds(ge=1))
    """LoRA rank r (alpha = r)"""
    device: str = field(default="cpu", metadata=DEVICE)
    """torch device: cpu, cuda, cuda:N, mps"""
    grid_every: int = field(default=10, metadata=bounds(ge=0))
    """save an image grid every N epochs (0: never)"""
    eval_images: int = field(default=0, metadata=bounds(ge=0))
    """images for the before/after evaluation with the model's default sampler (0: skip)"""
    progress: bool = True
    """progress bar"""
    model_kwargs: dict = field(default_factory=dict)
    """backend options, e.g. {"prompts": "prompts.txt"} for "sd:PATH" models"""
    kl_samples: int = field(default=4, metadata=bounds(ge=1))
    """images of each epoch whose visited states give the logged KL to the base (two network rows per stochastic
    step each: at 16 they cost 10-30 % of a shapes epoch, benchmarks/train_throughput.py)"""
    probe_every: int = field(default=0, metadata=bounds(ge=0))
    """over-optimisation monitor: every N epochs (and at epoch 1) score a fixed probe set (0: off)"""
    probe_images: int = field(default=200, metadata=bounds(ge=2))
    """probe set size: fixed seed and balanced conditions, the training guidance scale"""
    keep_probe_loras: bool = False
    """keep each probe's LoRA as lora_probe_<images>.safetensors (to select a checkpoint on the probe set)"""
    algo_overrides: dict = field(default_factory=dict)
    """algorithm config fields, e.g. {"lr": 1e-4, "group_size": 4}"""
    conditions: list[int | str] | None = None
    """condition ids or split names to train on (each group's condition drawn uniformly from them;
    evaluation and probes balanced over them) (default: the model's default set)"""

    def validate(self) -> None:
        if self.algo not in ALGORITHMS:
            raise ValueError(f"unknown algo {self.algo!r}; expected one of {sorted(ALGORITHMS)}")
        validate_fields(self)
        self.reward = resolve_reward(self.reward, self.model)  # the checkpoint records the reward by name
        check_path(self.out, "out")
        make_algorithm_config(self.algo, self.algo_overrides)  # bad options fail here, before any work


def check_budget(images: int, images_per_epoch: int, what: str = "images",
                 change: str = "--set images_per_epoch=N") -> None:
    """A run trains whole epochs, so the budget must be a multiple of the epoch (never rounded silently)."""
    if images % images_per_epoch:
        lower, upper = images // images_per_epoch * images_per_epoch, -(-images // images_per_epoch) * images_per_epoch
        suggest = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(f"{what}={images}: expected a multiple of images_per_epoch={images_per_epoch} (a run trains "
                         f"whole epochs), e.g. {suggest}; or change images_per_epoch ({change})")


class Trainer:
    """`tracker`: also send each epoch's log row and grid to TensorBoard / W&B / MLflow (`agents.tracking`),
    from rank 0, while `train` runs."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, tracker: TrackerSpec | None = None):
        cfg.validate()
        self.cfg, self.out = cfg, Path(cfg.out)
        self.tracker_spec, self.tracker = tracker, None
        self.dist = init_distributed(cfg.device)
        self.folder = RunFolder(self.out)
        self._on_main(lambda: self.folder.acquire(resume))  # first: --out usable, and this run its only writer
        try:
            self._setup(cfg, resume)
        except BaseException:
            self.folder.release()
            raise

    def _setup(self, cfg: TrainConfig, resume: bool) -> None:
        checkpoint = self._read_checkpoint(self.out / CHECKPOINT) if resume else None

        self.algo_cfg = make_algorithm_config(cfg.algo, cfg.algo_overrides)
        per_rank, rem = divmod(self.algo_cfg.images_per_epoch, self.dist.world_size)
        if rem or per_rank % self.algo_cfg.group_size:
            raise ValueError(f"images_per_epoch={self.algo_cfg.images_per_epoch} must split into "
                             f"{self.dist.world_size} rank(s) of whole groups of group_size={self.algo_cfg.group_size}")
        check_budget(cfg.images, self.algo_cfg.images_per_epoch)
        torch.manual_seed(cfg.seed)  # the same LoRA init on every rank (and broadcast below, as DDP does)
        self.policy = DiffusionPolicy(cfg.model, num_steps=cfg.num_steps, eta=self.algo_cfg.eta,
                                      noise_level=self.algo_cfg.noise_level, guidance_scale=cfg.guidance_scale,
                                      lora_rank=cfg.lora_rank, device=cfg.device, model_kwargs=cfg.model_kwargs)
        self.algo = ALGORITHMS[cfg.algo](self.policy, self.algo_cfg, self.dist)
        from diffenv import DiffusionSteerVectorEnv

        self.env = DiffusionSteerVectorEnv(
            num_envs=per_rank, action_mode="latent", reward=cfg.reward, group_size=self.algo_cfg.group_size,
            share_noise=self.algo_cfg.share_noise, seed=self.dist.stream_seed(cfg.seed, "env"),
            conditions=cfg.conditions,
            **self.policy.env_kwargs(),
        )
        self.params = self.policy.trainable_parameters()
        self._stochastic_steps = [k for k, std in enumerate(self.policy.sampler.stds.tolist()) if std > 0]
        self.dist.broadcast_(self.params)
        torch.manual_seed(self.dist.stream_seed(cfg.seed, "torch"))
        self.optimizer = torch.optim.AdamW(self.params, lr=self.algo_cfg.lr, weight_decay=self.algo_cfg.weight_decay)
        self.noise_gen = torch.Generator(device=self.policy.device)
        self.noise_gen.manual_seed(self.dist.stream_seed(cfg.seed, "policy_noise"))
        self.shuffle_gen = torch.Generator().manual_seed(self.dist.stream_seed(cfg.seed, "shuffle"))
        self.epoch, self.images_seen, self.nfe_total, self.wall_time = 0, 0, 0, 0.0
        self.log_rows: list[dict[str, float]] = []  # every epoch's row; log.csv is their text
        #: seconds per phase of `PHASES`, summed over epochs, when set to a dict (a profile; None: not measured)
        self.phase_times: dict[str, float] | None = None
        self._saved: tuple[int, tuple] | None = None  # (epoch, stat) of the checkpoint on disk, once there is one
        if checkpoint is not None:
            self._restore(checkpoint)
            self._on_main(lambda: self._write_lora_and_log(resumed=True))

    def _on_main(self, fn) -> None:
        """Run `fn` on rank 0 only; an exception it raises is raised on every rank (none waits for a dead one)."""
        error = None
        if self.dist.is_main:
            try:
                fn()
            except Exception as e:
                error = e
        first = self.dist.gather_objects(error)[0]  # also the barrier after rank 0's writes
        if first is not None:
            raise error if error is not None else first

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self) -> dict[str, float]:
        """One epoch. Host syncs: one per optimizer step (`_check_update`) and one for every diagnostic of
        the epoch together (`DeviceMeans.read`); the loss terms and diagnostics stay on the device until then."""
        start = time.perf_counter()
        self.policy.eval()
        with self._phase("rollout"), self.algo.collect_context():
            rollout = collect_rollout(self.policy, self.env, self.noise_gen)
        with self._phase("prepare"), torch.no_grad():
            if self.algo_cfg.train_fraction < 1:
                rollout["train_steps"] = random_step_subset(self._eligible_steps(rollout),
                                                            self.algo_cfg.train_fraction, self.shuffle_gen)
            self.algo.begin_epoch(self.images_seen)
            items = self.algo.prepare(rollout)
        diag = DeviceMeans()
        minibatch = 0
        for _ in range(self.algo_cfg.inner_epochs):
            perm = torch.randperm(len(items), generator=self.shuffle_gen).to(items.device)
            for lo in range(0, len(items), self.algo_cfg.minibatch_size):
                with self._phase("loss"):
                    terms = self.algo.loss(items[perm[lo:lo + self.algo_cfg.minibatch_size]])
                    loss = total_loss(terms)
                with self._phase("backward"):
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.dist.average_gradients(self.params)
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.algo_cfg.max_grad_norm)
                    minibatch += 1
                    self._check_update(loss, grad_norm, minibatch)
                    self.optimizer.step()
                    self.algo.after_update()
                diag.add({"loss": loss, **terms, "grad_norm": grad_norm})
        self._check_state(f"during epoch {self.epoch + 1}")
        rewards = self.dist.all_gather(rollout["rewards"])
        elapsed = time.perf_counter() - start  # training time: the KL-to-base diagnostic is not in it
        with self._phase("diagnostics"):
            diag.add({"reward_mean": rewards.mean(), "reward_std": rewards.std(),
                      "kl_to_base": self.kl_to_base(rollout, self.cfg.kl_samples)})
            means = diag.read()
        self._check_outputs(means["kl_to_base"])
        n_images = len(rewards)
        self.epoch += 1
        self.images_seen += n_images
        self.nfe_total += n_images * self.policy.num_steps * self.env.nfe_per_step
        self.wall_time += elapsed
        row = {"epoch": self.epoch, "images_seen": self.images_seen, "reward_mean": means.pop("reward_mean"),
               "reward_std": means.pop("reward_std"), "kl_to_base": means.pop("kl_to_base"),
               "nfe_total": self.nfe_total, "wall_time_s": round(self.wall_time, 3)}
        row.update(means)
        self._last_images, self._last_conditions = rollout["final_images"], rollout["conditions"]
        return row

    def _eligible_steps(self, rollout) -> torch.Tensor:
        """bool [B, K]: the steps the algorithm can train on (`Algorithm.visited_states`)."""
        stds = rollout["stds"]
        return stds > 0 if self.algo.visited_states == "stochastic" else torch.ones_like(stds, dtype=torch.bool)

    @contextlib.contextmanager
    def _phase(self, name: str):
        """Add the block's time to `phase_times[name]` when profiling (synchronising the device at both ends, so
        asynchronous GPU work lands in its own phase); nothing at all otherwise."""
        if self.phase_times is None:
            yield
            return
        sync = torch.cuda.synchronize if self.policy.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.phase_times[name] = self.phase_times.get(name, 0.0) + time.perf_counter() - t0

    def _check_update(self, loss: torch.Tensor, grad_norm: torch.Tensor, minibatch: int) -> None:
        """Stop before a NaN/inf loss or gradient reaches the weights (one sync; every rank agrees)."""
        status = self.dist.all_gather(torch.stack([loss.detach().float(), grad_norm.detach().float()]).view(1, 2))
        if bool(torch.isfinite(status).all()):
            return
        rank, col = (~torch.isfinite(status)).nonzero()[0].tolist()
        value = status[rank, col].item()
        kind = "NaN" if math.isnan(value) else f"{value:g}"
        where = f"epoch {self.epoch + 1}, minibatch {minibatch}" + (f", rank {rank}" if self.dist.active else "")
        raise RunError(f"{('loss', 'gradient norm')[col]} became {kind} at {where}; {self._intact()}")

    def _check_state(self, when: str) -> None:
        """Stop when LoRA weights or optimizer/algorithm state hold NaN/inf (never checkpoint them)."""
        weights = {n: p for n, p in self.policy.denoiser.named_parameters() if p.requires_grad}
        bad = non_finite({"LoRA weights": weights, "optimizer state": self.optimizer.state_dict()["state"],
                          "algorithm state": self.algo.state_dict()})  # the same on every rank
        if bad:
            raise RunError(f"NaN/inf in {', '.join(bad[:3])}{' …' if len(bad) > 3 else ''} {when}; {self._intact()}")

    def _check_outputs(self, kl_to_base: float) -> None:
        """Stop when the updated weights, finite as they are, make the policy's outputs NaN/inf (a step too large:
        `lr=1e5` gave LoRA weights of 1.7e5): KL-to-base is the updated policy on this epoch's states, and the
        next rollout, or a resume from a checkpoint of these weights, would fail on the same NaN."""
        bad = [(rank, v) for rank, v in enumerate(self.dist.gather_objects(kl_to_base)) if not math.isfinite(v)]
        if bad:  # (each rank's own states: every rank stops when one does)
            rank, value = bad[0]
            where = f"epoch {self.epoch + 1}" + (f", rank {rank}" if self.dist.active else "")
            raise RunError(f"the policy's output (kl_to_base) became {'NaN' if math.isnan(value) else f'{value:g}'} "
                           f"at {where}, after its optimizer steps (lr={self.algo_cfg.lr:g} too large?); "
                           f"{self._intact()}")

    def _intact(self) -> str:
        if self._saved is None:
            return f"no checkpoint was written to {self.out} yet"
        return f"the last good checkpoint ({self.out / CHECKPOINT}, epoch {self._saved[0]}) is intact"

    @torch.no_grad()
    def kl_to_base(self, rollout, n: int = 16) -> torch.Tensor:
        """Mean over stochastic steps of KL(π_θ ‖ π_base) per transition, on the first n samples' visited
        states: a 0-d tensor on the device (read with the epoch's other diagnostics). Every (sample, step) state
        goes through one batched call of each network: per-step calls of n rows cost ~4x more on shapes."""
        if not self._stochastic_steps:
            return torch.zeros((), device=rollout["latents"].device)
        lat, c = rollout["latents"][:n], rollout["conditions"][:n]
        steps = torch.tensor(self._stochastic_steps, device=lat.device)
        x = lat[:, steps].flatten(0, 1)  # [n·S, C, H, W], sample-major
        idx, cond = steps.repeat(len(c)), c.repeat_interleave(len(steps))
        mean, std = self.policy.distribution(x, idx, cond)
        ref, _ = self.policy.distribution(x, idx, cond, reference=True)
        return gaussian_kl_equal_std(mean, ref, std).view(len(c), len(steps)).mean()

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict[str, float]]:
        """Train until the budget; the run folder's lock is held until this returns or raises."""
        self._on_main(self._relock)
        rows = []
        bar = tqdm(total=self.cfg.images, initial=min(self.images_seen, self.cfg.images), unit="img",
                   desc=f"{self.cfg.algo}", disable=not (self.cfg.progress and self.dist.is_main))
        try:
            if self.tracker_spec is not None:
                self._on_main(lambda: setattr(self, "tracker", self.tracker_spec.open(self.out, asdict(self.cfg))))
            while self.images_seen < self.cfg.images:
                row = self.train_epoch()
                if self.cfg.probe_every and (self.epoch == 1 or self.epoch % self.cfg.probe_every == 0):
                    row.update(self.probe())
                rows.append(row)
                self.log_rows.append(row)
                bar.update(min(row["images_seen"], self.cfg.images) - bar.n)
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl_to_base']:.2f}")
                self.save_checkpoint()
        finally:
            bar.close()
            if self.tracker is not None:
                self.tracker.close()
                self.tracker = None
            self.folder.release()
        return rows

    @torch.no_grad()
    def evaluate(self, n: int, seed: int = 12345, batch_size: int = 256, condition_repeats: int | None = None):
        """Mean reward of the current (adapted) model, fixed seeds, with the model's *default* sampler
        (not the algorithm's rollout sampler, e.g. a churn set by hand for FDFO), so algorithms compare fairly."""
        from diffenv.sampling import generate

        result = generate(n, batch_size=batch_size, seed=seed, reward=self.cfg.reward, model=self.policy.backend,
                          num_steps=self.cfg.eval_num_steps or self.policy.num_steps,
                          guidance_scale=self.cfg.guidance_scale,
                          device=self.policy.device, condition_set=self.cfg.conditions,
                          condition_repeats=condition_repeats,
                          progress=self.cfg.progress and self.dist.is_main and n > batch_size)
        return {"reward_mean": result.rewards.mean().item(), "reward_std": result.rewards.std().item(),
                "result": result}

    def probe(self) -> dict[str, float]:
        """Reward, and where the model's task has them (`diffenv.tasks.task_metrics`: digits, shapes) the held-out
        judge and diversity, on the fixed probe set."""
        from diffenv.metrics import PROBE_BATCH, PROBE_REPEATS, PROBE_SEED
        from diffenv.tasks import task_metrics

        result = self.evaluate(self.cfg.probe_images, seed=PROBE_SEED, batch_size=PROBE_BATCH,
                               condition_repeats=PROBE_REPEATS)["result"]
        row = {"probe_reward": result.rewards.mean().item()}
        metrics = task_metrics(getattr(self.policy.backend, "name", ""))
        if metrics is not None:
            row.update({f"probe_{k}": v for k, v in metrics(result.images, result.conditions).items()})
        return row

    def probe_decline(self, tolerance: float = 0.02) -> str | None:
        """A one-line notice when the last probe scores more than `tolerance` below the run's best probe (the
        judge accuracy where the model's task has one, else the probe reward), naming where the best one was and
        its LoRA if kept; None otherwise. Training longer can give a worse model (over-optimisation, drift): the
        user is told instead of silently getting the last LoRA."""
        probed = [r for r in self.log_rows if "probe_reward" in r]
        if len(probed) < 2:
            return None
        key = "probe_judge_accuracy" if "probe_judge_accuracy" in probed[-1] else "probe_reward"
        best, last = max(probed, key=lambda r: r[key]), probed[-1]
        if last[key] >= best[key] - tolerance:
            return None
        kept = self.out / PROBE_LORA.format(images=best["images_seen"])
        where = f"; its LoRA: {kept}" if kept.is_file() else " (keep_probe_loras keeps each probe's LoRA)"
        return (f"the validation probe's {key} peaked at {best[key]:.3f} after {best['images_seen']} images and is "
                f"{last[key]:.3f} after {last['images_seen']}: the final LoRA is not the run's best{where}")

    # ------------------------------------------------------------------ persistence
    def _rng_state(self) -> dict[str, torch.Tensor]:
        return {"torch": torch.get_rng_state(), "noise_gen": self.noise_gen.get_state(),
                "shuffle_gen": self.shuffle_gen.get_state(), "env_gen": self.env.generator.get_state()}

    def save_checkpoint(self) -> None:
        """Grid, then checkpoint, then LoRA, then log row, each written whole or not at all: after a kill at
        any point the folder resumes exactly (see `agents.runfolder`)."""
        rng = self.dist.gather_objects(self._rng_state())
        self._on_main(lambda: self._write_epoch(rng))

    def _write_epoch(self, rng: list[dict[str, torch.Tensor]]) -> None:
        from diffenv.models.lora import lora_state_dict

        grid = None
        if self.cfg.grid_every and self.epoch % self.cfg.grid_every == 0:
            grid = self._grid()
            self.folder.write_atomic(f"{GRIDS}/epoch_{self.epoch:05d}.png", _png(grid[0]), "image grid",
                                     self._intact())
        state = {
            "format": CHECKPOINT_FORMAT,
            "train_config": {k: v for k, v in asdict(self.cfg).items()},
            "algo_config": asdict(self.algo_cfg),
            "world_size": self.dist.world_size,
            "epoch": self.epoch, "images_seen": self.images_seen, "nfe_total": self.nfe_total,
            "wall_time": self.wall_time,
            "lora": lora_state_dict(self.policy.denoiser),
            "optimizer": self.optimizer.state_dict(),
            "algo_state": self.algo.state_dict(),
            "rng": rng,
            "log": self.log_rows,
        }
        self.folder.write_checkpoint(state, self._intact())
        self._saved = (self.epoch, _stat(self.out / CHECKPOINT))
        self._write_lora_and_log()
        if self.tracker is not None:  # after log.csv: a tracker never shows an epoch the run folder lacks
            self.tracker.log_scalars(self.log_rows[-1], step=self.images_seen)
            if grid is not None:
                self.tracker.log_image("grid", *grid, step=self.images_seen)

    def _grid(self) -> tuple:
        """The epoch's first 64 images as a `grid_figure` (prompts under them on a text-to-image model), its tiles
        and their captions."""
        from diffenv.viz import grid_figure

        images, backend = self._last_images[:64].float().cpu(), self.policy.backend
        captions = ([backend.condition_names[c] for c in self._last_conditions[:64].tolist()]
                    if backend.text_conditioned else None)
        tiles = (images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images).permute(0, 2, 3, 1)
        return grid_figure(images, captions=captions), (tiles * 255).round().byte().numpy(), captions

    def _write_lora_and_log(self, resumed: bool = False) -> None:
        """LoRA (and the probe's LoRA, if kept) and log.csv to the checkpoint's epoch (on resume: a kill may have
        left them one epoch behind)."""
        written = f"checkpoint.pt (epoch {self.epoch}) is written; --resume restores the LoRA and log from it"
        lora = self.policy.lora_file_bytes()
        self.folder.write_atomic(LORA, lora, "LoRA", written)
        if self.cfg.keep_probe_loras and self.log_rows and "probe_reward" in self.log_rows[-1]:
            self.folder.write_atomic(PROBE_LORA.format(images=self.images_seen), lora, "probe LoRA", written)
        (self.folder.repair_log if resumed else self.folder.append_log)(self.log_rows, written)

    def _relock(self) -> None:
        """Take the folder again for a second `train()` call, if no other run has written to it meanwhile."""
        if self.folder.locked:
            return
        self.folder.acquire(resume=self._saved is not None)
        if self._saved is not None and _stat(self.out / CHECKPOINT) != self._saved[1]:
            self.folder.release()
            raise RunError(f"{self.out / CHECKPOINT} changed since this trainer wrote it (epoch {self._saved[0]}): "
                           "another run used the folder; continue with a new Trainer(..., resume=True)")

    def _read_checkpoint(self, path: Path) -> dict:
        state = self.folder.read_checkpoint()  # checksum verified
        check_resumable(state, path, asdict(self.cfg), make_algorithm_config(self.cfg.algo, self.cfg.algo_overrides),
                        self.dist.world_size)
        return state

    def _restore(self, state: dict) -> None:
        from diffenv.models.lora import set_lora_state

        path = self.out / CHECKPOINT
        set_lora_state(self.policy.denoiser, state["lora"], f"checkpoint {path}")
        check_optimizer(state, path, self.params)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            for group in self.optimizer.param_groups:
                group["lr"] = self.algo_cfg.lr  # (lr may change on resume: RESUME_MAY_CHANGE_ALGO)
            self.algo.load_state_dict(state["algo_state"])
            rng = state["rng"][self.dist.rank]
            torch.set_rng_state(rng["torch"])
            self.noise_gen.set_state(rng["noise_gen"])
            self.shuffle_gen.set_state(rng["shuffle_gen"])
            self.env.generator.set_state(rng["env_gen"])
        except (KeyError, IndexError, TypeError, RuntimeError) as e:  # a crafted or foreign checkpoint
            raise ValueError(f"checkpoint {path} does not fit this trainer: {type(e).__name__}: {e}") from e
        self.epoch, self.images_seen = state["epoch"], state["images_seen"]
        self.nfe_total, self.wall_time = state["nfe_total"], state["wall_time"]
        self.log_rows = list(state["log"])
        self._saved = (self.epoch, _stat(path))


def _stat(path: Path) -> tuple:
    s = path.stat()
    return s.st_ino, s.st_size, s.st_mtime_ns


def _png(picture) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["CHECKPOINT", "LOG", "LORA", "PHASES", "PROBE_LORA", "RunError", "TrainConfig", "Trainer"]
