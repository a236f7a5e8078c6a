"""The statistics of one call of a layer: its input's patches reduced to n and XᵀX, as the
device's precision policy (:mod:`trainact.maths.precision`) says.

The input is taken in bounded slices (sized by :func:`trainact.nn.adapters.chunk_budget`: cache
sized on the CPU, a fraction of the device's memory elsewhere); each slice's patches are written
once into a reused chunk buffer (centered on the channel means on the way, or split into the
split product's parts) and multiplied there; the shift and cross terms are assembled once per
call (:mod:`trainact.maths.statistics`).

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
from trainact.maths.statistics import (
    ExtendedGram,
    PatchStatistics,
    SplitSums,
    extended_buffer,
    split_quantum,
)
from trainact.nn.adapters import Adapter, adapter_from_spec, chunk_budget
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
            precision.memory or 0,
            precision.int8,
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
            _split_product(stats, adapter, x, mean, precision)
            return stats
        if precision.product == policy.CHECKED_FLOAT32 and n >= adapter.dim:
            limit = policy.float32_spread_limit(lam, adapter.dim)
            if spread.max() <= limit:  # the estimate; the product's own diagonal decides
                trial = PatchStatistics.zeros(adapter.groups, adapter.dim, device)
                squares = _product(trial, adapter, x, mean, torch.float32, precision)
                if squares.max() / n <= limit:
                    return trial
        _product(stats, adapter, x, mean, torch.float64, precision)
    return stats


def _columns(
    adapter: Adapter, x: Tensor, precision: policy.Precision, per_column: int, per_element: int
) -> int:
    """Columns per chunk: the budget over the chunk buffers' bytes per column and the bytes of
    the input-sized temporaries they are made from; at least the smallest piece the adapter
    cuts (one row of outputs of one sample), at most every patch."""
    budget = chunk_budget(x.device, precision.memory)
    cost = per_column + per_element * adapter.input_elements_per_column(x)
    return min(max(adapter.smallest_piece(x), int(budget // cost)), adapter.num_patches(x))


def _padding_bytes(adapter: Adapter, x: Tensor) -> int:
    """Bytes per input element of a padded copy of an input slice (none without padding)."""
    return x.element_size() if adapter.padded_shape(x.shape) != list(x.shape) else 0


def _product(
    stats: PatchStatistics,
    adapter: Adapter,
    x: Tensor,
    mean: Tensor,
    dtype: torch.dtype,
    precision: policy.Precision,
) -> Tensor:
    """Add the patches of ``x`` centered on ``mean``, the product in ``dtype``; returns the
    summed squares of the centered entries, ``(groups, d)``."""
    groups, dim = adapter.groups, adapter.dim
    shift = mean.to(dtype)  # subtracted exactly in float64, rounded once in float32
    per_column = groups * (dim + 1) * dtype.itemsize
    cols = _columns(adapter, x, precision, per_column, _padding_bytes(adapter, x))
    buffer = extended_buffer(groups, dim, cols, dtype, x.device)
    gram = ExtendedGram(groups, dim, x.device)
    on_patches = adapter.entrywise(shift)
    for part in adapter.slices(x, cols):
        for piece in adapter.pieces(adapter.padded(part), cols):
            width = piece.numel() // (groups * dim)
            torch.sub(piece, on_patches, out=buffer[:, :dim, :width].view(piece.shape))
            gram.add(buffer[..., :width])
    gram.add_to(stats, adapter.expand(shift))
    return gram.squares()


def _split_product(
    stats: PatchStatistics, adapter: Adapter, x: Tensor, mean: Tensor, precision: policy.Precision
) -> None:
    """Add the patches of ``x`` centered on ``mean`` by the split product (z = (x − mean)/q,
    k = round(z)). Where the input is about as large as its patches (kernels that do not
    overlap), z and k are made in the chunk buffers from the patches; otherwise once per input
    slice, and the chunk buffers are written from their patches."""
    groups, dim = adapter.groups, adapter.dim
    quantum = split_quantum(adapter.largest(x, mean), mean)  # per channel
    int8 = precision.int8 and policy.has_int8_kernel(x.device)
    exact_dtype = torch.int64 if precision.host_solve else torch.float64
    sums = SplitSums(adapter.expand(quantum), int8, exact_dtype)
    scale = quantum.reciprocal()  # z = x·scale + offset, exactly (q is a power of two)
    offset = (mean * scale).neg_()
    on_patches = 2 * adapter.input_elements_per_column(x) > dim
    per_column = SplitSums.bytes_per_column(groups, dim, int8)
    # input-sized: float32 z and round(z), and that in int8 for int8 products
    per_element = _padding_bytes(adapter, x) if on_patches else 8 + int8
    cols = _columns(adapter, x, precision, per_column, per_element)
    buffers = sums.buffers(cols, adapter.num_patches(x))
    if on_patches:
        _split_patches(sums, buffers, adapter, x, offset, scale, cols)
    else:
        _split_input_slices(sums, buffers, adapter, x, offset, scale, cols, int8)
    sums.add_to(stats, adapter.expand(mean))


def _split_patches(
    sums: SplitSums,
    buffers: tuple[Tensor, Tensor],
    adapter: Adapter,
    x: Tensor,
    offset: Tensor,
    scale: Tensor,
    cols: int,
) -> None:
    """z and k made in the chunk buffers, from each chunk's patches: z in the pair buffer's
    second half, k in its first, then (k, z) becomes (z + k, z − k) in place."""
    (k_buffer, pair_buffer), dim = buffers, adapter.dim
    offset, scale = adapter.entrywise(offset), adapter.entrywise(scale)
    for part in adapter.slices(x, cols):
        for piece in adapter.pieces(adapter.padded(part), cols):
            width = piece.numel() // (adapter.groups * dim)
            rounded, z = pair_buffer[..., :dim, :width]
            torch.addcmul(offset, piece, scale, out=z.view(piece.shape))
            torch.round(z, out=rounded)
            k_buffer[:, :dim, :width].copy_(rounded)
            sums.pair_in_place(rounded, z)
            sums.add(k_buffer, pair_buffer, width)


def _split_input_slices(
    sums: SplitSums,
    buffers: tuple[Tensor, Tensor],
    adapter: Adapter,
    x: Tensor,
    offset: Tensor,
    scale: Tensor,
    cols: int,
    int8: bool,
) -> None:
    """z and k made once per input slice in reused input-sized buffers (with zero padding,
    their padding written once: a zero, centered and scaled), the chunk buffers copied from
    their patches: k, and (z + k, z − k) by one operation."""
    (k_buffer, pair_buffer), dim = buffers, adapter.dim
    offset, scale = adapter.channelwise(offset), adapter.channelwise(scale)
    inputs: tuple[Tensor, Tensor, Tensor] | None = None  # z, round(z), k in k_buffer's dtype
    for part in adapter.slices(x, cols):
        if adapter.zero_padding:
            if inputs is None:  # the first slice is the largest
                z = part.new_empty(adapter.padded_shape(part.shape), dtype=torch.float32)
                if z.shape != part.shape:
                    z.copy_(offset.expand_as(z))
            else:
                z = inputs[0][: len(part)]
            torch.addcmul(offset, part, scale, out=adapter.unpadded(z))
        else:
            z = torch.addcmul(offset, adapter.padded(part), scale)
        if inputs is None:
            rounded = torch.empty_like(z)
            inputs = z, rounded, torch.empty_like(z, dtype=torch.int8) if int8 else rounded
        rounded, k = torch.round(z, out=inputs[1][: len(part)]), inputs[2][: len(part)]
        if int8:
            k.copy_(rounded)
        views = (adapter.pieces(t, cols) for t in (z, rounded, k))
        for z_piece, rounded_piece, k_piece in zip(*views, strict=True):
            width = k_piece.numel() // (adapter.groups * dim)
            k_buffer[:, :dim, :width].view(k_piece.shape).copy_(k_piece)
            out = pair_buffer[..., :dim, :width].view(2, *k_piece.shape)
            sums.pair(z_piece, rounded_piece, out)
            sums.add(k_buffer, pair_buffer, width)


# The schema spelled out: torch 2.4 to 2.6 cannot infer it from string annotations
@torch.library.custom_op(
    "trainact::call_statistics",
    mutates_args=(),
    schema="(Tensor x, int[] spec, str padding_mode, Tensor lam, str product, bool host_solve, "
    "bool fast_float64, str device, int memory, bool int8) -> Tensor",
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
    memory: int,
    int8: bool,
) -> Tensor:
    adapter = adapter_from_spec(spec, padding_mode)
    precision = policy.Precision(product, host_solve, fast_float64, device, memory or None, int8)
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
    memory: int,
    int8: bool,
) -> Tensor:
    adapter = adapter_from_spec(spec, padding_mode)
    size = adapter.groups * adapter.dim * adapter.dim + 1
    return x.new_empty(size, dtype=torch.float64, device="cpu" if host_solve else x.device)
