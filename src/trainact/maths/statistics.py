"""Patch statistics: the number of patches n and S = XᵀX per group, exact at any input scale.

Raw pixels have a large mean (≈ 230 per entry for bright photos), so XᵀX summed in float32 loses
more than λ to rounding. Chunks of patches therefore arrive *centered* on a shift s (the input's
channel means): only Σ yyᵀ of the centered y = x − s is the expensive product, and
S = Σ yyᵀ + s·(Σy)ᵀ + (Σy)·sᵀ + n·s·sᵀ is assembled in float64 (Chan, Golub and LeVeque's
pairwise update). S and n are plain float64 sums, so micro-batches merge by addition and
processes by one all-reduce of a single packed tensor.

The product Σ yyᵀ runs in float64, in float32 (accurate only for a small spread over λ), or
split (:class:`SplitSums`): accurate in float32 alone, for devices without fast float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from trainact.maths.solve import tract_gradient

#: Bits of the exact part of each entry in the split product, and the columns summed exactly per
#: block: |k| ≤ 2**7, so a block's Σ k·k ≤ 1024·2**14 = 2**24, every partial sum an integer that
#: float32 holds exactly (with or without TF32, whose inputs keep 11 bits).
SPLIT_BITS = 7
SPLIT_BLOCK = 1024


class PatchStatistics:
    """n and S = Σ xxᵀ of a layer's input patches, per group, packed in one float64 tensor.

    ``data`` is ``[S (groups·d·d), n]``: one tensor to add, all-reduce or keep, with ``gram``
    and ``count`` as views into it.
    """

    __slots__ = ("data", "groups", "dim")

    def __init__(self, data: Tensor, groups: int, dim: int) -> None:
        self.data, self.groups, self.dim = data, groups, dim

    @classmethod
    def zeros(cls, groups: int, dim: int, device: torch.device) -> PatchStatistics:
        """Empty statistics (n = 0) on ``device``."""
        return cls(
            torch.zeros(groups * dim * dim + 1, dtype=torch.float64, device=device), groups, dim
        )

    @property
    def gram(self) -> Tensor:
        """S = Σ xxᵀ, ``(groups, d, d)``, a view into :attr:`data`."""
        return self.data[:-1].view(self.groups, self.dim, self.dim)

    @property
    def count(self) -> Tensor:
        """n, a 0-dim view into :attr:`data`."""
        return self.data[-1]

    def add_chunk(self, centered: Tensor, shift: Tensor, total: Tensor | None = None) -> Tensor:
        """Add the patches ``centered + shift``; returns the diagonal of their Σ yyᵀ.

        Args:
            centered: ``(groups, d, cols)``, one patch per column, already minus ``shift``; its
                dtype (float32 or float64) is the one the product runs in.
            shift: ``(groups, d)``, exactly what was subtracted (in ``centered``'s dtype).
            total: Σy over the chunk's columns, ``(groups, d)``, where the caller has it
                cheaply; else summed here.
        """
        if total is None:
            total = centered.sum(-1)
        product = gram_product(centered)
        self.add_centered(product, total, shift, centered.shape[-1])
        return product.diagonal(dim1=-2, dim2=-1)

    def add_centered(self, product: Tensor, total: Tensor, shift: Tensor, cols: int) -> None:
        """Add ``cols`` patches given by their centered moments: Σ yyᵀ ``(groups, d, d)`` and
        Σy ``(groups, d)`` of y = x − ``shift``. Σy is small (centered), so a float32 sum of it
        is accurate."""
        s = shift.to(torch.float64)
        cross = s.unsqueeze(-1) * total.to(torch.float64).unsqueeze(-2)
        gram = self.gram
        gram.add_(product.to(torch.float64))
        gram.add_(cross).add_(cross.mT).add_(s.unsqueeze(-1) * s.unsqueeze(-2), alpha=cols)
        self.count.add_(cols)

    def merge_(self, other: PatchStatistics) -> PatchStatistics:
        """Add ``other``'s patches to these (micro-batches of one step); returns self."""
        self.data.add_(other.data.to(self.data.device))
        return self

    def clone(self) -> PatchStatistics:
        return PatchStatistics(self.data.clone(), self.groups, self.dim)

    def tract_gradient(self, grad: Tensor, lam: float | Tensor) -> Tensor:
        """G·(S/n + λI)⁻¹ for a weight gradient of any shape ``(out, ...)`` with d per group,
        solved where the statistics are (the CPU for a device without float64) and returned on
        the gradient's device.

        A row-sharded gradient (FSDP2) is solved shard by shard: TrAct acts on each
        output row alone.
        """
        grouped = grad.reshape(self.groups, -1, self.dim).to(self.data.device)
        solved = tract_gradient(grouped, self.gram, self.count, lam)
        return solved.to(grad.device).reshape(grad.shape)


def gram_product(y: Tensor) -> Tensor:
    """Σ yyᵀ per group for ``y`` ``(groups, d, cols)``: for d ≥ 128 only the blocks on and above
    the diagonal are multiplied (2 or 3 row blocks; the ImageNet stem's d = 147 measured 10%
    faster on a CPU, d = 768 30%), the rest mirrored."""
    d = y.shape[1]
    parts = 1 if d < 128 else 2 if d < 256 else 3
    if parts == 1:
        return torch.bmm(y, y.mT)
    edges = [round(i * d / parts) for i in range(parts + 1)]
    out = y.new_empty(y.shape[0], d, d)
    for i in range(parts):
        rows = slice(edges[i], edges[i + 1])
        for j in range(i, parts):
            cols = slice(edges[j], edges[j + 1])
            block = torch.bmm(y[:, rows], y[:, cols].mT)
            out[:, rows, cols] = block
            if j > i:
                out[:, cols, rows] = block.mT
    return out


class SplitSums:
    """Σ yyᵀ and Σy of centered float32 patches, accurate without float64 on the device.

    Each entry is split as y = k·q + r: q a power of two per feature (the feature's largest
    |y| over 2**7) and k an integer with |k| ≤ 2**7. Σ kkᵀ is summed in blocks of
    :data:`SPLIT_BLOCK` columns, where float32 is exact, and the blocks in float64 or int64;
    the rest, Σ yyᵀ − Σ (kq)(kq)ᵀ = sym(Σ (y + kq)·rᵀ), is 2**7 times smaller than Σ yyᵀ, so
    its float32 rounding is 2**7 times smaller too. The float32 products run with TF32 off
    (:func:`trainact.maths.precision.ieee_float32_matmul`).
    """

    def __init__(self, quantum: Tensor, exact_dtype: torch.dtype) -> None:
        groups, dim = quantum.shape
        device = quantum.device
        self.quantum = quantum  # (groups, d) float32, powers of two
        self.exact = torch.zeros(groups, dim, dim, dtype=exact_dtype, device=device)
        self.exact_total = torch.zeros(groups, dim, dtype=exact_dtype, device=device)
        self.rest = torch.zeros(groups, dim, dim, dtype=torch.float32, device=device)
        self.rest_total = torch.zeros(groups, dim, dtype=torch.float32, device=device)
        self.cols = 0

    def add(self, centered: Tensor) -> None:
        """Add a float32 chunk ``(groups, d, cols)`` of centered patches."""
        groups, dim, cols = centered.shape
        q = self.quantum.unsqueeze(-1)
        k = torch.round(centered / q).clamp_(-(2**SPLIT_BITS), 2**SPLIT_BITS)
        high = k * q
        remainder = centered - high  # exact (Sterbenz): k·q is 0 or within a factor 2 of y
        blocks = F.pad(k, (0, -cols % SPLIT_BLOCK)).view(groups, dim, -1, SPLIT_BLOCK)
        blocks = blocks.transpose(1, 2).reshape(-1, dim, SPLIT_BLOCK)
        partial = torch.bmm(blocks, blocks.mT).view(groups, -1, dim, dim)
        self.exact.add_(partial.sum(1, dtype=self.exact.dtype))
        self.exact_total.add_(k.sum(-1, dtype=self.exact.dtype))
        cross = torch.bmm(centered + high, remainder.mT)  # (2kq + r)·rᵀ: sym/2 is the rest
        self.rest.add_(cross).add_(cross.mT)
        self.rest_total.add_(remainder.sum(-1))
        self.cols += cols

    def add_to(self, stats: PatchStatistics, shift: Tensor) -> None:
        """Assemble in float64 where ``stats`` lives and add to it (the patches were y + shift)."""
        device = stats.data.device
        q = self.quantum.to(device, torch.float64)
        exact = self.exact.to(device, torch.float64) * (q.unsqueeze(-1) * q.unsqueeze(-2))
        product = exact + self.rest.to(device, torch.float64) / 2
        total = self.exact_total.to(device, torch.float64) * q + self.rest_total.to(device)
        stats.add_centered(product, total, shift.to(device), self.cols)


def split_quantum(largest: Tensor) -> Tensor:
    """The power of two q per feature with ``largest`` ≤ 2**SPLIT_BITS·q (largest |y| per
    feature); a non-finite ``largest`` stays non-finite, so that the statistics do."""
    safe = largest.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.exp2(torch.ceil(torch.log2(safe)) - SPLIT_BITS) + (largest - largest)
