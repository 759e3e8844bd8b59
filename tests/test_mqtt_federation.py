"""Federation through a real broker: same result as in process, restarts, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedsb.cli import run_simulation


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []


@pytest.mark.parametrize("per_round", [None, 2], ids=["all-clients", "sample-of-2"])
def test_mqtt_run_is_bit_identical_to_inproc_run(tiny_config, tmp_path, per_round):
    job = tiny_config(clients=4, rounds=3, client_ranks=[2, 4, 4, 3], clients_per_round=per_round)
    inproc = run_simulation(job, tmp_path / "inproc", transport="inproc", quiet=True)
    mqtt = run_simulation(job, tmp_path / "mqtt", transport="mqtt", quiet=True)
    assert_same_state(inproc["final_state"], mqtt["final_state"])
    assert inproc["accuracy_after"] == mqtt["accuracy_after"]
    assert mqtt["rejections"] == {}
    assert (tmp_path / "mqtt" / "aggregator" / "state.json").exists()
    if per_round:  # the aggregator's round message selected the same sample of 2 each round
        assert clients_per_round(tmp_path / "mqtt") == clients_per_round(tmp_path / "inproc")
        assert clients_per_round(tmp_path / "mqtt") == [2, 2, 2]


def clients_per_round(run_dir: Path) -> list[int]:
    """How many clients each round aggregated, from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["clients"] for row in rows if row["round"] > 0]


def test_frozen_head_over_mqtt_matches_inproc(tiny_model_dir, tmp_path):
    """The edge clients get the probed head once, with B and A, and upload R alone."""
    from conftest import frozen_head_job

    job = frozen_head_job(tiny_model_dir, clients=3, rounds=2)
    inproc = run_simulation(job, tmp_path / "i", transport="inproc", quiet=True)
    mqtt = run_simulation(job, tmp_path / "m", transport="mqtt", quiet=True)
    assert_same_state(inproc["final_state"], mqtt["final_state"])
    assert inproc["accuracy_after"] == mqtt["accuracy_after"]
    assert all(k.endswith(".R") for k in mqtt["final_state"])


@pytest.mark.parametrize("method", ["fedit", "flora"])
def test_baselines_over_mqtt_match_inproc(tiny_config, tmp_path, method):
    job = tiny_config(clients=3, rounds=2, method=method)
    inproc = run_simulation(job, tmp_path / "i", transport="inproc", quiet=True)
    mqtt = run_simulation(job, tmp_path / "m", transport="mqtt", quiet=True)
    assert_same_state(inproc["final_state"], mqtt["final_state"])


def test_dropout_and_slow_clients_complete_the_job(tiny_model_dir, tmp_path):
    from conftest import tiny_job

    from fedsb.config import parse_config

    raw = tiny_job(tiny_model_dir, clients=4, rounds=3, min_clients=2, round_timeout_s=20)
    raw["simulation"] = {
        "transport": "mqtt",
        "dropout": 0.3,
        "slow_fraction": 0.25,
        "slow_delay_s": 0.5,
    }
    job = parse_config(raw)
    summary = run_simulation(job, tmp_path, quiet=True)
    assert summary["rounds"] == 3
    assert 0.0 <= summary["accuracy_after"] <= 1.0
