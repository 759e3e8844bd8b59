"""Scenario 6: a Byzantine client sends updates a million times larger than the honest ones.

With `federation.norm_bound` its update is clipped to the bound or refused; with a robust
aggregation (coordinate-wise median) it barely moves the global state. Each run over
mosquitto equals the same job played in process.
"""

from __future__ import annotations

import pytest
import torch

from fedsb.aggregator.synthetic import synthetic_server
from fedsb.config import parse_config
from fedsb.synthetic import client_id, synthetic_job_dict, update_payload

from .harness import (
    Aggregators,
    assert_same_state,
    light_fleet,
    mosquitto,
    payloads,
    reference_global,
)

pytestmark = pytest.mark.chaos
HONEST = 10
ROUNDS = 3
BOUND = 0.1  # an honest update's norm is ≈ 1e-3·√3072 ≈ 0.055
BYZANTINE = HONEST  # client index of the attacker


def norm(state: dict[str, torch.Tensor]) -> float:
    return float(torch.cat([v.flatten().double() for v in state.values()]).norm())


def round_steps(job: dict, attack: dict) -> list[float]:
    """‖R after round r − R before it‖ of the in-process run (equal to the MQTT run's)."""
    server = synthetic_server(parse_config(job))
    steps = []
    for round_no in range(ROUNDS):
        before = dict(server.broadcast)
        for client, payload in payloads(job, round_no, range(HONEST)) + attack[round_no]:
            server.submit(client, payload)
        server.close_round()
        steps.append(norm({k: server.broadcast[k] - before[k] for k in before}))
    return steps


@pytest.mark.parametrize(
    ("defence", "quorum", "rejections"),
    [
        ({"norm_bound": BOUND, "norm_bound_action": "clip"}, HONEST + 1, {}),
        ({"norm_bound": BOUND, "norm_bound_action": "reject"}, HONEST, {"norm-bound": ROUNDS}),
        ({"aggregation": "median"}, HONEST + 1, {}),
    ],
    ids=["clip", "reject", "median"],
)
def test_byzantine_client_is_contained(tmp_path, broker_dir, defence, quorum, rejections):
    job = synthetic_job_dict(
        "byzantine", clients=HONEST + 1, rounds=ROUNDS, min_clients=quorum, **defence
    )
    config = parse_config(job)
    attack = {
        r: [(client_id(BYZANTINE), update_payload(config, r, BYZANTINE, scale=1e3))]
        for r in range(ROUNDS)
    }
    honest = list(range(HONEST))
    with mosquitto(broker_dir) as url, light_fleet(url, job, connections=1) as fleet:
        aggs = Aggregators(job, url, tmp_path)
        try:
            agg = aggs.start()
            for round_no in range(ROUNDS):
                fleet.wait_round(round_no)
                fleet.publish(attack[round_no])  # first, so it is judged before quorum
                fleet.publish(payloads(job, round_no, honest))
                fleet.wait_acked()
            assert agg.wait() == 0, agg.stderr()
        finally:
            aggs.close()

    assert aggs.report()["rejections"] == rejections
    final = aggs.final_global()
    assert_same_state(final, reference_global(job, [honest] * ROUNDS, attack))
    honest_only = reference_global(synthetic_job_dict("byzantine", HONEST, ROUNDS), [honest] * 3)
    if "norm_bound" in defence:  # every round moves R by at most the bound
        assert max(round_steps(job, attack)) <= BOUND
    else:  # the median stays next to the honest mean; the plain mean would be ≈ 1e3/11 off
        assert max((final[k] - honest_only[k]).abs().max().item() for k in final) < 5e-3
    if defence.get("norm_bound_action") == "reject":
        assert_same_state(final, honest_only)
