"""Scenario 5: 10,000 hostile messages on the update topics while an honest federation runs.

The aggregator must not crash, its memory must stay bounded, every hostile message must be
rejected and counted with the reason the validation gives it in process, and the honest
clients' global state must come out exactly as without the attack.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

import pytest

from fedsb.config import parse_config
from fedsb.mqtt import MqttConnection, Topics, parse_broker_url
from fedsb.synthetic import synthetic_job_dict

from .harness import (
    Aggregators,
    assert_same_state,
    light_fleet,
    mosquitto,
    payloads,
    reference_global,
)
from .hostile import KINDS, Hostile

pytestmark = pytest.mark.chaos
HOSTILE = 10_000
CLIENTS = 20
MEMORY_GROWTH_LIMIT_KB = 100 * 1024  # measured growth: 58 MB (5 messages of 4 MiB among them)


def expected_rejections(job: dict, messages: list[tuple[str, bytes, str]]) -> Counter[str]:
    """The reasons the aggregator's validation gives each message, checked in process."""
    from fedsb.aggregator.synthetic import synthetic_server

    server = synthetic_server(parse_config(job))
    logging.disable(logging.WARNING)  # one warning per rejection: 10,000 lines
    try:
        outcomes = {(kind, server.submit(client, payload)) for client, payload, kind in messages}
    finally:
        logging.disable(logging.NOTSET)
    assert {kind for kind, reason in outcomes if reason is None} == set()  # none accepted
    assert {kind for kind, _ in outcomes} == set(KINDS)
    return server.rejections


def test_hostile_flood_is_rejected_and_honest_result_exact(tmp_path, broker_dir):
    job = synthetic_job_dict("fuzz", clients=CLIENTS, rounds=3)
    messages = list(Hostile(parse_config(job), seed=8).messages(HOSTILE))
    expected = expected_rejections(job, messages)
    assert sum(expected.values()) == HOSTILE
    everyone = list(range(CLIENTS))

    with mosquitto(broker_dir) as url, light_fleet(url, job, connections=2) as fleet:
        aggs = Aggregators(job, url, tmp_path)
        attacker = MqttConnection(parse_broker_url(url), "attacker", [], clean_start=True)
        topics = Topics(job["name"])

        def attack() -> None:
            for client, payload, _ in messages:
                attacker.publish(topics.update(client), payload, wait_s=None)
            attacker.client.publish(topics.update("fuzz-end"), b"end", qos=1).wait_for_publish(60)

        try:
            agg = aggs.start()
            attacker.start()
            fleet.wait_round(0)
            flood = threading.Thread(target=attack, daemon=True)
            flood.start()
            fleet.publish(payloads(job, 0, everyone[:-1]))  # concurrently with the flood
            fleet.wait_acked()
            flood.join(120)
            assert not flood.is_alive()
            # the flood is queued before the update that completes round 0: the aggregator
            # judges all of it in round 0, as `expected_rejections` does
            fleet.publish(payloads(job, 0, everyone[-1:]))
            for round_no in (1, 2):
                fleet.wait_round(round_no)
                fleet.publish(payloads(job, round_no, everyone))
                fleet.wait_acked()
            assert agg.wait() == 0, agg.stderr()
        finally:
            attacker.stop()
            aggs.close()

    report = aggs.report()
    assert [r["clients"] for r in report["rounds"]] == [CLIENTS] * 3
    expected["malformed"] += 1  # the attacker's "end" marker
    assert report["rejections"] == dict(expected)
    growth = report["peak_rss_kb"] - report["start_rss_kb"]
    print(f"aggregator RSS {report['start_rss_kb']} kB at start, peak {report['peak_rss_kb']} kB")
    assert growth < MEMORY_GROWTH_LIMIT_KB
    assert_same_state(aggs.final_global(), reference_global(job, [everyone] * 3))
