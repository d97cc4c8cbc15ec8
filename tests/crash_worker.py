"""Run by tests/test_runfolder.py: `diffenv train ARGS`, optionally killing itself in the middle of a write.

    python tests/crash_worker.py [NAME:N] train ARGS...

With NAME:N, the N-th time the run folder opens a file named NAME (e.g. `checkpoint.pt.tmp`, `log.csv`)
the write puts half its bytes on disk and the process SIGKILLs itself: no `finally`, no cleanup, as an
OOM kill or a power cut would leave the folder.
"""

import os
import signal
import sys
from pathlib import Path

import torch

import agents.runfolder
from agents.cli import main
from torn_writes import TornFile  # tests/ is this script's folder, first on sys.path


def _flush_and_die(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def die_writing(name: str, n: int) -> None:
    opened = 0

    def open_(path, *args, **kwargs):
        nonlocal opened
        f = open(path, *args, **kwargs)
        if Path(path).name == name:
            opened += 1
            if opened == n:
                return TornFile(f, _flush_and_die)
        return f

    agents.runfolder.open = open_  # the module's writes look `open` up in its globals first


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = sys.argv[1:]
    if ":" in args[0]:
        name, n = args.pop(0).rsplit(":", 1)
        die_writing(name, int(n))
    sys.exit(main(args))
