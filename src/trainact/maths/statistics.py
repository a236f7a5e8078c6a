"""Second-moment statistics of a layer's input patches, accumulated chunk by chunk.

A chunk is a ``(groups, rows, d)`` tensor of patches (rows of X, per group). Summing
``chunkᵀ·chunk`` over bounded chunks gives XᵀX without ever holding the whole patch matrix.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def gram_of_chunks(chunks: Iterable[Tensor], out: Tensor) -> Tensor:
    """Add XᵀX of every chunk into ``out`` (``(groups, d, d)``, the statistics dtype)."""
    for chunk in chunks:
        chunk = chunk.to(out.dtype)
        out.baddbmm_(chunk.mT, chunk)
    return out


def patch_matrix(chunks: Iterable[Tensor], dtype: torch.dtype) -> Tensor:
    """The whole ``(groups, n, d)`` patch matrix; only used where n < d, so it is small."""
    return torch.cat([chunk.to(dtype) for chunk in chunks], dim=1)
