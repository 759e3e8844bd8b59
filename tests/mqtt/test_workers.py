"""Scale-out: `--workers 2` behind an MQTT 5 shared subscription on mosquitto.

The coordinator and its two worker processes serve a synthetic Fed-SB job (heterogeneous ranks,
examples weighting) to lightweight clients; the final global R must equal, bit for bit, the
single aggregator's over the same broker and `fedsb.aggregate` in process.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_job
from safetensors.torch import load_file

from fedsb.aggregate import aggregate
from fedsb.aggregator import synthetic
from fedsb.aggregator.service import AggregatorService
from fedsb.aggregator.synthetic import synthetic_server
from fedsb.aggregator.workers import WorkerAggregator, record_worker_count, worker_count
from fedsb.cli import main as cli_main
from fedsb.cli import run_simulation
from fedsb.config import JobConfig, parse_config
from fedsb.edge_client.light import LightFleet
from fedsb.mqtt import parse_broker_url
from fedsb.protocol import UpdateMeta, encode_client_update
from fedsb.synthetic import (
    client_id,
    initial_global,
    synthetic_job,
    synthetic_job_dict,
    update_state,
)
from fedsb.wire import decode_update

from .helpers import (
    AGGREGATOR_LOGIN,
    Procs,
    aggregator_args,
    broker_url,
    client_args,
    password_of,
    start_secure_mosquitto,
    write_job,
)

CLIENTS = 24
ROUNDS = 2
RANKS = (2, 4, 8)  # heterogeneous: client i trains rank RANKS[i % 3] of the job's 8
JOB_S = 120.0


def payload(job: JobConfig, round_no: int, index: int) -> bytes:
    """Client `index`'s update of `round_no`: its own rank, 1 + index % 7 examples."""
    rank = RANKS[index % len(RANKS)]
    state = update_state(job.seed, round_no, index, rank)
    meta = UpdateMeta(job.name, round_no, client_id(index), rank, 1 + index % 7, 0.5)
    return encode_client_update(state, meta)


def in_process(job: JobConfig) -> dict[str, torch.Tensor]:
    """The same rounds through `fedsb.aggregate` (no broker, no server)."""
    state = initial_global(job.adapter.rank)
    for round_no in range(ROUNDS):
        decoded = [decode_update(payload(job, round_no, i)) for i in range(CLIENTS)]
        deltas = [tensors for tensors, _ in decoded]
        weights = [float(meta["examples"]) for _, meta in decoded]
        ranks = [int(meta["rank"]) for _, meta in decoded]
        state = aggregate(state, deltas, weights, ranks, job.federation.padding)
    return state


