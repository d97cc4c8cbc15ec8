"""Counting host syncs on any device: the aten ops that make the host wait for an accelerator's queue.

On CUDA `torch.cuda.set_sync_debug_mode` reports syncs itself; on the CPU there is no queue to wait for, so
this counts the ops that *would* sync there: reading a value (`.item()`, `float()`, `bool()`, `.tolist()`
go through `_local_scalar_dense`), ops whose output size depends on the data (`nonzero`, `unique`,
`masked_select`, boolean-mask indexing) and copies between devices. A CPU-side proxy: it sees only ops
dispatched while it is active, and `.tolist()`/`.cpu()` of CPU tensors, which dispatch nothing, are
counted through `Tensor.tolist`/`Tensor.cpu`/`Tensor.numpy`. The optimizer's reads of its step counters are
kept apart (`host_only`): in a GPU run those counters live on the host.
"""

from __future__ import annotations

import sys
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: aten ops that wait for the device (their packet names)
SYNC_OPS = {"_local_scalar_dense", "nonzero", "_unique", "_unique2", "unique_dim", "unique_consecutive",
            "masked_select", "repeat_interleave"}
#: ops that sync only with some arguments: indexing with a boolean mask (a hidden nonzero)
MASK_OPS = {"index", "index_put", "index_put_"}


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class HostSyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()  # syncs, per op
        self.host_only: Counter[str] = Counter()  # the same ops on tensors that live on the host in a GPU run

    @property
    def count(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("_to_copy", "copy_") and _crosses_devices(func, args, kwargs or {}):
            name = "device_copy"
        elif not (name in SYNC_OPS or (name in MASK_OPS and _has_bool_index(args))):
            return func(*args, **(kwargs or {}))
        # torch.optim reads its step counters with .item(); they stay on the host unless `capturable`/`fused`
        (self.host_only if _called_from("/torch/optim/") else self.ops)[name] += 1
        return func(*args, **(kwargs or {}))


def _called_from(path_part: str, depth: int = 12) -> bool:
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if path_part in frame.f_code.co_filename.replace("\\", "/"):
            return True
        frame = frame.f_back
    return False


def _crosses_devices(func, args, kwargs) -> bool:
    if func.overloadpacket.__name__ == "copy_":
        return args[0].device != args[1].device
    device = kwargs.get("device")
    return device is not None and torch.device(device) != args[0].device


@contextmanager
def count_host_syncs():
    """`with count_host_syncs() as counter: ...`; then `counter.count` and `counter.ops` (per op)."""
    counter = HostSyncCounter()
    patched = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu", "numpy")}

    def wrap(name, method):
        def counted(self, *a, **k):
            counter.ops[name] += 1
            return method(self, *a, **k)
        return counted

    for name, method in patched.items():
        setattr(torch.Tensor, name, wrap(name, method))
    try:
        with counter:
            yield counter
    finally:
        for name, method in patched.items():
            setattr(torch.Tensor, name, method)
