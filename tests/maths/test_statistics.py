"""Patch statistics in float64 and float32 (trainact/maths/statistics.py): chunks of extended
patches merge to the raw second moments, the split product is accurate without float64, and
each of its exact partial sums is exact in the worst case its bounds allow."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from trainact.maths import PatchStatistics, tract_gradient
from trainact.maths.precision import ieee_float32_matmul
from trainact.maths.statistics import (
    FLOAT32_EXACT_COLUMNS,
    INT8_COLUMNS,
    SPLIT_MAX,
    ExtendedGram,
    SplitSums,
    extended_buffer,
    gram_product,
    split_quantum,
)

F64 = torch.float64


def extended_statistics(chunks: list[torch.Tensor], shift: torch.Tensor) -> PatchStatistics:
    """The statistics of ``chunks`` ``(groups, d, cols)`` of patches minus ``shift``, each
    written into one reused extended buffer and multiplied there."""
    groups, d, _ = chunks[0].shape
    device = chunks[0].device
    buffer = extended_buffer(groups, d, max(c.shape[-1] for c in chunks), chunks[0].dtype, device)
    gram = ExtendedGram(groups, d, device)
    for chunk in chunks:
        cols = chunk.shape[-1]
        buffer[:, :d, :cols] = chunk
        gram.add(buffer[..., :cols])
    stats = PatchStatistics.zeros(groups, d, device)
    gram.add_to(stats, shift)
    return stats


def int8_kernel(device: torch.device) -> bool:
    """Whether torch multiplies int8 matrices on ``device`` at all (the CPU does, slowly: the
    library then uses float32 blocks there, these tests use it anyway)."""
    try:
        a = torch.zeros(24, 8, dtype=torch.int8, device=device)
        torch._int_mm(a, a.mT)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def split_statistics(
    centered: list[torch.Tensor], shift: torch.Tensor, int8: bool = True
) -> tuple[PatchStatistics, SplitSums]:
    """The split product's statistics of float32 ``centered`` chunks ``(groups, d, cols)``
    (the patches minus ``shift``), as the library runs it: z = y/q, k = round(z)."""
    largest = torch.cat(centered, -1).abs().amax(-1)
    quantum = split_quantum(largest, torch.zeros_like(largest))
    sums = SplitSums(quantum, int8, torch.float64)
    cols = max(c.shape[-1] for c in centered)
    total = sum(c.shape[-1] for c in centered)
    groups, d = quantum.shape
    with ieee_float32_matmul():
        k_buffer, pair_buffer = sums.buffers(cols, total)
        for chunk in centered:
            width = chunk.shape[-1]
            z = chunk / quantum.unsqueeze(-1)
            rounded = torch.round(z)
            k_buffer[:, :d, :width] = rounded
            sums.pair(z, rounded, pair_buffer[..., :d, :width])
            sums.add(k_buffer, pair_buffer, width)
        stats = PatchStatistics.zeros(groups, d, centered[0].device)
        sums.add_to(stats, shift)
    return stats, sums


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    groups=st.integers(1, 3),
    d=st.integers(1, 9),
    sizes=st.lists(st.integers(1, 20), min_size=1, max_size=4),
    offset=st.sampled_from([0.0, 1.0, 230.0]),
    shifted=st.booleans(),
)
def test_extended_chunks_give_the_raw_second_moments(
    device64, seed, groups, d, sizes, offset, shifted
):
    """Chunks arrive minus a shift (any shift); S = Σ xxᵀ and n come out of one product per
    chunk of the extended patches, the shift's terms added once."""
    gen = torch.Generator().manual_seed(seed)
    chunks = [offset + torch.randn(groups, d, c, generator=gen, dtype=F64) for c in sizes]
    x = torch.cat(chunks, dim=-1)
    shift = x.mean(-1) if shifted else torch.full((groups, d), 3.0, dtype=F64)
    centered = [(c - shift.unsqueeze(-1)).to(device64) for c in chunks]
    stats = extended_statistics(centered, shift.to(device64))
    expected = x @ x.mT
    torch.testing.assert_close(stats.gram.cpu(), expected, rtol=1e-10, atol=1e-9 * (1 + offset**2))
    assert stats.count.item() == sum(sizes)
    merged = extended_statistics(centered[:1], shift.to(device64))
    if len(centered) > 1:
        merged.merge_(extended_statistics(centered[1:], shift.to(device64)))
    torch.testing.assert_close(merged.gram, stats.gram, rtol=1e-12, atol=1e-9 * (1 + offset**2))


