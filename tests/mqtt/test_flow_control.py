"""Flow control of `MqttConnection(max_backlog=…)` on mosquitto, and MQTT 5 reason-code logs."""

from __future__ import annotations

import logging
import time

import pytest

from fedsb.mqtt import MqttConnection, parse_broker_url

BACKLOG = 5
SENT = 60


@pytest.mark.parametrize("mqtt5", [False, True], ids=["mqtt311", "mqtt5"])
def test_backlog_never_exceeds_its_bound_and_nothing_is_lost(mosquitto_broker, mqtt5):
    address = parse_broker_url(mosquitto_broker.url)
    receiver = MqttConnection(
        address,
        f"bounded-{mqtt5}",
        ["fedsb/flow/update/+"],
        mqtt5=mqtt5,
        manual_ack=True,
        max_backlog=BACKLOG,
        clean_start=True,
    ).start()
    watcher = MqttConnection(
        address, f"watch-{mqtt5}", ["fedsb/flow/status/+"], mqtt5=mqtt5, clean_start=True
    ).start()
    publisher = MqttConnection(address, f"pub-{mqtt5}", [], mqtt5=mqtt5, clean_start=True).start()
    got: list[str] = []

    def take(count: int) -> int:
        """Take `count` messages slowly; the largest backlog seen meanwhile."""
        peak, deadline = 0, time.monotonic() + 20
        while count and time.monotonic() < deadline:
            time.sleep(0.02)  # a slow consumer: the broker keeps what it cannot push
            peak = max(peak, receiver.messages.qsize())
            msg = receiver.get(timeout_s=0.5)
            if msg is not None:
                receiver.ack(msg)
                got.append(msg.topic)
                count -= 1
        return peak

    try:
        for i in range(SENT):
            publisher.publish(f"fedsb/flow/update/c{i:03d}", b"x" * 4000, wait_s=None)
        peak = take(20)
        # the backlog is full: a publish that waits for its PUBACK still completes
        receiver.publish("fedsb/flow/status/agg", b"alive", wait_s=10)
        status = watcher.get(timeout_s=10)
        take(SENT - 20)
    finally:
        for conn in (receiver, watcher, publisher):
            conn.stop()
    assert peak == BACKLOG  # full, never beyond
    assert status is not None and status.payload == b"alive"
    assert sorted(got) == [f"fedsb/flow/update/c{i:03d}" for i in range(SENT)]


def test_mqtt5_reason_codes_are_logged(mosquitto_broker, caplog):
    address = parse_broker_url(mosquitto_broker.url)
    with caplog.at_level(logging.DEBUG, logger="fedsb.mqtt"):
        conn = MqttConnection(
            address, "reasons", ["fedsb/reasons/#"], mqtt5=True, clean_start=True
        ).start()
        try:
            conn.publish("fedsb/reasons/x", b"1", wait_s=5)
            deadline = time.monotonic() + 5
            while "SUBACK" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            conn.stop()
    assert "CONNACK Success" in caplog.text
    assert "SUBACK mid 1: Granted QoS 1" in caplog.text
    assert "PUBACK mid" in caplog.text and ": Success" in caplog.text
