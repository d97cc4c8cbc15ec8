"""`diffenv compare`: the RL-vs-CFG benchmark (docs/design.md §6), configured by a TOML file, resumable.

For each task (model × reward × steps) it evaluates, with one protocol, the same eval seeds and
balanced conditions (`agents.benchmark.evaluation`):
- baselines on the base model: a CFG sweep over guidance scales and best-of-N (N candidates at
  guidance 1, the best by the reward: N·K NFE, NFE-matched to CFG at N = 2);
- each diffusion-RL algorithm, trained for each budget of *images generated* × seeds (snapshots
  along one run per seed), sampled guidance-free (1 NFE per step);
- learning curves on the validation probe set (the trainer's probes, with CFG's sweep on the same set as the
  reference) and, per run, the checkpoint selected on them (`agents.benchmark.curves`), evaluated once on the
  test (eval) set;
and writes `results.csv`, `results.md`, `reward_vs_images.png`, `frontier.png`, `curves_<task>.png`,
`grids_<task>.png`.
Every finished entry is cached under `cache/` and every run checkpoints, so an interrupted comparison
continues where it stopped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from agents.algos import ALGORITHMS
from agents.benchmark import timing
from agents.benchmark.curves import probe_curve, select_checkpoint
from agents.benchmark.evaluation import (CANDIDATE_SEED_STRIDE, EVAL_BATCH, entry_metrics, eval_best_of_n, eval_model,
                                         eval_probe)
from agents.benchmark.learners import learner, learner_names
from agents.benchmark.report import BASE_ENTRY, read_log, write_outputs
from agents.tracking import TrackerSpec
from agents.trainer import check_budget
from diffenv.metrics import PROBE_BATCH, PROBE_SEED
from diffenv.paths import check_path, safe_name
from diffenv.tasks import TASK_REWARD, resolve_reward, task_protocol
from diffenv.validation import SEED, bounds, validate_fields

QUICK = dict(eval_images=100, budgets=[64], seeds=[0], cfg_scales=[1.0, 3.0], best_of_n=[2], probe_images=50)


@dataclass
class Task:
    """One task of a comparison; types and ranges are checked by `diffenv.validation` (field metadata)."""

    name: str
    model: str = "digits-eps"
    reward: Any = TASK_REWARD
    """a reward name or a {name: weight} table (default: the model's task's reward, `diffenv.tasks`)"""
    num_steps: int = field(default=10, metadata=bounds(ge=1))
    """sampler steps of every evaluated entry (and of the RL probes)"""
    train_num_steps: int | None = field(default=None, metadata=bounds(ge=1))
    """sampler steps of the RL rollouts (None: num_steps); fewer trains cheaper, the model is evaluated at num_steps"""
    sampler: str | None = None
    """evaluation sampler for every entry (None: the model's default)"""
    cfg_scales: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0, 4.0, 6.0], metadata=bounds(ge=0))
    best_of_n: list[int] = field(default_factory=lambda: [2, 4], metadata=bounds(ge=2))
    algos: list[str] = field(default_factory=lambda: sorted(ALGORITHMS))
    budgets: list[int] = field(default_factory=lambda: [1024, 4096, 16384], metadata=bounds(ge=1))
    """images per run at which a snapshot is evaluated: multiples of each algorithm's images_per_epoch"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata=SEED)
    eval_images: int = field(default=1000, metadata=bounds(ge=2))
    eval_seed: int = field(default=0, metadata=SEED)
    eval_conditions: str | list[int | str] | None = None
    """condition ids or split names every entry is evaluated on, balanced (None: the model's default set)"""
    probe_every: int = field(default=5, metadata=bounds(ge=0))
    """probe (validation) cadence in epochs: each probe is a point of the learning curve and a checkpoint
    candidate (0: no curves and no selected checkpoint)"""
    probe_images: int = field(default=200, metadata=bounds(ge=2))
    """validation probe set size (seed 999; the test set is the eval set)"""
    algo_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self) -> None:
        safe_name(self.name, "task name")  # names runs/<name>/, cache entries and grids_<name>.png
        known = learner_names()
        bad = [a for a in self.algos if a not in known]
        if bad:
            raise ValueError(f"task {self.name!r}: unknown algos {bad}; expected some of {known}")
        bad = [s for s in self.seeds if isinstance(s, bool) or not isinstance(s, int)]
        if bad:  # a seed names its run folder seed<seed>
            raise ValueError(f"task {self.name!r}: seeds {bad} are not ints; expected a list of ints")
        try:
            validate_fields(self)
            self.reward = resolve_reward(self.reward, self.model)
            unknown = sorted(set(self.algo_overrides) - set(known))
            if unknown:
                raise ValueError(f"algo_overrides names unknown algorithms {unknown}; expected some of {known}")
            for algo, options in self.algo_overrides.items():
                if not isinstance(options, dict):
                    raise TypeError(f"algo_overrides.{algo}={options!r}: expected a table of options, e.g. "
                                    f"[algo_overrides.{algo}] lr = 1e-3")
            for algo in sorted(set(self.algos) | set(self.algo_overrides)):  # bad options and budgets fail first
                epoch = learner(algo).images_per_epoch(self.algo_overrides.get(algo, {}))
                for budget in self.budgets if algo in self.algos and epoch is not None else ():
                    check_budget(budget, epoch, f"{algo} budget", f"[algo_overrides.{algo}] images_per_epoch = N")
            self._check_test_seeds()
        except (TypeError, ValueError) as e:
            raise type(e)(f"task {self.name!r}: {e}") from None

    def _check_test_seeds(self) -> None:
        """The test set (eval set, best-of-N candidates) must share no noise seed with the validation probe set."""
        def seeds(start, n, batch):
            return set(range(start, start + math.ceil(n / min(batch, n))))

        probe = seeds(PROBE_SEED, self.probe_images, PROBE_BATCH)
        starts = [self.eval_seed + CANDIDATE_SEED_STRIDE * j for j in range(max(self.best_of_n, default=0) + 1)]
        shared = sorted(probe & set().union(*(seeds(s, self.eval_images, EVAL_BATCH) for s in starts)))
        if shared:
            raise ValueError(f"eval_seed={self.eval_seed}: the test set's noise seeds include {shared}, which the "
                             f"validation probe set (seed {PROBE_SEED}) uses; expected an eval_seed whose test "
                             "batches avoid them (e.g. the default 0)")


