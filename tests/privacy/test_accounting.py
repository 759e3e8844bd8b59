"""ε on the wire equals Opacus's accountant stepped by hand; a spent client stops, the job goes on."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from fedsb.adapter import adapter_state
from fedsb.cli import run_simulation, select_clients
from fedsb.edge_client.client import FederatedClient
from fedsb.privacy import PrivacyLedger, noise_for_budget
from fedsb.protocol import encode_broadcast
from fedsb.simulation import initial_server_model, prepare_fleet
from fedsb.wire import decode_update


def trained_client(job, rounds: int) -> tuple[FederatedClient, list[dict[str, str]]]:
    """Client 0 of `job` trained for `rounds` rounds from the initial state; its update metadata."""
    fleet = prepare_fleet(job)
    model, method = initial_server_model(job, fleet)
    client = FederatedClient(
        "c0", copy.deepcopy(fleet.base_model), fleet.train.select(fleet.shards[0]), job, rank=4
    )
    client.receive_adapter(
        encode_broadcast(
            adapter_state(model, ["classifier"]), job=job.name, round_no=0, kind="adapter"
        )
    )
    metas = []
    for round_no in range(rounds):
        start = method.initial_broadcast(model)
        client.receive_global(
            encode_broadcast(start, job=job.name, round_no=round_no, kind="global")
        )
        metas.append(decode_update(client.train_round())[1])
    return client, metas


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_reported_epsilon_matches_the_accountant_stepped_by_hand(private_job, accountant):
    from opacus.accountants import PRVAccountant, RDPAccountant

    privacy = {"mode": "dp-sgd", "noise_multiplier": 1.1, "accountant": accountant}
    job = private_job(privacy, clients=2, local_steps=3, batch_size=8)
    client, metas = trained_client(job, rounds=2)
    q = 8 / len(client.data)
    reference = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for meta in metas:
        for _ in range(3):
            reference.step(noise_multiplier=1.1, sample_rate=q)
        assert float(meta["epsilon"]) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-6)
    assert 0 < float(metas[0]["epsilon"]) < float(metas[1]["epsilon"])


def test_noise_for_a_target_epsilon_spends_it_over_the_budgeted_steps():
    sigma = noise_for_budget(
        epsilon=3.0, delta=1e-5, sample_rate=0.0625, steps=48, accountant="rdp"
    )
    ledger = PrivacyLedger(delta=1e-5, accountant="rdp", budget=3.0)
    ledger.record(sigma, 0.0625, 48)
    assert 2.98 <= ledger.epsilon <= 3.0  # Opacus's search stops within 0.01 below the target
    assert not ledger.fits(sigma, 0.0625, 1)
    restored = PrivacyLedger(delta=1e-5, accountant="rdp")
    restored.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert restored.epsilon == ledger.epsilon


def test_platform_notes_figure():
    """q = 0.0625, 48 steps, σ = 1 → ε = 3.25 (PRV) / 3.80 (RDP) at δ = 1e-5."""
    for accountant, expected in (("prv", 3.25), ("rdp", 3.80)):
        ledger = PrivacyLedger(delta=1e-5, accountant=accountant)
        ledger.record(1.0, 0.0625, 48)
        assert ledger.epsilon == pytest.approx(expected, abs=0.01)


def spent_job(private_job):
    """3 clients, 2 sampled per round, each client's ε = 2 spread over one round only."""
    privacy = {"mode": "dp-sgd", "epsilon": 2.0, "accountant": "rdp", "budget_rounds": 1}
    return private_job(privacy, clients=3, clients_per_round=2, rounds=3, local_steps=1)


def test_a_client_over_budget_stops_and_the_federation_goes_on(private_job, tmp_path, caplog):
    job = spent_job(private_job)
    with caplog.at_level(logging.WARNING, logger="fedsb.aggregator.server"):
        summary = run_simulation(job, tmp_path, transport="inproc", quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ids = [f"client-{i:04d}" for i in range(3)]
    trained: set[str] = set()
    for round_no, row in enumerate(rows[1:]):
        picked = {c.client_id for c in select_clients(job, [_Id(i) for i in ids], round_no)}
        fresh = picked - trained
        assert (row["clients"], row["clients_budget_spent"]) == (len(fresh), len(picked & trained))
        trained |= fresh
    assert sum(row["clients_budget_spent"] for row in rows) >= 1  # someone was refused
    assert trained == set(ids)  # and the job went on with the others
    assert 1.9 < summary["epsilon"] <= 2.0
    assert "has spent its privacy budget" in caplog.text


class _Id:
    """Stands in for a client in `select_clients`, which reads only `client_id`."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id


def test_spent_clients_over_mqtt_match_inproc(private_job, tmp_path):
    job = spent_job(private_job)
    inproc = run_simulation(job, tmp_path / "i", transport="inproc", quiet=True)
    mqtt = run_simulation(job, tmp_path / "m", transport="mqtt", quiet=True)
    for key, value in inproc["final_state"].items():
        assert torch.equal(value, mqtt["final_state"][key]), key
    assert mqtt["epsilon"] == inproc["epsilon"]
    assert mqtt["rejections"] == {}


def test_spent_budget_survives_a_client_restart(private_job, tmp_path):
    """The client's state file keeps its ledger: a restarted client does not start from ε = 0."""
    from fedsb.edge_client.service import ClientService
    from fedsb.mqtt import parse_broker_url

    job = private_job({"mode": "dp-sgd", "epsilon": 2.0, "budget_rounds": 1}, clients=2)
    client, _ = trained_client(job, rounds=1)
    address = parse_broker_url("mqtt://127.0.0.1:1")
    state_file = tmp_path / "client.json"
    ClientService(client, address, state_file=state_file).record_sent(0)
    fresh, _ = trained_client(job, rounds=0)
    ClientService(fresh, address, state_file=state_file)
    assert fresh.privacy().epsilon == client.privacy().epsilon > 1.9
    assert not fresh.privacy().can_train_round()
