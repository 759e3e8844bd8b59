"""`fedsb broker`: starts a broker, prints its URL, stops on Ctrl-C; bad flag combinations fail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as mqtt

from fedsb.cli import main

FEDSB = str(Path(sys.executable).parent / "fedsb")


def test_embedded_broker_command_serves_until_interrupted():
    proc = subprocess.Popen(
        [FEDSB, "broker"],
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"COLUMNS": "200"},
        # Ctrl-C as in a terminal: a child inherits an ignored SIGINT, and in the full suite
        # something earlier leaves pytest's SIGINT ignored (the command then never stops)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = proc.stderr.readline()  # first line: the URL
        assert "embedded broker listening at mqtt://127.0.0.1:" in line
        port = int(line.split("mqtt://127.0.0.1:")[1].split(";")[0].split()[0])
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe")
        assert client.connect("127.0.0.1", port) == mqtt.MQTT_ERR_SUCCESS
        client.disconnect()
        proc.send_signal(signal.SIGINT)
        # bounded, not a timing check: amqtt's shutdown may wait out its own 10 s + 5 s limits
        # on a loaded machine (seen once in CI at 20 s)
        assert proc.wait(timeout=60) == 0
        assert "broker stopped" in proc.stderr.read()
    finally:
        proc.kill()


def test_tls_without_mosquitto_is_a_one_line_error(capsys):
    assert main(["broker", "--tls"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "error: --tls and --auth-file need --mosquitto (the embedded broker is for local use)"
    )


def test_max_packet_size_reaches_the_mosquitto_config(tmp_path, capsys):
    assert main(["broker", "--mosquitto", "--dir", str(tmp_path), "--max-packet-size", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: max_packet_size must be in 1..268435455, got 0"
    )
