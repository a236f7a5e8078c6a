"""The statistics of one call of a layer: its input's patches reduced to n and XᵀX, as the
device's precision policy (:mod:`trainact.maths.precision`) says.

Under ``torch.compile`` the whole computation is one custom operator,
``trainact::call_statistics``, that runs eagerly inside the compiled graph: its chunk loop, its
data-dependent float32/float64 choice on the CPU and its TF32-off matmuls then never specialize
the graph, so one graph serves every batch size (``dynamic=True``, ``mark_dynamic``), with no
graph break.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainact.maths import precision as policy
from trainact.maths.statistics import PatchStatistics, SplitSums, split_quantum
from trainact.nn.adapters import Adapter, adapter_from_spec
from trainact.nn.state import TrActState


def call_statistics(
    adapter: Adapter, x: Tensor, precision: policy.Precision, state: TrActState
) -> PatchStatistics:
    """n and XᵀX of the patches of ``x`` (detached), in float64, on ``x``'s device (on the CPU
    for a device without float64), for the layer whose state is ``state``."""
    if torch.compiler.is_compiling():
        spec, padding_mode = adapter.spec()
        data = torch.ops.trainact.call_statistics(
            x,
            spec,
            padding_mode,
            state.lam_vector,
            precision.product,
            precision.host_solve,
            precision.fast_float64,
            precision.device,
        )
        return PatchStatistics(data, adapter.groups, adapter.dim)
    return _compute(adapter, x, precision, state.lam)


def _compute(
    adapter: Adapter, x: Tensor, precision: policy.Precision, lam: float
) -> PatchStatistics:
    device = torch.device("cpu") if precision.host_solve else x.device
    stats = PatchStatistics.zeros(adapter.groups, adapter.dim, device)
    n = adapter.num_patches(x)
    if n == 0:
        return stats
    with policy.ieee_float32_matmul():
        spread, mean = adapter.moments(x)
        if precision.product == policy.SPLIT_FLOAT32:
            largest = adapter.expand(adapter.largest(x, mean))
            exact_dtype = torch.int64 if precision.host_solve else torch.float64
            sums = SplitSums(split_quantum(largest), exact_dtype)
            for chunk, _ in adapter.chunks(x, torch.float32, mean):
                sums.add(chunk)
            sums.add_to(stats, adapter.expand(mean))
            return stats
        if precision.product == policy.CHECKED_FLOAT32 and n >= adapter.dim:
            limit = policy.float32_spread_limit(lam, adapter.dim)
            if spread.max() <= limit:  # the estimate; the product's own diagonal decides
                trial = PatchStatistics.zeros(adapter.groups, adapter.dim, device)
                if _accumulate(trial, adapter, x, mean, torch.float32).max() / n <= limit:
                    return trial
        _accumulate(stats, adapter, x, mean, torch.float64)
    return stats


def _accumulate(
    stats: PatchStatistics, adapter: Adapter, x: Tensor, mean: Tensor, dtype: torch.dtype
) -> Tensor:
    """Add the patches of ``x`` centered on ``mean``, the product in ``dtype``; returns the
    summed diagonal of Σ yyᵀ (the centered entries' squares)."""
    mean = mean.to(dtype)  # the shift, exactly as the chunks subtract it
    shift = adapter.expand(mean)
    diagonal = torch.zeros(adapter.groups, adapter.dim, dtype=dtype, device=x.device)
    for chunk, total in adapter.chunks(x, dtype, mean):
        diagonal += stats.add_chunk(chunk, shift, total)
    return diagonal


# The schema spelled out: torch 2.4 to 2.6 cannot infer it from string annotations
@torch.library.custom_op(
    "trainact::call_statistics",
    mutates_args=(),
    schema="(Tensor x, int[] spec, str padding_mode, Tensor lam, str product, bool host_solve, "
    "bool fast_float64, str device) -> Tensor",
)
def _call_statistics_op(
    x: Tensor,
    spec: list[int],
    padding_mode: str,
    lam: Tensor,
    product: str,
    host_solve: bool,
    fast_float64: bool,
    device: str,
) -> Tensor:
    adapter = adapter_from_spec(spec, padding_mode)
    precision = policy.Precision(product, host_solve, fast_float64, device)
    return _compute(adapter, x, precision, lam.item()).data


@_call_statistics_op.register_fake
def _(
    x: Tensor,
    spec: list[int],
    padding_mode: str,
    lam: Tensor,
    product: str,
    host_solve: bool,
    fast_float64: bool,
    device: str,
) -> Tensor:
    adapter = adapter_from_spec(spec, padding_mode)
    size = adapter.groups * adapter.dim * adapter.dim + 1
    return x.new_empty(size, dtype=torch.float64, device="cpu" if host_solve else x.device)
