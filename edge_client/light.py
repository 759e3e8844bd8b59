"""Lightweight clients: many client ids sending pre-computed updates over a few MQTT connections.

A fleet of 10,000 real edge clients would need 10,000 sockets and models; for scale runs and
fault injection what matters is the broker and the aggregator, so N client ids share P
persistent-session paho connections (QoS 1, reconnect with backoff, unlimited outbound queue)
and each publishes its update to its own topic `…/update/{client}` when a round opens.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable

import paho.mqtt.client as paho

from fedsb.errors import FedsbError
from fedsb.mqtt import BrokerAddress, Topics
from fedsb.protocol import parse_round
from fedsb.synthetic import client_id

log = logging.getLogger(__name__)

# (round, client index) -> the encoded update, or None when the client skips that round
PayloadFn = Callable[[int, int], bytes | None]


class LightFleet:
    """N client ids over `connections` paho connections; the caller drives the rounds."""

    def __init__(
        self, address: BrokerAddress, job: str, *, connections: int = 4, name: str = "light"
    ) -> None:
        self.topics = Topics(job)
        self.rounds: queue.Queue[dict] = queue.Queue()
        self.latest: dict | None = None
        self.pending: list[paho.MQTTMessageInfo] = []
        self.clients = [self._connect(address, f"{name}-{i}", i == 0) for i in range(connections)]

    def _connect(self, address: BrokerAddress, client_id: str, watch: bool) -> paho.Client:
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=paho.MQTTv311,
        )
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=1, max_delay=8)
        connected = threading.Event()

        def on_connect(c, _u, _f, reason_code, _p):  # type: ignore[no-untyped-def]
            if watch and not reason_code.is_failure:
                c.subscribe(self.topics.round, qos=1)
            connected.set()

        client.on_connect = on_connect
        if watch:
            client.on_message = lambda _c, _u, msg: self.rounds.put(parse_round(msg.payload))
        client.connect(address.host, address.port, keepalive=30)
        client.loop_start()
        if not connected.wait(15):
            raise FedsbError(f"light client {client_id} could not connect to {address.url}")
        return client

    def wait_round(self, round_no: int, timeout_s: float = 60.0) -> dict:
        """The round message once round `round_no` (or a later one, or the end) is open."""
        deadline = time.monotonic() + timeout_s
        while not self._reached(round_no):
            try:
                self.latest = self.rounds.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise FedsbError(f"round {round_no} did not open within {timeout_s:g} s") from None
        assert self.latest is not None
        return self.latest

    def _reached(self, round_no: int) -> bool:
        body = self.latest
        return body is not None and (int(body["round"]) >= round_no or bool(body.get("done")))

    def publish(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Publish (client id, payload) pairs, client i on connection i mod P; no waiting."""
        for n, (client, payload) in enumerate(items):
            conn = self.clients[n % len(self.clients)]
            info = conn.publish(self.topics.update(client), payload, qos=1)
            if info.rc == paho.MQTT_ERR_NO_CONN:  # queued by paho, sent after reconnecting
                info.rc = paho.MQTT_ERR_SUCCESS
            self.pending.append(info)

    def wait_acked(self, timeout_s: float = 60.0) -> None:
        """Block until the broker has acknowledged every publish so far (bounded)."""
        deadline = time.monotonic() + timeout_s
        for info in self.pending:
            info.wait_for_publish(timeout=max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise FedsbError(f"the broker did not acknowledge all updates in {timeout_s:g} s")
        self.pending.clear()

    def run(
        self, payload: PayloadFn, clients: int, rounds: int, timeout_s: float = 600.0
    ) -> list[float]:
        """Play `rounds` rounds: when round r opens, every client sends `payload(r, i)`.

        Returns the wall-clock time (time.time) each round opened, as this fleet saw it.
        """
        opened = []
        for round_no in range(rounds):
            body = self.wait_round(round_no, timeout_s)
            if body.get("done"):
                break
            opened.append(time.time())
            items = ((client_id(i), payload(round_no, i)) for i in range(clients))
            self.publish((c, p) for c, p in items if p is not None)
            self.wait_acked(timeout_s)
        return opened

    def close(self) -> None:
        for client in self.clients:
            client.disconnect()
            client.loop_stop()
