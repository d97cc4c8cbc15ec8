"""The run folder of `diffenv train`: one writer at a time, crash-safe files, verified checkpoints.

| file | written | after a kill at any moment |
|---|---|---|
| `.lock` | created and `flock`ed for the run; holds the writer's pid | the kernel releases the lock with the process |
| `grids/epoch_*.png` | every `grid_every` epochs, before the checkpoint | redone with the epoch |
| `checkpoint.pt` | every epoch, first: temp file, fsync, rename | the previous checkpoint, whole |
| `lora.safetensors` | every epoch, after the checkpoint, the same way | rewritten from the checkpoint on resume |
| `log.csv` | every epoch, last (append, fsync) | rewritten from the rows the checkpoint stores on resume |
| `tracking/` | with `--logger tensorboard/wandb/mlflow`: the tracker's files, after log.csv (`agents.tracking`) | an epoch redone on resume is logged again at the same step |
| `*.tmp` | the temp files of the writes above | removed by the next run that takes the lock |

No file of the folder is read or written through a symlink (`O_NOFOLLOW`, and a folder holding one is refused):
a link would redirect the run's writes, e.g. a `.lock` link truncating its target.

So after any kill the folder holds a whole checkpoint (or none, and may be started again), `log.csv`
never runs ahead of it, and `--resume` continues bit-exactly. A checkpoint file is one header line with
the sha256 of its payload, then the payload (a `torch.save` dict), so flipped bytes are found on load.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import math
import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.pt"
LORA = "lora.safetensors"
LOG = "log.csv"
LOCK = ".lock"
GRIDS = "grids"
_HEADER = b"DiffusionSteer checkpoint v2 sha256="
_TMP = ".tmp"
TRACKING = "tracking"  # (agents.tracking writes there)
#: what an interrupted run leaves before its first checkpoint: such a folder may be started again
_LEFTOVERS = {LOCK, GRIDS, TRACKING}
_ERRNO_WORDS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EIO: "I/O error"}


class RunError(RuntimeError):
    """The run cannot go on (folder in use, a write failed, values became NaN/inf); the message names
    the cause and what the folder still holds."""


def _why(e: OSError) -> str:
    return _ERRNO_WORDS.get(e.errno, "error")


def _link_error(path: Path) -> ValueError:
    kind = "folder" if path.name == GRIDS else "file"
    return ValueError(f"{path} is a symlink; expected a regular {kind} of the run folder (its files are never read or "
                      "written through links): remove the link or choose another --out")


def _open(path: str | Path, flags: int, mode: int = 0o666) -> int:
    """`os.open` that refuses a symlink at `path` (ValueError) instead of following it; `open`'s `opener`."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _link_error(path) from None
        raise


