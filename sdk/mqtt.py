"""The one paho-mqtt connection helper and the topic layout, shared by aggregator and clients.

Wraps (never subclasses) a paho client: subscriptions are made in `on_connect` so they come
back after every reconnect; paho reconnects with exponential backoff; messages are handed
to the caller through a thread-safe queue. All metadata travels in payloads (DESIGN §3), so
MQTT 3.1.1 brokers (the embedded amqtt) and MQTT 5 brokers (mosquitto) both work.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .errors import ConfigError, FedsbError

log = logging.getLogger(__name__)

DEFAULT_MAX_PACKET = 16 * 2**20  # mosquitto's max_packet_size in fedsb's generated config


def packet_limit(max_update_bytes: int) -> int:
    """The MQTT packet size a job's connections allow: its largest update plus topic slack."""
    return max(DEFAULT_MAX_PACKET, max_update_bytes + 2**16)


class TransportError(FedsbError):
    """The broker cannot be reached, refused us, or a message cannot be sent."""


@dataclass(frozen=True)
class BrokerAddress:
    """Where and how to connect: parsed from `mqtt[s]://user:pass@host:port`."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str, *, ca_file: str | None = None) -> BrokerAddress:
    """`mqtt://host:1883`, `mqtts://user:pass@host:8883` → BrokerAddress (clear errors otherwise)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"broker URL must start with mqtt:// or mqtts://, got {url!r}")
    if not parts.hostname:
        raise ConfigError(f"broker URL {url!r} has no host")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError:
        raise ConfigError(f"broker URL {url!r} has an invalid port") from None
    return BrokerAddress(
        host=parts.hostname,
        port=port,
        tls=parts.scheme == "mqtts",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        ca_file=ca_file,
    )


@dataclass(frozen=True)
class Topics:
    """The topic layout of one job under a prefix (default `fedsb/{job}`)."""

    job: str
    prefix: str = "fedsb"

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.job}"

    @property
    def manifest(self) -> str:
        return f"{self.base}/manifest"

    def adapter(self, index: int) -> str:
        return f"{self.base}/adapter/{index}"

    @property
    def adapter_all(self) -> str:
        return f"{self.base}/adapter/+"

    @property
    def round(self) -> str:
        return f"{self.base}/round"

    @property
    def global_state(self) -> str:
        return f"{self.base}/global"

    def update(self, client: str) -> str:
        return f"{self.base}/update/{client}"

    @property
    def update_all(self) -> str:
        return f"{self.base}/update/+"

    def status(self, client: str) -> str:
        return f"{self.base}/status/{client}"

    @property
    def init_request(self) -> str:
        """Federated init: which request is open, as its chunk count and sha256 (retained)."""
        return f"{self.base}/init/request"

    def init_request_chunk(self, index: int) -> str:
        """Federated init: one chunk of the open pass's request (server → all, retained)."""
        return f"{self.base}/init/request/{index}"

    @property
    def init_request_chunks(self) -> str:
        return f"{self.base}/init/request/+"

    def init_reply(self, client: str) -> str:
        """Federated init: a client's reply, chunked like the adapter (client → server)."""
        return f"{self.base}/init/reply/{client}"

    @property
    def init_reply_all(self) -> str:
        return f"{self.base}/init/reply/+"

    def client_of(self, topic: str) -> str:
        """The last topic level (the client id of an update or status topic)."""
        return topic.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    mid: int = 0
    qos: int = 0


