"""The patches as each layer family's adapter streams them (trainact/nn/adapters.py): bounded
chunks, and no padding copy for non-overlapping patches; exact against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from testing.harness import check_layer
from trainact.maths import PatchStatistics
from trainact.nn import adapters


@pytest.mark.parametrize(
    "layer,shape,dtype",
    [
        (nn.Conv2d(3, 4, 3, padding=2, dilation=2, padding_mode="reflect"), (5, 3, 10, 12), None),
        (nn.Conv2d(4, 4, 2, stride=2, groups=2), (3, 4, 8, 8), None),
        (nn.Conv3d(1, 2, 2, padding=1), (2, 1, 5, 6, 5), None),
        (nn.Linear(7, 3), (6, 5, 7), torch.bfloat16),  # converted to float32 chunk by chunk
    ],
)
def test_bounded_chunks_are_exact(device64, monkeypatch, layer, shape, dtype):
    """A tiny chunk budget forces batch chunks and splits within one sample; still exact."""
    seen: list[int] = []
    original = PatchStatistics.add_chunk

    def recording(self, centered, shift, total=None):
        seen.append(centered.numel() * centered.element_size())
        return original(self, centered, shift, total)

    monkeypatch.setattr(PatchStatistics, "add_chunk", recording)
    monkeypatch.setattr(adapters, "CHUNK_BYTES", 4 * 4 * 40)  # about 40 rows of d=4
    monkeypatch.setattr(adapters, "ACCELERATOR_CHUNK_BYTES", 4 * 4 * 40)
    torch.manual_seed(0)
    dtype = dtype or torch.float64
    layer, x = layer.to(device64, dtype), torch.randn(shape, dtype=dtype).to(device64)
    tol = 1e-7 if dtype == torch.float64 else 2e-2
    check_layer(layer, x, 0.1, tol, tol)
    assert len(seen) > 2, "the budget must have split the patches"
    # at most the budget, or one slice of one sample along the first output dimension
    adapter = adapters.adapter_for(layer)
    out_shape = layer(x.to(layer.weight.dtype)).shape
    slice_rows = out_shape[3:].numel() if isinstance(layer, nn.Conv3d | nn.Conv2d) else 1
    slice_bytes = slice_rows * adapter.dim * adapter.groups * 8  # float64 or float32: ≤ 8
    assert max(seen) <= max(4 * 4 * 40, slice_bytes), seen


def test_non_overlapping_patches_need_no_padding_copy(device64, monkeypatch):
    """ViT patch embedding (stride == kernel, no padding): no F.pad, exact."""
    calls = []
    monkeypatch.setattr(
        adapters.F, "pad", lambda *a, **k: calls.append(a) or torch.nn.functional.pad(*a, **k)
    )
    torch.manual_seed(0)
    check_layer(
        nn.Conv2d(3, 8, 4, stride=4).double(),
        torch.randn(20, 3, 16, 16, dtype=torch.float64),
        0.1,
        1e-7,
        1e-9,
        device64,
    )
    assert not calls