class RunFolder:
    """`--out` of one training run. `acquire` before any work, `release` when done (or let the process end)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    # ------------------------------------------------------------------ ownership
    def acquire(self, resume: bool) -> None:
        """Check the folder suits a new run (or `resume`), create it, lock it, remove stale temp files.

        Raises FileExistsError / FileNotFoundError for a folder that does not suit the request, RunError
        when it cannot be created or written, or another process holds it.
        """
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"--out {self.path} is a file; expected a folder (new, or a run to --resume)")
        if not (self.path / LOCK).exists():  # (with a lock file, "in use" is the first thing to tell)
            self._check_contents(resume)  # before creating anything, so a refused folder stays untouched
        # again once locked: another run may have written its first checkpoint meanwhile
        self.lock(lambda: self._check_contents(resume))

    def lock(self, check=lambda: None) -> None:
        """Create the folder, lock it, refuse symlinks in it and run `check`, then remove stale temp files: the
        lock alone, for runs whose folder holds other files than the trainer's (a Stable-Baselines3 run)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = _open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunError(f"run folder {self.path} cannot be created or written: {e}; choose a writable --out") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunError(f"run folder {self.path} is in use by another run (pid {holder}); wait for it to end "
                           "or choose another --out") from None
        self._lock_fd = fd
        try:
            self._check_no_links()
            check()
        except BaseException:
            self.release()
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            for tmp in [*self.path.glob("*" + _TMP), *self.path.glob(f"{GRIDS}/*{_TMP}")]:
                tmp.unlink()
        except OSError as e:
            self.release()
            raise RunError(f"run folder {self.path} is not writable ({_why(e)}: {e}); choose a writable --out") from e

    def release(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _check_contents(self, resume: bool) -> None:
        checkpoint = self.path / CHECKPOINT
        if resume:
            if not checkpoint.is_file():
                hint = ("; the run there stopped before its first checkpoint: start it again without --resume"
                        if self.restartable() and self.path.exists() else "")
                raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}{hint}")
        elif checkpoint.is_file():
            raise FileExistsError(f"{self.path} already holds a run; pass --resume to continue it "
                                  "or choose another --out")
        elif not self.restartable():
            found = sorted(p.name for p in self.path.iterdir())
            raise FileExistsError(f"{self.path} is not empty ({', '.join(found[:5])}) and holds no checkpoint to "
                                  "--resume; choose an empty or new --out")

    def _check_no_links(self) -> None:
        """Refuse a symlink among the folder's entries and grids' (the run would write through it)."""
        grids = self.path / GRIDS
        inside = list(grids.iterdir()) if grids.is_dir() and not grids.is_symlink() else []
        link = next((p for p in [*self.path.iterdir(), *inside] if p.is_symlink()), None)
        if link is not None:
            raise _link_error(link)

    def restartable(self) -> bool:
        """No checkpoint, and nothing but what a run leaves before its first checkpoint."""
        if not self.path.is_dir():
            return True
        return all(p.name in _LEFTOVERS or p.name.endswith(_TMP) for p in self.path.iterdir())

    # ------------------------------------------------------------------ writes
    def write_atomic(self, name: str, data: bytes, what: str, intact: str) -> Path:
        """Write `data` to `name` via a temp file, fsync and rename: readers see the old file or the new one.

        A failed write (disk full, …) removes the temp file and raises RunError naming the cause, the
        file and `intact` (what the folder still holds, e.g. "the previous checkpoint (epoch 3) is intact").
        """
        path = self.path / name
        tmp = path.with_name(path.name + _TMP)
        if path.parent != self.path and path.parent.is_symlink():
            raise _link_error(path.parent)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb", opener=_open) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise RunError(f"{_why(e)} while writing {what} {path} ({e}); {intact}") from e
        return path

    def copy_atomic(self, src: str, dst: str, what: str) -> Path:
        """Copy the folder's file `src` to `dst` the way `write_atomic` writes (a kill leaves no torn copy)."""
        return self.write_atomic(dst, _read(self.path / src), what, f"{self.path / src} is intact")

    def append_log(self, rows: list[dict[str, Any]], intact: str) -> None:
        """Append the last of `rows` to log.csv (all of them if the file is new); columns: the first row's."""
        path = self.path / LOG
        if not path.is_file():
            self.write_atomic(LOG, render_log(rows).encode(), "log", intact)
            return
        try:
            with open(path, "a", newline="", opener=_open) as f:
                f.write(render_log(rows[-1:], fields=list(rows[0]), header=False))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise RunError(f"{_why(e)} while writing log {path} ({e}); {intact}") from e

    def repair_log(self, rows: list[dict[str, Any]], intact: str) -> None:
        """Make log.csv exactly `rows` (a kill may have left it one row short, or a row torn)."""
        path, data = self.path / LOG, render_log(rows).encode()
        try:
            current = _read(path) if path.is_file() else None
        except OSError:
            current = None
        if current != data:
            self.write_atomic(LOG, data, "log", intact)

    # ------------------------------------------------------------------ checkpoints
    def write_checkpoint(self, state: dict, intact: str) -> Path:
        buf = io.BytesIO()
        torch.save(state, buf)
        payload = buf.getvalue()
        data = _HEADER + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload
        return self.write_atomic(CHECKPOINT, data, "checkpoint", intact)

    def read_checkpoint(self) -> dict:
        """The checkpoint's dict, its checksum verified; ValueError when it is corrupt or not a checkpoint."""
        path = self.path / CHECKPOINT
        data = _read(path)
        head, _, payload = data.partition(b"\n")
        if not head.startswith(_HEADER):
            raise ValueError(f"checkpoint {path} is corrupt or not a DiffusionSteer checkpoint (no checksum header; "
                             "checkpoints of versions before the checksum cannot be resumed)")
        if head[len(_HEADER):].decode(errors="replace") != hashlib.sha256(payload).hexdigest():
            raise ValueError(f"checkpoint {path} is corrupt (checksum mismatch): its bytes changed after it was "
                             "written; restore it from a copy or start a new run")
        try:
            state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"checkpoint {path} is corrupt or not a DiffusionSteer checkpoint: {e}") from e
        if not isinstance(state, dict):
            raise ValueError(f"checkpoint {path} is not a DiffusionSteer checkpoint (holds {type(state).__name__})")
        return state


def render_log(rows: list[dict[str, Any]], fields: list[str] | None = None, header: bool = True) -> str:
    """log.csv's text. Columns: `fields`, by default the first row's keys, so the first epoch fixes them
    across --resume (a later extra key, e.g. a probe switched on, is dropped; a missing one left empty)."""
    if not rows:
        return ""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fields or list(rows[0]), extrasaction="ignore")
    if header:
        w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def non_finite(tree: Any, prefix: str = "") -> list[str]:
    """Paths of the NaN/inf floats and float tensors in nested dicts/lists/tuples (e.g. 'state.3.exp_avg').

    The tensors of one device are checked together: one host sync per device, not one per tensor."""
    leaves = list(_float_leaves(tree, prefix))
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for path, value in leaves:
        if isinstance(value, torch.Tensor):
            by_device.setdefault(value.device, []).append((path, value))
    bad = {path for path, value in leaves if isinstance(value, float) and not math.isfinite(value)}
    for group in by_device.values():
        finite = torch.stack([torch.isfinite(t).all() for _, t in group]).tolist()
        bad |= {path for (path, _), ok in zip(group, finite) if not ok}
    return [path for path, _ in leaves if path in bad]


def _float_leaves(tree: Any, prefix: str):
    """(path, value) of every float and floating-point tensor in nested dicts/lists/tuples."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point():
            yield prefix, tree
        return
    if isinstance(tree, float):
        yield prefix, tree
        return
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for k, v in items:
        yield from _float_leaves(v, f"{prefix}.{k}" if prefix else str(k))


def _read(path: Path) -> bytes:
    """A run-folder file's bytes, refusing a symlink (ValueError)."""
    with open(path, "rb", opener=_open) as f:
        return f.read()


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (the directory entry), where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["CHECKPOINT", "LORA", "LOG", "LOCK", "GRIDS", "RunError", "RunFolder", "non_finite", "render_log"]
