"""The GPU check: one unattended command (≤ 6 min on one GPU) that measures what CPU runs cannot.

    python benchmarks/gpu_check.py                      # on a CUDA machine; JSON to docs/results/gpu/
    python benchmarks/gpu_check.py --device cpu --quick # the same code paths on tiny sizes (CI, seconds)

Measures, in one run, and prints as one table (JSON with the date, GPU name and torch version to `--out`):
1. env overhead: a whole episode through the native vector env vs the bare batched forward + sampler maths +
   reward (`env_throughput.episode_fns`), digits-eps and shapes, batch 64 to 1,024;
2. host syncs per step in steady state under `torch.cuda.set_sync_debug_mode` (counted with "warn" on every
   non-terminal step of an episode after a warm-up; the first offending op is named from a rerun under "error");
   must be 0;
3. training throughput per algorithm on shapes (20 DDIM steps) as a fraction of plain 20-step sampling
   (`train_throughput`), with each one's peak memory (`torch.cuda.max_memory_allocated`);
4. the largest batch that fits for shapes: sampling episodes and training epochs at doubling batch sizes until
   out-of-memory (caught), a size cap or a time cap;
5. the tests that need CUDA (`pytest -m cuda`).
Without CUDA (and no `--device cpu`) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts, run from anywhere
import env_throughput  # noqa: E402
import train_throughput  # noqa: E402

from agents.algos import ALGORITHMS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: model -> (reward, sampler steps) of the checks
TASKS = {"digits-eps": ("digit_classifier", 10), "shapes": ("shapes_verifier", 20)}
FULL = dict(batches=[64, 256, 1024], episodes=10, train_images=512, train_batch=64, max_batch=1 << 16, trial_s=30.0)
QUICK = dict(batches=[4], episodes=1, train_images=4, train_batch=4, max_batch=4, trial_s=20.0, num_steps=2)


def make_env(model: str, batch: int, device: str, num_steps: int | None):
    import gymnasium as gym

    import diffenv  # noqa: F401  (registers DiffusionSteer-v0)

    reward, steps = TASKS[model]
    return gym.make_vec("DiffusionSteer-v0", num_envs=batch, vectorization_mode="vector_entry_point", model=model,
                        reward=reward, num_steps=num_steps or steps, seed=0, device=device)


def env_overhead(models, sizes: dict, device: str) -> list[dict]:
    rows = []
    for model in models:
        for batch in sizes["batches"]:
            venv = make_env(model, batch, device, sizes.get("num_steps"))
            bare, native = env_throughput.episode_fns(venv, torch.device(device))
            t_bare, t_native = env_throughput.timed([bare, native], sizes["episodes"], torch.device(device))
            rows.append({"model": model, "batch": batch, "bare_ms": 1e3 * t_bare, "native_ms": 1e3 * t_native,
                         "native_over_bare": t_native / t_bare, "images_per_s": batch / t_native})
    return rows


def host_syncs(models, device: str, sizes: dict) -> list[dict]:
    """Syncs per non-terminal step of a lockstep episode (noise mode), after a warm-up episode."""
    rows = []
    if torch.device(device).type != "cuda":
        return [{"model": m, "syncs_per_step": None, "note": "CUDA only"} for m in models]
    for model in models:
        venv = make_env(model, sizes["batches"][0], device, sizes.get("num_steps"))
        k = venv.cfg.num_steps
        gen = torch.Generator(device=device).manual_seed(0)
        actions = [torch.randn((venv.num_envs, *venv.backend.latent_shape), generator=gen, device=device)
                   for _ in range(k)]
        venv.reset(seed=0)
        for a in actions:  # warm-up episode (libraries initialise once), then the autoreset step
            venv.step(a)
        venv.step(actions[0])
        count, first = 0, None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for a in actions[:-1]:
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    venv.step(a)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            count = sum("synchroniz" in str(w.message) for w in caught)
        venv.step(actions[-1])  # the terminal step reads the checks and the reward: allowed to sync
        if count:
            first = first_sync(venv, actions)
        rows.append({"model": model, "steps": k - 1, "syncs": count, "syncs_per_step": count / max(1, k - 1),
                     "first_sync": first})
    return rows


def first_sync(venv, actions) -> str:
    """The op and the last frames of the first sync of a non-terminal step, from a rerun under "error"."""
    import traceback

    venv.step(actions[0])  # the autoreset step after the previous terminal one
    for a in actions[:-1]:
        torch.cuda.set_sync_debug_mode("error")
        try:
            venv.step(a)
        except RuntimeError as e:
            frames = traceback.format_exception(e)[-4:-1]
            return f"{e}".splitlines()[0] + " at " + " | ".join(f.strip().replace("\n", " ") for f in frames)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return "not reproduced under 'error'"


def peak_memory(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.device(device).type == "cuda" else None


def reset_peak(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def training(model: str, sizes: dict, device: str, algos) -> list[dict]:
    reward, steps = TASKS[model]
    steps = sizes.get("num_steps") or steps
    reset_peak(device)
    sample = train_throughput.sampling_rate(model, steps, sizes["train_images"], reward, sizes["train_batch"], device)
    rows = [{"model": model, "what": "sampling", "images_per_s": sample, "x_sampling": 1.0,
             "peak_mib": peak_memory(device)}]
    for algo in algos:
        reset_peak(device)
        overrides = small_groups(sizes["train_batch"])
        try:
            rate = train_throughput.training_rate(algo, model, steps, sizes["train_images"], reward,
                                                  sizes["train_batch"], device, overrides)
        except ValueError as e:  # FPO needs a flow model
            rows.append({"model": model, "what": algo, "images_per_s": None, "x_sampling": None, "peak_mib": None,
                         "note": str(e).split(";")[0]})
            continue
        rows.append({"model": model, "what": algo, "images_per_s": rate, "x_sampling": rate / sample,
                     "peak_mib": peak_memory(device)})
    return rows


def small_groups(batch: int) -> dict:
    """Groups of 2 for the quick mode's batches, smaller than the default group of 8."""
    return {"group_size": 2} if batch < 8 else {}


