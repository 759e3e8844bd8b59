"""Tests for fedsb.data.partition: coverage, skew, column grouping, determinism and errors."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from fedsb.data import SCHEMES, TextDataset, load_dataset, partition
from fedsb.errors import DataError


@pytest.fixture(scope="module")
def topics() -> TextDataset:
    return load_dataset("chatterbot-topics").train


@pytest.fixture(scope="module")
def drugs() -> TextDataset:
    return load_dataset("drugreview").train


def _toy(groups: list[str], labels: list[int] | None = None) -> TextDataset:
    labels = labels if labels is not None else [0] * len(groups)
    names = [str(i) for i in range(max(labels) + 1)]
    return TextDataset([f"t{i}" for i in range(len(groups))], labels, names, groups, name="toy")


def _assert_disjoint_cover(parts: list[list[int]], n: int) -> None:
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(n))
    assert all(part == sorted(part) for part in parts)


def _mean_label_entropy(dataset: TextDataset, parts: list[list[int]]) -> float:
    """Mean over clients of the entropy (nats) of the client's label distribution."""
    entropies = []
    for part in parts:
        counts = Counter(dataset.labels[i] for i in part)
        total = sum(counts.values())
        entropies.append(-sum(c / total * math.log(c / total) for c in counts.values()))
    return sum(entropies) / len(entropies)


def test_schemes() -> None:
    assert SCHEMES == ("iid", "dirichlet", "column")


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("num_clients", [1, 3, 10])
def test_every_index_exactly_once(drugs: TextDataset, scheme: str, num_clients: int) -> None:
    parts = partition(drugs, num_clients, scheme=scheme, alpha=0.3, seed=1)
    assert len(parts) == num_clients
    assert all(len(p) >= 1 for p in parts)
    _assert_disjoint_cover(parts, 783)


def test_iid_deals_evenly(topics: TextDataset) -> None:
    parts = partition(topics, 10, scheme="iid", seed=0)
    assert [len(p) for p in parts] == [150] * 8 + [149] * 2
    _assert_disjoint_cover(parts, 1498)


def test_dirichlet_small_alpha_skews_labels(topics: TextDataset) -> None:
    iid = _mean_label_entropy(topics, partition(topics, 10, scheme="iid", seed=0))
    skewed = _mean_label_entropy(topics, partition(topics, 10, scheme="dirichlet", alpha=0.1))
    mild = _mean_label_entropy(topics, partition(topics, 10, scheme="dirichlet", alpha=100.0))
    assert iid > 2.3  # close to the full label entropy
    assert skewed < iid - 0.5
    assert skewed < mild
    assert abs(mild - iid) < 0.2


def test_dirichlet_respects_min_size(topics: TextDataset) -> None:
    parts = partition(topics, 8, scheme="dirichlet", alpha=0.3, seed=2, min_size=40)
    assert min(len(p) for p in parts) >= 40
    _assert_disjoint_cover(parts, 1498)


def test_dirichlet_over_groups(drugs: TextDataset) -> None:
    parts = partition(drugs, 5, scheme="dirichlet", alpha=0.5, column_groups=True, seed=0)
    _assert_disjoint_cover(parts, 783)
    assert parts != partition(drugs, 5, scheme="dirichlet", alpha=0.5, seed=0)


def test_column_keeps_each_group_on_one_client(drugs: TextDataset) -> None:
    parts = partition(drugs, 10, scheme="column")
    _assert_disjoint_cover(parts, 783)
    owners: dict[str, set[int]] = {}
    for client, part in enumerate(parts):
        for i in part:
            owners.setdefault(drugs.groups[i], set()).add(client)
    assert len(owners) == 161
    assert all(len(clients) == 1 for clients in owners.values())
    # the largest group (Birth Control) fills the first client on its own
    assert {drugs.groups[i] for i in parts[0]} == {"Birth Control"}


def test_column_greedy_assignment_is_exact() -> None:
    groups = ["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d"] * 2
    parts = partition(_toy(groups), 2, scheme="column")
    # a(5)->0, b(3)->1, c(2)->1 (load 3 < 5), d(2)->0 (tie 5 == 5, lowest client)
    assert parts == [[0, 1, 2, 3, 4, 10, 11], [5, 6, 7, 8, 9]]


def test_column_gives_clients_whole_languages() -> None:
    lang = load_dataset("chatterbot-language", max_examples=2000).train
    parts = partition(lang, 4, scheme="column")
    langs = [{lang.groups[i] for i in p} for p in parts]
    assert sum(len(s) for s in langs) == 28
    assert all(len(s) >= 2 for s in langs)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic_per_seed(drugs: TextDataset, scheme: str) -> None:
    first = partition(drugs, 6, scheme=scheme, seed=7)
    assert first == partition(drugs, 6, scheme=scheme, seed=7)
    if scheme != "column":  # column is seed-independent by design
        assert first != partition(drugs, 6, scheme=scheme, seed=8)


def test_bad_num_clients(drugs: TextDataset) -> None:
    with pytest.raises(DataError, match="num_clients must be an integer >= 1; got 0"):
        partition(drugs, 0)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("inf")])
def test_bad_alpha(drugs: TextDataset, alpha: float) -> None:
    with pytest.raises(DataError, match="alpha must be a finite number > 0"):
        partition(drugs, 2, alpha=alpha)


def test_fewer_examples_than_clients() -> None:
    with pytest.raises(DataError, match="has 3 examples but num_clients=4"):
        partition(_toy(["a", "b", "c"]), 4, scheme="iid")


def test_unknown_scheme(drugs: TextDataset) -> None:
    with pytest.raises(DataError, match="unknown partition scheme 'random'; expected one of iid"):
        partition(drugs, 2, scheme="random")


def test_column_without_groups(topics: TextDataset) -> None:
    with pytest.raises(DataError, match="has groups=None"):
        partition(topics, 2, scheme="column")


def test_column_with_fewer_groups_than_clients() -> None:
    with pytest.raises(DataError, match="2 distinct groups for 3 clients"):
        partition(_toy(["a", "a", "b", "b"]), 3, scheme="column")


def test_dirichlet_gives_up_after_retries() -> None:
    toy = _toy(["g"] * 4)  # one class: near one-hot proportions leave clients empty
    with pytest.raises(DataError, match="could not give each of 4 clients >= 1 examples in 100"):
        partition(toy, 4, scheme="dirichlet", alpha=0.001)


def test_dirichlet_min_size_too_large(drugs: TextDataset) -> None:
    with pytest.raises(DataError, match="min_size=100 for 10 clients needs 1000 examples"):
        partition(drugs, 10, min_size=100)


def test_column_groups_with_iid(drugs: TextDataset) -> None:
    with pytest.raises(DataError, match="column_groups=True only applies to scheme='dirichlet'"):
        partition(drugs, 2, scheme="iid", column_groups=True)
