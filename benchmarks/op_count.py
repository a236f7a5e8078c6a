"""How many kernels does one training call of a first layer launch, and how much memory traffic?

    python benchmarks/op_count.py          # ResNet-50 stem and ViT-B/16 embedding, batch 256
    python benchmarks/op_count.py --batch 32 --json counts.json
    python benchmarks/op_count.py --device cuda    # also this GPU's policy, each path of it

Counted on the meta device (no GPU, no data: shapes only) under a GPU's precision policy
(:func:`trainact.maths.precision.gpu_precision`, forced with
:func:`trainact.maths.precision.use_precision`), by a ``TorchDispatchMode`` that sees every
aten operation of ``layer(x).sum().backward()`` (a plain layer: 4, its convolution, the sum, the
seed gradient and the convolution's backward):

- **operations**: every aten operation but views (``view``, ``permute``, ``unfold``, slices,
  ``_unsafe_view``: they launch no kernel); on a GPU each is at least one kernel launch;
- **traffic**: the bytes each operation reads and writes, every tensor argument in full (a
  GEMM's operands too, a strided view as its element count), in passes over the layer's float32
  patch matrix (n·d·4 bytes); the destination of ``copy_``, ``fill_``, ``zero_`` and of an
  ``out=`` argument is counted as written only, an allocation (``empty``) as nothing;
- **extra peak memory**: the most bytes held at once by the tensors TrAct's own operations make
  (every operation but the plain call's), against the device memory the chunk rule was given.

The policies are the H100's (compute capability 9.0, full-rate float64, 80 GB) and the RTX
4090's (8.9, reduced-rate float64, 24 GB); ``--memory-gb`` changes the memory of both.
``--device`` adds a GPU's own policy with each ``statistics_dtype`` (default, float32: the
split product, float64) at its own memory: the GPU check (``benchmarks/gpu_check.py``) prints
these counts beside the times it measures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import weakref
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import trainact
from trainact.maths.precision import (
    CHECKED_FLOAT32,
    Precision,
    gpu_precision,
    precision_for,
    use_precision,
)
from trainact.nn.adapters import adapter_for

GB = 10**9
#: The layers counted: name -> (layer factory, input shape per sample).
LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "ResNet-50 stem (3→64, 7×7/2)": (
        lambda: nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
        (3, 224, 224),
    ),
    "ViT-B/16 patch embedding (3→768, 16×16/16)": (
        lambda: nn.Conv2d(3, 768, 16, stride=16),
        (3, 224, 224),
    ),
}
#: The policies counted: name -> (gpu_precision's arguments, device memory in bytes).
POLICIES: dict[str, tuple[tuple[str, int, int], int]] = {
    "H100": (("NVIDIA H100 80GB HBM3", 9, 0), 80 * GB),
    "RTX 4090": (("NVIDIA GeForce RTX 4090", 8, 9), 24 * GB),
}
_WRITE_ONLY = {"aten::copy_", "aten::fill_", "aten::zero_"}
_VIEW_LIKE = {"aten::_unsafe_view"}  # a view by another name: no kernel
#: Allocations: an operation each, but they read and write nothing.
_ALLOCATIONS = {"aten::empty", "aten::new_empty", "aten::empty_like", "aten::empty_strided"}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class OpCounter(TorchDispatchMode):
    """Counts the operations, traffic and live bytes of whatever runs inside it."""

    def __init__(self, own: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.own = own  # the plain layer's operations: their tensors are not TrAct's
        self.ops: Counter[str] = Counter()
        self.traffic: Counter[str] = Counter()
        self.live = 0
        self.peak = 0
        self._seen: weakref.WeakSet[torch.UntypedStorage] = weakref.WeakSet()

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        self._seen.add(storage)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        if func.is_view or name in _VIEW_LIKE:
            return out
        written_only = {
            id(kwargs[a.name])
            for a in func._schema.arguments
            if a.kwarg_only and a.alias_info is not None and a.alias_info.is_write
            and isinstance(kwargs.get(a.name), torch.Tensor)
        }  # fmt: skip
        if name in _WRITE_ONLY:
            written_only.add(id(args[0]))
        read = [
            t
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and id(t) not in written_only
        ]
        written = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.ops[str(func)] += 1
        if name not in _ALLOCATIONS:
            self.traffic[str(func)] += sum(_nbytes(t) for t in read + written)
        if str(func) not in self.own:
            for t in written:
                self._track(t)
        return out

    @property
    def count(self) -> int:
        return sum(self.ops.values())


@dataclasses.dataclass
class Counts:
    """One layer's training call under one policy."""

    ops: int
    plain_ops: int
    passes: float  # traffic over the float32 patch matrix's bytes
    plain_passes: float
    extra_peak_bytes: int
    memory: int  # the device memory the chunk rule was given
    by_op: dict[str, int]

    @property
    def extra_peak_fraction(self) -> float:
        return self.extra_peak_bytes / self.memory


