"""The patches as each layer family's adapter streams them (trainact/nn/adapters.py): bounded
chunks, and no padding copy for non-overlapping patches; exact against the float64 reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from testing.harness import check_layer, tract_error
from trainact.nn import adapters


@pytest.mark.parametrize("path", ["product", "split", "int8"])
@pytest.mark.parametrize(
    "layer,shape,dtype",
    [
        (nn.Conv2d(3, 4, 3, padding=2, dilation=2, padding_mode="reflect"), (5, 3, 10, 12), None),
        (nn.Conv2d(4, 4, 2, stride=2, groups=2), (3, 4, 8, 8), None),
        (nn.Conv3d(1, 2, 2, padding=1), (2, 1, 5, 6, 5), None),
        (nn.Conv2d(3, 4, 3, padding=1), (3, 3, 7, 9), None),  # zero padding written once
        (nn.Linear(7, 3), (6, 5, 7), torch.bfloat16),  # converted to float32 chunk by chunk
    ],
)
def test_bounded_chunks_are_exact(device64, monkeypatch, layer, shape, dtype, path):
    """A tiny chunk budget forces batch chunks and splits within one sample, for the product
    and the split product (input-sized buffers reused), with its exact part in float32 blocks
    and, as a GPU runs it, in int8 (zeroed margins, per group); still exact."""
    from trainact.maths import precision
    from trainact.maths.statistics import ExtendedGram, SplitSums
    from trainact.nn import call_statistics

    widths: list[int] = []
    for cls in (ExtendedGram, SplitSums):
        original = cls.add
        monkeypatch.setattr(
            cls, "add", lambda self, *a, o=original: widths.append(a[-1] if len(a) > 1 else
                                                                  a[0].shape[-1]) or o(self, *a)
        )  # fmt: skip
    monkeypatch.setattr(call_statistics, "chunk_budget", lambda device, memory: 4 * 4 * 40)
    torch.manual_seed(0)
    dtype = dtype or torch.float64
    layer = copy.deepcopy(layer).to(device64, dtype)  # the parametrized one serves both runs
    x = torch.randn(shape, dtype=dtype).to(device64)
    tol = 1e-7 if dtype == torch.float64 else 2e-2
    if path == "product":
        check_layer(layer, x, 0.1, tol, tol)
    elif path == "split":
        assert tract_error(layer, x, statistics_dtype=torch.float32) < 10 * tol
    else:
        with precision.use_precision(precision.gpu_precision("NVIDIA GeForce RTX 4090", 8, 9)):
            assert tract_error(layer, x, statistics_dtype=torch.float32) < 10 * tol
    assert len(widths) > 2, "the budget must have split the patches"
    # at most the budget, or one slice of one sample along the first output dimension
    adapter = adapters.adapter_for(layer)
    out_shape = layer(x.to(layer.weight.dtype)).shape
    slice_rows = out_shape[3:].numel() if isinstance(layer, nn.Conv3d | nn.Conv2d) else 1
    budget_columns = 4 * 4 * 40 // (4 * adapter.groups * (adapter.dim + 1))
    assert max(widths) <= max(budget_columns, slice_rows), widths


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


@pytest.mark.parametrize("statistics_dtype", [None, torch.float32])
def test_chunk_buffers_hold_at_most_the_calls_patches(monkeypatch, statistics_dtype):
    """Under a chunk budget far larger than the call (a small batch on a large GPU), the chunk
    buffers hold the call's own patches, not the budget."""
    import trainact
    from trainact.maths.statistics import SplitSums
    from trainact.nn import call_statistics

    columns: list[int] = []
    extended, buffers = call_statistics.extended_buffer, SplitSums.buffers
    monkeypatch.setattr(
        call_statistics,
        "extended_buffer",
        lambda g, d, cols, *a: columns.append(cols) or extended(g, d, cols, *a),
    )
    monkeypatch.setattr(
        SplitSums,
        "buffers",
        lambda self, cols, total: columns.append(cols) or buffers(self, cols, total),
    )
    monkeypatch.setattr(call_statistics, "chunk_budget", lambda device, memory: 2**40)
    layer = trainact.TrAct(nn.Conv2d(3, 4, 3), statistics_dtype=statistics_dtype)
    layer(torch.randn(2, 3, 8, 8)).sum().backward()
    assert columns == [2 * 6 * 6]