def load_tasks(path: str | Path, quick: bool = False, names: list[str] | None = None,
               seeds: list[int] | None = None) -> list[Task]:
    """Tasks from a TOML file: top-level keys are defaults, each `[[task]]` table a task (only `names`, if given;
    only the training `seeds` of each, if given: several processes sharing one `--out` can then split the seeds,
    and a last call with all of them reassembles the report from the per-entry cache)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"comparison config {path} does not exist")
    try:
        data = tomllib.loads(path.read_bytes().decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"comparison config {path} is not valid TOML ({e}); expected defaults and [[task]] "
                         "tables, e.g. examples/compare.toml") from None
    known = {f.name for f in fields(Task)}
    defaults = {k: v for k, v in data.items() if k != "task"}
    tasks = []
    for raw in data.get("task", []):
        spec = {**defaults, **raw}
        # a task's [task.algo_overrides.<algo>] keys update the top-level ones of that algorithm (not replace them);
        # anything but tables of tables is left as written, for `Task.validate` to name
        shared, own = defaults.get("algo_overrides", {}), raw.get("algo_overrides", {})
        if all(isinstance(o, dict) and all(isinstance(v, dict) for v in o.values()) for o in (shared, own)):
            spec["algo_overrides"] = {a: {**shared.get(a, {}), **own.get(a, {})} for a in {*shared, *own}}
        bad = sorted(set(spec) - known)
        if bad:
            raise ValueError(f"{path}: unknown task keys {bad}; expected some of {sorted(known)}")
        if quick:
            spec.update(QUICK)
        task = Task(**spec)
        task.validate()
        tasks.append(task)
    if not tasks:
        raise ValueError(f"{path} defines no [[task]] tables")
    selected, names = names, [t.name for t in tasks]
    if len(set(names)) < len(names):  # they would share run folders and cached entries
        raise ValueError(f"{path}: task names {names} repeat; expected a distinct name per [[task]]")
    if selected is not None:
        unknown = sorted(set(selected) - set(names))
        if unknown:
            raise ValueError(f"{path}: no [[task]] named {unknown}; expected some of {names}")
        tasks = [t for t in tasks if t.name in selected]
    if seeds is not None:
        for t in tasks:
            missing = sorted(set(seeds) - set(t.seeds))
            if missing:
                raise ValueError(f"{path}: task {t.name!r} has no training seeds {missing}; expected some of {t.seeds}")
            t.seeds = [s for s in t.seeds if s in seeds]
    return tasks


# ---------------------------------------------------------------------- the runner
class Comparison:
    """`tracker`: each trainer run is also a tracked run named TASK/ALGO/seedN, and the figures and results.md go
    to one more, named after `--out` (`agents.tracking`; SB3's PPO runs keep their log.csv only)."""

    def __init__(self, tasks: list[Task], out: str | Path, progress: bool = True, tracker: TrackerSpec | None = None):
        for task in tasks:
            task.validate()
        self.tasks, self.out, self.progress = tasks, check_path(out, "out"), progress
        self.tracker = tracker or TrackerSpec()
        self.bar = tqdm(disable=True)  # the current task's bar over its entries (see `run`)
        (self.out / "cache").mkdir(parents=True, exist_ok=True)

    def _cached(self, key: str, compute) -> dict:
        path = self.out / "cache" / (key.replace("/", "__") + ".json")
        self.bar.set_postfix_str(key.split("/", 1)[-1])
        if path.is_file():
            self.bar.update()
            return json.loads(path.read_text())
        row = compute()
        self.bar.update()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(row))
        tmp.replace(path)
        return row

    def baseline_rows(self, task: Task) -> list[dict]:
        rows = []
        for w in task.cfg_scales:
            row = self._cached(f"{task.name}/cfg_{w:g}", lambda: entry_metrics(eval_model(task, task.model, w), task))
            rows.append({"task": task.name, "entry": f"cfg w={w:g}", "kind": "cfg", "guidance_scale": w, **row})
        for n in task.best_of_n:
            row = self._cached(f"{task.name}/bon_{n}", lambda: entry_metrics(eval_best_of_n(task, n), task))
            rows.append({"task": task.name, "entry": f"best-of-{n}", "kind": "best_of_n", "guidance_scale": 1.0,
                         "best_of_n": n, **row})
        return rows

    def probe_reference_rows(self, task: Task) -> list[dict]:
        """CFG over `cfg_scales` on the validation probe set (the trainer's probe protocol): the curves' reference."""
        if not has_curves(task):
            return []
        rows = []
        for w in task.cfg_scales:
            row = self._cached(f"{task.name}/probe_cfg_{w:g}",
                               lambda: entry_metrics(eval_probe(task, task.model, w), task))
            rows.append({"task": task.name, "entry": f"cfg w={w:g}", "kind": "cfg_probe", "guidance_scale": w, **row})
        return rows

    def run_dir(self, task: Task, algo: str, seed: int) -> Path:
        return self.out / "runs" / safe_name(task.name, "task name") / safe_name(algo, "algo") / f"seed{int(seed)}"

    def train(self, task: Task, algo: str, seed: int) -> None:
        """Train one run of `algo` through every budget, keeping a LoRA snapshot at each (resumable)."""
        learner(algo).train(self, task, seed, self.run_dir(task, algo, seed))

    def rl_rows(self, task: Task) -> list[dict]:
        from diffenv.models import load_tuned_backend

        rows = []
        for algo in task.algos:
            for seed in task.seeds:
                self.train(task, algo, seed)
                run = self.run_dir(task, algo, seed)
                flag = overoptimisation_flag(run / "log.csv")
                train_log = read_log(run / "log.csv")
                for budget in sorted(task.budgets):
                    def compute():
                        # merged: the deployment cost, no adapter matmuls at sampling time
                        backend = load_tuned_backend(task.model, run / f"lora_{budget}.safetensors")
                        return entry_metrics(eval_model(task, backend, 1.0), task)

                    row = self._cached(f"{task.name}/{algo}/s{seed}/b{budget}", compute)
                    rows.append(run_row(task, algo, seed, f"{algo} @{budget}", "rl", budget, train_log, flag, row))
                rows += self.selected_rows(task, algo, seed, train_log, flag)
        return rows

    def selected_rows(self, task: Task, algo: str, seed: int, train_log: list[dict], flag: str) -> list[dict]:
        """The run's reported model: the checkpoint `curves.select_checkpoint` picks from the validation probe rows
        alone (those whose LoRA was kept), then evaluated once on the test set. None for a run without probes."""
        from agents.trainer import PROBE_LORA
        from diffenv.models import load_tuned_backend

        protocol, run = task_protocol(task.model), self.run_dir(task, algo, seed)
        if protocol is None:
            return []
        curve = [p for p in probe_curve(train_log, "probe_judge_accuracy", f"probe_{protocol.diversity}")
                 if (run / PROBE_LORA.format(images=int(p.images))).is_file()]
        if not curve:
            return []
        images = int(select_checkpoint(curve, protocol.diversity_lower_is_better).images)

        def compute():
            backend = load_tuned_backend(task.model, run / PROBE_LORA.format(images=images))
            return entry_metrics(eval_model(task, backend, 1.0), task)

        row = self._cached(f"{task.name}/{algo}/s{seed}/selected_{images}", compute)
        return [run_row(task, algo, seed, f"{algo} selected", "selected", images, train_log, flag, row)]

    def time_entries(self, task: Task, rows: list[dict]) -> None:
        """Every entry's `ms_per_image` and `time_vs_base` from one interleaved timing pass (`agents.benchmark.timing`:
        the evaluations' own wall times come from different moments of a busy machine). Cached as one set."""
        from agents.trainer import PROBE_LORA
        from diffenv.models import load_tuned_backend

        def key(r: dict) -> str:
            return f"{r['entry']}|{r.get('seed', '')}"

        def entry(r: dict):
            if r["kind"] == "cfg":
                return timing.sampler(task, task.model, r["guidance_scale"])
            if r["kind"] == "best_of_n":
                return timing.sampler(task, task.model, candidates=r["best_of_n"])
            run = self.run_dir(task, r["algo"], r["seed"])
            budget = int(r["budget"])
            lora = PROBE_LORA.format(images=budget) if r["kind"] == "selected" else f"lora_{budget}.safetensors"
            return timing.sampler(task, load_tuned_backend(task.model, run / lora))

        keys = sorted(key(r) for r in rows)
        path = self.out / "cache" / f"{task.name}__timing.json"
        cached = json.loads(path.read_text()) if path.is_file() else {}
        if cached.get("keys") != keys:
            self.bar.set_postfix_str("timing every entry, interleaved")
            n = min(timing.TIMING_IMAGES, task.eval_images)
            seconds = timing.interleaved_seconds({key(r): entry(r) for r in rows})
            cached = {"keys": keys, "per_image": {k: v / n for k, v in seconds.items()}}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cached))
            tmp.replace(path)
        timing.apply_timings(rows, cached["per_image"], key, key({"entry": BASE_ENTRY}))

    def run(self) -> list[dict]:
        """Every task's entries (the rows of results.csv); the CFG probe-set references go to the report only."""
        rows, probe_rows = [], []
        for task in tqdm(self.tasks, desc="tasks", disable=not self.progress):
            probing = has_curves(task)
            selected = probing * sum(a in ALGORITHMS for a in task.algos) * len(task.seeds)
            entries = (len(task.cfg_scales) * (1 + probing) + len(task.best_of_n)
                       + len(task.algos) * len(task.seeds) * len(task.budgets) + selected)
            with tqdm(total=entries, desc=task.name, unit="entry", disable=not self.progress) as self.bar:
                task_rows = self.baseline_rows(task)
                probe_rows += self.probe_reference_rows(task)
                task_rows += self.rl_rows(task)
                self.time_entries(task, task_rows)
                rows += task_rows
        write_outputs(rows, self.tasks, self.out, probe_rows)
        self.track_outputs()
        return rows

    def track_outputs(self) -> None:
        """The comparison's figures and results.md, to the tracker's summary run (none with the csv default)."""
        tracker = replace(self.tracker, name=self.out.resolve().name).open(self.out)
        if tracker is None:
            return
        try:
            for png in sorted(self.out.glob("*.png")):
                tracker.log_png(png.stem, png)
            tracker.log_text("results", (self.out / "results.md").read_text())
        finally:
            tracker.close()


