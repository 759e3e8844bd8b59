"""`clients_per_round` over MQTT: the aggregator publishes its seeded sample and holds to it."""

from __future__ import annotations

import time

import torch

from fedsb.aggregator.server import FederatedServer
from fedsb.aggregator.service import AggregatorService
from fedsb.config import parse_config
from fedsb.methods import get_method
from fedsb.mqtt import MqttConnection, parse_broker_url
from fedsb.protocol import UpdateMeta, encode_client_update, parse_round
from fedsb.selection import default_client_ids, sample_clients

NAMES = [f"layer.{i}.R" for i in range(2)]


def test_round_message_lists_the_seeded_sample_and_others_are_rejected(mosquitto_broker, tmp_path):
    federation = {"clients": 6, "clients_per_round": 2, "round_timeout_s": 60}
    job = parse_config(
        {"name": "pick", "seed": 3, "adapter": {"rank": 4}, "federation": federation}
    )
    shapes = {n: (4, 4) for n in NAMES}
    server = FederatedServer(
        job, get_method("fedsb"), {}, {n: torch.zeros(4, 4) for n in NAMES}, shapes
    )
    address = parse_broker_url(mosquitto_broker.url)
    service = AggregatorService(job, server, address, tmp_path / "state")
    watcher = MqttConnection(address, "watch", [service.topics.round], clean_start=True).start()
    publisher = MqttConnection(address, "pub", [], clean_start=True).start()
    service.connection.start()
    try:
        service.publish_round()
        body = parse_round(watcher.get(timeout_s=10).payload)  # type: ignore[union-attr]
        expected = sample_clients(job, default_client_ids(job), 0)
        assert body["selected"] == expected and len(expected) == 2
        outsider = next(c for c in default_client_ids(job) if c not in expected)
        for client in (outsider, expected[0]):
            state = {n: torch.ones(4, 4) for n in NAMES}
            payload = encode_client_update(state, UpdateMeta("pick", 0, client, 4, 5, 0.1))
            publisher.publish(service.topics.update(client), payload)
        deadline = time.monotonic() + 10
        while len(server.pending) + sum(server.rejections.values()) < 2:
            assert time.monotonic() < deadline, "the two updates did not arrive"
            service.step()
    finally:
        for conn in (watcher, publisher, service.connection):
            conn.stop()
    assert dict(server.rejections) == {"not-selected": 1}
    assert list(server.pending) == [expected[0]]
    assert sample_clients(job, default_client_ids(job), 1) != expected  # a new draw each round
