"""fedsb.aggregate: hand-computed heterogeneous-rank padding, order independence, errors."""

from __future__ import annotations

import copy
import random
import re

import pytest
import torch

from fedsb.aggregate import PADDINGS, aggregate
from fedsb.errors import ConfigError

R_MAX = 8
# Global R: a known, non-constant 8×8 matrix.
GLOBAL_R = torch.arange(64, dtype=torch.float64).reshape(8, 8) / 8 - 3

# Which clients cover each entry of the 8×8 R for client ranks 2, 4, 8:
# a = all three, b = the rank-4 and rank-8 clients, c = the rank-8 client only.
GRID_2_4_8 = [
    "aabbcccc",
    "aabbcccc",
    "bbbbcccc",
    "bbbbcccc",
    "cccccccc",
    "cccccccc",
    "cccccccc",
    "cccccccc",
]  # fmt: skip


def grid(values: dict[str, float]) -> torch.Tensor:
    """The 8×8 matrix whose entries are `values[letter]` following GRID_2_4_8."""
    return torch.tensor([[values[ch] for ch in row] for row in GRID_2_4_8], dtype=torch.float64)


def constant_updates(ranks: list[int], values: list[float]) -> list[dict[str, torch.Tensor]]:
    return [
        {"layer.R": torch.full((r, r), v, dtype=torch.float64)}
        for r, v in zip(ranks, values, strict=True)
    ]


# Ranks 2/4/8, deltas filled with 1, 2, 4, weights 1, 1, 2.
#   replication: a = (1·1 + 1·2 + 2·4)/(1+1+2), b = (1·2 + 2·4)/(1+2), c = 2·4/2
#   zero:        a = (1·1 + 1·2 + 2·4)/4,       b = (1·2 + 2·4)/4,     c = 2·4/4
#   hetlora:     weights = Frobenius norms ‖1·J₂‖ = 2, ‖2·J₄‖ = 8, ‖4·J₈‖ = 32 (sum 42)
#                a = (2·1 + 8·2 + 32·4)/42,    b = (8·2 + 32·4)/42,   c = 32·4/42
EXPECTED_2_4_8 = {
    "replication": {"a": 11 / 4, "b": 10 / 3, "c": 4.0},
    "zero": {"a": 11 / 4, "b": 10 / 4, "c": 8 / 4},
    "hetlora": {"a": 146 / 42, "b": 144 / 42, "c": 128 / 42},
}


@pytest.mark.parametrize("padding", PADDINGS)
def test_heterogeneous_ranks_by_hand(padding: str) -> None:
    updates = constant_updates([2, 4, 8], [1.0, 2.0, 4.0])
    new = aggregate({"layer.R": GLOBAL_R}, updates, [1, 1, 2], [2, 4, 8], padding=padding)
    expected = GLOBAL_R + grid(EXPECTED_2_4_8[padding])
    torch.testing.assert_close(new["layer.R"], expected, rtol=0, atol=1e-12)
    # The spot values, spelled out once more for the reader of a failure
    step = new["layer.R"] - GLOBAL_R
    assert step[0, 0].item() == pytest.approx(EXPECTED_2_4_8[padding]["a"], abs=1e-12)
    assert step[3, 1].item() == pytest.approx(EXPECTED_2_4_8[padding]["b"], abs=1e-12)
    assert step[7, 7].item() == pytest.approx(EXPECTED_2_4_8[padding]["c"], abs=1e-12)


# Ranks 2/4 into r_max 8 (the rank-8 client is absent), deltas 1, 2, weights 1, 3.
#   replication: a = (1·1 + 3·2)/4, b = 3·2/3, c: nobody trained it → global kept exactly
#   zero:        a = (1·1 + 3·2)/4, b = 3·2/4, c = 0
#   hetlora:     norms ‖1·J₂‖ = 2, ‖2·J₄‖ = 8: a = (2·1 + 8·2)/10, b = 8·2/10, c = 0
EXPECTED_2_4 = {
    "replication": {"a": 7 / 4, "b": 2.0, "c": 0.0},
    "zero": {"a": 7 / 4, "b": 6 / 4, "c": 0.0},
    "hetlora": {"a": 18 / 10, "b": 16 / 10, "c": 0.0},
}


