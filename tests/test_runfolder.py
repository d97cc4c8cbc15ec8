"""The run folder: one writer at a time, crash-safe writes, verified checkpoints, NaN never saved."""

from __future__ import annotations

import csv
import errno
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import agents.runfolder as runfolder
from agents.cli import main as cli_main
from agents.runfolder import RunError, RunFolder
from agents.trainer import TrainConfig, Trainer
from torn_writes import TornFile

ROOT = Path(__file__).parents[1]
SMALL = {"images_per_epoch": 8, "group_size": 4, "minibatch_size": 8}
#: the same run as `config()`, on the command line
TRAIN_ARGS = ["train", "--algo", "grpo", "--model", "digits-flow", "--num-steps", "2", "--seed", "0",
              "--no-progress", *[a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]]


def config(out, images=16, **kw) -> TrainConfig:
    return TrainConfig(algo="grpo", model="digits-flow", num_steps=2, images=images, out=str(out), seed=0,
                       progress=False, grid_every=0, algo_overrides={**SMALL, **kw})


def worker(out, images, *extra, die=None) -> subprocess.Popen:
    """`diffenv train` in a fresh process (optionally dying inside a write, see tests/crash_worker.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "tests" / "crash_worker.py"), *([die] if die else []), *TRAIN_ARGS,
           "--images", str(images), "--out", str(out), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def log_rows(out) -> list[dict[str, str]]:
    with open(Path(out) / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def wait_for_rows(out, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len((Path(out) / "log.csv").read_bytes().splitlines()) > n:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.01)


# ------------------------------------------------------------------ item 4: one writer per folder
def test_second_run_on_a_live_folder_fails_fast_and_the_lock_dies_with_its_process(tmp_path):
    out = tmp_path / "run"
    live = worker(out, 80000)  # ~5000 epochs: runs until killed
    try:
        wait_for_rows(out, 1, live)
        assert live.poll() is None, finish(live)[1][-2000:]
        in_use = rf"run folder {out} is in use by another run \(pid {live.pid}\)"
        for resume in (False, True):  # a second trainer, or a --resume of the live run
            start = time.perf_counter()
            with pytest.raises(RunError, match=in_use):
                Trainer(config(out, images=80000), resume=resume)
            assert time.perf_counter() - start < 5, "refused before any work"
        rc, err = finish(worker(out, 80000, "--resume"))
        assert rc == 1 and f"diffenv train: error: run folder {out} is in use by another run (pid {live.pid})" in err
        assert live.poll() is None, "the live run went on"
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    resumed = Trainer(config(out, images=80000), resume=True)  # the kernel released the dead process's lock
    try:
        rows = log_rows(out)
        assert [int(r["epoch"]) for r in rows] == list(range(1, resumed.epoch + 1)), "one writer, no interleaving"
    finally:
        resumed.folder.release()


def test_two_trainers_in_one_process_exclude_each_other_until_train_returns(tmp_path):
    first = Trainer(config(tmp_path))
    with pytest.raises(RunError, match="in use by another run"):
        Trainer(config(tmp_path))
    first.train()
    with pytest.raises(FileExistsError, match="already holds a run"):  # the lock is free again
        Trainer(config(tmp_path))
    Trainer(config(tmp_path, images=24), resume=True).train()
    assert first.epoch == 2 and len(log_rows(tmp_path)) == 3
    first.cfg.images = 32  # training the first trainer further would overwrite the newer run
    with pytest.raises(RunError, match="changed since this trainer wrote it"):
        first.train()


# ------------------------------------------------------------------ item 5: crash safety
def test_out_must_be_a_creatable_writable_folder(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(FileExistsError, match=rf"--out {file} is a file; expected a folder"):
        Trainer(config(file))
    with pytest.raises(RunError, match=rf"run folder {file / 'run'} cannot be created or written: .*Not a directory"):
        Trainer(config(file / "run"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"is not empty \(todo.txt\)"):
        Trainer(config(tmp_path / "notes"))
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["todo.txt"], "a refused folder is untouched"
    assert cli_main([*TRAIN_ARGS, "--images", "16", "--out", str(file)]) == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_unwritable_out_fails_before_any_work(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(RunError, match="cannot be created or written: .*Permission denied"):
            Trainer(config(tmp_path / "run"))
    finally:
        tmp_path.chmod(0o700)


def test_kills_at_any_moment_resume_to_the_uninterrupted_lora_log_and_grids(tmp_path):
    """Kills inside each write (checkpoint, LoRA, log) and at random moments, then resume: bit-identical."""
    images, ref, out = 96, tmp_path / "ref", tmp_path / "run"  # 12 epochs of 8 images
    grids = ("--grid-every", "2")
    reference = worker(ref, images, *grids)
    sigkill, rng = -signal.SIGKILL, random.Random(0)

    def run(die=None, resume=True, kill_after_rows=None):
        proc = worker(out, images, *grids, *(["--resume"] if resume else []), die=die)
        if kill_after_rows is not None:
            wait_for_rows(out, kill_after_rows, proc)
            time.sleep(rng.uniform(0, 0.15))
            proc.send_signal(signal.SIGKILL)
        return finish(proc)

    # epoch 1, inside the first checkpoint write: no checkpoint yet, a torn temp file
    assert run("checkpoint.pt.tmp:1", resume=False)[0] == sigkill
    assert not (out / "checkpoint.pt").exists() and (out / "checkpoint.pt.tmp").exists()
    with pytest.raises(FileNotFoundError, match="stopped before its first checkpoint: start it again without --resume"):
        Trainer(config(out, images), resume=True)  # nothing to resume ...
    # ... but it starts again; this time die appending epoch 3's log row (after its checkpoint)
    assert run("log.csv:2", resume=False)[0] == sigkill
    assert len(log_rows(out)) == 3 and not (out / "checkpoint.pt.tmp").exists()
    assert run("lora.safetensors.tmp:3")[0] == sigkill  # epoch 5's LoRA (the 1st is the resume's catch-up)
    assert run("checkpoint.pt.tmp:2")[0] == sigkill  # epoch 7's checkpoint
    for _ in range(2):
        assert run(kill_after_rows=len(log_rows(out)) + 1)[0] in (sigkill, 0)
    rc, err = run()
    assert rc == 0, err[-3000:]
    rc, err = finish(reference)
    assert rc == 0, err[-3000:]

    assert (out / "lora.safetensors").read_bytes() == (ref / "lora.safetensors").read_bytes()
    strip = [{k: v for k, v in r.items() if k != "wall_time_s"} for r in log_rows(out)]
    assert strip == [{k: v for k, v in r.items() if k != "wall_time_s"} for r in log_rows(ref)]
    assert len(strip) == 12 and (out / "log.csv").read_text().count("\n") == 13
    pngs = sorted(p.name for p in (ref / "grids").iterdir())
    assert pngs == sorted(p.name for p in (out / "grids").iterdir()) and len(pngs) == 6
    assert all((out / "grids" / p).read_bytes() == (ref / "grids" / p).read_bytes() for p in pngs)
    assert not list(out.rglob("*.tmp"))


def _tear_writes_to(monkeypatch, name: str, err: int) -> None:
    """Writes to files named `name` put half their bytes on disk, then fail with OSError(err)."""
    real_open = open

    def fail(_f):
        raise OSError(err, os.strerror(err))

    def open_(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        return TornFile(f, fail) if Path(path).name == name else f

    monkeypatch.setattr(runfolder, "open", open_, raising=False)


@pytest.mark.parametrize("name, err, expected", [
    ("checkpoint.pt.tmp", errno.ENOSPC, r"disk full while writing checkpoint {out}/checkpoint.pt \(\[Errno 28\] "
                                        r"No space left on device\); the last good checkpoint \({out}/checkpoint.pt, "
                                        r"epoch 1\) is intact"),
    ("lora.safetensors.tmp", errno.ENOSPC, r"disk full while writing LoRA {out}/lora.safetensors .*; checkpoint.pt "
                                           r"\(epoch 2\) is written; --resume restores the LoRA and log from it"),
    ("checkpoint.pt.tmp", errno.EIO, r"I/O error while writing checkpoint .*epoch 1\) is intact"),
])
def test_failed_writes_say_what_happened_and_keep_the_previous_files(tmp_path, monkeypatch, name, err, expected):
    Trainer(config(tmp_path, images=8)).train()
    before = {p: (tmp_path / p).read_bytes() for p in ("checkpoint.pt", "lora.safetensors", "log.csv")}
    trainer = Trainer(config(tmp_path, images=16), resume=True)
    _tear_writes_to(monkeypatch, name, err)
    with pytest.raises(RunError, match=expected.format(out=tmp_path)):
        trainer.train()
    monkeypatch.undo()
    if name == "checkpoint.pt.tmp":
        assert {p: (tmp_path / p).read_bytes() for p in before} == before
    assert not list(tmp_path.glob("*.tmp"))
    resumed = Trainer(config(tmp_path, images=16), resume=True)  # the lock was released; the folder resumes
    assert resumed.epoch == (1 if name == "checkpoint.pt.tmp" else 2) and len(log_rows(tmp_path)) == resumed.epoch


# ------------------------------------------------------------------ item 6: integrity
def test_flipped_bytes_in_the_checkpoint_are_refused_and_the_good_lora_kept(tmp_path, capsys):
    assert cli_main([*TRAIN_ARGS, "--images", "8", "--out", str(tmp_path)]) == 0
    lora, ckpt = (tmp_path / "lora.safetensors").read_bytes(), bytearray((tmp_path / "checkpoint.pt").read_bytes())
    for i in range(4):  # 4 bytes in the middle of the payload, as a bad disk or copy would
        ckpt[len(ckpt) // 2 + 97 * i] ^= 0x5A
    (tmp_path / "checkpoint.pt").write_bytes(bytes(ckpt))
    capsys.readouterr()
    assert cli_main([*TRAIN_ARGS, "--images", "16", "--out", str(tmp_path), "--resume"]) == 2
    assert f"checkpoint {tmp_path}/checkpoint.pt is corrupt (checksum mismatch)" in capsys.readouterr().err
    assert (tmp_path / "lora.safetensors").read_bytes() == lora
    assert (tmp_path / "checkpoint.pt").read_bytes() == bytes(ckpt) and len(log_rows(tmp_path)) == 1


def _rewrite_checkpoint(out, edit) -> None:
    """Change the checkpoint's dict and store it with a valid checksum (only the content is wrong)."""
    folder = RunFolder(out)
    state = folder.read_checkpoint()
    edit(state)
    folder.write_checkpoint(state, intact="")


