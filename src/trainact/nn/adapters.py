"""One adapter per layer family: how a layer sees its input as patches, and its forward.

Every adapter answers the same questions (the kfac-pytorch pattern): the layer's forward with a
given weight tensor, the patch geometry (groups, d per group, n for an input), and the patches
themselves as a stream of bounded ``(groups, d, cols)`` chunks (patches as columns, see
:mod:`trainact.maths.statistics`), taken exactly as the layer's
forward sees its input (after its padding mode, with its stride, dilation and groups).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Largest patch chunk held at once, in bytes of the statistics dtype (bounds the extra memory).
#: On the CPU a chunk that stays in cache between its copy and its GEMM is fastest (measured:
#: 2 to 4 MiB beat 16 MiB by ~7% of TrAct's cost on an ImageNet stem); accelerators prefer fewer,
#: larger chunks (fewer kernel launches).
CHUNK_BYTES = 4 * 2**20
ACCELERATOR_CHUNK_BYTES = 32 * 2**20


def chunk_bytes(device: torch.device) -> int:
    """The chunk budget for tensors on ``device``."""
    return CHUNK_BYTES if device.type == "cpu" else ACCELERATOR_CHUNK_BYTES


#: A centered ``(groups, d, cols)`` chunk and its column sums ``(groups, d)``, or None where
#: :meth:`PatchStatistics.add_chunk` should compute them.
Chunk = tuple[Tensor, "Tensor | None"]

SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LinearAdapter:
    """``nn.Linear`` on inputs of any number of leading dimensions: one patch per row."""

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer

    @property
    def groups(self) -> int:
        return 1

    @property
    def dim(self) -> int:
        return self.layer.in_features

    def forward(self, input: Tensor, weight: Tensor) -> Tensor:
        return F.linear(input, weight, self.layer.bias)

    def num_patches(self, input: Tensor) -> int:
        return input.numel() // self.dim if input.dim() > 0 else 0

    def moments(self, input: Tensor) -> tuple[Tensor, Tensor]:
        """The mean of each input feature and the mean square of each centered feature,
        ``(d,)`` float32 each (input non-empty). The mean is exact (a GEMV); the spread, which
        only picks the GEMM dtype, comes from at most 4096 rows spread by a multiplicative hash
        (evenly spaced rows would alias with the tokens of a sequence)."""
        rows = input.reshape(-1, self.dim)
        count = rows.shape[0]
        mean = (rows.mT @ rows.new_ones(count)).float() / count
        picked = torch.arange(min(count, 4096), device=rows.device) * 2654435761 % count
        spread = (rows[picked].float() - mean).square().mean(0)
        return spread, mean

    def expand(self, per_feature: Tensor) -> Tensor:
        """A per-feature vector as the ``(groups, d)`` value of each patch entry."""
        return per_feature.unsqueeze(0)

    def chunks(self, input: Tensor, dtype: torch.dtype, mean: Tensor) -> Iterator[Chunk]:
        """``(1, d, cols)`` chunks of the rows minus ``mean``, in ``dtype`` (sums not known)."""
        rows = input.reshape(-1, self.dim)
        step = max(1, chunk_bytes(rows.device) // (self.dim * dtype.itemsize))
        for start in range(0, rows.shape[0], step):
            yield (rows[start : start + step].to(dtype) - mean).mT.unsqueeze(0), None


class ConvAdapter:
    """``nn.Conv1d/2d/3d`` with every option: stride, padding (incl. 'same'), dilation, groups,
    padding_mode; the patch matrix is a strided view of the (padded) input, copied chunk by chunk.
    """

    def __init__(self, layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
        self.layer = layer
        self.spatial = len(layer.kernel_size)

    @property
    def groups(self) -> int:
        return self.layer.groups

    @property
    def dim(self) -> int:
        return self.layer.in_channels // self.layer.groups * math.prod(self.layer.kernel_size)

    def forward(self, input: Tensor, weight: Tensor) -> Tensor:
        return self.layer._conv_forward(input, weight, self.layer.bias)

    def _pads(self) -> list[int]:
        return list(self.layer._reversed_padding_repeated_twice)

    def _output_size(self, input: Tensor) -> list[int]:
        layer, pads = self.layer, self._pads()
        sizes = []
        for i in range(self.spatial):
            # F.pad order is last dimension first.
            total = pads[2 * (self.spatial - 1 - i)] + pads[2 * (self.spatial - 1 - i) + 1]
            span = layer.dilation[i] * (layer.kernel_size[i] - 1) + 1
            size = input.shape[input.dim() - self.spatial + i]  # batched or not
            sizes.append((size + total - span) // layer.stride[i] + 1)
        return sizes

    def num_patches(self, input: Tensor) -> int:
        batch = input.shape[0] if input.dim() == self.spatial + 2 else 1
        return batch * math.prod(self._output_size(input))

    def moments(self, input: Tensor) -> tuple[Tensor, Tensor]:
        """The mean of each input channel and an upper bound of the mean square of its centered
        patch entries, ``(C,)`` float32 each (input non-empty): the channel's variance, plus
        mean² where zero padding puts entries at −mean once centered."""
        if input.dim() == self.spatial + 1:
            input = input.unsqueeze(0)
        spread, mean = _var_mean(input, [0, *range(2, input.dim())])
        if self.layer.padding_mode == "zeros" and any(self._pads()):
            spread = spread + mean.square()
        return spread, mean

    def expand(self, per_channel: Tensor) -> Tensor:
        """A per-channel vector as the ``(groups, d)`` value of each patch entry."""
        kernel = math.prod(self.layer.kernel_size)
        per_entry = per_channel.view(self.groups, -1, 1).expand(-1, -1, kernel)
        return per_entry.reshape(self.groups, -1)

    def chunks(self, input: Tensor, dtype: torch.dtype, mean: Tensor) -> Iterator[Chunk]:
        """``(groups, d, cols)`` chunks of the patches of the (padded) input minus its channel
        ``mean``, in ``dtype``, with their column sums where they come cheaply. Padding comes
        first, so a zero pad becomes −mean like any zero entry: every patch entry is shifted by
        the same constant."""
        layer, n_sp = self.layer, self.spatial
        if input.dim() == n_sp + 1:  # unbatched input, as the conv layers accept
            input = input.unsqueeze(0)
        mean = mean.view(1, -1, *([1] * n_sp))
        per_sample = math.prod(self._output_size(input))
        if per_sample <= 0:
            return
        rows_budget = max(1, chunk_bytes(input.device) // (self.dim * self.groups * dtype.itemsize))
        batch_step = max(1, rows_budget // per_sample)
        pads = self._pads()
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        for start in range(0, input.shape[0], batch_step):
            x = input[start : start + batch_step]
            if any(pads):
                x = F.pad(x, pads, mode=mode)
            # input-sized passes (channels-last made contiguous: the patch copy below then runs
            # along the last dimension); the patches themselves are copied once, below
            x = (x.to(dtype) - mean).contiguous()
            v = self._patches(x)
            if batch_step > 1 or per_sample <= rows_budget:
                # Patch sums are linear: those of the batch-summed input, from an input-sized
                # pass instead of a pass over the (kernel-volume times larger) patches.
                sums = self._patches(x.sum(0, keepdim=True)).sum([*range(2 + n_sp, v.dim())])
                yield v.reshape(self.groups, self.dim, -1), sums.reshape(self.groups, self.dim)
                continue
            # One sample is larger than the budget: split it along its first output dimension.
            first_out = 3 + n_sp
            row_step = max(1, rows_budget // (per_sample // v.shape[first_out]))
            for r in range(0, v.shape[first_out], row_step):
                part = v.narrow(first_out, r, min(row_step, v.shape[first_out] - r))
                yield part.reshape(self.groups, self.dim, -1), None

    def _patches(self, x: Tensor) -> Tensor:
        """The patches of a padded input as a strided view ``(g, C/g, *kernel, b, *out)``: a
        patch per column, its rows ordered as ``weight[o].flatten()``; copying it out runs along
        the input's contiguous last dimension."""
        layer, n_sp = self.layer, self.spatial
        # (b, C, *S) -> (b, g, C/g, *S) -> unfold each spatial dim: (b, g, C/g, *out, *span)
        v = x.unflatten(1, (self.groups, -1))
        for i in range(n_sp):
            span = layer.dilation[i] * (layer.kernel_size[i] - 1) + 1
            v = v.unfold(3 + i, span, layer.stride[i])
        if any(d > 1 for d in layer.dilation):
            v = v[(..., *(slice(None, None, d) for d in layer.dilation))]
        return v.permute([1, 2, *range(3 + n_sp, 3 + 2 * n_sp), 0, *range(3, 3 + n_sp)])


