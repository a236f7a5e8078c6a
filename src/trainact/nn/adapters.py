"""One adapter per layer family: how a layer sees its input as patches.

Every adapter answers the same questions (the kfac-pytorch pattern): the patch geometry (groups,
d per group, n for an input), the input's per-channel moments, and the patches themselves as
views of bounded slices of the (padded) input, ``(groups, d, cols)`` by their layout (patches
as columns, see :mod:`trainact.maths.statistics`), or, for n < d, as rows, taken exactly as the
layer's forward sees its input (after its padding mode, with its stride, dilation and groups).
An adapter holds the geometry only (plain numbers), so that it can be rebuilt from
:meth:`spec` (the compile-time custom op of :mod:`trainact.nn.call_statistics` does).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from types import EllipsisType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The CPU's chunk: one that stays in cache between its copy and its product is fastest
#: (the ImageNet stem, 2026-12-06: 4 and 16 MiB equal, 64 MiB a third slower; docs/cost.md).
CHUNK_BYTES = 4 * 2**20
#: An accelerator's chunk: its working set (its buffers and the input-sized tensors they are
#: copied from) is at most this fraction of the device's memory, so that a call launches a few
#: large kernels (the ResNet-50 stem at batch 256: 4 chunks on an 80 GB device) and TrAct's
#: extra peak memory stays within 2% of the device's (``benchmarks/op_count.py``).
MEMORY_FRACTION = 1 / 64
#: The memory assumed for an accelerator that does not say (MPS, other device types).
UNKNOWN_MEMORY = 8 * 2**30


def chunk_budget(device: torch.device, memory: int | None) -> int:
    """The bytes of one chunk's working set for tensors on ``device``, of ``memory`` bytes."""
    if device.type == "cpu":
        return CHUNK_BYTES
    return int((memory or UNKNOWN_MEMORY) * MEMORY_FRACTION)


