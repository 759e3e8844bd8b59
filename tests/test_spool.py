"""The aggregator's spool log: what a crash or a full disk mid-write leaves is read correctly."""

from __future__ import annotations

import os

import pytest

from fedsb.aggregator.service import Checkpoint
from fedsb.aggregator.spool import HEADER, SpoolLog, read_spool
from fedsb.errors import StateDirError

UPDATES = [(f"client-{i}", os.urandom(100 + 37 * i)) for i in range(5)]


def test_records_round_trip_in_client_order_across_writers(tmp_path):
    checkpoint, worker = Checkpoint(tmp_path), Checkpoint(tmp_path, writer="worker-1")
    for i, (client, payload) in enumerate(reversed(UPDATES)):
        (checkpoint if i % 2 else worker).save_update(3, client, payload)
    checkpoint.close()
    worker.close()
    assert checkpoint.spooled(3) == UPDATES
    assert sorted(p.name for p in checkpoint.spool(3).iterdir()) == [
        "aggregator.log",
        "worker-1.log",
    ]
    assert checkpoint.spooled(4) == []


def test_a_torn_last_record_is_ignored_then_cut_off_before_the_next_append(tmp_path):
    log = SpoolLog(tmp_path, "aggregator")
    for client, payload in UPDATES[:3]:
        log.append(client, payload)
    log.close()
    size = log.path.stat().st_size
    with open(log.path, "r+b") as f:  # a crash halfway through the third record's payload
        f.truncate(size - 50)
    assert read_spool(tmp_path) == UPDATES[:2]

    log.append(*UPDATES[3])  # reopens: the torn bytes go, the new record follows the second
    log.close()
    assert read_spool(tmp_path) == [UPDATES[0], UPDATES[1], UPDATES[3]]


def test_a_corrupt_record_stops_the_read_at_that_record(tmp_path):
    log = SpoolLog(tmp_path, "aggregator")
    for client, payload in UPDATES[:3]:
        log.append(client, payload)
    log.close()
    data = bytearray(log.path.read_bytes())
    second = HEADER.size + len(UPDATES[0][0]) + len(UPDATES[0][1])
    data[second + HEADER.size + 20] ^= 0xFF  # one flipped bit pattern inside the second record
    log.path.write_bytes(bytes(data))
    assert read_spool(tmp_path) == UPDATES[:1]


def test_a_full_disk_is_one_line_and_spools_nothing(tmp_path):
    checkpoint = Checkpoint(tmp_path)
    checkpoint.spool(1).mkdir(parents=True)
    os.symlink("/dev/full", checkpoint.spool(1) / "aggregator.log")
    with pytest.raises(StateDirError) as err:
        checkpoint.save_update(1, *UPDATES[0])
    assert str(err.value) == (
        f"cannot write an update of round 1 to the state directory {tmp_path} "
        "(No space left on device); stopped accepting updates: everything acknowledged so far "
        "is checkpointed there, and unacknowledged updates stay with the broker"
    )
    assert checkpoint.spooled(1) == []
