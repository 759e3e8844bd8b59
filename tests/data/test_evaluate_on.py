"""data.evaluate_on = "validation": a seeded validation set carved from the train split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from conftest import tiny_job

from fedsb.config import parse_config
from fedsb.errors import ConfigError
from fedsb.simulation import prepare_fleet, validation_split


def job(model_dir: Path, evaluate_on: str) -> dict:
    raw = tiny_job(model_dir)
    raw["data"] = raw["data"] | {"evaluate_on": evaluate_on}
    return raw


def test_validation_is_disjoint_from_train_and_test_and_reproducible(tiny_model_dir: Path) -> None:
    plain = prepare_fleet(parse_config(job(tiny_model_dir, "test")))
    tuned = prepare_fleet(parse_config(job(tiny_model_dir, "validation")))
    validation, rest = tuned.split.test.texts, tuned.split.train.texts
    test, full_train = plain.split.test.texts, plain.split.train.texts

    assert len(full_train) == 120 and len(validation) == 30  # ~20% per class, >= 1 of each
    assert not set(validation) & set(rest)
    assert not set(validation) & set(test)
    assert Counter(validation) + Counter(rest) == Counter(full_train)
    assert len(tuned.test.labels) == len(validation)  # the fleet evaluates on it
    assert sum(len(shard) for shard in tuned.shards) == len(rest)  # and trains on the rest

    again = validation_split(plain.split.train, 0.2, seed=0)
    other = validation_split(plain.split.train, 0.2, seed=1)
    assert again.test.texts == validation
    assert other.test.texts != validation


def test_bad_evaluate_on_is_one_line(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data\.evaluate_on: .*'validation'.* \(got 'train'\)$"):
        parse_config(job(tiny_model_dir, "train"))
