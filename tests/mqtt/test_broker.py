"""fedsb's local brokers against real MQTT traffic: round trips, retention, TLS, auth and ACL."""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from fedsb.aggregator.broker import (
    BrokerError,
    BrokerHandle,
    MosquittoUsers,
    acl_text,
    free_port,
    parse_auth_file,
    start_embedded_broker,
    start_mosquitto,
    write_mosquitto_config,
)
from fedsb.errors import ConfigError

from .conftest import USERS, ClientFactory, require_mosquitto

PAYLOAD = os.urandom(64 * 1024)
NOT_AUTHORIZED = 0x87
SUCCESS = 0x00
NO_SUBSCRIBERS = 0x10  # MQTT 5 PUBACK: accepted, but nobody is subscribed


def login(user: str) -> tuple[str, str]:
    return user, USERS.all()[user]


def round_trip(broker: BrokerHandle, make_client: ClientFactory, protocol: int) -> None:
    """A 64 KiB QoS 1 message goes through the broker unchanged."""
    sub = make_client("sub", protocol=protocol)
    pub = make_client("pub", protocol=protocol)
    assert sub.connect(broker) == "Success"
    assert pub.connect(broker) == "Success"
    assert [c.value for c in sub.subscribe("fedsb/job/update/c1")] == [1]
    assert pub.publish("fedsb/job/update/c1", PAYLOAD) == SUCCESS
    msg = sub.next_message()
    assert (msg.topic, msg.qos, msg.payload) == ("fedsb/job/update/c1", 1, PAYLOAD)


# ---------------------------------------------------------------- embedded amqtt


def test_embedded_round_trip_64k(embedded_broker: BrokerHandle, make_client: ClientFactory):
    assert embedded_broker.kind == "embedded"
    assert embedded_broker.url == f"mqtt://127.0.0.1:{embedded_broker.port}"
    round_trip(embedded_broker, make_client, mqtt.MQTTv311)


def test_embedded_retained_reaches_late_subscriber(
    embedded_broker: BrokerHandle, make_client: ClientFactory
):
    server = make_client("server", protocol=mqtt.MQTTv311)
    assert server.connect(embedded_broker) == "Success"
    assert server.publish("fedsb/job/global", b"round-3", retain=True) == SUCCESS
    late = make_client("late", protocol=mqtt.MQTTv311)
    assert late.connect(embedded_broker) == "Success"
    late.subscribe("fedsb/job/global")
    msg = late.next_message()
    assert (msg.topic, msg.payload, msg.retain) == ("fedsb/job/global", b"round-3", True)


def test_embedded_stop_frees_port(make_client: ClientFactory):
    first = start_embedded_broker()
    client = make_client("c", protocol=mqtt.MQTTv311)
    assert client.connect(first) == "Success"
    first.stop()
    first.stop()  # idempotent
    assert client.disconnected.wait(5)
    with start_embedded_broker(first.port) as second:
        assert second.port == first.port
        again = make_client("again", protocol=mqtt.MQTTv311)
        assert again.connect(second) == "Success"


def test_embedded_refuses_non_loopback_host():
    with pytest.raises(BrokerError, match="127.0.0.1 only"):
        start_embedded_broker(host="0.0.0.0")


def test_embedded_port_in_use_is_a_broker_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(BrokerError, match="embedded broker failed to start"):
            start_embedded_broker(taken.getsockname()[1], timeout_s=5)


# ---------------------------------------------------------------- plain mosquitto


def test_mosquitto_round_trip_64k(mosquitto_broker: BrokerHandle, make_client: ClientFactory):
    assert mosquitto_broker.kind == "mosquitto"
    assert mosquitto_broker.url == f"mqtt://127.0.0.1:{mosquitto_broker.port}"
    round_trip(mosquitto_broker, make_client, mqtt.MQTTv5)


def test_mosquitto_persistence(broker_dir: Path, make_client: ClientFactory):
    require_mosquitto()
    config = write_mosquitto_config(broker_dir, port=free_port())
    store = broker_dir / "persistence"
    assert store.is_dir()
    assert f"persistence_location {store}/" in config.read_text().splitlines()
    with start_mosquitto(config) as broker:
        writer = make_client("writer")
        assert writer.connect(broker) == "Success"
        assert writer.publish("fedsb/job/global", b"kept", retain=True) == NO_SUBSCRIBERS
    assert (store / "mosquitto.db").stat().st_size > 0  # saved on SIGTERM
    with start_mosquitto(config) as broker:  # the retained message survives a restart
        reader = make_client("reader")
        assert reader.connect(broker) == "Success"
        reader.subscribe("fedsb/job/global")
        assert reader.next_message().payload == b"kept"