@pytest.mark.parametrize("padding", PADDINGS)
def test_max_rank_client_absent(padding: str) -> None:
    updates = constant_updates([2, 4], [1.0, 2.0])
    new = aggregate({"layer.R": GLOBAL_R}, updates, [1, 3], [2, 4], padding=padding)["layer.R"]
    torch.testing.assert_close(new, GLOBAL_R + grid(EXPECTED_2_4[padding]), rtol=0, atol=1e-12)
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[:4, :4] = False
    assert torch.equal(new[outside], GLOBAL_R[outside])  # bit-identical outside the 4×4 block


def test_non_r_keys_are_plain_weighted_mean() -> None:
    head_w = torch.linspace(-1, 1, 24, dtype=torch.float64).reshape(3, 8)
    head_b = torch.tensor([0.5, -0.5, 2.0], dtype=torch.float64)
    global_state = {"layer.R": GLOBAL_R, "classifier.weight": head_w, "classifier.bias": head_b}
    updates = constant_updates([2, 4, 8], [1.0, 2.0, 4.0])
    for u, v in zip(updates, [1.0, 2.0, 4.0], strict=True):
        u["classifier.weight"] = torch.full((3, 8), v, dtype=torch.float64)
    updates[1]["classifier.bias"] = torch.full((3,), 10.0, dtype=torch.float64)
    updates[2]["classifier.bias"] = torch.full((3,), 1.0, dtype=torch.float64)
    for padding in PADDINGS:
        new = aggregate(global_state, updates, [1, 1, 2], [2, 4, 8], padding=padding)
        # weight: (1·1 + 1·2 + 2·4)/4 whatever the padding (padding only concerns .R keys)
        torch.testing.assert_close(new["classifier.weight"], head_w + 11 / 4, rtol=0, atol=1e-12)
        # bias sent by clients 2 and 3 only: (1·10 + 2·1)/3
        torch.testing.assert_close(new["classifier.bias"], head_b + 4.0, rtol=0, atol=1e-12)


def test_missing_tensor_everywhere_keeps_global() -> None:
    global_state = {"layer.R": GLOBAL_R, "other.R": GLOBAL_R * 2}
    new = aggregate(global_state, constant_updates([8], [1.0]), padding="zero")
    assert torch.equal(new["other.R"], GLOBAL_R * 2)
    assert new["other.R"] is not global_state["other.R"]  # a copy, not an alias


def test_zero_weight_entries_keep_global_under_replication() -> None:
    updates = constant_updates([2, 8], [1.0, 5.0])
    new = aggregate({"layer.R": GLOBAL_R}, updates, [1.0, 0.0], padding="replication")["layer.R"]
    expected = GLOBAL_R.clone()
    expected[:2, :2] += 1.0
    assert torch.equal(new, expected)


def test_inputs_are_not_mutated() -> None:
    torch.manual_seed(0)
    global_state = {"layer.R": torch.randn(8, 8), "classifier.weight": torch.randn(3, 8)}
    updates = [
        {"layer.R": torch.randn(r, r), "classifier.weight": torch.randn(3, 8)} for r in (2, 4, 8)
    ]
    saved = copy.deepcopy((global_state, updates))
    for padding in PADDINGS:
        aggregate(global_state, updates, [1, 2, 3], [2, 4, 8], padding=padding)
    for key in global_state:
        assert torch.equal(global_state[key], saved[0][key])
    for u, s in zip(updates, saved[1], strict=True):
        assert all(torch.equal(u[k], s[k]) for k in u)


# --- order independence -------------------------------------------------------------------


def random_round(
    seed: int, dtype: torch.dtype = torch.float32
) -> tuple[dict, list[dict], list[float], list[int]]:
    """A global state and 6 client deltas of mixed ranks, with random positive weights."""
    gen = torch.Generator().manual_seed(seed)
    ranks = [2, 8, 4, 8, 3, 5]
    global_state = {
        "enc.0.query.R": torch.randn(8, 8, generator=gen),
        "enc.1.value.R": torch.randn(8, 8, generator=gen),
        "classifier.weight": torch.randn(3, 16, generator=gen),
        "classifier.bias": torch.randn(3, generator=gen),
    }
    updates = [
        {
            "enc.0.query.R": torch.randn(r, r, generator=gen) * 1e-3,
            "enc.1.value.R": torch.randn(r, r, generator=gen) * 10,
            "classifier.weight": torch.randn(3, 16, generator=gen),
            "classifier.bias": torch.randn(3, generator=gen) * 1e4,
        }
        for r in ranks
    ]
    weights = (torch.rand(len(ranks), generator=gen) * 100 + 0.1).tolist()
    cast = {k: v.to(dtype) for k, v in global_state.items()}
    return cast, [{k: v.to(dtype) for k, v in u.items()} for u in updates], weights, ranks