def serve(
    service: AggregatorService, url: str, job: JobConfig, play: Callable[[LightFleet], None]
) -> None:
    """Run `service` in a thread while `play` drives a fleet of lightweight clients."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            service.run(max_seconds=JOB_S)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(err)

    thread = threading.Thread(target=run, name="aggregator")
    thread.start()
    fleet = LightFleet(parse_broker_url(url), job.name, connections=2, name=job.name)
    try:
        play(fleet)
    finally:
        fleet.close()
        thread.join(JOB_S)
    assert not thread.is_alive()
    if errors:
        raise errors[0]


def every_round(job: JobConfig) -> Callable[[LightFleet], None]:
    """Each client sends its update once per round."""
    return lambda fleet: fleet.run(lambda r, i: payload(job, r, i), CLIENTS, ROUNDS, 60.0)


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []


def test_two_workers_equal_the_single_aggregator_bit_for_bit(mosquitto_broker, tmp_path):
    url = mosquitto_broker.url
    address = parse_broker_url(url)
    scaled_job = synthetic_job("workers-2", CLIENTS, ROUNDS)
    scaled = WorkerAggregator(
        scaled_job, synthetic_server(scaled_job), address, tmp_path / "scaled", workers=2
    )
    serve(scaled, url, scaled_job, every_round(scaled_job))

    single_job = synthetic_job("workers-1", CLIENTS, ROUNDS)
    single = AggregatorService(
        single_job, synthetic_server(single_job), address, tmp_path / "single", mqtt5=True
    )
    serve(single, url, single_job, every_round(single_job))

    assert scaled.server.round == single.server.round == ROUNDS
    assert scaled.server.rejections == single.server.rejections == {}
    assert sum(scaled.pool.accepted) == CLIENTS * ROUNDS
    assert min(scaled.pool.accepted) > 0  # the broker dealt updates to both workers
    assert_same(scaled.server.broadcast, single.server.broadcast)
    assert_same(scaled.server.broadcast, in_process(scaled_job))


def test_update_accepted_by_both_workers_counts_once(mosquitto_broker, tmp_path):
    job = synthetic_job("workers-dup", CLIENTS, ROUNDS)
    service = WorkerAggregator(
        job, synthetic_server(job), parse_broker_url(mosquitto_broker.url), tmp_path, workers=2
    )
    copy = client_id(3), payload(job, 0, 3)
    copies = 0

    def play(fleet: LightFleet) -> None:
        nonlocal copies
        fleet.wait_round(0)
        # The broker deals copies out as it likes: resend until each worker has accepted one
        # (a worker refuses its own second copy as a duplicate).
        while min(service.pool.accepted) == 0 and copies < 40:
            fleet.publish([copy])
            fleet.wait_acked()
            copies += 1
            deadline = time.monotonic() + 1.0
            while min(service.pool.accepted) == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
        fleet.publish((client_id(i), payload(job, 0, i)) for i in range(CLIENTS) if i != 3)
        fleet.wait_acked()
        fleet.wait_round(1)
        fleet.publish((client_id(i), payload(job, 1, i)) for i in range(CLIENTS))
        fleet.wait_acked()

    serve(service, mosquitto_broker.url, job, play)
    assert copies >= 2
    assert service.duplicates_merged == 1  # found when merging the two workers' sums
    assert service.server.rejections == {"duplicate": copies - 1}
    assert_same(service.server.broadcast, in_process(job))


def test_workers_need_an_mqtt5_broker(embedded_broker, tmp_path, capsys):
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(synthetic_job_dict("workers-311", 4, 1)))
    args = ["--job", str(job_file), "--broker", embedded_broker.url, "--workers", "2"]
    assert synthetic.main([*args, "--state-dir", str(tmp_path / "state")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--workers 2 needs an MQTT 5 broker with shared subscriptions" in err
    assert not Path(tmp_path / "state" / "state.json").exists()
    assert not Path(tmp_path / "state" / "workers.json").exists()  # no worker session was made


@pytest.mark.parametrize("init", ["lora-sb", "lora-sb-federated"])
def test_cli_aggregator_with_two_workers_matches_inproc(init, tiny_model_dir, tmp_path, broker_dir):
    """`fedsb aggregator --workers 2` and two `fedsb client`s over TLS, passwords and the ACL;
    with the federated init, the coordinator runs the init passes before the workers start."""
    raw = tiny_job(tiny_model_dir, clients=2, rounds=2)
    raw["adapter"]["init"] = init
    config = write_job(tmp_path / "job.toml", raw)
    ids = ["client-0000", "client-0001"]  # the ids (and training seeds) of `run_simulation`
    state_dir = tmp_path / "aggregator"
    procs = Procs(tmp_path / "logs")
    with start_secure_mosquitto(broker_dir, ids) as broker:
        try:
            ca = broker.ca_file
            args = aggregator_args(config, broker_url(broker, AGGREGATOR_LOGIN), state_dir, ca)
            agg = procs.start("aggregator", *args, "--workers", "2")
            clients = []
            for i, cid in enumerate(ids):
                url = broker_url(broker, (cid, password_of(cid)))
                state_file = tmp_path / f"{cid}.json"
                clients.append(procs.start(cid, *client_args(config, url, cid, i, state_file, ca)))
            deadline = time.monotonic() + 240
            codes = {p.name: p.wait(deadline) for p in [agg, *clients]}
            assert codes == {"aggregator": 0, ids[0]: 0, ids[1]: 0}, procs.report()
        finally:
            procs.close()

    state = json.loads((state_dir / "state.json").read_text())
    assert state == {"round": 2, "global": "global-00002.safetensors", "rejections": {}}
    assert json.loads((state_dir / "workers.json").read_text()) == {"workers": 2}
    assert any((state_dir / "adapter").iterdir())
    final = load_file(str(state_dir / "global-00002.safetensors"))
    reference = run_simulation(parse_config(raw), tmp_path / "ref", transport="inproc", quiet=True)
    assert_same(final, reference["final_state"])


def test_never_fewer_workers_than_sessions_on_the_broker(tmp_path, caplog):
    """A restart with fewer workers starts as many as before: the old sessions hold updates."""
    assert worker_count(tmp_path, 2) == 2  # a fresh state directory
    record_worker_count(tmp_path, 3)
    with caplog.at_level(logging.WARNING, logger="fedsb.aggregator.workers"):
        assert worker_count(tmp_path, 2) == 3
    assert f"{tmp_path} was served by 3 workers" in caplog.text
    assert "starting 3 workers, not 2" in caplog.text
    assert worker_count(tmp_path, 4) == 4


def test_cli_refuses_fewer_than_one_worker(tmp_path, capsys):
    argv = ["aggregator", "--config", str(tmp_path / "job.toml"), "--broker", "mqtt://127.0.0.1:1"]
    assert cli_main([*argv, "--state-dir", str(tmp_path), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --workers must be at least 1, got 0"
