"""Deterministic stratified train/test splitting and train subsampling."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from fedsb.errors import DataError


def indices_by_class(labels: Sequence[int]) -> dict[int, list[int]]:
    """Map each label to the ascending list of example indices that carry it (keys sorted)."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    return dict(sorted(by_class.items()))


def check_test_fraction(test_fraction: float) -> None:
    """Reject fractions that would leave the train or the test split empty."""
    if not (isinstance(test_fraction, int | float) and math.isfinite(test_fraction)):
        raise DataError(f"test_fraction must be a number in (0, 1); got {test_fraction!r}.")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(
            f"test_fraction must be strictly between 0 and 1; got {test_fraction}. "
            "Use e.g. 0.2 for an 80/20 split."
        )


def _num_test(class_size: int, test_fraction: float) -> int:
    """Test examples for one class: rounded share, at least 1 and at most size-1 when size >= 2."""
    if class_size < 2:
        return 0
    wanted = int(class_size * test_fraction + 0.5)
    return max(1, min(class_size - 1, wanted))


def stratified_split(
    labels: Sequence[int], test_fraction: float, rng: random.Random
) -> tuple[list[int], list[int]]:
    """Split indices per class so every class with >= 2 examples has a test example.

    Returns (train, test), each ascending so the original example order is kept.
    """
    check_test_fraction(test_fraction)
    train: list[int] = []
    test: list[int] = []
    for members in indices_by_class(labels).values():
        shuffled = list(members)
        rng.shuffle(shuffled)
        k = _num_test(len(shuffled), test_fraction)
        test.extend(shuffled[:k])
        train.extend(shuffled[k:])
    return sorted(train), sorted(test)


def stratified_subsample(labels: Sequence[int], k: int, rng: random.Random) -> list[int]:
    """Pick `k` indices keeping class proportions; one per class first when k allows it.

    Systematic sampling: each class is shuffled and its j-th member gets key j / class_size;
    the `k` smallest keys win (ties broken by class id). Returns ascending indices.
    """
    if k >= len(labels):
        return list(range(len(labels)))
    keyed: list[tuple[float, int, int]] = []
    for label, members in indices_by_class(labels).items():
        shuffled = list(members)
        rng.shuffle(shuffled)
        size = len(shuffled)
        keyed.extend((j / size, label, idx) for j, idx in enumerate(shuffled))
    keyed.sort()
    return sorted(idx for _, _, idx in keyed[:k])