def test_float32_chunks_of_raw_pixels_stay_accurate_when_centered(device64):
    """Pixels around 230 (over-exposed): float32 raw sums lose the covariance, centered ones keep
    it. This is the reason for the centering: the raw product must fail here."""
    gen = torch.Generator().manual_seed(0)
    x = (230 + 10 * torch.rand(1, 12, 20000, generator=gen, dtype=F64)).to(device64)
    shift = x.mean(-1).float()
    centered = extended_statistics([x.float() - shift.unsqueeze(-1)], shift)
    raw = extended_statistics([x.float()], torch.zeros(1, 12, device=device64))
    g = torch.randn(1, 4, 12, generator=gen, dtype=F64).to(device64)
    n = torch.tensor(20000.0, dtype=F64, device=device64)
    expected = tract_gradient(g, x @ x.mT, n, 0.1)

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
    int8=st.booleans(),
)
@example(seed=0, groups=1, d=1, cols=[1, 2], offset=0.0, scale=1e-3, int8=True)  # margins
def test_split_product_is_accurate_without_float64(
    device64, seed, groups, d, cols, offset, scale, int8
):
    """Σ yyᵀ from an exact 6-bit part (int8 products, or float32 blocks) and a float32 rest, to
    float64 accuracy of the inputs, over several chunks, for features of very different
    scales."""
    if int8 and not int8_kernel(device64):
        pytest.skip(f"no int8 products on {device64.type}")
    gen = torch.Generator().manual_seed(seed)
    feature_scale = scale * torch.rand(groups, d, 1, generator=gen) ** 4
    chunks = [
        (offset + feature_scale * torch.randn(groups, d, c, generator=gen)).float() for c in cols
    ]
    shift = torch.full((groups, d), offset)
    centered = [(c - shift.unsqueeze(-1)).to(device64) for c in chunks]
    stats, _ = split_statistics(centered, shift.to(device64), int8)
    x = torch.cat(chunks, -1).double()
    exact = x @ x.mT
    # the exact part exact, the rest's float32 rounding about 2**-6 of the whole's
    tol = 5e-8 * exact.diagonal(dim1=-2, dim2=-1).amax(-1)[:, None, None]
    assert ((stats.gram.cpu() - exact).abs() <= tol).all()
    assert stats.count.item() == sum(cols)


def test_split_values_are_exact_at_the_quantums_edge():
    """The largest |y| of a feature at exactly 63·q, and just above it (q doubles): z stays
    within ±63, k = round(z) fits int8 with |k| ≤ 63, and z − k is exact."""
    largest = torch.tensor([63 * 2.0**-3, 63 * 2.0**-3 * (1 + 2**-20), 1e-30, 5.0])
    q = split_quantum(largest, torch.zeros_like(largest))
    assert torch.equal(q[:2], torch.tensor([2.0**-3, 2.0**-2]))
    y = torch.stack([largest, -largest, largest / 3, -largest * 0.499], -1)
    z = y / q.unsqueeze(-1)
    k = torch.round(z)
    assert z.abs().max() <= SPLIT_MAX and k.abs().max() <= SPLIT_MAX
    assert torch.equal(k.to(torch.int8).float(), k)
    assert torch.equal((z - k).double(), z.double() - k.double())


