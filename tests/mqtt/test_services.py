"""The aggregator and client services end to end: CLI processes, crashes, restarts, hostile input.

Everything runs on 127.0.0.1 against real brokers; every wait is bounded and every subprocess
is killed (by PID) when a test ends. The reference for "the right result" is always the
in-process run of the same job (`run_simulation(..., transport="inproc")`).
"""

from __future__ import annotations

import copy
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from threading import Thread

import paho.mqtt.client as mqtt
import torch
from conftest import tiny_job
from safetensors.torch import load_file

from fedsb.aggregator.server import FederatedServer
from fedsb.aggregator.service import AggregatorService, Checkpoint
from fedsb.cli import run_simulation
from fedsb.config import parse_config
from fedsb.edge_client.client import FederatedClient
from fedsb.edge_client.service import ClientService
from fedsb.mqtt import MqttConnection, Topics, parse_broker_url
from fedsb.protocol import parse_round
from fedsb.simulation import initial_server_model, prepare_fleet
from fedsb.wire import decode_update, encode_update

from .helpers import (
    AGGREGATOR_LOGIN,
    Procs,
    UpdateSpy,
    aggregator_args,
    broker_url,
    client_args,
    password_of,
    read_json,
    start_secure_mosquitto,
    wait_until,
    write_job,
)

JOB_S = 180.0  # bound on a whole CLI job
STARTUP_S = 60.0  # bound on one process getting to a given point


def client_id(index: int) -> str:
    """The ids `run_simulation` gives its clients (training seeds depend on the id)."""
    return f"client-{index:04d}"


