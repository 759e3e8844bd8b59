"""Helpers for the service tests: job TOML files, `fedsb` subprocesses, bounded waits, a spy.

Every wait is bounded; every subprocess is killed by its own PID at the end of a test.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
import torch

from fedsb.aggregator.broker import (
    BrokerHandle,
    MosquittoUsers,
    free_port,
    start_mosquitto,
    write_mosquitto_config,
)
from fedsb.wire import decode_update

AGGREGATOR_LOGIN = ("agg", "agg-pw")


# ---------------------------------------------------------------- job files


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A tiny TOML writer for job dicts: scalars and lists first, then one table per dict."""
    lines = [f"{key} = {_toml_value(v)}" for key, v in data.items() if not isinstance(v, dict)]
    for key, value in data.items():
        if isinstance(value, dict):
            name = f"{prefix}{key}"
            lines += ["", f"[{name}]", to_toml(value, name + ".")]
    return "\n".join(lines).strip() + "\n"


def write_job(path: Path, raw: dict[str, Any]) -> Path:
    """Write a job dict (as built by `tiny_job`) to a TOML file the CLI can load."""
    path.write_text(to_toml(raw), encoding="utf-8")
    return path


# ---------------------------------------------------------------- brokers


def start_secure_mosquitto(directory: Path, client_ids: list[str]) -> BrokerHandle:
    """mosquitto with TLS, passwords and the fedsb ACL; user `agg` plus one user per client id.

    The user names equal the client ids (the ACL needs that), so a CLI run can use the same
    ids as `run_simulation` (`client-0000`, …), whose training seeds depend on them.
    """
    users = MosquittoUsers(AGGREGATOR_LOGIN, {cid: password_of(cid) for cid in client_ids})
    config = write_mosquitto_config(directory, port=free_port(), tls=True, users=users)
    return start_mosquitto(config)


def password_of(client_id: str) -> str:
    return f"{client_id}-pw"


def broker_url(handle: BrokerHandle, login: tuple[str, str] | None = None) -> str:
    scheme = "mqtts" if handle.ca_file else "mqtt"
    auth = f"{login[0]}:{login[1]}@" if login else ""
    return f"{scheme}://{auth}{handle.host}:{handle.port}"


# ---------------------------------------------------------------- subprocesses


def cli_env() -> dict[str, str]:
    """The environment of a `fedsb` subprocess: offline, quiet threads, as many as pytest's.

    The thread count matches this process's, so training in a subprocess gives the same bits
    as the in-process reference run.
    """
    env = dict(os.environ)
    env.update(
        OMP_WAIT_POLICY="PASSIVE",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(torch.get_num_threads()),
        PYTHONUNBUFFERED="1",
    )
    return env


def fedsb_exe() -> list[str]:
    script = Path(sys.executable).with_name("fedsb")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedsb.cli"]


def aggregator_args(
    config: Path, url: str, state_dir: Path, ca_file: Path | None = None
) -> list[str | Path]:
    """`fedsb aggregator` arguments."""
    args: list[str | Path] = ["aggregator", "--config", config, "--broker", url]
    args += ["--state-dir", state_dir]
    return args + (["--ca-file", ca_file] if ca_file else [])


def client_args(
    config: Path,
    url: str,
    client_id: str,
    shard: int,
    state_file: Path,
    ca_file: Path | None = None,
) -> list[str | Path]:
    """`fedsb client` arguments."""
    args: list[str | Path] = ["client", "--config", config, "--broker", url]
    args += ["--client-id", client_id, "--data-shard", str(shard), "--state-file", state_file]
    return args + (["--ca-file", ca_file] if ca_file else [])


class Proc:
    """A `fedsb` subprocess with its stdout and stderr in files under `log_dir`."""

    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out_path = log_dir / f"{name}.out"
        self.err_path = log_dir / f"{name}.err"
        self._files: list[IO[bytes]] = [open(self.out_path, "wb"), open(self.err_path, "wb")]
        self.popen = subprocess.Popen(
            [*fedsb_exe(), *args],
            stdin=subprocess.DEVNULL,
            stdout=self._files[0],
            stderr=self._files[1],
            env=cli_env(),
        )

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def stderr(self) -> str:
        return self.err_path.read_text(encoding="utf-8", errors="replace")

    def wait(self, deadline: float) -> int:
        """The exit code; fails the test (with the logs) if it runs past `deadline`."""
        try:
            return self.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            report = self.report()
            raise AssertionError(f"{self.name} still running at the deadline\n{report}") from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to this process (by PID) unless it has exited; reap it on SIGKILL."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            if sig == signal.SIGKILL:
                self.popen.wait(10)

    def close(self) -> None:
        self.kill()
        for f in self._files:
            f.close()

    def report(self) -> str:
        tail = "\n".join(self.stderr().splitlines()[-25:])
        return f"--- {self.name} (rc={self.returncode}) stderr tail:\n{tail}"


class Procs:
    """All subprocesses of one test; `close()` kills whatever is still running."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.all: list[Proc] = []

    def start(self, name: str, *args: str | Path) -> Proc:
        proc = Proc(name, [str(a) for a in args], self.log_dir)
        self.all.append(proc)
        return proc

    def report(self) -> str:
        return "\n".join(p.report() for p in self.all)

    def close(self) -> None:
        for proc in self.all:
            proc.close()


def wait_until(
    predicate: Callable[[], Any], timeout_s: float, what: str, report: Callable[[], str] = str
) -> Any:
    """Poll `predicate` every 20 ms until it returns a truthy value; AssertionError on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}\n{report()}")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file written atomically by the code under test, or None while it is absent."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------- traffic spy


class UpdateSpy:
    """A clean-session subscriber that records (client of the topic, round, meta client)."""

    def __init__(self, handle: BrokerHandle, job: str) -> None:
        self.seen: queue.Queue[tuple[str, int, str]] = queue.Queue()
        self.paho = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="spy", protocol=mqtt.MQTTv311
        )
        self.paho.on_message = self._on_message
        subscribed: queue.Queue[object] = queue.Queue()
        self.paho.on_subscribe = lambda *_args: subscribed.put(True)
        self.paho.connect(handle.host, handle.port, keepalive=30)
        self.paho.loop_start()
        self.paho.subscribe(f"fedsb/{job}/update/+", qos=1)
        subscribed.get(timeout=10)

    def _on_message(self, _client: object, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        topic_client = msg.topic.rsplit("/", 1)[-1]
        try:
            _, meta = decode_update(bytes(msg.payload))
            self.seen.put((topic_client, int(meta["round"]), meta["client"]))
        except Exception:  # noqa: BLE001 - a hostile payload is recorded as such
            self.seen.put((topic_client, -1, "?"))

    def records(self) -> list[tuple[str, int, str]]:
        out = []
        while True:
            try:
                out.append(self.seen.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()
