"""Real-broker fixtures (no mocks) and a small paho-mqtt test client with bounded waits."""

from __future__ import annotations

import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from fedsb.aggregator.broker import (
    BrokerHandle,
    MosquittoUsers,
    free_port,
    mosquitto_available,
    start_embedded_broker,
    start_mosquitto,
    write_mosquitto_config,
)

WAIT_S = 5.0
USERS = MosquittoUsers(aggregator=("agg", "agg-pw"), clients={"c1": "c1-pw", "c2": "c2-pw"})


class TestClient:
    """A paho client on its own network thread; every wait is bounded by `WAIT_S`."""

    __test__ = False  # not a pytest test class

    def __init__(self, client_id: str, protocol: mqtt.MQTTProtocolVersion) -> None:
        self.paho = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            reconnect_on_failure=False,
        )
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connacks: queue.Queue[ReasonCode] = queue.Queue()
        self.disconnected = threading.Event()
        self.subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
        self.pubacks: queue.Queue[tuple[int, ReasonCode]] = queue.Queue()
        self.paho.on_connect = lambda _c, _u, _f, rc, _p: self.connacks.put(rc)
        self.paho.on_disconnect = lambda *_args: self.disconnected.set()
        self.paho.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.paho.on_subscribe = lambda _c, _u, _mid, codes, _p: self.subacks.put(codes)
        self.paho.on_publish = lambda _c, _u, mid, rc, _p: self.pubacks.put((mid, rc))

    def connect(self, broker: BrokerHandle) -> ReasonCode:
        """Connect, start the network thread and return the CONNACK reason code."""
        self.paho.connect(broker.host, broker.port, keepalive=30)
        self.paho.loop_start()
        return self.connacks.get(timeout=WAIT_S)

    def subscribe(self, topic: str, qos: int = 1) -> list[ReasonCode]:
        """Subscribe and return the SUBACK reason codes."""
        self.paho.subscribe(topic, qos)
        return self.subacks.get(timeout=WAIT_S)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Publish and, for QoS 1, return the PUBACK reason code's value."""
        info = self.paho.publish(topic, payload, qos=qos, retain=retain)
        mid, code = self.pubacks.get(timeout=WAIT_S)
        assert mid == info.mid
        return int(code.value)

    def next_message(self, timeout_s: float = WAIT_S) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout_s)

    def assert_silent(self, wait_s: float = 1.0) -> None:
        """Nothing arrives within `wait_s`."""
        with pytest.raises(queue.Empty):
            msg = self.messages.get(timeout=wait_s)
            pytest.fail(f"unexpected message on {msg.topic}: {msg.payload[:40]!r}")

    def close(self) -> None:
        if self.paho.is_connected():
            self.paho.disconnect()
        self.paho.loop_stop()


ClientFactory = Callable[..., TestClient]


@pytest.fixture
def make_client() -> Iterator[ClientFactory]:
    """Build test clients (optionally with TLS and a login); all are closed at teardown."""
    made: list[TestClient] = []

    def build(
        client_id: str,
        *,
        protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv5,
        ca_file: Path | None = None,
        login: tuple[str, str] | None = None,
    ) -> TestClient:
        client = TestClient(client_id, protocol)
        if ca_file is not None:
            client.paho.tls_set(ca_certs=str(ca_file))
        if login is not None:
            client.paho.username_pw_set(*login)
        made.append(client)
        return client

    yield build
    for client in made:
        client.close()


def require_mosquitto() -> None:
    """These tests never skip: a missing broker is a broken test environment."""
    if not mosquitto_available():
        pytest.fail(
            "mosquitto and mosquitto_passwd are required for tests/mqtt; install them with "
            "`apt-get install -y mosquitto mosquitto-clients` (the Makefile does this)",
            pytrace=False,
        )


@pytest.fixture
def broker_dir() -> Iterator[Path]:
    """A fresh directory mosquitto can enter after dropping to its own user (pytest's can't)."""
    path = Path(tempfile.mkdtemp(prefix="fedsb-mqtt-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def embedded_broker() -> Iterator[BrokerHandle]:
    with start_embedded_broker() as handle:
        yield handle


def _mosquitto(directory: Path, **options: Any) -> Iterator[BrokerHandle]:
    require_mosquitto()
    config = write_mosquitto_config(directory, port=free_port(), **options)
    with start_mosquitto(config) as handle:
        yield handle


@pytest.fixture
def mosquitto_broker(broker_dir: Path) -> Iterator[BrokerHandle]:
    """Plain mosquitto: anonymous, no TLS, persistence on."""
    yield from _mosquitto(broker_dir)


@pytest.fixture
def secure_mosquitto(broker_dir: Path) -> Iterator[BrokerHandle]:
    """mosquitto with TLS (self-signed CA), passwords and the fedsb ACL for `USERS`."""
    yield from _mosquitto(broker_dir, tls=True, users=USERS)