def run_row(task: Task, algo: str, seed: int, entry: str, kind: str, images: int, train_log: list[dict], flag: str,
            metrics: dict) -> dict:
    """results.csv's row of a trained model (guidance 1) after `images` images of one run."""
    seen = [r for r in train_log if float(r["images_seen"]) <= images]
    return {"task": task.name, "entry": entry, "kind": kind, "algo": algo, "guidance_scale": 1.0, "budget": images,
            "seed": seed, "train_wall_s": float(seen[-1]["wall_time_s"]) if seen else math.nan,
            "overoptimisation": flag, **metrics}


def has_curves(task: Task) -> bool:
    """Whether the task gets learning curves: probes on, a trainer algorithm to probe, a task protocol to score."""
    return bool(task.probe_every) and any(a in ALGORITHMS for a in task.algos) and task_protocol(task.model) is not None


# ---------------------------------------------------------------------- logs and flags
def overoptimisation_flag(log_path: Path, judge_drop: float = 0.05, fd_rise: float = 0.25) -> str:
    """'' or a reason: the probe reward rose while the judge (log-prob or accuracy) fell or the FD rose markedly."""
    probes = [r for r in read_log(log_path) if r.get("probe_reward")]
    if len(probes) < 2:
        return ""
    first, last = probes[0], probes[-1]
    if float(last["probe_reward"]) <= float(first["probe_reward"]):
        return ""
    reasons = []
    for key, label in (("probe_judge_log_prob", "judge log-prob"), ("probe_judge_accuracy", "judge accuracy")):
        if key in last and float(last[key]) < float(first[key]) - judge_drop:
            reasons.append(f"{label} {float(first[key]):.3f}->{float(last[key]):.3f}")
    if "probe_fd" in last and float(last["probe_fd"]) > (1 + fd_rise) * float(first["probe_fd"]):
        reasons.append(f"FD {float(first['probe_fd']):.2f}->{float(last['probe_fd']):.2f}")
    return "; ".join(reasons)