def test_mosquitto_port_in_use_reports_log(broker_dir: Path):
    require_mosquitto()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = write_mosquitto_config(broker_dir, port=taken.getsockname()[1])
        with pytest.raises(BrokerError, match="Address already in use"):
            start_mosquitto(config, timeout_s=5)


# ---------------------------------------------------------------- TLS + auth + ACL


def test_tls_login_with_ca(secure_mosquitto: BrokerHandle, make_client: ClientFactory):
    assert secure_mosquitto.url == f"mqtts://127.0.0.1:{secure_mosquitto.port}"
    assert secure_mosquitto.ca_file is not None and secure_mosquitto.ca_file.is_file()
    c1 = make_client("c1", ca_file=secure_mosquitto.ca_file, login=login("c1"))
    assert c1.connect(secure_mosquitto) == "Success"
    by_name = make_client("c1-by-name", ca_file=secure_mosquitto.ca_file, login=login("c1"))
    by_name.paho.connect("localhost", secure_mosquitto.port)  # SAN DNS:localhost verifies
    by_name.paho.loop_start()
    assert by_name.connacks.get(timeout=5) == "Success"


@pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311])
@pytest.mark.parametrize("bad_login", [("c1", "wrong"), ("c1", "c2-pw"), ("nobody", "c1-pw")])
def test_wrong_login_refused(
    secure_mosquitto: BrokerHandle,
    make_client: ClientFactory,
    protocol: int,
    bad_login: tuple[str, str],
):
    # mosquitto 2.0.11 answers a bad password with "Not authorized" (MQTT 5 reason 0x87,
    # MQTT 3.1.1 return code 5), not with 0x86 "Bad user name or password".
    client = make_client("c1", protocol=protocol, ca_file=secure_mosquitto.ca_file, login=bad_login)
    code = client.connect(secure_mosquitto)
    assert (str(code), code.value, code.is_failure) == ("Not authorized", NOT_AUTHORIZED, True)
    assert client.disconnected.wait(5)
    assert not client.paho.is_connected()


def test_tls_without_ca_fails(secure_mosquitto: BrokerHandle, make_client: ClientFactory):
    system_cas = make_client("c1", login=login("c1"))
    system_cas.paho.tls_set()  # system trust store: our self-signed CA is not in it
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed") as exc:
        system_cas.paho.connect(secure_mosquitto.host, secure_mosquitto.port)
    assert exc.value.verify_message == "self-signed certificate in certificate chain"
    plain = make_client("c1-plain", login=login("c1"))  # no tls_set: speaks MQTT to a TLS port
    plain.paho.connect(secure_mosquitto.host, secure_mosquitto.port)
    plain.paho.loop_start()
    assert plain.disconnected.wait(5)
    assert plain.connacks.empty()


def secure_pair(broker: BrokerHandle, make_client: ClientFactory, protocol: int):
    """`agg` subscribed to every update, and `c1` connected."""
    agg = make_client("agg", protocol=protocol, ca_file=broker.ca_file, login=login("agg"))
    c1 = make_client("c1", protocol=protocol, ca_file=broker.ca_file, login=login("c1"))
    assert agg.connect(broker) == "Success"
    assert c1.connect(broker) == "Success"
    assert [c.value for c in agg.subscribe("fedsb/job/update/+")] == [1]
    return agg, c1


def test_client_cannot_publish_as_another(
    secure_mosquitto: BrokerHandle, make_client: ClientFactory
):
    agg, c1 = secure_pair(secure_mosquitto, make_client, mqtt.MQTTv311)
    assert c1.publish("fedsb/job/update/c2", b"forged") == SUCCESS  # 3.1.1: dropped silently
    agg.assert_silent(1.0)
    assert c1.publish("fedsb/job/update/c1", PAYLOAD) == SUCCESS
    msg = agg.next_message()
    assert (msg.topic, msg.payload) == ("fedsb/job/update/c1", PAYLOAD)


@pytest.mark.parametrize(
    "topic",
    [
        "fedsb/job/update/c2",
        "fedsb/job/status/c2",
        "fedsb/job/global",
        "fedsb/job/round",
        "fedsb/job/init/reply/c2",
        "fedsb/job/init/request",
        "fedsb/job/init/request/0",
    ],
)
def test_denied_publish_gets_not_authorized_v5(
    secure_mosquitto: BrokerHandle, make_client: ClientFactory, topic: str
):
    agg, c1 = secure_pair(secure_mosquitto, make_client, mqtt.MQTTv5)
    assert c1.publish(topic, b"forged") == NOT_AUTHORIZED
    assert c1.publish("fedsb/job/update/c1", b"mine") == SUCCESS
    msg = agg.next_message()
    assert (msg.topic, msg.payload) == ("fedsb/job/update/c1", b"mine")
    agg.assert_silent(0.2)


