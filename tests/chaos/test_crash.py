"""Scenarios 1 and 8: a SIGKILLed aggregator, a crash inside a checkpoint write, a full disk.

Each run is compared bit for bit with the same job played in process without faults.
"""

from __future__ import annotations

import os
import signal

import pytest

from fedsb.synthetic import client_id, synthetic_job_dict

from .harness import (
    Aggregators,
    assert_same_state,
    light_fleet,
    mosquitto,
    payloads,
    reference_global,
    wait_until,
)

pytestmark = pytest.mark.chaos
CLIENTS = 40
EVERYONE = list(range(CLIENTS))


def test_sigkilled_aggregator_resumes_bit_identical(tmp_path, broker_dir):
    job = synthetic_job_dict("sigkill", clients=CLIENTS, rounds=3)
    with mosquitto(broker_dir) as url, light_fleet(url, job, connections=2) as fleet:
        aggs = Aggregators(job, url, tmp_path)
        try:
            first = aggs.start()
            fleet.wait_round(0)
            fleet.publish(payloads(job, 0, range(10)))
            fleet.wait_acked()
            wait_until(lambda: len(aggs.spooled(0)) == 10, 30, "10 spooled updates")
            first.kill()  # SIGKILL after 10 accepted updates of round 0
            assert first.popen.returncode == -signal.SIGKILL
            fleet.publish(payloads(job, 0, range(10, CLIENTS)))  # queued for the dead one
            fleet.wait_acked()

            second = aggs.start()
            fleet.wait_round(1)
            fleet.publish(payloads(job, 1, range(30)))  # 10 short of quorum
            wait_until(lambda: len(aggs.spooled(1)) >= 5, 30, "round-1 updates spooled")
            second.kill()  # while updates of round 1 stream in
            fleet.wait_acked()
            assert aggs.state()["round"] == 1

            third = aggs.start()
            fleet.publish(payloads(job, 1, range(30, CLIENTS)))
            fleet.wait_round(2)
            fleet.publish(payloads(job, 2, EVERYONE))
            fleet.wait_acked()
            assert third.wait() == 0, third.stderr()
        finally:
            aggs.close()

    assert aggs.state()["round"] == 3
    # redelivered copies of updates spooled but not yet acknowledged are the only rejections
    assert set(aggs.report()["rejections"]) <= {"duplicate"}
    assert_same_state(aggs.final_global(), reference_global(job, [EVERYONE] * 3))


@pytest.mark.parametrize(
    ("torn_file", "commits_before"),
    [("global-00002.safetensors", 0), ("state.json", 1)],
    ids=["global-tensors", "state-json"],
)
def test_crash_between_checkpoint_write_and_rename_keeps_previous(
    tmp_path, broker_dir, torn_file, commits_before
):
    job = synthetic_job_dict("torn-write", clients=8, rounds=3)
    everyone = list(range(8))
    with mosquitto(broker_dir) as url, light_fleet(url, job, connections=1) as fleet:
        aggs = Aggregators(job, url, tmp_path)
        try:
            # the commit of round 1's close (global-00002, then state.json → round 2) dies
            # after writing the temporary file, before its rename
            crashing = aggs.start(crash_before_replace=torn_file, crash_after=commits_before)
            for round_no in (0, 1):
                fleet.wait_round(round_no)
                fleet.publish(payloads(job, round_no, everyone))
                fleet.wait_acked()
            assert crashing.wait() == 137
            state = aggs.state()
            assert state == {"round": 1, "global": "global-00001.safetensors", "rejections": {}}
            assert (aggs.state_dir / f".{torn_file}.tmp").stat().st_size > 0  # never committed
            assert not (aggs.state_dir / "global-00002.safetensors").exists() or commits_before
            assert aggs.spooled(1) == [client_id(i) for i in everyone]

            resumed = aggs.start()
            fleet.wait_round(2)
            fleet.publish(payloads(job, 2, everyone))
            fleet.wait_acked()
            assert resumed.wait() == 0, resumed.stderr()
        finally:
            aggs.close()

    assert [r["clients"] for r in aggs.report()["rounds"]] == [8, 8]  # round 1 again, then 2
    assert_same_state(aggs.final_global(), reference_global(job, [everyone] * 3))


def test_full_disk_stops_the_aggregator_and_loses_nothing(tmp_path, broker_dir):
    job = synthetic_job_dict("disk-full", clients=6, rounds=2)
    everyone = list(range(6))
    with mosquitto(broker_dir) as url, light_fleet(url, job, connections=1) as fleet:
        aggs = Aggregators(job, url, tmp_path)
        # the aggregator's round-1 spool log is written through /dev/full: ENOSPC
        spool = aggs.state_dir / "spool" / "round-00001"
        spool.mkdir(parents=True)
        full = spool / "aggregator.log"
        os.symlink("/dev/full", full)
        try:
            first = aggs.start()
            for round_no in (0, 1):
                fleet.wait_round(round_no)
                fleet.publish(payloads(job, round_no, everyone))
                fleet.wait_acked()
            assert first.wait() == 2
            lines = first.stderr().strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in first.stderr()
            assert lines[0] == (
                f"error: cannot write an update of round 1 to the state directory "
                f"{aggs.state_dir} (No space left on device); stopped accepting updates: "
                "everything acknowledged so far is checkpointed there, and unacknowledged "
                "updates stay with the broker"
            )
            assert aggs.state()["round"] == 1  # round 0 committed and intact
            assert aggs.spooled(1) == []  # the first round-1 write failed: nothing of it spooled

            full.unlink()  # space again
            second = aggs.start()
            assert second.wait() == 0, second.stderr()
        finally:
            aggs.close()

    assert aggs.report()["rounds"][-1] == {**aggs.report()["rounds"][-1], "round": 1, "clients": 6}
    assert_same_state(aggs.final_global(), reference_global(job, [everyone] * 2))