def _fits(fn, device: str) -> tuple[bool, float, float | None]:
    reset_peak(device)
    start = time.perf_counter()
    try:
        fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return False, time.perf_counter() - start, None
    return True, time.perf_counter() - start, peak_memory(device)


def largest_batch(model: str, sizes: dict, device: str) -> list[dict]:
    """Doubling search from the largest env-overhead batch: the last batch that ran, and why the search stopped."""
    reward, steps = TASKS[model]
    steps = sizes.get("num_steps") or steps
    rows = []

    def sample(batch):
        _, native = env_throughput.episode_fns(make_env(model, batch, device, steps), torch.device(device))
        native()

    def train(batch):
        train_throughput.training_rate("grpo", model, steps, batch, reward, batch, device,
                                       {"minibatch_size": batch * steps // 2, **small_groups(batch)})

    for what, fn in (("sampling episode", sample), ("grpo epoch", train)):
        batch, last, stop = sizes["batches"][-1], None, "size cap"
        while batch <= sizes["max_batch"]:
            ok, seconds, peak = _fits(lambda: fn(batch), device)
            if not ok:
                stop = "out of memory"
                break
            last = {"batch": batch, "seconds": seconds, "peak_mib": peak}
            if seconds > sizes["trial_s"]:
                stop = f"time cap ({sizes['trial_s']:.0f} s per trial)"
                break
            batch *= 2
        rows.append({"model": model, "what": what, "largest_batch": last and last["batch"],
                     "seconds": last and last["seconds"], "peak_mib": last and last["peak_mib"], "stopped_by": stop})
        reset_peak(device)
    return rows


def cuda_tests(device: str) -> dict:
    """The tests marked `cuda` (pytest -m cuda), in a subprocess; their summary line."""
    if torch.device(device).type != "cuda":
        return {"summary": "skipped (no CUDA device)", "returncode": None}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {"summary": lines[-1] if lines else proc.stderr[-300:], "returncode": proc.returncode}


def quiet() -> None:
    """No model-loading progress bars between the rows (the script loads the models many times)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from diffenv.quiet import quiet_third_party

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    quiet_third_party()


def fmt(v, spec=".3g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def table(result: dict) -> str:
    lines = [f"GPU check: {result['device_name']}, torch {result['torch']}, {result['date']}"
             + (" (quick)" if result["quick"] else ""),
             "| check | model | setting | value | detail |", "|---|---|---|---|---|"]
    for r in result["env_overhead"]:
        lines.append(f"| env overhead | {r['model']} | batch {r['batch']} | native/bare {r['native_over_bare']:.3f} | "
                     f"{r['native_ms']:.1f} ms/episode, {r['images_per_s']:.0f} images/s |")
    for r in result["host_syncs"]:
        lines.append(f"| host syncs per step | {r['model']} | steady state | {fmt(r.get('syncs_per_step'))} | "
                     f"{r.get('first_sync') or r.get('note') or ''} |")
    for r in result["training"]:
        lines.append(f"| training | {r['model']} | {r['what']} | {fmt(r['x_sampling'], '.2f')}× sampling | "
                     f"{fmt(r['images_per_s'], '.1f')} images/s, peak {fmt(r['peak_mib'], '.0f')} MiB"
                     f"{' ' + r['note'] if r.get('note') else ''} |")
    for r in result["largest_batch"]:
        lines.append(f"| largest batch | {r['model']} | {r['what']} | {fmt(r['largest_batch'])} | "
                     f"{fmt(r['seconds'], '.1f')} s, peak {fmt(r['peak_mib'], '.0f')} MiB, "
                     f"stopped by {r['stopped_by']} |")
    lines.append(f"| CUDA tests | | pytest -m cuda | {result['cuda_tests']['summary']} | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to exercise the code paths")
    p.add_argument("--quick", action="store_true", help="tiny batches and step counts (a CPU test of the script)")
    p.add_argument("--out", default=None, help="JSON path (default: docs/results/gpu/gpu_check_<date>_<gpu>.json)")
    p.add_argument("--algos", nargs="+", default=sorted(ALGORITHMS))
    a = p.parse_args(argv)
    if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False): nothing to check. "
              "Run it where a GPU is, or pass --device cpu --quick to exercise the script.")
        return 0
    sizes = QUICK if a.quick else FULL
    quiet()
    start = time.perf_counter()
    cuda = torch.device(a.device).type == "cuda"
    name = torch.cuda.get_device_name(torch.device(a.device)) if cuda else "cpu"
    result = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"), "device": a.device,
              "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda, "quick": a.quick,
              "sizes": sizes}
    result["env_overhead"] = env_overhead(list(TASKS), sizes, a.device)
    result["host_syncs"] = host_syncs(list(TASKS), a.device, sizes)
    result["training"] = training("shapes", sizes, a.device, a.algos)
    result["largest_batch"] = largest_batch("shapes", sizes, a.device)
    result["cuda_tests"] = cuda_tests(a.device)
    result["wall_s"] = time.perf_counter() - start
    out = Path(a.out) if a.out else ROOT / "docs" / "results" / "gpu" / (
        f"gpu_check_{result['date']}_{''.join(c if c.isalnum() else '-' for c in name)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {out} in {result['wall_s']:.0f} s")
    syncs = [r["syncs"] for r in result["host_syncs"] if r.get("syncs")]
    return 1 if syncs or (result["cuda_tests"]["returncode"] not in (None, 0)) else 0


if __name__ == "__main__":
    sys.exit(main())