def test_client_cannot_read_other_updates(
    secure_mosquitto: BrokerHandle, make_client: ClientFactory
):
    agg, c1 = secure_pair(secure_mosquitto, make_client, mqtt.MQTTv5)
    ca = secure_mosquitto.ca_file
    c2 = make_client("c2", ca_file=ca, login=login("c2"))
    assert c2.connect(secure_mosquitto) == "Success"
    assert [c.value for c in c2.subscribe("fedsb/job/update/#")] == [1]  # granted, yet empty
    assert c1.publish("fedsb/job/update/c1", b"private") == SUCCESS
    assert agg.next_message().payload == b"private"
    c2.assert_silent(1.0)


def test_client_reads_retained_global(secure_mosquitto: BrokerHandle, make_client: ClientFactory):
    ca = secure_mosquitto.ca_file
    agg = make_client("agg", ca_file=ca, login=login("agg"))
    assert agg.connect(secure_mosquitto) == "Success"
    assert agg.publish("fedsb/job/global", PAYLOAD, retain=True) == NO_SUBSCRIBERS
    c1 = make_client("c1", ca_file=ca, login=login("c1"))
    assert c1.connect(secure_mosquitto) == "Success"
    c1.subscribe("fedsb/job/global")
    msg = c1.next_message()
    assert (msg.topic, msg.payload, msg.retain) == ("fedsb/job/global", PAYLOAD, True)


def test_client_takes_part_in_a_federated_init(
    secure_mosquitto: BrokerHandle, make_client: ClientFactory
):
    """A client reads the retained init request and answers on its own init reply topic only."""
    ca = secure_mosquitto.ca_file
    agg = make_client("agg", ca_file=ca, login=login("agg"))
    assert agg.connect(secure_mosquitto) == "Success"
    assert agg.publish("fedsb/job/init/request/0", b"chunk", retain=True) == NO_SUBSCRIBERS
    assert agg.publish("fedsb/job/init/request", b"pointer", retain=True) == NO_SUBSCRIBERS
    assert [c.value for c in agg.subscribe("fedsb/job/init/reply/+")] == [1]
    c1 = make_client("c1", ca_file=ca, login=login("c1"))
    assert c1.connect(secure_mosquitto) == "Success"
    c1.subscribe("fedsb/job/init/request")
    assert c1.next_message().payload == b"pointer"
    c1.subscribe("fedsb/job/init/request/+")
    assert c1.next_message().payload == b"chunk"
    assert c1.publish("fedsb/job/init/reply/c1", b"reply") == SUCCESS
    msg = agg.next_message()
    assert (msg.topic, msg.payload) == ("fedsb/job/init/reply/c1", b"reply")


def test_secure_files_and_acl(secure_mosquitto: BrokerHandle):
    directory = secure_mosquitto.ca_file.parent if secure_mosquitto.ca_file else None
    assert directory is not None
    assert not (directory / "ca.key").exists()  # nobody can mint certificates afterwards
    assert "c1-pw" not in (directory / "passwd").read_text()  # hashed
    assert (directory / "acl").read_text() == acl_text(USERS)


# ---------------------------------------------------------------- auth file


def test_parse_auth_file(tmp_path: Path):
    path = tmp_path / "auth.toml"
    path.write_text('[aggregator]\nuser = "agg"\npassword = "p"\n[clients]\nc1 = "x"\nc2 = "y"\n')
    assert parse_auth_file(path) == MosquittoUsers(("agg", "p"), {"c1": "x", "c2": "y"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[aggregator\n", "not valid TOML"),
        ('[clients]\nc1 = "x"\n', r"needs a \[aggregator\] table"),
        ('[aggregator]\nuser = "agg"\n[clients]\nc1 = "x"\n', "needs both `user` and `password`"),
        ('[aggregator]\nuser = "agg"\npassword = "p"\n', r"needs a \[clients\] table"),
        ('[aggregator]\nuser = "agg"\npassword = "p"\n[clients]\n', "lists no clients"),
        ('[aggregator]\nuser="a"\npassword="p"\nrole="x"\n[clients]\nc="x"\n', "unknown keys"),
        ('[aggregator]\nuser = "agg"\npassword = "p"\n[clients]\n"c/1" = "x"\n', "must match"),
        ('[aggregator]\nuser = "agg"\npassword = "p"\n[clients]\nc1 = ""\n', "non-empty"),
        ('[aggregator]\nuser = "agg"\npassword = "p"\n[clients]\nagg = "x"\n', "both the"),
    ],
)
def test_parse_auth_file_errors(tmp_path: Path, text: str, message: str):
    path = tmp_path / "auth.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_auth_file(path)


def test_parse_auth_file_missing(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_auth_file(tmp_path / "absent.toml")
