"""Learners: how `diffenv compare` trains one run of a task through its budgets. Every algorithm of
`agents.algos.ALGORITHMS` trains through the shared trainer (`TrainerLearner`); a generic RL library's learner
(Stable-Baselines3's PPO, `SB3PPOLearner`) is one more entry of the same interface. A learner writes
`lora_<budget>.safetensors` at each budget and `log.csv` into its run folder, under the folder's lock, and resumes
from what the folder holds; compare then evaluates every learner's LoRAs alike.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from agents.algos import ALGORITHMS, make_algorithm_config
from agents.runfolder import RunFolder
from rewards.registry import Registry

SB3_PPO_DEFAULTS = dict(num_envs=32, n_epochs=2, batch_size=48, lr=1e-3, lora_rank=8, chunk_images=256)
SB3_STATE = "sb3_ppo.safetensors"  # the SB3 run's weights-only training state (agents.integrations.sb3.save_training_state)


@contextmanager
def locked(run: Path):
    """The run folder `run`, locked (`agents.runfolder.RunFolder.lock`) while the block writes to it."""
    folder = RunFolder(run)
    folder.lock()
    try:
        yield folder
    finally:
        folder.release()


class Learner:
    """One way to train a comparison run. `images_per_epoch(options)` checks a task's `[algo_overrides.NAME]`
    table (a ValueError naming a bad option) and returns the images per epoch the budgets must be multiples of
    (None: any budget); `train(cmp, task, seed, run)` trains the run through `task.budgets`."""

    name: str

    def images_per_epoch(self, options: dict[str, Any]) -> int | None:
        raise NotImplementedError

    def train(self, cmp, task, seed: int, run: Path) -> None:
        raise NotImplementedError


class TrainerLearner(Learner):
    """An algorithm of `agents.algos` trained by `agents.trainer.Trainer`, with its validation probes."""

    def __init__(self, algo: str):
        self.name = algo

    def images_per_epoch(self, options):
        return make_algorithm_config(self.name, options).images_per_epoch

    def train(self, cmp, task, seed, run):
        """Train one run through every budget, keeping a LoRA snapshot at each (resumable)."""
        from agents.trainer import CHECKPOINT, LORA, TrainConfig, Trainer

        for budget in sorted(task.budgets):
            snap = run / f"lora_{budget}.safetensors"
            if snap.is_file():
                continue
            cmp.bar.set_postfix_str(f"training {self.name} seed{seed} to {budget} images")
            cfg = TrainConfig(algo=self.name, model=task.model, reward=task.reward, images=budget, out=str(run),
                              seed=seed, num_steps=task.train_num_steps or task.num_steps,
                              eval_num_steps=task.num_steps, grid_every=0, progress=cmp.progress,
                              probe_every=task.probe_every, probe_images=task.probe_images, keep_probe_loras=True,
                              algo_overrides=dict(task.algo_overrides.get(self.name, {})))
            tracker = replace(cmp.tracker, name=f"{task.name}/{self.name}/seed{seed}")
            Trainer(cfg, resume=(run / CHECKPOINT).is_file(), tracker=tracker).train()
            with locked(run) as folder:
                folder.copy_atomic(LORA, snap.name, "LoRA snapshot")


class SB3PPOLearner(Learner):
    name = "sb3_ppo"

    def images_per_epoch(self, options):
        bad = sorted(set(options) - set(SB3_PPO_DEFAULTS))
        if bad:
            raise ValueError(f"unknown sb3_ppo option(s) {bad}; expected some of {sorted(SB3_PPO_DEFAULTS)}")
        return None

    def train(self, cmp, task, seed: int, run: Path) -> None:
        """Stable-Baselines3's own PPO fine-tuning the LoRA through `DiffusionActorCriticPolicy` (latent mode).

        The run resumes from `sb3_ppo.safetensors` (weights, optimizer state, counters: no pickle), never
        from an SB3 `.zip`, whose loading unpickles whatever the run folder holds.
        """
        if all((run / f"lora_{b}.safetensors").is_file() for b in task.budgets):
            return
        if (run / "ppo.zip").exists() and not (run / SB3_STATE).is_file():
            raise ValueError(f"{run / 'ppo.zip'} is a Stable-Baselines3 pickle (from an older diffenv compare) and is "
                             f"never loaded: unpickling a file can run code. Delete {run} to train this run again "
                             f"(its state is now kept in {SB3_STATE})")
        with locked(run) as folder:  # one writer, as the trainer's runs: two compares on one --out would both train
            self._train(cmp, task, seed, folder)

    def _train(self, cmp, task, seed: int, folder: RunFolder) -> None:
        from stable_baselines3 import PPO
        from stable_baselines3.common.logger import Logger

        from agents.integrations.sb3 import (DiffusionActorCriticPolicy, DiffusionSteerSB3VecEnv, load_training_state,
                                save_training_state)

        opts = {**SB3_PPO_DEFAULTS, **task.algo_overrides.get("sb3_ppo", {})}
        run = folder.path
        k, state = task.num_steps, run / SB3_STATE
        venv = DiffusionSteerSB3VecEnv(opts["num_envs"], seed=seed, model=task.model, reward=task.reward,
                                       num_steps=k, action_mode="latent")
        model = PPO(DiffusionActorCriticPolicy, venv, n_steps=k, batch_size=opts["batch_size"],
                    n_epochs=opts["n_epochs"], learning_rate=opts["lr"], gamma=1.0, gae_lambda=0.95,
                    max_grad_norm=1.0, seed=seed, device="cpu",
                    policy_kwargs={"diffusion_kwargs": dict(model=task.model, num_steps=k,
                                                            lora_rank=opts["lora_rank"])})
        # the run's own log.csv below is the record; SB3's default logger would make an empty folder in the temp
        # directory on every `learn` call (one per chunk)
        model.set_logger(Logger(folder=None, output_formats=[]))
        if state.is_file():
            load_training_state(model, state)
        start = time.perf_counter()
        bar = tqdm(total=max(task.budgets), initial=model.num_timesteps // k, unit="img", desc="sb3_ppo",
                   disable=not cmp.progress)
        for budget in sorted(task.budgets):
            snap = f"lora_{budget}.safetensors"
            if (run / snap).is_file():  # (a resumed state may be past this budget: never overwrite its snapshot)
                continue
            cmp.bar.set_postfix_str(f"training sb3_ppo seed{seed} to {budget} images")
            while model.num_timesteps // k < budget:
                chunk = min(opts["chunk_images"], budget - model.num_timesteps // k)
                model.learn(chunk * k, reset_num_timesteps=False)
                episodes = model.rollout_buffer.rewards.size / k  # terminal rewards only
                row = {"epoch": model._n_updates, "images_seen": model.num_timesteps // k,
                       "reward_mean": float(model.rollout_buffer.rewards.sum() / episodes),
                       "wall_time_s": round(time.perf_counter() - start, 3)}
                folder.append_log([row], f"{state} holds the last finished budget")
                bar.update(row["images_seen"] - bar.n)
            save_training_state(model, state)
            folder.write_atomic(snap, model.policy.diffusion.lora_file_bytes(), "LoRA snapshot", f"{state} is written")
        bar.close()


#: learners by name, beyond the algorithms (each algorithm is its own `TrainerLearner`); a package of your own adds
#: one with `LEARNERS.register(name, learner)` or the entry-point group `diffusion_steer.learners`
LEARNERS = Registry("learner")
LEARNERS.register(SB3PPOLearner.name, SB3PPOLearner())


def learner_names() -> list[str]:
    return sorted(ALGORITHMS) + [n for n in LEARNERS.names() if n not in ALGORITHMS]


def learner(name: str) -> Learner:
    """The learner that trains `name`: an algorithm's `TrainerLearner`, else a registered learner."""
    if name in ALGORITHMS:
        return TrainerLearner(name)
    if name in LEARNERS:
        return LEARNERS.get(name)
    raise ValueError(f"unknown learner {name!r}; expected one of {learner_names()}")
