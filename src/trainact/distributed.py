"""The only place trainact talks to torch.distributed: which group to sum statistics over,
and the all-reduce itself. Single-process runs never reach a collective.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Literal, TypeGuard, Union

import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from types import FrameType

    from torch.distributed.tensor import DTensor

#: "auto": the default group whenever torch.distributed runs with world size > 1;
#: None: each process keeps its own statistics; or an explicit ProcessGroup.
ProcessGroupArg = Union[Literal["auto"], None, "dist.ProcessGroup"]


def resolve(process_group: ProcessGroupArg) -> dist.ProcessGroup | None:
    """The group whose statistics are summed this step, or None for purely local statistics."""
    if process_group is None or not dist.is_available() or not dist.is_initialized():
        return None
    group = dist.group.WORLD if process_group == "auto" else process_group
    return group if dist.get_world_size(group) > 1 else None


# The latest collective's Work handle, held until the next one starts. Dropped at once, the
# handle (and the tensor it sums) would be freed by gloo's worker thread, which needs the GIL
# for a tensor Python has seen; if the main thread meanwhile tears the process group down (it
# holds the GIL while joining that thread), the process hangs at exit. Seen with torchrun,
# defer=True and a loaded CPU on torch 2.13; holding the handle moves the free to this thread.
_latest_work: dist.Work | None = None


def all_reduce_async(tensor: Tensor, group: dist.ProcessGroup) -> dist.Work:
    """Start summing ``tensor`` in place across ``group``; wait on the returned work."""
    global _latest_work
    _latest_work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return _latest_work


def all_reduce(tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Sum ``tensor`` in place across ``group`` (a no-op for None) and return it."""
    if group is not None:
        all_reduce_async(tensor, group).wait()
    return tensor


def world_size(process_group: ProcessGroupArg) -> int:
    """The number of processes whose statistics a step would combine now."""
    group = resolve(process_group)
    return 1 if group is None else dist.get_world_size(group)


_DDP_SOURCE = os.path.join("nn", "parallel", "distributed.py")


def in_ddp_join() -> bool:
    """Whether the caller runs inside the forward of a DistributedDataParallel whose join is
    enabled (by ``ddp.join()`` or ``Join([ddp, ...])``, and left so after the context ends),
    which shadows DDP's own collectives for processes that ran out of inputs, and no other.
    Read from the call stack: the layer has no reference to the wrapper around it."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "forward" and code.co_filename.endswith(_DDP_SOURCE):
            config = getattr(frame.f_locals.get("self"), "_join_config", None)
            return bool(getattr(config, "enable", False))
        frame = frame.f_back
    return False


def is_dtensor(tensor: Tensor) -> TypeGuard[DTensor]:
    """FSDP2 shards parameters (and their gradients) as DTensors."""
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "to_local")


def local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


__all__ = [
    "ProcessGroupArg",
    "all_reduce",
    "all_reduce_async",
    "in_ddp_join",
    "is_dtensor",
    "local",
    "resolve",
    "world_size",
]