@pytest.mark.parametrize("edit, expected", [
    (lambda s: [s.pop("optimizer"), s.pop("rng")], r"lacks \['optimizer', 'rng'\]; expected a checkpoint"),
    (lambda s: s["optimizer"]["state"][0]["exp_avg"].view(-1)[3:5].fill_(float("nan")),
     r"holds NaN/inf in optimizer.state.0.exp_avg; it cannot be resumed"),
    (lambda s: next(iter(s["lora"].values())).fill_(float("inf")), r"holds NaN/inf in lora\..*lora_[AB]"),
    (lambda s: s["rng"][0].pop("noise_gen"), r"rng\[0\].noise_gen=None; expected a generator state"),
    (lambda s: s.update(format=1), r"has format 1; expected 2"),
    # fields a crafted file can get wrong with a valid checksum: each named, before any is used
    (lambda s: s.update(images_seen=-8), r"checkpoint .*: images_seen=-8; expected an int >= 0"),
    (lambda s: s.update(images_seen=9), r"images_seen=9; expected epoch × images_per_epoch = 1 × 8"),
    (lambda s: s.update(epoch=1.0), r"epoch=1.0; expected an int >= 0"),
    (lambda s: s.update(nfe_total=True), r"nfe_total=True; expected an int >= 0"),
    (lambda s: s.update(wall_time=float("nan")), r"wall_time=nan; expected a finite number of seconds >= 0"),
    (lambda s: s.update(wall_time=-1.0), r"wall_time=-1.0; expected a finite number"),
    (lambda s: s.update(log=[]), r"log='list of 0'; expected a list of 1 rows"),
    (lambda s: s.update(rng={}), r"rng='dict'; expected a list of 1 ranks' generator states"),
    (lambda s: s.update(optimizer=[]), r"optimizer='list'; expected a dict"),
    (lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)),
     r"optimizer.state.0.exp_avg=\(3,\); expected a tensor of shape \(8, 32, 3, 3\)"),
    (lambda s: s["optimizer"]["state"][1].update(step=torch.tensor(-1.0)), r"optimizer.state.1.step=.*; expected a"),
    (lambda s: s["optimizer"]["state"].update({10**6: {}}), r"optimizer.state=.*; expected a dict keyed by LoRA"),
    (lambda s: s["optimizer"]["param_groups"].append({}), r"optimizer.param_groups=.*; expected one group over"),
])
def test_checkpoints_with_missing_or_non_finite_entries_are_refused(tmp_path, edit, expected):
    Trainer(config(tmp_path, images=8)).train()
    _rewrite_checkpoint(tmp_path, edit)
    lora = (tmp_path / "lora.safetensors").read_bytes()
    with pytest.raises(ValueError, match=expected):
        Trainer(config(tmp_path), resume=True)
    assert (tmp_path / "lora.safetensors").read_bytes() == lora