def _var_mean(x: Tensor, dims: list[int]) -> tuple[Tensor, Tensor]:
    """Population variance and mean over ``dims`` in at least float32, from Σx and ‖x‖² (one
    fast pass each; ``torch.var_mean`` over a channel's strided elements measured 8× slower)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    total = x.sum(dims, dtype=dtype)
    count = max(x.numel() // max(total.numel(), 1), 1)
    mean = total / count
    square = torch.linalg.vector_norm(x, dim=dims, dtype=dtype).square() / count
    return (square - mean.square()).clamp_min(0), mean


Adapter = LinearAdapter | ConvAdapter


def check_supported(cls: type[nn.Module]) -> None:
    """TypeError naming ``cls`` unless it is a supported layer class.

    Subclasses are accepted only when they keep the parent's forward, since TrAct re-runs that
    forward with its own weight tensor; a subclass with its own forward (weight standardization,
    say) would silently change meaning.
    """
    for base in SUPPORTED_TYPES:
        if issubclass(cls, base) and cls.forward is base.forward:
            if (
                issubclass(cls, nn.modules.conv._ConvNd)
                and cls._conv_forward is not base._conv_forward
            ):
                break
            return
    names = ", ".join(f"nn.{t.__name__}" for t in SUPPORTED_TYPES)
    raise TypeError(
        f"TrAct does not support {cls.__module__}.{cls.__qualname__}; "
        f"supported layers are {names} (subclasses only when they keep the parent's forward)"
    )


def adapter_for(layer: nn.Module) -> Adapter:
    """The adapter of a layer that :func:`check_supported` accepted."""
    return LinearAdapter(layer) if isinstance(layer, nn.Linear) else ConvAdapter(layer)
