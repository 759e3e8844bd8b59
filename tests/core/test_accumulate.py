"""fedsb.accumulate: exact against Fraction arithmetic, order/merge/checkpoint invariance, errors."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from fractions import Fraction

import pytest
import torch

from fedsb.accumulate import ExactSum, exact_weighted_mean

SHAPE = (48, 16, 16)  # 48 stacked 16×16 blocks, the aggregator's hot-path tensor


def to_float(exact: Fraction) -> float:
    """Correctly rounded float64 of an exact rational (±inf past the largest float)."""
    try:
        return float(exact)
    except OverflowError:
        return math.inf if exact > 0 else -math.inf


def reference(values: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w·x per element in Fraction arithmetic, rounded once to float64."""
    columns = [v.double().flatten().tolist() for v in values]
    fw = [Fraction(w) for w in weights]
    out = [
        to_float(
            sum((w * Fraction(col[i]) for w, col in zip(fw, columns, strict=True)), Fraction(0))
        )
        for i in range(values[0].numel())
    ]
    return torch.tensor(out, dtype=torch.float64).view(values[0].shape)


def summed(values: Sequence[torch.Tensor], weights: Sequence[float]) -> ExactSum:
    acc = ExactSum(tuple(values[0].shape))
    for value, weight in zip(values, weights, strict=True):
        acc.add(value, weight)
    return acc


def wide_float32(gen: torch.Generator, shape: tuple[int, ...], lo: int, hi: int) -> torch.Tensor:
    """Random-sign float32 with exponents uniform in [lo, hi] (mixed magnitudes)."""
    mant = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
    exps = torch.randint(lo, hi + 1, shape, generator=gen)
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    return (sign * torch.ldexp(mant, exps.double())).float()