@pytest.mark.parametrize("break_at, expected", [
    ("loss", r"loss became NaN at epoch 2, minibatch 1; the last good checkpoint \({out}/checkpoint.pt, epoch 1\) "
             r"is intact"),
    ("weights", r"NaN/inf in LoRA weights\..*lora_B.* during epoch 2; the last good checkpoint .*epoch 1\) is intact"),
    ("first_loss", r"loss became inf at epoch 1, minibatch 1; no checkpoint was written to {out} yet"),
])
def test_non_finite_training_stops_with_the_cause_and_keeps_the_good_checkpoint(tmp_path, break_at, expected):
    cfg = lambda images: config(tmp_path, images=images, minibatch_size=16)  # noqa: E731 (one minibatch an epoch)
    trainer = Trainer(cfg(24))
    loss, step = trainer.algo.loss, trainer.optimizer.step
    epoch_of_break = 1 if break_at == "first_loss" else 2

    def bad_loss(items):
        out = loss(items)
        if trainer.epoch + 1 == epoch_of_break:  # a constant: the gradient stays finite, only the loss is not
            out["loss_policy"] = out["loss_policy"] + float("nan" if break_at == "loss" else "inf")
        return out

    def bad_step(*a, **k):
        step(*a, **k)
        if trainer.epoch + 1 == epoch_of_break:
            with torch.no_grad():
                next(p for n, p in trainer.policy.denoiser.named_parameters() if "lora_B" in n)[0].fill_(float("nan"))

    if break_at == "weights":
        trainer.optimizer.step = bad_step
    else:
        trainer.algo.loss = bad_loss
    files = {}
    if epoch_of_break == 2:
        trainer.cfg.images = 8
        trainer.train()
        files = {p: (tmp_path / p).read_bytes() for p in ("checkpoint.pt", "lora.safetensors", "log.csv")}
        trainer.cfg.images = 24
    with pytest.raises(RunError, match=expected.format(out=tmp_path)):
        trainer.train()
    assert {p: (tmp_path / p).read_bytes() for p in files} == files, "the good files are untouched"
    if epoch_of_break == 2:
        assert Trainer(cfg(24), resume=True).epoch == 1
    else:  # stopped before its first checkpoint: the folder starts again
        assert not (tmp_path / "checkpoint.pt").exists() and Trainer(cfg(24)).epoch == 0


