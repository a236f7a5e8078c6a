"""Patch statistics: the number of patches n and S = XᵀX per group, exact at any input scale.

Raw pixels have a large mean (≈ 230 per entry for bright photos), so XᵀX summed in float32 loses
more than λ to rounding. Patches are therefore *centered* on a shift s (the input's channel
means): only Σ yyᵀ of the centered y = x − s is the expensive product, and
S = Σ yyᵀ + s·(Σy)ᵀ + (Σy)·sᵀ + n·s·sᵀ is assembled in float64 once per call (Chan, Golub and
LeVeque's pairwise update). S and n are plain float64 sums, so micro-batches merge by addition
and processes by one all-reduce of a single packed tensor.

The patches arrive in chunks, each written once into a reused buffer whose extra row is
constant (:func:`extended_buffer`): one product per chunk of the *extended* patches [y; 1] then
gives Σ yyᵀ, Σy and n together (:class:`ExtendedGram`), accumulated in one ``(d+1)×(d+1)``
tensor. The product runs in float64, in float32 (accurate only for a small spread over λ), or
split (:class:`SplitSums`): an exact part (integers |k| ≤ 63) multiplied in int8 with int32
sums on GPUs (tensor cores), in exact float32 blocks elsewhere, and a float32 remainder,
accurate without float64 on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainact.maths.solve import tract_gradient

#: The exact part of the split product: each centered entry over its feature's quantum q is
#: rounded to an integer k with |k| ≤ 63 (int8), so that a product's sums over at most
#: :data:`INT8_COLUMNS` columns stay within int32 (2**19 · 63² = 2,080,899,072 < 2**31 − 1)
#: and, where int8 products are unavailable, over :data:`FLOAT32_EXACT_COLUMNS` columns within
#: float32's exact integers (4096 · 63² = 16,257,024 < 2**24).
SPLIT_MAX = 63
INT8_COLUMNS = 2**19
FLOAT32_EXACT_COLUMNS = 4096


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

    def add_extended(self, extended: Tensor, shift: Tensor, scale: Tensor | None = None) -> None:
        """Add the patches x = scale·z + shift given by the extended Gram matrix of z,
        Σ [z; 1][z; 1]ᵀ ``(groups, d+1, d+1)`` (Σ zzᵀ, Σz in its last row, n in its corner):
        S += T·G·Tᵀ with T = [diag(scale) | shift] (exact in float32: the shift as it was
        subtracted, powers of two), in float64, once per call."""
        device = self.data.device
        if scale is None:
            diagonal = torch.eye(self.dim, dtype=shift.dtype, device=shift.device)
            diagonal = diagonal.expand(self.groups, -1, -1)
        else:
            diagonal = torch.diag_embed(scale)
        t = torch.cat([diagonal, shift.unsqueeze(-1)], -1).to(device, torch.float64)
        extended = extended.to(device, torch.float64)
        self.gram.baddbmm_(t @ extended, t.mT)
        self.count.add_(extended[0, -1, -1])

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


def extended_buffer(
    groups: int, dim: int, cols: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """A chunk buffer ``(groups, dim + 1, cols)`` whose last row is ones: patches are written
    into ``[:, :dim, :c]``, and the product of ``[..., :c]`` with itself is then the extended
    Gram matrix of those c patches."""
    buffer = torch.empty(groups, dim + 1, cols, dtype=dtype, device=device)
    buffer[:, -1] = 1
    return buffer


class ExtendedGram:
    """Σ [y; 1][y; 1]ᵀ over chunks of extended patches, accumulated in float64: on an
    accelerator one accumulating product per chunk (``baddbmm``, the chunk's dtype float64);
    on the CPU the product's upper blocks (:func:`gram_product`), then added."""

    def __init__(self, groups: int, dim: int, device: torch.device) -> None:
        self.sums = torch.zeros(groups, dim + 1, dim + 1, dtype=torch.float64, device=device)

    def add(self, chunk: Tensor) -> None:
        """Add a chunk ``(groups, d + 1, cols)`` from :func:`extended_buffer` (float32 or 64)."""
        if chunk.device.type != "cpu" and chunk.dtype == torch.float64:
            self.sums.baddbmm_(chunk, chunk.mT)
        else:
            self.sums.add_(gram_product(chunk))

    def squares(self) -> Tensor:
        """Σ y² of each entry, ``(groups, d)``: the diagonal of Σ yyᵀ."""
        return self.sums.diagonal(dim1=-2, dim2=-1)[:, :-1]

    def add_to(self, stats: PatchStatistics, shift: Tensor) -> None:
        """Add these patches (``y + shift``) to ``stats``."""
        stats.add_extended(self.sums, shift)


class SplitSums:
    """Σ yyᵀ, Σy and n of centered float32 patches, accurate without float64 on the device.

    Each entry is written y = (k + r)·q: q a power of two per feature (:func:`split_quantum`),
    z = y/q within ±63, k = round(z) an integer and r = z − k, |r| ≤ 1/2, exact in float32.
    Σ kkᵀ is exact: with ``int8`` (devices with int8 matrix units), int8 products with int32
    sums over at most :data:`INT8_COLUMNS` columns each (``torch._int_mm``), summed in
    ``exact_dtype``; otherwise (the CPU, where torch's int8 product is slow) float32 products of
    at most :data:`FLOAT32_EXACT_COLUMNS` columns, exact too. The rest,
    Σ zzᵀ − Σ kkᵀ = sym(Σ (z + k)·rᵀ), has terms about 2**-6 of the whole (of either sign:
    rounding, unlike truncation, leaves r unbiased), so its float32 rounding (TF32 off:
    :func:`trainact.maths.precision.ieee_float32_matmul`) is as small.

    A chunk is two buffers (:meth:`buffers`): k (int8 or float32) and (z + k, r) in float32,
    each with the extra rows that make their products carry Σk, Σr and n.
    """

    def __init__(self, quantum: Tensor, int8: bool, exact_dtype: torch.dtype) -> None:
        self.quantum = quantum  # (groups, d) float32, powers of two
        self.k_dtype = torch.int8 if int8 else torch.float32
        self.exact_dtype = exact_dtype  # float64, or int64 on a device without float64
        self.rows = self.k_rows(quantum.shape[1], self.k_dtype)
        self.exact: Tensor | None = None  # Σ kkᵀ (groups, rows, rows)
        self.rest: Tensor | None = None  # Σ (z + k)·rᵀ, float32 (groups, d + 1, d + 1)
        self._blocks: Tensor | None = None  # int32 products not yet summed into ``exact``
        self._filled = 0
        self.columns = 0  # n
        self._margins = False  # whether the corner of ``exact`` also counts zeroed margins
        self._signs = torch.arange(1, -2, -2, dtype=torch.float32, device=quantum.device)

    @staticmethod
    def k_rows(dim: int, k_dtype: torch.dtype) -> int:
        """Rows of the k buffer: d + 1; for int8 a multiple of 8 and more than 16 (``_int_mm``)."""
        return max(24, -(-(dim + 1) // 8) * 8) if k_dtype == torch.int8 else dim + 1

    @classmethod
    def bytes_per_column(cls, groups: int, dim: int, int8: bool) -> int:
        """The bytes of the two chunk buffers per column."""
        k_dtype = torch.int8 if int8 else torch.float32
        return groups * (cls.k_rows(dim, k_dtype) * k_dtype.itemsize + 2 * 4 * (dim + 1))

    def buffers(self, cols: int, total: int) -> tuple[Tensor, Tensor]:
        """The chunk buffers for up to ``cols`` columns (of ``total`` in the call): k
        ``(groups, rows, C)``, row d ones and the rows below it zero; (z + k, r)
        ``(2, groups, d + 1, C)`` float32, row d 2 and 0 (their product's last row is then
        2·Σr, halved by the symmetrization)."""
        groups, dim = self.quantum.shape
        cols = -(-cols // 16) * 16  # int8 products: columns and row strides multiples of 8
        device = self.quantum.device
        k = torch.zeros(groups, self.rows, cols, dtype=self.k_dtype, device=device)
        k[:, dim].fill_(1)
        pair = torch.empty(2, groups, dim + 1, cols, dtype=torch.float32, device=device)
        pair[0, :, dim].fill_(2)
        pair[1, :, dim].fill_(0)
        if self.k_dtype == torch.int8:  # every product of the call, summed at once (at most 256)
            blocks = (-(-total // cols) + 1) * -(-cols // INT8_COLUMNS)
            self._blocks = torch.empty(
                groups, min(blocks, 256), self.rows, self.rows, dtype=torch.int32, device=device
            )
        return k, pair

    def pair(self, z: Tensor, rounded: Tensor, out: Tensor) -> None:
        """Write (z + k, r = z − k) into ``out`` ``(2, *z.shape)`` for float32 ``z`` within
        ±63 and ``rounded`` = k = round(z) (float32 or int8: exact either way); r is exact, k
        being z rounded to fewer bits."""
        torch.addcmul(z, self._signs.view(2, *([1] * z.dim())), rounded, out=out)

    @staticmethod
    def pair_in_place(rounded: Tensor, z: Tensor) -> None:
        """The same in place, from k = round(z) in ``rounded`` and z in ``z``: ``z`` becomes
        r = z − k (exact) and ``rounded`` z + k, computed as r + 2k (the same rounding)."""
        z.sub_(rounded)
        torch.add(z, rounded, alpha=2, out=rounded)

    def add(self, k: Tensor, pair: Tensor, cols: int) -> None:
        """Add the first ``cols`` columns of the chunk buffers ``k`` and ``pair``."""
        self.columns += cols
        w, r = pair[0, ..., :cols], pair[1, ..., :cols].mT
        self.rest = torch.bmm(w, r) if self.rest is None else self.rest.baddbmm_(w, r)
        if self.k_dtype == torch.float32:
            for start in range(0, cols, FLOAT32_EXACT_COLUMNS):
                block = k[..., start : min(start + FLOAT32_EXACT_COLUMNS, cols)]
                self._add_exact(torch.bmm(block, block.mT))  # exact integers in float32
            return
        assert self._blocks is not None
        padded = -(-cols // 8) * 8
        if padded != cols:  # zero the patch entries the product reads beyond the chunk
            k[:, : self.quantum.shape[1], cols:padded].zero_()
            self._margins = True
        for start in range(0, padded, INT8_COLUMNS):
            if self._filled == self._blocks.shape[1]:
                self._flush()
            block = k[..., start : min(start + INT8_COLUMNS, padded)]
            for g in range(block.shape[0]):
                torch._int_mm(block[g], block[g].mT, out=self._blocks[g, self._filled])
            self._filled += 1

    def _add_exact(self, part: Tensor) -> None:
        part = part.to(self.exact_dtype)  # exact: integers below 2**53 (float64) or int64
        self.exact = part if self.exact is None else self.exact.add_(part)

    def _flush(self) -> None:
        if self._blocks is not None and self._filled:
            self._add_exact(self._blocks[:, : self._filled].sum(1, dtype=self.exact_dtype))
            self._filled = 0

    def add_to(self, stats: PatchStatistics, shift: Tensor) -> None:
        """Assemble in float64 where ``stats`` lives and add to it (the patches were
        y + shift)."""
        self._flush()
        if self.exact is None or self.rest is None:
            return
        device = stats.data.device
        dim = self.quantum.shape[1]
        exact = self.exact[:, : dim + 1, : dim + 1].to(device)  # promoted to float64 below
        rest = self.rest.to(device, torch.float64)
        extended = torch.add(exact, rest + rest.mT, alpha=0.5)
        if self._margins:
            extended[:, -1, -1] = self.columns
        stats.add_extended(extended, shift, self.quantum)


def split_quantum(largest: Tensor, mean: Tensor) -> Tensor:
    """The smallest power of two q with ``largest`` ≤ 63·q (largest |y| per feature), and at
    least 2**-32·|``mean``| so that x/q stays finite where the patches are constant (a
    nonzero |y| is at least about 2**-24·|mean| anyway); a non-finite ``largest`` stays
    non-finite, so that the statistics do."""
    floor = (mean.abs() * 2.0**-32).clamp_min_(SPLIT_MAX * torch.finfo(torch.float32).tiny)
    safe = torch.maximum(largest, floor)  # NaN stays NaN
    return torch.exp2(torch.ceil(torch.log2(safe / SPLIT_MAX)))
