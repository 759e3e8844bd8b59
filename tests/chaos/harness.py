"""Fault-injection harness: a synthetic aggregator process, lightweight clients, references.

The aggregator runs as its own process (`python -m fedsb.aggregator.synthetic`), so it can
be SIGKILLed and its memory measured; every wait is bounded and every child is killed by its
own PID when a test ends. The reference for "the right result" is the same job played in
process, without faults (`reference_global`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import load_file

from fedsb.aggregator.broker import free_port, start_mosquitto, write_mosquitto_config
from fedsb.aggregator.service import Checkpoint
from fedsb.aggregator.synthetic import REPORT_FILE, synthetic_server
from fedsb.config import parse_config
from fedsb.edge_client.light import LightFleet
from fedsb.mqtt import parse_broker_url
from fedsb.synthetic import client_id, update_payload

HERE = Path(__file__).resolve().parent
JOB_S = 120.0  # bound on one job


class Child:
    """A Python child process with stdout/stderr in files; killed by PID on close."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str]) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.err_path = log_dir / f"{name}.err"
        self.out_path = log_dir / f"{name}.out"
        self.files: list[IO[bytes]] = [open(self.out_path, "wb"), open(self.err_path, "wb")]
        full_env = dict(os.environ) | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"} | env
        self.popen = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.DEVNULL,
            stdout=self.files[0],
            stderr=self.files[1],
            env=full_env,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait(self, timeout_s: float = JOB_S) -> int:
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running\n{self.stderr()[-3000:]}") from None

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def close(self) -> None:
        self.kill()
        for f in self.files:
            f.close()


class Aggregators:
    """Starts synthetic aggregator processes of one job; closes them all at the end."""

    def __init__(self, job: dict[str, Any], url: str, tmp: Path) -> None:
        self.job = job
        self.url = url
        self.state_dir = tmp / "aggregator"
        self.log_dir = tmp / "logs"
        self.job_file = tmp / "job.json"
        self.job_file.write_text(json.dumps(job))
        self.started: list[Child] = []

    def start(self, *, crash_before_replace: str = "", crash_after: int = 0) -> Child:
        """An aggregator; with `crash_before_replace`, it dies (os._exit) just before the
        rename that would commit file `crash_before_replace` for the (crash_after+1)-th time."""
        args = ["--job", str(self.job_file), "--broker", self.url]
        args += ["--state-dir", str(self.state_dir)]
        env = {}
        if crash_before_replace:
            entry = [str(HERE / "crash_aggregator.py")]
            env = {"CRASH_BEFORE_REPLACE": crash_before_replace, "CRASH_AFTER": str(crash_after)}
        else:
            entry = ["-m", "fedsb.aggregator.synthetic"]
        child = Child(f"aggregator-{len(self.started)}", entry + args, self.log_dir, env)
        self.started.append(child)
        return child

    def spooled(self, round_no: int) -> list[str]:
        return [c for c, _ in Checkpoint(self.state_dir).spooled(round_no)]

    def state(self) -> dict[str, Any]:
        return json.loads((self.state_dir / "state.json").read_text())

    def final_global(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.state_dir / self.state()["global"]))

    def report(self) -> dict[str, Any]:
        return json.loads((self.state_dir / REPORT_FILE).read_text())

    def close(self) -> None:
        for child in self.started:
            child.close()


def payloads(job: dict[str, Any], round_no: int, indices: Iterable[int]) -> list[tuple[str, bytes]]:
    """(client id, update) of the given clients for `round_no`."""
    config = parse_config(job)
    return [(client_id(i), update_payload(config, round_no, i)) for i in indices]


def reference_global(
    job: dict[str, Any],
    plan: list[list[int]],
    extra: dict[int, list[tuple[str, bytes]]] | None = None,
) -> dict[str, torch.Tensor]:
    """The final global state when round r aggregates exactly the clients `plan[r]` (in process).

    `extra[r]` adds (client id, payload) pairs submitted last in round r (a Byzantine client).
    """
    server = synthetic_server(parse_config(job))
    for round_no, indices in enumerate(plan):
        for client, payload in payloads(job, round_no, indices):
            assert server.submit(client, payload) is None
        for client, payload in (extra or {}).get(round_no, []):
            server.submit(client, payload)  # accepted, clipped or refused as the job says
        server.close_round()
    return server.broadcast


def assert_same_state(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []


def wait_until(predicate: Any, timeout_s: float, what: str) -> Any:
    """Poll every 20 ms until `predicate()` is truthy; AssertionError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


@contextmanager
def light_fleet(url: str, job: dict[str, Any], **options: Any) -> Iterator[LightFleet]:
    fleet = LightFleet(parse_broker_url(url), job["name"], **options)
    try:
        yield fleet
    finally:
        fleet.close()


def mosquitto_config(directory: Path, **options: Any) -> Path:
    """A fedsb mosquitto config on a free port (anonymous, persistence on)."""
    return write_mosquitto_config(directory, port=free_port(), **options)


@contextmanager
def mosquitto(directory: Path) -> Iterator[str]:
    """A fresh mosquitto; yields its URL."""
    with start_mosquitto(mosquitto_config(directory)) as handle:
        yield handle.url