# ------------------------------------------------------------------ no writes through symlinks
@pytest.mark.parametrize("name", [".lock", "grids", "checkpoint.pt", "lora.safetensors", "log.csv",
                                  "lora_probe_8.safetensors", "checkpoint.pt.tmp"])
def test_a_symlink_in_the_run_folder_is_refused_and_its_target_untouched(tmp_path, name):
    """A link would redirect the run's writes (a `.lock` link had its target truncated and a pid written into it;
    a `grids` link had its target's *.tmp files removed): resume and a fresh start both refuse it, exit 2."""
    out, victim = tmp_path / "run", tmp_path / "victim"
    if name == "grids":
        victim.mkdir()
        (victim / "keep.tmp").write_text("x")
    else:
        victim.write_text("precious\n")
    resume = name not in (".lock", "grids")
    if resume:
        Trainer(config(out, images=8)).train()
        (out / name).unlink(missing_ok=True)
    else:
        out.mkdir()
    (out / name).symlink_to(victim)
    expected = f"{out / name} is a symlink; expected a regular {'folder' if name == 'grids' else 'file'}"
    with pytest.raises(ValueError, match=expected):
        Trainer(config(out, images=16), resume=resume)
    for again in (False, True):  # the other mode refuses it too (or finds nothing to resume)
        if again == resume:
            continue
        with pytest.raises((ValueError, FileExistsError, FileNotFoundError)):
            Trainer(config(out, images=16), resume=again)
    if name == "grids":
        assert [p.name for p in victim.iterdir()] == ["keep.tmp"]
    else:
        assert victim.read_text() == "precious\n"
    assert (out / name).is_symlink()


