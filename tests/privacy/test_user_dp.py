"""User-level DP at the aggregator: clipped deltas, noise σ·C on the sum, ε in the metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedsb.aggregator.server import FederatedServer
from fedsb.cli import run_simulation
from fedsb.privacy import UserLevelDP, epsilon_spent
from fedsb.protocol import UpdateMeta, encode_client_update
from fedsb.robust import update_norm
from fedsb.simulation import initial_server_model, prepare_fleet


def user_dp(**privacy: object) -> dict:
    return {"mode": "user-dp", "accountant": "rdp"} | privacy


@pytest.fixture(scope="module")
def tiny_fleet(tiny_model_dir):
    from conftest import tiny_job

    from fedsb.config import parse_config

    job = parse_config(tiny_job(tiny_model_dir))
    return prepare_fleet(job)


def server_for(job, fleet) -> FederatedServer:
    model, method = initial_server_model(job, fleet)
    return FederatedServer.from_model(job, model, method)


def submit(server: FederatedServer, client: str, delta: dict[str, torch.Tensor]) -> None:
    meta = UpdateMeta(server.job.name, server.round, client, 4, 10, 1.0)
    assert server.submit(client, encode_client_update(delta, meta)) is None


def test_noise_on_the_sum_has_scale_sigma_times_c(private_job, tiny_fleet):
    """Zero deltas: the step is ξ/n with ξ ~ N(0, (σC)²) per entry; fixed seed, ~900 entries."""
    job = private_job(user_dp(noise_multiplier=2.0, clip_norm=0.5), weighting="uniform")
    server = server_for(job, tiny_fleet)
    start = dict(server.broadcast)
    n = 2
    for i in range(n):
        submit(server, f"c{i}", {k: torch.zeros_like(v) for k, v in start.items()})
    result = server.close_round()
    step = torch.cat([(server.broadcast[k] - start[k]).flatten().double() for k in start]) * n
    count = step.numel()
    assert count > 800
    # sample std of N(0, 1) over `count` draws is within 4/√(2·count) of 1 (4 standard errors)
    assert abs(float(step.std()) / 1.0 - 1) < 4 / math.sqrt(2 * count)
    assert abs(float(step.mean())) < 4 * 1.0 / math.sqrt(count)
    assert result.epsilon == pytest.approx(
        epsilon_spent([(2.0, 1.0, 1)], delta=1e-5, accountant="rdp")
    )


def test_each_delta_is_clipped_to_c_and_the_sum_stays_exact(private_job, tiny_fleet):
    job = private_job(user_dp(noise_multiplier=0.0, clip_norm=0.01), weighting="uniform")
    server = server_for(job, tiny_fleet)
    start = dict(server.broadcast)
    big = {k: torch.ones_like(v) for k, v in start.items()}
    submit(server, "c0", big)
    submit(server, "c1", {k: -v for k, v in big.items()})
    submit(server, "c2", big)
    server.close_round()
    step = {k: server.broadcast[k] - start[k] for k in start}
    assert update_norm(step) == pytest.approx(0.01 / 3, rel=1e-5)  # (C·u − C·u + C·u) / 3


def test_noise_is_seeded_per_round_and_differs_between_rounds():
    mech = UserLevelDP(clip_norm=1.0, noise_multiplier=1.0, sample_rate=1.0, delta=1e-5, seed=3)
    like = {"a.R": torch.zeros(4, 4), "b": torch.zeros(7)}
    first, again, second = mech.noise(like, 0), mech.noise(like, 0), mech.noise(like, 1)
    assert all(torch.equal(first[k], again[k]) for k in like)
    assert not torch.equal(first["a.R"], second["a.R"])


def test_epsilon_per_round_in_metrics_and_same_over_mqtt(private_job, tmp_path):
    job = private_job(
        user_dp(epsilon=4.0, clip_norm=0.05),
        weighting="uniform",
        clients=4,
        clients_per_round=2,
        rounds=2,
    )
    inproc = run_simulation(job, tmp_path / "i", transport="inproc", quiet=True)
    mqtt = run_simulation(job, tmp_path / "m", transport="mqtt", quiet=True)
    rows = [
        json.loads(line) for line in (tmp_path / "i" / "metrics.jsonl").read_text().splitlines()
    ]
    sigma = UserLevelDP.from_job(job).noise_multiplier
    for row in rows[1:]:
        expected = epsilon_spent([(sigma, 0.5, row["round"])], delta=1e-5, accountant="rdp")
        assert row["epsilon"] == pytest.approx(expected)
    assert 3.9 < inproc["epsilon"] <= 4.0  # calibrated to spend ε = 4 over the job's rounds
    assert mqtt["epsilon"] == inproc["epsilon"]
    for key, value in inproc["final_state"].items():
        assert torch.equal(value, mqtt["final_state"][key]), key