def test_int8_products_are_exact_in_the_worst_case(device):
    """The worst block of the int8 product: INT8_COLUMNS columns of ±63 (every product 63²,
    all of one sign on the diagonal): its int32 sums are exact. One more such block in the
    same product would overflow int32 (the bound is tight), so the products stop there."""
    if not int8_kernel(device):
        pytest.skip(f"no int8 products on {device.type}")
    k = torch.full((24, INT8_COLUMNS), SPLIT_MAX, dtype=torch.int8, device=device)
    k[1] = -SPLIT_MAX
    k[2, ::2] = -SPLIT_MAX
    product = torch._int_mm(k, k.mT).cpu().long()
    expected = k.cpu().long() @ k.cpu().long().mT
    assert torch.equal(product, expected)
    assert product[0, 0] == INT8_COLUMNS * SPLIT_MAX**2 < 2**31
    assert 2 * INT8_COLUMNS * SPLIT_MAX**2 >= 2**31


def test_float32_exact_blocks_are_exact_in_the_worst_case(device):
    """Where the device has no int8 product: FLOAT32_EXACT_COLUMNS columns of ±63 in a float32
    product sum to an integer float32 holds exactly; twice as many would not (odd partial
    sums beyond 2**24 round)."""
    k = torch.full((1, 4, FLOAT32_EXACT_COLUMNS), float(SPLIT_MAX), device=device)
    k[:, 1] = -SPLIT_MAX
    with ieee_float32_matmul():
        product = torch.bmm(k, k.mT).cpu().double()
    assert torch.equal(product, k.cpu().double() @ k.cpu().double().mT)
    assert FLOAT32_EXACT_COLUMNS * SPLIT_MAX**2 < 2**24 <= 2 * FLOAT32_EXACT_COLUMNS * SPLIT_MAX**2


@pytest.mark.parametrize("int8", [True, False])
def test_split_products_exact_part_is_exact_over_several_products(device64, int8):
    """Patches at ±63·q over more columns than one int8 product may take (three products in
    two chunks, or float32 blocks): the exact part Σ kkᵀ, Σk and n come out exactly."""
    if int8 and not int8_kernel(device64):
        pytest.skip(f"no int8 products on {device64.type}")
    cols = INT8_COLUMNS + INT8_COLUMNS // 2
    y = torch.full((1, 3, cols), 63.0, device=device64)
    y[:, 1, ::3] = -63.0
    y[:, 2] = -63.0
    stats, sums = split_statistics([y, y[..., : INT8_COLUMNS // 3]], torch.zeros(1, 3))
    k = torch.cat([y, y[..., : INT8_COLUMNS // 3]], -1).cpu().long()
    k = torch.cat([k, torch.ones_like(k[:, :1])], 1)
    assert sums.exact is not None  # Σ kkᵀ and Σk (its corner also counts zeroed margins)
    assert torch.equal(sums.exact[:, :3, :4].cpu(), (k @ k.mT)[:, :3])
    assert torch.equal(stats.gram.cpu(), (k @ k.mT)[:, :3, :3].double())
    assert stats.count.item() == k.shape[-1]


def test_split_quantum_keeps_non_finite_input_non_finite():
    largest = torch.tensor([[63.0, float("inf"), float("nan"), 0.0, 0.0]])
    q = split_quantum(largest, torch.tensor([[1.0, 1.0, 1.0, 0.0, 2.0**100]]))
    assert q[0, 0] == 1 and not q[0, 1:3].isfinite().any() and q[0, 3] > 0
    assert (2.0**100 / q[0, 4]).isfinite()  # constant patches far from 0: x/q stays finite


@pytest.mark.parametrize("d", [5, 130, 300])
def test_gram_product_by_blocks_equals_the_full_product(d):
    """Above d = 128 only the upper blocks are multiplied and mirrored: the same Σ yyᵀ."""
    y = torch.randn(2, d, 57, dtype=F64)
    torch.testing.assert_close(gram_product(y), y @ y.mT, rtol=1e-12, atol=1e-12)
