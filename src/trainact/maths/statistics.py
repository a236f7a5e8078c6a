"""Patch statistics: the number of patches n and S = XᵀX per group, exact at any input scale.

Raw pixels have a large mean (≈ 230 per entry for bright photos), so XᵀX summed in float32 loses
more than λ to rounding. Chunks of patches therefore arrive *centered* on a shift s (the input's
channel means): only Σ yyᵀ of the centered y = x − s runs as a float32 GEMM (the expensive,
well-conditioned part), and S = Σ yyᵀ + s·(Σy)ᵀ + (Σy)·sᵀ + n·s·sᵀ is assembled in float64
(Chan, Golub and LeVeque's pairwise update). S and n are plain float64 sums, so micro-batches
merge by addition and processes by one all-reduce of a single packed tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainact.maths.solve import precondition


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

    def add_chunk(self, centered: Tensor, shift: Tensor, total: Tensor | None = None) -> None:
        """Add the patches ``centered + shift``.

        Args:
            centered: ``(groups, d, cols)``, one patch per column, already minus ``shift``; its
                dtype (float32 or float64) is the one the GEMM runs in.
            shift: ``(groups, d)``, exactly what was subtracted (in ``centered``'s dtype).
            total: Σy over the chunk's columns, ``(groups, d)``, where the caller has it
                cheaply; else summed here.
        """
        cols = centered.shape[-1]
        s = shift.to(torch.float64)
        if total is None:
            total = centered.sum(-1)
        total = total.to(torch.float64)  # Σy: small (centered), so its float32 sum is accurate
        cross = s.unsqueeze(-1) * total.unsqueeze(-2)
        gram = self.gram
        gram.add_(torch.bmm(centered, centered.mT).to(torch.float64))
        gram.add_(cross).add_(cross.mT).add_(s.unsqueeze(-1) * s.unsqueeze(-2), alpha=cols)
        self.count.add_(cols)

    def merge_(self, other: PatchStatistics) -> PatchStatistics:
        """Add ``other``'s patches to these (micro-batches of one step); returns self."""
        self.data.add_(other.data)
        return self

    def clone(self) -> PatchStatistics:
        return PatchStatistics(self.data.clone(), self.groups, self.dim)

    def precondition(self, grad: Tensor, lam: float) -> Tensor:
        """G·(S/n + λI)⁻¹ for a weight gradient of any shape ``(out, ...)`` with d per group.

        A row-sharded gradient (FSDP2) is preconditioned shard by shard: TrAct acts on each
        output row alone.
        """
        grouped = grad.reshape(self.groups, -1, self.dim)
        return precondition(grouped, self.gram, self.count, lam).reshape(grad.shape)
