"""Patch statistics in float64 and float32 (trainact/maths/statistics.py): centered chunks merge
to the raw second moments, and the split float32 product is accurate without float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainact.maths import PatchStatistics, tract_gradient
from trainact.maths.statistics import (
    SPLIT_BITS,
    SPLIT_BLOCK,
    SplitSums,
    gram_product,
    split_quantum,
)

F64 = torch.float64


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    groups=st.integers(1, 3),
    d=st.integers(1, 9),
    sizes=st.lists(st.integers(0, 20), min_size=1, max_size=4),
    offset=st.sampled_from([0.0, 1.0, 230.0]),
    shifted=st.booleans(),
)
def test_statistics_of_centered_chunks_are_the_raw_second_moments(
    device64, seed, groups, d, sizes, offset, shifted
):
    """Chunks arrive minus a shift (any shift); S = Σ xxᵀ and n come out exactly, merged."""
    gen = torch.Generator().manual_seed(seed)
    chunks = [offset + torch.randn(groups, d, c, generator=gen, dtype=F64) for c in sizes]
    stats = PatchStatistics.zeros(groups, d, device64)
    for i, chunk in enumerate(chunks):
        shift = chunk.mean(-1) if shifted and chunk.shape[-1] else torch.full((groups, d), 3.0 * i)
        part = PatchStatistics.zeros(groups, d, device64)
        part.add_chunk((chunk - shift.unsqueeze(-1)).to(device64), shift.to(device64, F64))
        stats.merge_(part)
    x = torch.cat(chunks, dim=-1)
    expected = x @ x.mT
    torch.testing.assert_close(stats.gram.cpu(), expected, rtol=1e-10, atol=1e-9 * (1 + offset**2))
    assert stats.count.item() == sum(sizes)


def test_float32_chunks_of_raw_pixels_stay_accurate_when_centered(device64):
    """Pixels around 230 (over-exposed): float32 raw sums lose the covariance, centered ones keep
    it. This is the reason for the centering: the raw product must fail here."""
    gen = torch.Generator().manual_seed(0)
    x = (230 + 10 * torch.rand(1, 12, 20000, generator=gen, dtype=F64)).to(device64)
    exact = x @ x.mT
    centered = PatchStatistics.zeros(1, 12, device64)
    shift = x.mean(-1).float()
    centered.add_chunk((x.float() - shift.unsqueeze(-1)), shift)
    raw = PatchStatistics.zeros(1, 12, device64)
    raw.add_chunk(x.float(), torch.zeros(1, 12, device=device64))
    g = torch.randn(1, 4, 12, generator=gen, dtype=F64).to(device64)
    n = torch.tensor(20000.0, dtype=F64, device=device64)
    expected = tract_gradient(g, exact, n, 0.1)

    def error(stats):
        return ((stats.tract_gradient(g, 0.1) - expected).norm() / expected.norm()).item()

    assert error(centered) < 1e-3
    assert error(raw) > 10 * error(centered)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    groups=st.integers(1, 2),
    d=st.integers(1, 10),
    cols=st.lists(st.integers(1, 3000), min_size=1, max_size=3),
    offset=st.sampled_from([0.0, 1.0, 230.0]),
    scale=st.sampled_from([1e-3, 1.0, 255.0]),
)
def test_split_product_is_accurate_without_float64(device64, seed, groups, d, cols, offset, scale):
    """Σ yyᵀ from float32 alone (exact 7-bit part + float32 rest) to float64 accuracy of the
    inputs, over several chunks, for features of very different scales."""
    gen = torch.Generator().manual_seed(seed)
    feature_scale = scale * torch.rand(groups, d, 1, generator=gen) ** 4
    chunks = [
        (offset + feature_scale * torch.randn(groups, d, c, generator=gen)).float() for c in cols
    ]
    shift = torch.full((groups, d), offset)
    centered = [(c - shift.unsqueeze(-1)).to(device64) for c in chunks]
    largest = torch.cat(centered, -1).abs().amax(-1)
    sums = SplitSums(split_quantum(largest), torch.int64)
    for chunk in centered:
        sums.add(chunk)
    stats = PatchStatistics.zeros(groups, d, device64)
    sums.add_to(stats, shift.to(device64))
    x = torch.cat(chunks, -1).double()
    exact = x @ x.mT
    # 2**-7 of float32 summation rounding (≈ 1e-6 relative) on the rest, the exact part exact
    tol = 2e-8 * exact.diagonal(dim1=-2, dim2=-1).amax(-1)[:, None, None]
    assert ((stats.gram.cpu() - exact).abs() <= tol).all()
    assert stats.count.item() == sum(cols)


def test_split_product_exact_part_is_exact_and_small_enough_for_tf32():
    """The integer part k of each entry has at most 8 significant bits (|k| ≤ 128), so TF32
    (11 bits) and bfloat16 (8 bits) hold it exactly, and a block's Σ kk fits float32's 24 bits."""
    gen = torch.Generator().manual_seed(0)
    y = 255 * torch.rand(1, 6, 5000, generator=gen) - 120
    q = split_quantum(y.abs().amax(-1))
    k = torch.round(y / q.unsqueeze(-1))
    assert k.abs().max() <= 2**SPLIT_BITS
    assert torch.equal(k.to(torch.bfloat16).float(), k)
    assert SPLIT_BLOCK * 4**SPLIT_BITS <= 2**24


def test_split_quantum_keeps_non_finite_input_non_finite():
    q = split_quantum(torch.tensor([[1.0, float("inf"), float("nan"), 0.0]]))
    assert q[0, 0] == 2**-7 and not q[0, 1:3].isfinite().any() and q[0, 3] > 0


@pytest.mark.parametrize("d", [5, 130, 300])
def test_gram_product_by_blocks_equals_the_full_product(d):
    """Above d = 128 only the upper blocks are multiplied and mirrored: the same Σ yyᵀ."""
    y = torch.randn(2, d, 57, dtype=F64)
    torch.testing.assert_close(gram_product(y), y @ y.mT, rtol=1e-12, atol=1e-12)
