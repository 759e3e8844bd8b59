"""Scenarios 3 and 4: clients that drop out or come back late, and duplicate deliveries.

Rounds close at quorum or at their deadline; a late update for a closed round is refused
and counted; a resent update, or a QoS 1 PUBLISH delivered twice, counts once.
"""

from __future__ import annotations

import random
import socket
import struct

import pytest

from fedsb.mqtt import Topics
from fedsb.synthetic import synthetic_job_dict

from .harness import (
    Aggregators,
    assert_same_state,
    light_fleet,
    mosquitto,
    payloads,
    reference_global,
)

pytestmark = pytest.mark.chaos


def dropout_plan(clients: int, rounds: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Per round, who sends in time and who comes back late (3 of the dropped; none last round).

    30% drop every round (seeded); in round 1 one more client is lost, so that round cannot
    reach its quorum and closes at its deadline.
    """
    rng = random.Random(seed)
    active, late = [], []
    for round_no in range(rounds):
        dropped = rng.sample(range(clients), clients * 3 // 10 + (round_no == 1))
        active.append(sorted(set(range(clients)) - set(dropped)))
        late.append(sorted(dropped[:3]) if round_no < rounds - 1 else [])
    return active, late


def test_dropouts_and_late_clients(tmp_path, broker_dir):
    clients, rounds = 20, 3
    quorum = clients - clients * 3 // 10  # 14
    job = synthetic_job_dict(
        "dropout", clients=clients, rounds=rounds, min_clients=quorum, round_timeout_s=4.0
    )
    active, late = dropout_plan(clients, rounds, seed=3)
    with mosquitto(broker_dir) as url, light_fleet(url, job, connections=2) as fleet:
        aggs = Aggregators(job, url, tmp_path)
        try:
            agg = aggs.start()
            for round_no in range(rounds):
                fleet.wait_round(round_no)
                if round_no:  # last round's latecomers reconnect (a new connection) and send
                    with light_fleet(url, job, connections=1, name=f"late-{round_no}") as back:
                        back.publish(payloads(job, round_no - 1, late[round_no - 1]))
                        back.wait_acked()
                fleet.publish(payloads(job, round_no, active[round_no]))
                fleet.wait_acked()
            assert agg.wait() == 0, agg.stderr()
        finally:
            aggs.close()

    report = aggs.report()
    assert [len(a) for a in active] == [14, 13, 14]
    assert [r["clients"] for r in report["rounds"]] == [14, 13, 14]  # quorum, deadline, quorum
    assert report["rejections"] == {"stale-round": 6}
    assert_same_state(aggs.final_global(), reference_global(job, active))


def mqtt_packet(kind: int, body: bytes) -> bytes:
    """An MQTT 3.1.1 packet: fixed header byte, remaining length (varint), body."""
    length, size = b"", len(body)
    while True:
        size, digit = divmod(size, 128)
        length += bytes([digit | (128 if size else 0)])
        if not size:
            return bytes([kind]) + length + body


def mqtt_string(text: str) -> bytes:
    return struct.pack("!H", len(text)) + text.encode()


def publish_twice_with_dup(port: int, topic: str, payload: bytes) -> None:
    """A QoS 1 PUBLISH and its retransmission (same packet id, DUP flag), as after a lost ACK."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        connect = mqtt_string("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 30)
        sock.sendall(mqtt_packet(0x10, connect + mqtt_string("redeliverer")))
        assert sock.recv(4) == b"\x20\x02\x00\x00"  # CONNACK, accepted
        body = mqtt_string(topic) + struct.pack("!H", 7) + payload
        sock.sendall(mqtt_packet(0x32, body) + mqtt_packet(0x3A, body))  # QoS 1, then DUP
        acks = b""
        while len(acks) < 8:
            acks += sock.recv(8 - len(acks))
        assert acks == b"\x40\x02\x00\x07" * 2  # both PUBACKed: the broker forwards both
        sock.sendall(b"\xe0\x00")  # DISCONNECT


def test_duplicate_deliveries_count_once(tmp_path, broker_dir):
    clients = 8
    job = synthetic_job_dict("duplicates", clients=clients, rounds=2)
    everyone = list(range(clients))
    first = payloads(job, 0, everyone)
    with mosquitto(broker_dir) as url, light_fleet(url, job, connections=1) as fleet:
        aggs = Aggregators(job, url, tmp_path)
        try:
            agg = aggs.start()
            fleet.wait_round(0)
            client5, payload5 = first[5]
            publish_twice_with_dup(
                int(url.rsplit(":", 1)[1]), Topics(job["name"]).update(client5), payload5
            )
            fleet.publish(first[:5] + first[6:7])
            fleet.publish(first[:3])  # clients 0-2 resend the same update
            fleet.wait_acked()
            fleet.publish(first[7:])  # the last one completes the round
            fleet.wait_round(1)
            fleet.publish(payloads(job, 1, everyone))
            fleet.wait_acked()
            assert agg.wait() == 0, agg.stderr()
        finally:
            aggs.close()

    report = aggs.report()
    assert [r["clients"] for r in report["rounds"]] == [clients, clients]
    assert report["rejections"] == {"duplicate": 4}
    assert_same_state(aggs.final_global(), reference_global(job, [everyone] * 2))