class MqttConnection:
    """A persistent-session paho client delivering messages to a queue; QoS 1 everywhere."""

    def __init__(
        self,
        address: BrokerAddress,
        client_id: str,
        subscriptions: list[str],
        *,
        will: tuple[str, bytes] | None = None,
        max_packet: int = DEFAULT_MAX_PACKET,
        clean_start: bool = False,
        mqtt5: bool = False,
        manual_ack: bool = False,
        receive_maximum: int | None = None,
        session_expiry_s: int | None = None,
        max_backlog: int | None = None,
        network_thread: bool = True,
    ) -> None:
        self.address = address
        # network_thread=False: no paho thread; `get` and `publish` run paho's loop in the
        # caller's thread. One thread then does everything, with no GIL hand-offs between a
        # reader and a consumer (the aggregator's hot path); the backlog is what one read gives.
        self.network_thread = network_thread
        self._reconnect_at = 0.0  # caller-driven loop: when to try the next reconnect
        self._reconnect_delay = 1.0
        self.mqtt5 = mqtt5
        self.clean_start = clean_start
        self.receive_maximum = receive_maximum  # MQTT 5: at most this many unacked deliveries
        # MQTT 5: how long the broker keeps the session (queued and unacked messages) after a
        # disconnect; without it a v5 session ends with the connection, even with clean_start off.
        self.session_expiry_s = session_expiry_s
        self.subscriptions = subscriptions
        self.max_packet = max_packet
        self.messages: queue.Queue[Message] = queue.Queue()
        # Flow control: with `max_backlog`, paho's network thread waits in `_on_message` while
        # that many messages are queued, so it stops reading the socket and TCP pushes back on
        # the broker: the backlog stays with the broker, this process's memory stays flat.
        self.max_backlog = max_backlog
        self._room = threading.Condition()
        self._unblocked = 0  # publishes waiting for their PUBACK (need the network thread), stop
        self.connected = threading.Event()
        self.refused: str | None = None
        if mqtt5:  # shared subscriptions, reason codes; the session is set at connect time
            self.client = paho.Client(
                paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
            )
        else:
            self.client = paho.Client(
                paho.CallbackAPIVersion.VERSION2,
                client_id=client_id,
                clean_session=clean_start,
                protocol=paho.MQTTv311,
            )
        # manual_ack: a message is acknowledged by `ack` once the caller has made it durable,
        # so a crash before that makes the broker redeliver it instead of losing it.
        self.client.manual_ack_set(manual_ack)
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(100)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        if address.username:
            self.client.username_pw_set(address.username, address.password)
        if address.tls:
            self.client.tls_set(ca_certs=address.ca_file, cert_reqs=ssl.CERT_REQUIRED)
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        if mqtt5:  # reason codes are only meaningful (and logged) in MQTT 5
            self.client.on_subscribe = self._on_subscribe
            self.client.on_publish = self._on_publish

    def start(self, timeout_s: float = 15.0) -> MqttConnection:
        """Connect and start paho's network thread; wait (bounded) for the first CONNACK."""
        try:
            if self.mqtt5:
                properties = Properties(PacketTypes.CONNECT)
                if self.receive_maximum:
                    properties.ReceiveMaximum = self.receive_maximum
                if self.session_expiry_s:
                    properties.SessionExpiryInterval = self.session_expiry_s
                self.client.connect(
                    self.address.host,
                    self.address.port,
                    keepalive=30,
                    clean_start=self.clean_start,
                    properties=properties,
                )
            else:
                self.client.connect(self.address.host, self.address.port, keepalive=30)
        except (OSError, ssl.SSLError) as err:
            raise TransportError(f"cannot reach the broker at {self.address.url}: {err}") from err
        if self.network_thread:
            self.client.loop_start()
        else:
            deadline = time.monotonic() + timeout_s
            while not self.connected.is_set() and time.monotonic() < deadline:
                self.client.loop(timeout=0.05)
        if not self.connected.wait(timeout_s if self.network_thread else 0) or self.refused:
            self.stop()
            why = self.refused or f"no answer within {timeout_s:.0f} s"
            raise TransportError(f"broker {self.address.url} refused the connection: {why}")
        return self

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            self.refused = str(reason_code)
            self.connected.set()
            client.disconnect()
            return
        if self.mqtt5:
            log.info(
                "connected to %s: CONNACK %s (session present %s) %s",
                self.address.url,
                reason_code,
                flags.session_present,
                properties or "",
            )
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        self._reconnect_delay = 1.0
        self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # type: ignore[no-untyped-def]
        for code in reason_codes:
            level = logging.WARNING if code.is_failure else logging.DEBUG
            log.log(level, "SUBACK mid %d: %s", mid, code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if reason_code.is_failure:  # e.g. 0x87 Not authorized: an ACL denied the publish
            log.warning("PUBACK mid %d: %s", mid, reason_code)
        else:
            log.debug("PUBACK mid %d: %s", mid, reason_code)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            log.warning("disconnected from %s: %s (paho reconnects)", self.address.url, reason_code)

    def _on_message(self, client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        if self.max_backlog and self.network_thread:
            with self._room:
                self._room.wait_for(
                    lambda: self._unblocked or self.messages.qsize() < (self.max_backlog or 0)
                )
        self.messages.put(
            Message(msg.topic, bytes(msg.payload), bool(msg.retain), msg.mid, msg.qos)
        )

    def ack(self, message: Message) -> None:
        """Acknowledge a QoS 1 message received with `manual_ack` (no-op for QoS 0)."""
        if message.qos > 0:
            self.client.ack(message.mid, message.qos)

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, wait_s: float | None = 30.0
    ) -> None:
        """Publish with QoS 1 after checking the broker's packet limit (paho does not)."""
        if len(payload) + len(topic) + 16 > self.max_packet:
            raise TransportError(
                f"message of {len(payload):,} bytes to {topic} exceeds the broker limit of {self.max_packet:,}"
            )
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc == paho.MQTT_ERR_NO_CONN:
            # broker down: paho keeps the QoS 1 message and sends it after reconnecting
            info.rc = paho.MQTT_ERR_SUCCESS
        if wait_s is not None and not self.network_thread:
            deadline = time.monotonic() + wait_s
            while not info.is_published() and time.monotonic() < deadline:
                self.pump(min(0.05, deadline - time.monotonic()))
        elif wait_s is not None:
            # Waiting for the PUBACK needs the network thread to read past a full backlog:
            # let it queue beyond `max_backlog` meanwhile (publish with wait_s=None to avoid).
            self._unblock(+1)
            try:
                info.wait_for_publish(timeout=wait_s)
            finally:
                self._unblock(-1)

    def _unblock(self, delta: int) -> None:
        """Let the network thread queue messages past `max_backlog` (+1) or stop doing so (-1)."""
        with self._room:
            self._unblocked += delta
            self._room.notify_all()

    def get(self, timeout_s: float) -> Message | None:
        """The next message, or None after `timeout_s`."""
        if not self.network_thread:
            deadline = time.monotonic() + timeout_s
            while self.messages.empty():
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.pump(min(left, 1.0))
            return self.messages.get_nowait()
        try:
            message = self.messages.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if self.max_backlog:
            with self._room:
                self._room.notify()
        return message

    def pump(self, timeout_s: float) -> None:
        """Caller-driven loop: read/write what the socket has (waiting up to `timeout_s`).

        Also reconnects after a lost connection, with exponential backoff (1 s doubling to
        30 s) as paho's own thread does; the session (clean_start false) keeps what was queued.
        """
        if self.client.loop(timeout=max(timeout_s, 0.0)) == paho.MQTT_ERR_SUCCESS:
            return
        now = time.monotonic()
        if now < self._reconnect_at:
            time.sleep(min(timeout_s, self._reconnect_at - now))
            return
        self._reconnect_at = now + self._reconnect_delay
        self._reconnect_delay = min(2 * self._reconnect_delay, 30.0)
        try:
            self.client.reconnect()
        except (OSError, ssl.SSLError) as err:
            log.warning("reconnecting to %s failed: %s (retrying)", self.address.url, err)

    def stop(self) -> None:
        """Disconnect cleanly (no will message) and stop the network thread."""
        self._unblock(+1)  # for good: the network thread must not wait for room any more
        self.client.disconnect()
        if self.network_thread:
            self.client.loop_stop()
        else:
            self.client.loop(timeout=0.05)  # let the DISCONNECT go out
