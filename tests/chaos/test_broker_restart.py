"""Scenario 2: mosquitto SIGKILLed mid-round and restarted from its persistence store.

Clients and aggregator reconnect with paho's backoff; updates sent while the broker was down
wait in the clients' session and go out after the reconnect; the final global state equals
the uninterrupted run. The broker saves its store on every change here (`autosave_on_changes`),
which is what "no acknowledged update lost when the broker crashes" requires.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fedsb.synthetic import synthetic_job_dict

from .harness import (
    Aggregators,
    assert_same_state,
    light_fleet,
    mosquitto_config,
    payloads,
    reference_global,
    wait_until,
)

pytestmark = pytest.mark.chaos


class Mosquitto:
    """mosquitto run from a config by this test, so it can be SIGKILLed by its PID."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.port = int(
            next(
                line.split()[1]
                for line in config.read_text().splitlines()
                if line.startswith("listener ")
            )
        )
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.accepts, 10, "mosquitto to listen")

    def accepts(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)


def test_broker_killed_mid_round_loses_nothing(tmp_path, broker_dir):
    clients = 20
    everyone = list(range(clients))
    job = synthetic_job_dict("broker-crash", clients=clients, rounds=3)
    config = mosquitto_config(broker_dir)
    text = config.read_text().replace("autosave_interval 60", "autosave_interval 1")
    config.write_text(text + "autosave_on_changes true\n")
    broker = Mosquitto(config)
    broker.start()
    try:
        with light_fleet(broker.url, job, connections=2) as fleet:
            aggs = Aggregators(job, broker.url, tmp_path)
            try:
                agg = aggs.start()
                fleet.wait_round(0)
                fleet.publish(payloads(job, 0, everyone[:10]))
                fleet.wait_acked()
                wait_until(lambda: len(aggs.spooled(0)) == 10, 30, "10 accepted updates")
                broker.kill()  # SIGKILL mid-round
                fleet.publish(payloads(job, 0, everyone[10:]))  # held by paho meanwhile
                time.sleep(1.0)
                broker.start()  # same port, same persistence store
                fleet.wait_acked(60)  # sent once the fleet has reconnected
                for round_no in (1, 2):
                    fleet.wait_round(round_no)
                    fleet.publish(payloads(job, round_no, everyone))
                    fleet.wait_acked()
                assert agg.wait() == 0, agg.stderr()
                assert len(aggs.started) == 1  # the same aggregator process throughout
            finally:
                aggs.close()
    finally:
        broker.kill()

    report = aggs.report()
    assert [r["clients"] for r in report["rounds"]] == [clients] * 3
    assert set(report["rejections"]) <= {"duplicate"}  # redeliveries of unacked copies only
    assert_same_state(aggs.final_global(), reference_global(job, [everyone] * 3))
