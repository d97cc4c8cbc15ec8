"""A file wrapper whose `write` puts half its bytes on disk and then calls `after()` (raise, or kill the process):
the torn write of a crash or a full disk, for tests/test_runfolder.py and tests/crash_worker.py."""

from collections.abc import Callable


class TornFile:
    def __init__(self, f, after: Callable[[object], None]):
        self.f, self.after = f, after

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.after(self.f)