# float32 is what clients send; float64 is where a naive arrival-order sum would differ in the
# last bit (in float32 the float64 accumulation mostly hides it), so both are checked.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("padding", PADDINGS)
def test_order_independence_is_bit_exact(padding: str, dtype: torch.dtype) -> None:
    global_state, updates, weights, ranks = random_round(seed=11, dtype=dtype)
    reference = aggregate(global_state, updates, weights, ranks, padding=padding)
    assert all(v.dtype == dtype for v in reference.values())
    rng = random.Random(0)
    orders = [list(reversed(range(6)))] + [rng.sample(range(6), 6) for _ in range(12)]
    for order in orders:
        got = aggregate(
            global_state,
            [updates[i] for i in order],
            [weights[i] for i in order],
            [ranks[i] for i in order],
            padding=padding,
        )
        assert got.keys() == reference.keys()
        for key in reference:
            assert torch.equal(got[key], reference[key]), (padding, order, key)


def test_order_independence_with_identical_contents() -> None:
    """Two clients with the same delta but different weights must still commute."""
    global_state, updates, _, _ = random_round(seed=3, dtype=torch.float64)
    twin = [updates[0], dict(updates[0]), updates[1]]
    a = aggregate(global_state, twin, [1.0, 3.0, 2.0])
    b = aggregate(global_state, twin[::-1], [2.0, 3.0, 1.0])
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- errors --------------------------------------------------------------------------------


def good_round() -> tuple[dict, list[dict]]:
    global_state = {"layer.R": torch.zeros(4, 4), "classifier.weight": torch.zeros(3, 4)}
    updates = [{"layer.R": torch.ones(2, 2)}, {"layer.R": torch.ones(4, 4)}]
    return global_state, updates


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"padding": "mean"}, "padding must be one of replication, zero, hetlora, got 'mean'"),
        ({"weights": [1.0]}, "updates, weights and ranks must have the same length"),
        ({"weights": [1.0, 2.0, 3.0]}, "updates, weights and ranks must have the same length"),
        ({"ranks": [2]}, "updates, weights and ranks must have the same length"),
        ({"weights": [1.0, -0.5]}, "aggregation weights must be finite and non-negative"),
        ({"ranks": [2, 2]}, "update tensor 'layer.R' is (4, 4), expected rank 2"),
    ],
)
def test_argument_errors(change: dict, message: str) -> None:
    global_state, updates = good_round()
    kwargs = {"weights": None, "ranks": None, "padding": "replication"} | change
    with pytest.raises(ConfigError, match=re.escape(message)):
        aggregate(global_state, updates, **kwargs)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"layer.S": torch.ones(2, 2)}, "update has tensor 'layer.S' that the global state"),
        ({"layer.R": torch.ones(5, 5)}, "update tensor 'layer.R' has shape (5, 5), which does not"),
        ({"layer.R": torch.ones(2, 5)}, "update tensor 'layer.R' has shape (2, 5)"),
        ({"layer.R": torch.ones(16)}, "update tensor 'layer.R' has shape (16,)"),
        (
            {"classifier.weight": torch.ones(2, 4)},
            "update tensor 'classifier.weight' has shape (2, 4)",  # blocks are for .R keys only
        ),
    ],
)
def test_shape_errors(update: dict, message: str) -> None:
    global_state, updates = good_round()
    with pytest.raises(ConfigError, match=re.escape(message)):
        aggregate(global_state, [updates[0], update])


def test_non_square_r_block_is_rejected() -> None:
    global_state, _ = good_round()
    with pytest.raises(ConfigError, match="layer.R"):
        aggregate(global_state, [{"layer.R": torch.ones(2, 3)}])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weight_is_rejected(bad: float) -> None:
    global_state, updates = good_round()
    updates = [u | {"classifier.weight": torch.ones(3, 4)} for u in updates]
    with pytest.raises(ConfigError, match="weight"):
        aggregate(global_state, updates, [bad, 1.0])