#: A layer TrAct supports (or a subclass of one that keeps its forward).
Layer = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d
SUPPORTED_TYPES: tuple[type[Layer], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LinearAdapter:
    """``nn.Linear`` on inputs of any number of leading dimensions: one patch per row."""

    groups = 1

    def __init__(self, in_features: int) -> None:
        self.dim = in_features

    def spec(self) -> tuple[list[int], str]:
        return [0, self.dim], ""

    def num_patches(self, input: Tensor) -> int:
        return input.numel() // self.dim if input.dim() > 0 else 0

    def valid(self, input: Tensor) -> bool:
        """Whether the layer's forward accepts ``input``'s shape (else it raises its own error)."""
        return input.dim() > 0 and input.shape[-1] == self.dim

    def moments(self, input: Tensor) -> tuple[Tensor, Tensor]:
        """The mean of each input feature and the mean square of each centered feature over
        every row, ``(d,)`` float32 each (input non-empty)."""
        rows = input.reshape(-1, self.dim)
        return _var_mean(rows, [0])

    def largest(self, input: Tensor, mean: Tensor) -> Tensor:
        """The largest |x − mean| of each feature, ``(d,)`` float32."""
        rows = input.reshape(-1, self.dim)
        high = rows.amax(0).float() - mean
        return torch.maximum(high, mean - rows.amin(0).float())

    def expand(self, per_feature: Tensor) -> Tensor:
        """A per-feature vector as the ``(groups, d)`` value of each patch entry."""
        return per_feature.unsqueeze(0)

    def slices(self, input: Tensor, cols: int) -> Iterator[Tensor]:
        """The rows, ``cols`` at a time."""
        rows = input.reshape(-1, self.dim)
        step = _multiple_of_8(cols, 1)
        for start in range(0, rows.shape[0], step):
            yield rows[start : start + step]

    def padded(self, rows: Tensor) -> Tensor:
        return rows

    def padded_shape(self, shape: torch.Size) -> list[int]:
        return list(shape)

    #: Whether the padding is constant zeros (or none): a transformed slice can then be written
    #: into the :meth:`unpadded` part of a buffer whose padding holds the transformed zero.
    zero_padding = True

    def unpadded(self, padded: Tensor) -> Tensor:
        return padded

    def pieces(self, rows: Tensor, cols: int) -> Iterator[Tensor]:
        """A slice of rows ``(r, d)`` as patch columns ``(1, d, r)``."""
        yield rows.mT.unsqueeze(0)

    def channelwise(self, per_feature: Tensor) -> Tensor:
        """A per-feature vector shaped to broadcast over rows."""
        return per_feature

    def entrywise(self, per_feature: Tensor) -> Tensor:
        """A per-feature vector shaped to broadcast over :meth:`pieces`."""
        return per_feature.view(1, -1, 1)

    def input_elements_per_column(self, input: Tensor) -> float:
        return self.dim

    def smallest_piece(self, input: Tensor) -> int:
        """The fewest columns :meth:`pieces` cuts: one row."""
        return 1

    def rows(self, input: Tensor) -> Tensor:
        """The patches as rows, ``(1, n, d)``."""
        return input.reshape(1, -1, self.dim)

    def grad_rows(self, grad: Tensor) -> Tensor:
        """The output gradient as ``(1, n, out)``, row i belonging to patch i."""
        return grad.reshape(1, -1, grad.shape[-1])

    def bias_grad(self, grad: Tensor) -> Tensor:
        """The bias gradient from the output gradient, summed in at least float32."""
        dtype = torch.promote_types(grad.dtype, torch.float32)
        return grad.reshape(-1, grad.shape[-1]).sum(0, dtype=dtype)


class ConvAdapter:
    """``nn.Conv1d/2d/3d`` with every option: stride, padding (incl. 'same'), dilation, groups,
    padding_mode; the patch matrix is a strided view of the (padded) input, copied chunk by chunk.
    """

    def __init__(
        self,
        in_channels: int,
        groups: int,
        kernel_size: tuple[int, ...],
        stride: tuple[int, ...],
        dilation: tuple[int, ...],
        pads: list[int],
        padding_mode: str,
    ) -> None:
        self.in_channels, self.groups = in_channels, groups
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.pads, self.padding_mode = pads, padding_mode  # pads in F.pad order
        self.spatial = len(kernel_size)
        self.dim = in_channels // groups * math.prod(kernel_size)

    @classmethod
    def of(cls, layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> ConvAdapter:
        return cls(
            layer.in_channels,
            layer.groups,
            tuple(layer.kernel_size),
            tuple(layer.stride),
            tuple(layer.dilation),
            list(layer._reversed_padding_repeated_twice),
            layer.padding_mode,
        )

    def spec(self) -> tuple[list[int], str]:
        geometry = [*self.kernel_size, *self.stride, *self.dilation, *self.pads]
        return [self.spatial, self.in_channels, self.groups, *geometry], self.padding_mode

    def _output_size(self, input: Tensor) -> list[int]:
        sizes = []
        for i in range(self.spatial):
            # F.pad order is last dimension first.
            j = 2 * (self.spatial - 1 - i)
            span = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            size = input.shape[input.dim() - self.spatial + i]  # batched or not
            sizes.append((size + self.pads[j] + self.pads[j + 1] - span) // self.stride[i] + 1)
        return sizes

    def num_patches(self, input: Tensor) -> int:
        batch = input.shape[0] if input.dim() == self.spatial + 2 else 1
        return batch * math.prod(self._output_size(input))

    def valid(self, input: Tensor) -> bool:
        """Whether the layer's forward accepts ``input``'s shape (a kernel no larger than the
        padded input, the channel count right; else it raises its own error)."""
        if input.dim() not in (self.spatial + 1, self.spatial + 2):
            return False
        channels = input.shape[1 if input.dim() == self.spatial + 2 else 0]
        return channels == self.in_channels and all(s > 0 for s in self._output_size(input))

    def _batched(self, input: Tensor) -> Tensor:
        return input.unsqueeze(0) if input.dim() == self.spatial + 1 else input

    def _zero_padded(self) -> bool:
        return self.padding_mode == "zeros" and any(self.pads)

    def _read(self, input: Tensor) -> Tensor:
        """The (batched) input restricted to the positions the layer reads, so that a value it
        never reads (past a strided convolution's last window, or between windows when the
        stride exceeds the kernel's span) cannot change the statistics: NaN or 1e20 there
        leaves TrAct's gradient finite, as the plain one is."""
        x = self._batched(input)
        for i in range(self.spatial):
            j = 2 * (self.spatial - 1 - i)  # F.pad order is last dimension first
            dim = 2 + i
            read = _read_positions(
                x.shape[dim],
                self.kernel_size[i],
                self.stride[i],
                self.dilation[i],
                self.pads[j],
                self.pads[j + 1],
                self.padding_mode,
            )
            if isinstance(read, slice):
                x = x[(slice(None),) * dim + (read,)]
            elif read is not None:
                x = x.index_select(dim, torch.tensor(read, device=x.device))
        return x

    def moments(self, input: Tensor) -> tuple[Tensor, Tensor]:
        """The mean of each input channel and an estimate of the mean square of its centered
        patch entries, ``(C,)`` float32 each (input non-empty), over the values the layer reads:
        the channel's variance, plus mean² where zero padding puts entries at −mean once
        centered."""
        input = self._read(input)
        spread, mean = _var_mean(input, [0, *range(2, input.dim())])
        if self._zero_padded():
            spread = spread + mean.square()
        return spread, mean

    def largest(self, input: Tensor, mean: Tensor) -> Tensor:
        """The largest |x − mean| of each channel over the values the layer reads, ``(C,)``
        float32 (|mean| with zero padding)."""
        input = self._read(input)
        dims = [0, *range(2, input.dim())]
        largest = torch.maximum(input.amax(dims).float() - mean, mean - input.amin(dims).float())
        return torch.maximum(largest, mean.abs()) if self._zero_padded() else largest

    def expand(self, per_channel: Tensor) -> Tensor:
        """A per-channel vector as the ``(groups, d)`` value of each patch entry."""
        kernel = math.prod(self.kernel_size)
        per_entry = per_channel.view(self.groups, -1, 1).expand(-1, -1, kernel)
        return per_entry.reshape(self.groups, -1)

    def slices(self, input: Tensor, cols: int) -> Iterator[Tensor]:
        """Batch slices of the input whose patches are at most ``cols`` columns (or one sample)."""
        input = self._batched(input)
        per_sample = math.prod(self._output_size(input))
        step = _multiple_of_8(max(1, cols // per_sample), per_sample)
        for start in range(0, input.shape[0], step):
            yield input[start : start + step]

    def padded(self, x: Tensor) -> Tensor:
        """A batch slice as the layer's kernels see it: padded by its padding mode."""
        if not any(self.pads):
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, self.pads, mode=mode)

    def padded_shape(self, shape: torch.Size) -> list[int]:
        """The shape of a batch slice of ``shape`` once padded."""
        padded = list(shape)
        for i in range(self.spatial):
            j = 2 * (self.spatial - 1 - i)
            padded[len(shape) - self.spatial + i] += self.pads[j] + self.pads[j + 1]
        return padded

    @property
    def zero_padding(self) -> bool:
        """Whether the padding is constant zeros (or none): a transformed slice can then be
        written into the :meth:`unpadded` part of a buffer whose padding holds the transformed
        zero."""
        return self.padding_mode == "zeros" or not any(self.pads)

    def unpadded(self, padded: Tensor) -> Tensor:
        """The input's part of a padded batch slice (a view)."""
        index = [slice(None)] * (padded.dim() - self.spatial)
        for i in range(self.spatial):
            j = 2 * (self.spatial - 1 - i)
            size = padded.shape[padded.dim() - self.spatial + i]
            index.append(slice(self.pads[j], size - self.pads[j + 1]))
        return padded[tuple(index)]

    def pieces(self, x: Tensor, cols: int) -> Iterator[Tensor]:
        """The patches of a padded batch slice ``(b, C, *S)`` as strided views
        ``(g, C/g, *kernel, b, *out)`` of at most ``cols`` columns each: the whole slice, or
        one sample split along its first output dimension."""
        v = self._patches(x)
        out = v.shape[v.dim() - self.spatial :]
        if v.shape[v.dim() - self.spatial - 1] * math.prod(out) <= cols:
            yield v
            return
        first_out = v.dim() - self.spatial
        step = max(1, cols // math.prod(out[1:]))
        for start in range(0, out[0], step):
            yield v.narrow(first_out, start, min(step, out[0] - start))

    def channelwise(self, per_channel: Tensor) -> Tensor:
        """A per-channel vector shaped to broadcast over batch slices."""
        return per_channel.view(-1, *([1] * self.spatial))

    def entrywise(self, per_channel: Tensor) -> Tensor:
        """A per-channel vector shaped to broadcast over :meth:`pieces`."""
        return per_channel.view(self.groups, -1, *([1] * (2 * self.spatial + 1)))

    def smallest_piece(self, input: Tensor) -> int:
        """The fewest columns :meth:`pieces` cuts: one row of outputs of one sample."""
        return math.prod(self._output_size(input)[1:])

    def input_elements_per_column(self, input: Tensor) -> float:
        """Elements of the padded input per patch: what an input-sized temporary costs per
        column of a chunk."""
        sample = self._batched(input)[0]
        padded = math.prod(self.padded_shape(sample.shape))
        return padded / math.prod(self._output_size(sample))

    def rows(self, input: Tensor) -> Tensor:
        """The patches as rows, ``(groups, n, d)``, ordered as :meth:`grad_rows` orders the
        output gradient (batch, then output positions)."""
        v = self._patches(self.padded(self._batched(input)))
        return v.reshape(self.groups, self.dim, -1).mT

    def grad_rows(self, grad: Tensor) -> Tensor:
        """The output gradient ``(b, out, *out_size)`` as ``(groups, n, out/groups)``."""
        grad = self._batched(grad)
        per_group: Tensor = grad.unflatten(1, (self.groups, -1))  # (b, g, out/g, *S)
        order = [1, 0, *range(3, per_group.dim()), 2]
        return per_group.permute(order).reshape(self.groups, -1, per_group.shape[2])

    def bias_grad(self, grad: Tensor) -> Tensor:
        """The bias gradient from the output gradient, summed in at least float32."""
        grad = self._batched(grad)
        dtype = torch.promote_types(grad.dtype, torch.float32)
        return grad.sum([0, *range(2, grad.dim())], dtype=dtype)

    def _patches(self, x: Tensor) -> Tensor:
        """The patches of a padded input as a strided view ``(g, C/g, *kernel, b, *out)``: a
        patch per column, its rows ordered as ``weight[o].flatten()``; copying it out runs along
        the input's contiguous last dimension."""
        n_sp = self.spatial
        # (b, C, *S) -> (b, g, C/g, *S) -> unfold each spatial dim: (b, g, C/g, *out, *span)
        v: Tensor = x.unflatten(1, (self.groups, -1))
        for i in range(n_sp):
            span = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            v = v.unfold(3 + i, span, self.stride[i])
        if any(d > 1 for d in self.dilation):
            every_dth: tuple[EllipsisType | slice, ...]
            every_dth = (..., *(slice(None, None, d) for d in self.dilation))
            v = v[every_dth]
        return v.permute([1, 2, *range(3 + n_sp, 3 + 2 * n_sp), 0, *range(3, 3 + n_sp)])


def _multiple_of_8(count: int, columns: int) -> int:
    """``count`` items of ``columns`` columns each, rounded down (where it can be) so that
    their columns are a multiple of 8: int8 products then need no zeroed margin."""
    unit = 8 // math.gcd(columns, 8)
    return count - count % unit if count >= unit else count


@functools.lru_cache(maxsize=256)
def _read_positions(
    size: int, kernel: int, stride: int, dilation: int, left: int, right: int, mode: str
) -> slice | tuple[int, ...] | None:
    """The positions along one spatial dimension of size ``size`` that a convolution reads,
    padding mode included (reflect, replicate and circular padding read input positions too):
    None for all of them, a slice for a contiguous run, else their indices."""
    padded = size + left + right
    span = dilation * (kernel - 1) + 1
    windows = range(0, padded - span + 1, stride)
    read: set[int] = set()
    for start in windows:
        for k in range(start, start + span, dilation):
            q = k - left
            if 0 <= q < size:
                read.add(q)
            elif mode == "reflect":
                read.add(-q if q < 0 else 2 * (size - 1) - q)
            elif mode == "replicate":
                read.add(min(max(q, 0), size - 1))
            elif mode == "circular":
                read.add(q % size)
    if len(read) == size:
        return None
    first, last = min(read), max(read)
    if last - first + 1 == len(read):
        return slice(first, last + 1)
    return tuple(sorted(read))


def _var_mean(x: Tensor, dims: list[int]) -> tuple[Tensor, Tensor]:
    """Population variance and mean over ``dims`` as float32, accumulated in at least float32
    whatever ``x``'s dtype (a float16 sum overflows past 65504), from Σx and ‖x‖² (one fast
    pass each; ``torch.var_mean`` over a channel's strided elements measured 8× slower)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    total = x.sum(dims, dtype=dtype)
    count = max(x.numel() // max(total.numel(), 1), 1)
    mean = total / count
    square = torch.linalg.vector_norm(x, dim=dims, dtype=dtype).square() / count
    return (square - mean.square()).clamp_min(0).float(), mean.float()


Adapter = LinearAdapter | ConvAdapter


def adapter_for(layer: Layer) -> Adapter:
    """The adapter of a layer that :func:`trainact.nn.checks.check_supported` accepted."""
    return (
        LinearAdapter(layer.in_features) if isinstance(layer, nn.Linear) else ConvAdapter.of(layer)
    )


def adapter_from_spec(spec: list[int], padding_mode: str) -> Adapter:
    """The adapter whose :meth:`spec` this is."""
    spatial, rest = spec[0], spec[1:]
    if spatial == 0:
        return LinearAdapter(rest[0])
    in_channels, groups, geometry = rest[0], rest[1], rest[2:]
    kernel, stride, dilation = (tuple(geometry[i * spatial : (i + 1) * spatial]) for i in range(3))
    return ConvAdapter(
        in_channels, groups, kernel, stride, dilation, list(geometry[3 * spatial :]), padding_mode
    )