def assert_same_state(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert different == []


def reference_final(raw: dict, out: Path) -> dict[str, torch.Tensor]:
    """The final global state of the uninterrupted in-process run of the same job."""
    summary = run_simulation(parse_config(raw), out, transport="inproc", quiet=True)
    return summary["final_state"]


# ---------------------------------------------------------------- 1. CLI over TLS + auth + ACL


def test_cli_job_over_secure_mosquitto_matches_inproc(tiny_model_dir, tmp_path, broker_dir):
    raw = tiny_job(tiny_model_dir, clients=2, rounds=2)
    config = write_job(tmp_path / "job.toml", raw)
    ids = [client_id(0), client_id(1)]
    state_dir = tmp_path / "aggregator"
    procs = Procs(tmp_path / "logs")
    with start_secure_mosquitto(broker_dir, ids) as broker:
        try:
            ca = broker.ca_file
            agg_url = broker_url(broker, AGGREGATOR_LOGIN)
            agg = procs.start("aggregator", *aggregator_args(config, agg_url, state_dir, ca))
            clients = []
            for i, cid in enumerate(ids):
                url = broker_url(broker, (cid, password_of(cid)))
                state_file = tmp_path / f"{cid}.json"
                clients.append(procs.start(cid, *client_args(config, url, cid, i, state_file, ca)))
            deadline = time.monotonic() + JOB_S
            codes = {p.name: p.wait(deadline) for p in [agg, *clients]}
            assert codes == {"aggregator": 0, ids[0]: 0, ids[1]: 0}, procs.report()

            url = broker_url(broker, (ids[0], "wrong-password"))
            state_file = tmp_path / "intruder.json"
            intruder = procs.start("intruder", *client_args(config, url, ids[0], 0, state_file, ca))
            assert intruder.wait(time.monotonic() + STARTUP_S) == 2, procs.report()
            err = intruder.stderr()
        finally:
            procs.close()

    state = read_json(state_dir / "state.json")
    assert state == {"round": 2, "global": "global-00002.safetensors", "rejections": {}}
    assert (state_dir / "adapter").is_dir() and any((state_dir / "adapter").iterdir())
    for cid in ids:
        assert read_json(tmp_path / f"{cid}.json") == {"sent_rounds": [0, 1]}
    final = load_file(str(state_dir / "global-00002.safetensors"))
    assert_same_state(final, reference_final(raw, tmp_path / "reference"))

    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: broker mqtts://127.0.0.1:")
    assert "refused the connection: Not authorized" in lines[0]
    assert not (tmp_path / "intruder.json").exists()


# ---------------------------------------------------------------- 2. aggregator crash and resume


class StaggeredClient(ClientService):
    """A client service that waits `hold_s` before training round `hold_round` (and no other)."""

    def __init__(self, *args, hold_round: int, hold_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hold_round, self.hold_s = hold_round, hold_s

    def maybe_train(self) -> None:
        info = self.round_info
        held = info is not None and int(info.get("round", -1)) == self.hold_round
        self.delay_s = self.hold_s if held else 0.0
        super().maybe_train()


def fleet_clients(job, count: int) -> list[FederatedClient]:
    """The clients `run_simulation` builds: same ids, shards, ranks and base model."""
    fleet = prepare_fleet(job)
    return [
        FederatedClient(
            client_id(i),
            copy.deepcopy(fleet.base_model),
            fleet.train.select(fleet.shards[i]),
            job,
            rank=job.client_rank(i),
        )
        for i in range(count)
    ]


def spooled_clients(state_dir: Path, round_no: int) -> list[str]:
    """Clients whose update of `round_no` is in the aggregator's spool (read as resume reads it)."""
    return [client for client, _ in Checkpoint(state_dir).spooled(round_no)]


def start_threads(services: list[ClientService], errors: list[BaseException]) -> list[Thread]:
    def body(service: ClientService) -> None:
        try:
            service.run(max_seconds=JOB_S)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    threads = [Thread(target=body, args=(s,), daemon=True) for s in services]
    for t in threads:
        t.start()
    return threads


def test_killed_aggregator_resumes_and_matches_inproc(tiny_model_dir, tmp_path, mosquitto_broker):
    raw = tiny_job(tiny_model_dir, clients=3, rounds=3)
    job = parse_config(raw)
    config = write_job(tmp_path / "job.toml", raw)
    state_dir = tmp_path / "aggregator"
    address = parse_broker_url(mosquitto_broker.url)
    agg_args = aggregator_args(config, mosquitto_broker.url, state_dir)
    # client-0000 sends round 1 at once; the others hold it back long enough for the kill
    # to land while no update is in flight (see test_update_acked_but_not_spooled_...)
    lock = threading.Lock()
    services = [
        StaggeredClient(
            client,
            address,
            state_file=tmp_path / f"{client.client_id}.json",
            compute_lock=lock,
            hold_round=1,
            hold_s=0.0 if i == 0 else 4.0 + 2.0 * i,
        )
        for i, client in enumerate(fleet_clients(job, 3))
    ]
    procs = Procs(tmp_path / "logs")
    errors: list[BaseException] = []
    threads: list[Thread] = []
    try:
        first = procs.start("aggregator-1", *agg_args)
        threads = start_threads(services, errors)
        spooled = wait_until(
            lambda: spooled_clients(state_dir, 1),
            STARTUP_S,
            "a spooled round-1 update",
            procs.report,
        )
        first.kill(signal.SIGKILL)
        assert first.returncode == -signal.SIGKILL
        assert spooled == [client_id(0)]
        wait_until(lambda: 1 in services[0].sent, 10, "client-0000 to record round 1 as sent")
        # the others still hold round 1 back: no update was in flight at the kill
        assert [sorted(s.sent) for s in services] == [[0, 1], [0], [0]]
        assert read_json(state_dir / "state.json")["round"] == 1

        second = procs.start("aggregator-2", *agg_args)
        assert second.wait(time.monotonic() + JOB_S) == 0, procs.report()
        for t in threads:
            t.join(30)
        assert errors == []
        assert not any(t.is_alive() for t in threads)
    finally:
        for s in services:
            s.done = True  # ends a thread still waiting (bounded by its 0.5 s poll)
        procs.close()
        for t in threads:
            t.join(10)

    state = read_json(state_dir / "state.json")
    assert state == {"round": 3, "global": "global-00003.safetensors", "rejections": {}}
    assert [read_json(tmp_path / f"{client_id(i)}.json") for i in range(3)] == [
        {"sent_rounds": [0, 1, 2]}
    ] * 3
    assert "round 2 closed: 3 updates" in procs.all[1].stderr()
    final = load_file(str(state_dir / "global-00003.safetensors"))
    assert_same_state(final, reference_final(raw, tmp_path / "reference"))


def crash(service: AggregatorService) -> None:
    """What a SIGKILL does to the aggregator's connection: the socket closes, no DISCONNECT."""
    sock = service.connection.client.socket()
    if sock is not None:
        sock.close()


def publish_and_step(
    service: AggregatorService, address, updates: dict[str, bytes], steps: int
) -> None:
    """Publish `updates` (each PUBACKed by the broker), wait until the aggregator's connection
    has received every one of them, then let the aggregator handle `steps` of them."""
    publisher = MqttConnection(address, "publisher", [], clean_start=True).start()
    try:
        for cid, payload in updates.items():
            publisher.publish(service.topics.update(cid), payload)  # waits for the PUBACK
    finally:
        publisher.stop()
    connection, received = service.connection, service.connection.messages

    def delivered() -> bool:
        connection.pump(0.02)  # the aggregator's connection reads only when it is driven
        return received.qsize() == len(updates)

    wait_until(delivered, 10, "every delivery")
    service.deadline = time.monotonic() + 60  # no deadline close in these steps
    for _ in range(steps):
        service.step()


def test_updates_spooled_in_round_0_are_replayed(tiny_model_dir, tmp_path, mosquitto_broker):
    raw = tiny_job(tiny_model_dir, clients=2, rounds=1)
    job = parse_config(raw)
    address = parse_broker_url(mosquitto_broker.url)
    state_dir = tmp_path / "aggregator"
    updates = honest_updates(job, fleet_clients(job, 2), fresh_server(job))

    crashed = AggregatorService(job, fresh_server(job), address, state_dir)
    crashed.connection.start()
    try:
        crashed.publish_job()
        crashed.publish_round()
        publish_and_step(crashed, address, {client_id(0): updates[client_id(0)]}, steps=1)
        assert list(crashed.server.pending) == [client_id(0)]
        assert spooled_clients(state_dir, 0) == [client_id(0)]
    finally:
        crash(crashed)

    resumed = AggregatorService(job, fresh_server(job), address, state_dir)
    assert resumed.server.round == 0
    assert list(resumed.server.pending) == [client_id(0)]


def test_update_acked_but_not_spooled_survives_a_crash(tiny_model_dir, tmp_path, mosquitto_broker):
    raw = tiny_job(tiny_model_dir, clients=2, rounds=2, round_timeout_s=3.0)
    job = parse_config(raw)
    address = parse_broker_url(mosquitto_broker.url)
    state_dir = tmp_path / "aggregator"
    a, b = client_id(0), client_id(1)
    clients = fleet_clients(job, 2)

    crashed = AggregatorService(job, fresh_server(job), address, state_dir)
    crashed.connection.start()
    try:
        crashed.publish_job()
        crashed.publish_round()
        for cid, payload in honest_updates(job, clients, crashed.server).items():
            assert crashed.server.submit(cid, payload) is None
        crashed.close_round()  # round 0 committed; round 1 open
        round_1 = honest_updates(job, clients, crashed.server)
        publish_and_step(crashed, address, round_1, steps=1)  # a is spooled, b only acked
        assert spooled_clients(state_dir, 1) == [a]
        time.sleep(0.5)  # paho's network thread has sent both PUBACKs by now
    finally:
        crash(crashed)

    closed: list[list[str]] = []
    resumed = AggregatorService(
        job,
        fresh_server(job),
        address,
        state_dir,
        on_round_closed=lambda result, _payload: closed.append(result.clients),
    )
    assert list(resumed.server.pending) == [a]
    resumed.run(max_seconds=30)  # round 1 closes at quorum, or at its 3 s deadline
    assert closed == [[a, b]]


# ---------------------------------------------------------------- 3. client restart


def test_restarted_client_does_not_resend(tiny_model_dir, tmp_path, mosquitto_broker):
    raw = tiny_job(tiny_model_dir, clients=2, rounds=2)
    config = write_job(tmp_path / "job.toml", raw)
    state_dir = tmp_path / "aggregator"
    url = mosquitto_broker.url
    a, b = client_id(0), client_id(1)

    def args_of(cid: str, shard: int) -> list[str | Path]:
        return client_args(config, url, cid, shard, tmp_path / f"{cid}.json")

    procs = Procs(tmp_path / "logs")
    spy = UpdateSpy(mosquitto_broker, raw["name"])
    try:
        agg = procs.start("aggregator", *aggregator_args(config, url, state_dir))
        first_a = procs.start(f"{a}-1", *args_of(a, 0))
        # round 0 cannot close before b joins, so a has sent round 0 and nothing else
        wait_until(
            lambda: read_json(tmp_path / f"{a}.json"), STARTUP_S, "round 0 of a", procs.report
        )
        first_a.kill(signal.SIGKILL)
        assert read_json(tmp_path / f"{a}.json") == {"sent_rounds": [0]}

        second_a = procs.start(f"{a}-2", *args_of(a, 0))
        client_b = procs.start(b, *args_of(b, 1))
        deadline = time.monotonic() + JOB_S
        codes = {p.name: p.wait(deadline) for p in [agg, second_a, client_b]}
        assert codes == {"aggregator": 0, f"{a}-2": 0, b: 0}, procs.report()
        records: list[tuple[str, int, str]] = []
        wait_until(lambda: records.extend(spy.records()) or len(records) >= 4, 10, "4 updates")
        time.sleep(0.5)  # a resent update would have come long before the job ended
        records += spy.records()
    finally:
        spy.close()
        procs.close()

    # every (client, round) update went over the wire exactly once
    assert sorted(records) == [(a, 0, a), (a, 1, a), (b, 0, b), (b, 1, b)]
    assert read_json(state_dir / "state.json")["rejections"] == {}
    assert read_json(tmp_path / f"{a}.json") == {"sent_rounds": [0, 1]}
    assert "round 1 closed: 2 updates" in procs.all[0].stderr()
    final = load_file(str(state_dir / "global-00002.safetensors"))
    assert_same_state(final, reference_final(raw, tmp_path / "reference"))


# ---------------------------------------------------------------- 4. rejections over the wire


def fresh_server(job) -> FederatedServer:
    """The aggregator's server as `fedsb aggregator` builds it."""
    fleet = prepare_fleet(job)
    model, method = initial_server_model(job, fleet)
    return FederatedServer.from_model(job, model, method)


def honest_updates(
    job, clients: list[FederatedClient], server: FederatedServer
) -> dict[str, bytes]:
    """The clients' updates for the server's open round, computed as the in-process run does."""
    adapter, payload = server.adapter_payload(), server.global_payload()
    out = {}
    for client in clients:
        if client.round is None:
            client.receive_adapter(adapter)
        client.receive_global(payload)
        out[client.client_id] = client.train_round()
    return out


def test_hostile_updates_are_rejected_over_the_wire(
    tiny_model_dir, tmp_path, embedded_broker, make_client
):
    raw = tiny_job(tiny_model_dir, clients=2, rounds=1)
    job = parse_config(raw)
    a, b = client_id(0), client_id(1)
    honest = honest_updates(job, fleet_clients(job, 2), fresh_server(job))
    state, meta = decode_update(honest[a])
    r_key = next(k for k in sorted(state) if k.endswith(".R"))
    rank = int(meta["rank"])

    def forged(**changes: str) -> bytes:
        return encode_update(state, meta | changes)

    with_nan = {k: v.clone() for k, v in state.items()}
    with_nan[r_key][0, 0] = float("nan")
    wrong_shape = dict(state) | {r_key: torch.zeros(rank - 1, rank - 1)}

    server = fresh_server(job)
    hostile = [  # (topic's client id, payload, expected reason)
        ("mallory", b"\x00garbage, not a safetensors file\xff" * 10, "malformed"),
        (a, forged(job="another-job"), "wrong-job"),
        (a, forged(round="1"), "future-round"),
        ("mallory", honest[a], "client-mismatch"),
        (a, encode_update(with_nan, meta), "malformed"),
        (a, encode_update(wrong_shape, meta), "bad-shape"),
        (a, b"\x00" * (server.rules.max_bytes + 1), "oversize"),
        (a, honest[a], None),  # accepted
        (a, honest[a], "duplicate"),
    ]
    service = AggregatorService(
        job, server, parse_broker_url(embedded_broker.url), tmp_path / "aggregator"
    )
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            service.run(max_seconds=120)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    thread = Thread(target=serve, daemon=True)
    attacker = make_client("attacker", protocol=mqtt.MQTTv311)
    try:
        thread.start()
        assert attacker.connect(embedded_broker) == "Success"
        attacker.subscribe(f"fedsb/{job.name}/round")
        # the round message follows the aggregator's SUBSCRIBE on its connection
        assert parse_round(attacker.next_message(30).payload)["round"] == 0
        topics = Topics(job.name)
        for topic_client, payload, _ in hostile:  # each PUBACKed by the broker, in order
            assert attacker.publish(topics.update(topic_client), payload) == 0
        wait_until(
            lambda: sum(server.rejections.values()) == 8 and list(server.pending) == [a],
            60,
            "the aggregator to judge every hostile update",
            lambda: f"rejections {dict(server.rejections)}, pending {list(server.pending)}",
        )
        assert attacker.publish(topics.update(b), honest[b]) == 0
        thread.join(60)
        assert not thread.is_alive() and errors == []
    finally:
        thread.join(10)  # a daemon thread; its run() is bounded by max_seconds anyway

    expected = Counter(reason for _, _, reason in hostile if reason)
    assert (
        dict(server.rejections)
        == dict(expected)
        == {
            "malformed": 2,
            "wrong-job": 1,
            "future-round": 1,
            "client-mismatch": 1,
            "bad-shape": 1,
            "oversize": 1,
            "duplicate": 1,
        }
    )
    saved = read_json(tmp_path / "aggregator" / "state.json")
    assert saved == {"round": 1, "global": "global-00001.safetensors", "rejections": expected}
    assert_same_state(server.broadcast, reference_final(raw, tmp_path / "reference"))
