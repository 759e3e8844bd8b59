"""Scenario 7, reduced: 500 lightweight clients through mosquitto, 3 rounds, exact result.

The full run (1,000 and 10,000 clients, with memory and throughput) is `benchmarks/scale.py`.
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from fedsb.cli import main
from fedsb.config import parse_config
from fedsb.synthetic import synthetic_job_dict, update_payload

from .harness import Aggregators, assert_same_state, light_fleet, mosquitto, reference_global

pytestmark = pytest.mark.chaos
CLIENTS = 500
ROUNDS = 3


def test_500_light_clients_three_rounds(tmp_path, broker_dir):
    job = synthetic_job_dict("scale", clients=CLIENTS, rounds=ROUNDS)
    config = parse_config(job)
    with mosquitto(broker_dir) as url, light_fleet(url, job, connections=4) as fleet:
        aggs = Aggregators(job, url, tmp_path)
        try:
            agg = aggs.start()
            opened = fleet.run(lambda r, i: update_payload(config, r, i), CLIENTS, ROUNDS)
            assert agg.wait() == 0, agg.stderr()
        finally:
            aggs.close()

    assert len(opened) == ROUNDS
    report = aggs.report()
    assert [r["clients"] for r in report["rounds"]] == [CLIENTS] * ROUNDS
    assert report["rejections"] == {}
    assert_same_state(aggs.final_global(), reference_global(job, [list(range(CLIENTS))] * ROUNDS))


def test_fedsb_simulate_light_through_mosquitto(tmp_path, broker_dir):
    config = tmp_path / "job.toml"
    config.write_text(
        'name = "light"\n[adapter]\nrank = 8\n[federation]\nclients = 200\nrounds = 2\n'
    )
    job = synthetic_job_dict("light", clients=200, rounds=2, min_clients=None)
    with mosquitto(broker_dir) as url:
        args = ["simulate", "--config", str(config), "--light", "--broker", url]
        code = main([*args, "--out", str(tmp_path / "run")])
    assert code == 0
    summary = json.loads((tmp_path / "run" / "light.json").read_text())
    assert [r["clients"] for r in summary["rounds"]] == [200, 200]
    assert summary["rejections"] == {}
    state = json.loads((tmp_path / "run" / "aggregator" / "state.json").read_text())
    final = load_file(str(tmp_path / "run" / "aggregator" / state["global"]))
    assert_same_state(final, reference_global(job, [list(range(200))] * 2))