def _call(
    make: Callable[[], nn.Module], shape: tuple[int, ...], own: frozenset[str] | None = None
) -> OpCounter:
    """``layer(x).sum().backward()`` counted: the plain layer's, or with TrAct where ``own`` (the
    plain call's operations) is given."""
    with torch.device("meta"):
        layer = make()
    if own is not None:
        trainact.TrAct(layer)
    x = torch.empty(shape, device="meta")
    with OpCounter(own or frozenset()) as counter:
        layer(x).sum().backward()
    return counter


def count(
    make: Callable[[], nn.Module],
    batch: int,
    policy: Precision,
    memory: int = 80 * GB,
    sample: tuple[int, ...] = (3, 224, 224),
) -> Counts:
    """The operations, traffic and extra peak memory of one training call (forward, backward)
    of the layer ``make()`` with TrAct on a batch of ``batch`` inputs of shape ``sample``, under
    ``policy`` (e.g. ``gpu_precision("RTX 4090", 8, 9)``) on a device of ``memory`` bytes."""
    policy = dataclasses.replace(policy, memory=memory)
    shape = (batch, *sample)
    with use_precision(policy):
        plain = _call(make, shape)
        tract = _call(make, shape, frozenset(plain.ops))
    # TrAct may run fewer of them (the n×n form has its own backward), never more: its own
    # tensors would then be missed in the extra peak
    extra = {op: tract.ops[op] - n for op, n in plain.ops.items() if tract.ops[op] > n}
    if extra:
        raise RuntimeError(f"TrAct ran the plain layer's operations {extra}: the peak misses them")
    with torch.device("meta"):
        adapter = adapter_for(make())  # type: ignore[arg-type]
    patch_bytes = adapter.num_patches(torch.empty(shape, device="meta")) * adapter.dim * 4
    patch_bytes *= adapter.groups
    return Counts(
        ops=tract.count,
        plain_ops=plain.count,
        passes=sum(tract.traffic.values()) / patch_bytes,
        plain_passes=sum(plain.traffic.values()) / patch_bytes,
        extra_peak_bytes=tract.peak,
        memory=memory,
        by_op=dict(tract.ops.most_common()),
    )


def policies(device: str | None, memory_gb: float | None) -> dict[str, tuple[Precision, int]]:
    """The policies counted, by name: the H100's and the RTX 4090's, and ``device``'s with each
    statistics dtype (its CPU default, which decides on the data, cannot run on meta)."""
    chosen = {}
    for name, (arguments, memory) in POLICIES.items():
        memory = int(memory_gb * GB) if memory_gb else memory
        chosen[f"{name} ({memory / GB:.0f} GB)"] = gpu_precision(*arguments), memory
    if device is not None:
        for label, dtype in (
            ("default", None),
            ("float32", torch.float32),
            ("float64", torch.float64),
        ):
            policy = precision_for(torch.device(device), dtype, torch.float32)
            if policy.product != CHECKED_FLOAT32:
                memory = policy.memory or 80 * GB
                chosen[f"{device} {label} ({memory / GB:.0f} GB)"] = policy, memory
    return chosen


def table(batch: int, chosen: dict[str, tuple[Precision, int]]) -> list[dict[str, Any]]:
    """Every layer under every policy: one row each, printed as a Markdown table."""
    rows = []
    print(f"batch {batch}; operations per call (plain layer in parentheses), traffic in passes")
    print("over the layer's float32 patch matrix, extra peak memory against the device's\n")
    print("| layer | policy | product | operations | traffic (passes) | extra peak |")
    print("|---|---|---|---:|---:|---:|")
    for layer_name, (make, sample) in LAYERS.items():
        for policy_name, (policy, memory) in chosen.items():
            c = count(make, batch, policy, memory, sample)
            row = {"layer": layer_name, "policy": policy_name, "product": policy.product}
            row |= dataclasses.asdict(c) | {"extra_peak_fraction": c.extra_peak_fraction}
            rows.append(row)
            print(
                f"| {layer_name} | {policy_name} | {policy.product} | "
                f"{c.ops:,} ({c.plain_ops}) | {c.passes:.1f} ({c.plain_passes:.1f}) | "
                f"{c.extra_peak_bytes / 2**20:,.0f} MiB = {100 * c.extra_peak_fraction:.2f}% |",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--memory-gb", type=float, help="the two cards' memory, in GB")
    parser.add_argument("--device", help="also this device's policy (cuda, cuda:1, ...)")
    parser.add_argument("--by-op", action="store_true", help="also each operation's count")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = table(args.batch, policies(args.device, args.memory_gb))
    if args.by_op:
        for row in rows:
            print(f"\n{row['layer']}, {row['policy']}: {row['by_op']}")
    if args.json:
        args.json.write_text(json.dumps({"batch": args.batch, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
