"""Scale-out under faults: a SIGKILLed coordinator, then a SIGKILLed worker, mid-round.

`python -m fedsb.aggregator.synthetic --workers 2` over mosquitto; each restart resumes from
the state directory and the final global state equals the fault-free run in process, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedsb.aggregator.service import Checkpoint
from fedsb.aggregator.synthetic import REPORT_FILE
from fedsb.synthetic import synthetic_job_dict

from . import harness as chaos
from .harness import Child

pytestmark = pytest.mark.chaos


def worker_pids(coordinator: Child) -> list[int]:
    """The coordinator's child processes (its workers; it starts no other)."""
    pid = coordinator.pid
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def gone(pids: list[int]) -> bool:
    return not any(Path(f"/proc/{p}").exists() for p in pids)


def test_killed_coordinator_and_worker_resume_bit_identical(tmp_path, broker_dir):
    job = synthetic_job_dict("workers-crash", clients=30, rounds=2)
    everyone = list(range(30))
    state_dir = tmp_path / "state"
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))

    def spooled(round_no: int) -> int:
        return len(Checkpoint(state_dir).spooled(round_no))

    with chaos.mosquitto(broker_dir) as url, chaos.light_fleet(url, job, connections=2) as fleet:
        args = ["-m", "fedsb.aggregator.synthetic", "--job", str(job_file), "--broker", url]
        args += ["--state-dir", str(state_dir), "--workers", "2"]
        started: list[Child] = []

        def start() -> Child:
            started.append(Child(f"coordinator-{len(started)}", args, tmp_path / "logs", {}))
            return started[-1]

        try:
            first = start()
            fleet.wait_round(0)
            fleet.publish(chaos.payloads(job, 0, range(10)))
            fleet.wait_acked()
            chaos.wait_until(lambda: spooled(0) == 10, 30, "10 spooled updates")
            workers = worker_pids(first)
            first.kill()  # SIGKILL mid-round: its workers see the pipe close and stop
            chaos.wait_until(lambda: gone(workers), 30, "the orphaned workers to stop")
            fleet.publish(chaos.payloads(job, 0, range(10, 30)))  # queued for the workers
            fleet.wait_acked()

            second = start()
            fleet.wait_round(1)
            fleet.publish(chaos.payloads(job, 1, range(20)))
            chaos.wait_until(lambda: spooled(1) >= 5, 30, "round-1 updates spooled")
            victim = worker_pids(second)[-1]
            os.kill(victim, signal.SIGKILL)  # a worker dies mid-round
            assert second.wait() == 2
            errors = [line for line in second.stderr().splitlines() if line.startswith("error")]
            assert len(errors) == 1
            assert errors[0].startswith("error: aggregator worker ")
            assert f"(pid {victim}) exited with code -9; stopped: every update ackno" in errors[0]
            fleet.wait_acked()

            third = start()
            fleet.publish(chaos.payloads(job, 1, range(20, 30)))
            fleet.wait_acked()
            assert third.wait() == 0, third.stderr()
        finally:
            for child in started:
                child.close()

    state = json.loads((state_dir / "state.json").read_text())
    assert state["round"] == 2
    report = json.loads((state_dir / REPORT_FILE).read_text())
    # a redelivered copy of an update spooled but not yet acknowledged is the only rejection
    assert set(report["rejections"]) <= {"duplicate"}
    final = load_file(str(state_dir / state["global"]))
    chaos.assert_same_state(final, chaos.reference_global(job, [everyone] * 2))