def test_a_symlink_in_the_run_folder_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(tmp_path / "victim")
    assert cli_main([*TRAIN_ARGS, "--images", "8", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {tmp_path}/run/.lock is a symlink; expected a regular file" in err
    assert not (tmp_path / "victim").exists()


def test_a_step_too_large_stops_the_run_and_a_smaller_lr_resumes_it(tmp_path, capsys):
    """`--set lr=1e5`: one optimizer step makes finite LoRA weights (1.7e5) whose outputs are NaN. The run stops
    before it checkpoints them (exit 1, the documented run stop; before, the next rollout failed inside the env and
    a checkpoint of those weights failed the same way on resume), and the kept checkpoint resumes with a smaller lr."""
    one_step = [a.replace("minibatch_size=8", "minibatch_size=16") for a in TRAIN_ARGS]  # one optimizer step an epoch
    run = [*one_step, "--out", str(tmp_path)]
    assert cli_main([*run, "--images", "8"]) == 0
    good = (tmp_path / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert cli_main([*run, "--images", "24", "--resume", "--set", "lr=1e5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(r"the policy's output \(kl_to_base\) became NaN at epoch 2, .*; the last good checkpoint "
                     rf"\({tmp_path}/checkpoint.pt, epoch 1\) is intact", err), err
    assert (tmp_path / "checkpoint.pt").read_bytes() == good and len(log_rows(tmp_path)) == 1
    assert cli_main([*run, "--images", "24", "--resume", "--set", "lr=1e-4"]) == 0
    assert [int(r["epoch"]) for r in log_rows(tmp_path)] == [1, 2, 3]
    state = RunFolder(tmp_path).read_checkpoint()
    assert state["algo_config"]["lr"] == 1e-4 and state["optimizer"]["param_groups"][0]["lr"] == 1e-4
