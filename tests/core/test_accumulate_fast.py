"""ExactSum's float32 × integer-weight fast path (int64 bins): exact against Fraction arithmetic."""

from __future__ import annotations

import random

import pytest
import torch

from core.test_accumulate import reference, summed, wide_float32
from fedsb import accumulate
from fedsb.accumulate import ExactSum


def f32_extremes() -> torch.Tensor:
    """Every corner of float32: subnormals, the largest finite, ±0, both signs, 1 ulp apart."""
    return torch.tensor(
        [1e-45, -1e-45, 1.1754942e-38, -1.17549435e-38, 3.4028235e38, -3.4028235e38, 0.0, -0.0]
        + [1.0, 1.0000001, -0.99999994, 2.0**-126, 2.0**-149 * 3, 65504.0, 1e-30, -7.0]
    )


def test_fast_path_takes_float32_with_integer_weights() -> None:
    acc = ExactSum((4,))
    acc.add(torch.ones(4), 3.0)
    assert acc._bins is not None  # the int64 bins, not the float64 limbs
    acc.add(torch.ones(4), 0.5)  # a fractional weight goes the general way, into the same sum
    assert acc.result().tolist() == [3.5] * 4


@pytest.mark.parametrize("weights", [[1.0] * 6, [1.0, 2.0**20, 7.0, 3.0, 2.0**20 - 1, 0.0]])
def test_extremes_and_subnormals_match_fraction(weights: list[float]) -> None:
    gen = torch.Generator().manual_seed(5)
    values = [f32_extremes() * (1 if i % 2 else -1) for i in range(3)]
    values += [wide_float32(gen, (16,), -149, 127) for _ in range(3)]  # the full float32 range
    got = summed(values, weights).result()
    assert torch.equal(got, reference(values, weights))


def test_many_large_weights_flush_exactly() -> None:
    """Σ w passes the 2^23 flush threshold several times; the result is still exact."""
    gen = torch.Generator().manual_seed(6)
    rng = random.Random(6)
    values = [wide_float32(gen, (8, 8), -60, 60) for _ in range(40)]
    weights = [float(rng.choice([2**20, 2**20 - 1, 999_999, 1, 3])) for _ in values]
    assert sum(weights) > 2 * 2**23
    assert torch.equal(summed(values, weights).result(), reference(values, weights))


def test_cancellation_across_bins_is_exact() -> None:
    big, tiny = 2.0**100, 2.0**-100
    values = [torch.tensor([big, tiny, 1.0]), torch.tensor([-big, 0.0, -1.0])]
    values.append(torch.tensor([0.0, tiny, 2.0**-149]))
    assert summed(values, [5.0, 5.0, 1.0]).result().tolist() == [0.0, 6 * tiny, 2.0**-149]


def test_fast_and_general_paths_mix_merge_and_checkpoint_exactly() -> None:
    gen = torch.Generator().manual_seed(7)
    rng = random.Random(7)
    shape = (6, 4, 4)
    values = [wide_float32(gen, shape, -40, 10) for _ in range(24)]
    weights = [float(rng.randint(0, 5000)) if i % 3 else rng.random() * 30 for i in range(24)]
    expected = reference(values, weights)
    parts = [ExactSum(shape) for _ in range(3)]
    for i, (v, w) in enumerate(zip(values, weights, strict=True)):
        parts[i % 3].add(v, w)
        if i == 11:  # checkpoint one part in the middle of the stream, then keep adding to it
            parts[1] = ExactSum.from_state_dict(parts[1].state_dict())
    parts[0].merge(parts[1])
    parts[2].merge(parts[0])
    assert torch.equal(parts[2].result(), expected)
    assert parts[2].count == 24


@pytest.mark.parametrize("rank", [1, 3, 4])
def test_fast_add_block_matches_fraction(rank: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    blocks = [wide_float32(gen, (5, rank, rank), -30, 5) for _ in range(6)]
    weights = [float(w) for w in (1, 2, 3, 10, 100, 1000)]
    acc = ExactSum((5, 4, 4))
    for block, weight in zip(blocks, weights, strict=True):
        acc.add_block(block, weight)
    padded = [torch.nn.functional.pad(b, (0, 4 - rank, 0, 4 - rank)) for b in blocks]
    assert torch.equal(acc.result(), reference(padded, weights))


def test_fast_path_rejects_non_finite_without_changing_the_sum() -> None:
    acc = ExactSum((3,))
    acc.add(torch.tensor([1.0, 2.0, 3.0]), 2.0)
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="finite"):
            acc.add(torch.tensor([1.0, bad, 0.0]), 1.0)
    assert acc.count == 1
    assert acc.result().tolist() == [2.0, 4.0, 6.0]


def test_chunked_passes_match_fraction_across_chunk_boundaries(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Large tensors are added, flushed and rounded in chunks: the result is still exact,
    with a NaN in the last chunk refused before any chunk is added."""
    monkeypatch.setattr(accumulate, "_CHUNK", 7)  # 7 does not divide any size below
    gen = torch.Generator().manual_seed(8)
    shape = (3, 5, 4)
    values = [wide_float32(gen, shape, -149, 127) for _ in range(5)]
    extremes = f32_extremes()  # 16 values: 3 × 16 + 12 = 60 = 3·5·4
    values.append(torch.cat([extremes, -extremes, extremes * 0.5, extremes[:12]]).view(shape))
    weights = [1.0, 3.0, 2.0**20, 0.25, 7.0, 5.0]  # 0.25: the general path, chunked rounding
    acc = summed(values, weights)
    bad = values[0].clone().view(-1)
    bad[-1] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        acc.add(bad.view(shape), 1.0)
    assert torch.equal(acc.result(), reference(values, weights))
    block = ExactSum((3, 5, 4))  # a leading block whose chunks are not contiguous in the sum
    blocks = [wide_float32(gen, (3, 3, 3), -30, 5) for _ in range(3)]
    for b, w in zip(blocks, (1.0, 2.0, 9.0), strict=True):
        block.add_block(b, w)
    padded = [torch.nn.functional.pad(b, (0, 1, 0, 2)) for b in blocks]
    assert torch.equal(block.result(), reference(padded, [1.0, 2.0, 9.0]))