def updates(seed: int, count: int, shape: tuple[int, ...]) -> tuple[list, list[float]]:
    """float32 updates of mixed magnitude with integer and 53-bit float weights."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    values = [wide_float32(gen, shape, -40, 10) for _ in range(count)]
    weights = [float(rng.randint(1, 5000)) if i % 2 else rng.random() * 30 for i in range(count)]
    return values, weights


def test_catastrophic_cancellation_is_exact() -> None:
    terms = (1e16, 1.0, -1e16)  # a float64 running sum in this order gives 0.0
    values = [torch.tensor([v, -v, 3.0], dtype=torch.float64) for v in terms]
    expected = torch.tensor([1.0, -1.0, 9.0], dtype=torch.float64)
    assert torch.equal(summed(values, [1.0] * 3).result(), expected)
    assert summed(values, [1.0] * 3).result()[0].item() == math.fsum(terms)
    # float32 path, fractional weight: 2^60 and −2^60 cancel exactly around 1 and 2^-100.
    f32 = [torch.tensor([2.0**60, 1.0, 2.0**-100]), torch.tensor([-(2.0**60), 0.0, 0.0])]
    assert torch.equal(summed(f32, [0.1, 0.1]).result(), reference(f32, [0.1, 0.1]))
    assert summed(f32, [0.1, 0.1]).result()[0].item() == 0.0


def test_rounds_once_to_nearest_even() -> None:
    def total(*terms: float) -> float:
        return summed([torch.tensor(t, dtype=torch.float64) for t in terms], [1.0] * len(terms))

    cases = {
        (1.0, 2.0**-53): 1.0,  # tie, even neighbour below
        (1.0 + 2.0**-52, 2.0**-53): 1.0 + 2.0**-51,  # tie, even neighbour above
        (1.0, 2.0**-53, 2.0**-1000): 1.0 + 2.0**-52,  # just past the tie: sticky bit
        (-1.0, -(2.0**-53), -(2.0**-1070)): -(1.0 + 2.0**-52),
        (5e-324, 5e-324, 5e-324): 1.5e-323,  # subnormal, exact
        (1e308, 1e308, -1e308): 1e308,  # intermediate overflow is harmless
    }
    for terms, expected in cases.items():
        assert total(*terms).result().item() == expected
    half_ulp = summed([torch.tensor([5e-324, 3 * 5e-324], dtype=torch.float64)], [0.5])
    assert half_ulp.result().tolist() == [0.0, 1e-323]  # subnormal ties to even


def test_memory_does_not_grow_with_additions() -> None:
    gen = torch.Generator().manual_seed(9)
    values = [torch.randn(4, 4, generator=gen) for _ in range(4)]
    acc = summed(values, [3.0, 1.0, 2.0, 5.0])
    rows = acc.n_limbs
    for i in range(400):
        acc.add(values[i % 4], 1000.0)
    assert acc.n_limbs <= rows + 1


def test_mixed_magnitudes_match_fraction_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    rng = random.Random(1)
    values = [wide_float32(gen, (8, 16), -100, 33) for _ in range(30)]  # 1e-30 .. 1e10
    weights = [rng.choice([0.0, 1.0, 7.0, rng.random(), rng.random() * 1e-20]) for _ in values]
    assert torch.equal(summed(values, weights).result(), reference(values, weights))


def test_float64_extremes_and_subnormals_match_reference() -> None:
    tiny = 5e-324  # smallest float64 subnormal
    row = [tiny, -3 * tiny, 1e-310, 2.0**-1022, 1e300, -1e-300, 1.0, 0.0, 1.5e308]
    values = [torch.tensor(row, dtype=torch.float64) * s for s in (1.0, -0.5, 0.25)]
    for weights in ([1.0, 1.0, 1.0], [0.3, 1e-300, 2.0], [1e-30, 0.7, 1.0]):
        assert torch.equal(summed(values, weights).result(), reference(values, weights))
    # Overflow rounds to inf like float64 arithmetic; float32 subnormals times tiny weights.
    assert summed([torch.tensor([1e308], dtype=torch.float64)], [10.0]).result().item() == math.inf
    sub32 = [torch.tensor([1e-45, -1e-40, 1e-38, 3e38]).float() for _ in range(2)]
    for weights in ([1.0, 1.0], [1e-290, 3e-300], [1e-280, 0.5]):
        assert torch.equal(summed(sub32, weights).result(), reference(sub32, weights))


def test_zero_weights_and_zero_values_contribute_nothing() -> None:
    values, weights = updates(2, 6, (4, 4))
    acc = summed(values, weights)
    acc.add(torch.full((4, 4), 123.0), 0.0)
    acc.add(torch.zeros(4, 4), 9.0)
    assert acc.count == 8
    assert torch.equal(acc.result(), reference(values, weights))
    assert torch.equal(summed(values, [0.0] * 6).result(), torch.zeros(4, 4, dtype=torch.float64))


def test_order_independent_bit_for_bit() -> None:
    values, weights = updates(3, 50, SHAPE)
    pairs = list(zip(values, weights, strict=True))
    first = summed(values, weights).result()
    rng = random.Random(3)
    for _ in range(20):
        rng.shuffle(pairs)
        assert torch.equal(summed([p[0] for p in pairs], [p[1] for p in pairs]).result(), first)
    small = [v[:2] for v in values]  # exact reference on a slice (Fraction is slow)
    assert torch.equal(summed(small, weights).result(), reference(small, weights))


def test_merge_of_any_split_equals_single_accumulator() -> None:
    values, weights = updates(4, 40, (6, 16))
    single = summed(values, weights).result()
    rng = random.Random(4)
    for parts in (2, 3, 3, 2):
        accs = [ExactSum((6, 16)) for _ in range(parts)]
        for value, weight in zip(values, weights, strict=True):
            accs[rng.randrange(parts)].add(value, weight)
        restored = [ExactSum.from_state_dict(a.state_dict()) for a in accs]
        for group in (accs, restored):
            total = group[0]
            for other in group[1:]:
                total.merge(other)
            assert total.count == len(values)
            assert torch.equal(total.result(), single)


def test_merge_aligns_different_windows() -> None:
    big = [torch.full((3,), 1e10, dtype=torch.float32)]
    small = [torch.tensor([1e-30, -1e-30, 3e-38], dtype=torch.float32)]
    a, b = summed(big, [3.0]), summed(small, [0.1])
    a.merge(b)
    assert torch.equal(a.result(), reference(big + small, [3.0, 0.1]))
    b.merge(summed(big, [3.0]))
    assert torch.equal(b.result(), a.result())


def test_state_dict_round_trip_continues_exactly() -> None:
    values, weights = updates(5, 12, (5, 7))
    acc = summed(values[:6], weights[:6])
    state = acc.state_dict()
    assert all(isinstance(t, torch.Tensor) for t in state.values())
    restored = ExactSum.from_state_dict(state)
    for value, weight in zip(values[6:], weights[6:], strict=True):
        restored.add(value, weight)
    assert restored.count == 12
    assert torch.equal(restored.result(), summed(values, weights).result())
    bad = dict(state, meta=state["meta"].clone())
    bad["meta"][1] = 32
    with pytest.raises(ValueError):
        ExactSum.from_state_dict(bad)


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_add_block_matches_zero_padded_add(rank: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    blocks = [wide_float32(gen, (rank, rank), -30, 5) for _ in range(5)]
    weights = [3.0, 0.25, 1.0 / 3.0, 17.0, 2.5e-7]
    by_block, padded = ExactSum((8, 8)), ExactSum((8, 8))
    big = torch.randn(8, 8, generator=gen)
    by_block.add(big, 2.0)
    padded.add(big, 2.0)
    for block, weight in zip(blocks, weights, strict=True):
        by_block.add_block(block, weight)
        padded.add(torch.nn.functional.pad(block, (0, 8 - rank, 0, 8 - rank)), weight)
    assert torch.equal(by_block.result(), padded.result())
    with pytest.raises(ValueError):
        by_block.add_block(torch.ones(9, 2))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_raise(bad: float) -> None:
    acc = ExactSum((3,))
    for dtype in (torch.float32, torch.float64):
        with pytest.raises(ValueError):
            acc.add(torch.tensor([1.0, bad, 2.0], dtype=dtype))
        with pytest.raises(ValueError):
            acc.add(torch.tensor([1.0, bad, 2.0], dtype=dtype), 0.0)
    assert acc.count == 0


@pytest.mark.parametrize("weight", [-1.0, -1e-300, math.nan, math.inf])
def test_bad_weights_raise(weight: float) -> None:
    with pytest.raises(ValueError):
        ExactSum((2,)).add(torch.ones(2), weight)


def test_wrong_shape_or_dtype_raises() -> None:
    acc = ExactSum((2, 2))
    with pytest.raises(ValueError):
        acc.add(torch.ones(4))
    with pytest.raises(TypeError):
        acc.add(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError):
        acc.merge(ExactSum((4,)))


def test_exact_weighted_mean_matches_fraction_arithmetic() -> None:
    values, weights = updates(6, 9, (3, 5))
    mean = exact_weighted_mean(values, weights)
    total = to_float(sum((Fraction(w) for w in weights), Fraction(0)))
    assert torch.equal(mean, reference(values, weights) / total)
    shuffled = list(zip(values, weights, strict=True))[::-1]
    again = exact_weighted_mean([p[0] for p in shuffled], [p[1] for p in shuffled])
    assert torch.equal(again, mean)
    zeros = exact_weighted_mean(values[:2], [0.0, 0.0])
    assert torch.equal(zeros, torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError):
        exact_weighted_mean([], [])
