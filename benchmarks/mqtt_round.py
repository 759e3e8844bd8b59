"""How many Fed-SB updates per second the real MQTT aggregator takes, against the raw broker rate.

For each fleet size N (``--clients``), on a fresh mosquitto on 127.0.0.1 started from the
config `fedsb.aggregator.broker.write_mosquitto_config` generates:

1. **Raw ceiling.** A bare paho subscriber (own process, QoS 1, no decoding) on
   ``fedsb/{job}/update/+`` receives N update messages from the publishers below; rate =
   N / (first publish → last message received). Repeated ``--raw-reps`` times; the best run is
   the ceiling.
2. **Aggregator.** The real `AggregatorService` (own process, started with multiprocessing
   "spawn") serves a job of R rounds (``--rounds``) with quorum ``min_clients = N``. Its
   `FederatedServer` holds BERT-base-sized Fed-SB state: 48 R matrices of 16×16 float32 (query,
   key, value and attention-output of 12 layers, zeros) and an adapter of the same 48 modules
   with A 16×768 and B 768×16 (random; published once, chunked). The service checkpoints as
   shipped (each accepted update appended to the spool log, acknowledged once written; the round commit
   fsyncs). Rate per round = N / (first publish of the round → `on_round_closed`), so the close
   itself (exact sums, checkpoint) is included. Peak RSS is the process's own VmHWM; the
   largest backlog of its inbound queue is sampled (paho reads only when the loop takes the next update).
3. **Publishers.** ``--publishers`` paho connections (threads of this process, QoS 1, up to 100
   in flight each) each publish for N/P client ids: a client's update goes to its own topic
   ``fedsb/{job}/update/c00042``, so the aggregator sees N distinct clients over P TCP
   connections (N sockets would measure the kernel, not fedsb). Every update (48 random 16×16
   float32 blocks, `encode_client_update`, rank 16, 10 examples) is encoded before any timing.
   In the aggregator phase each publisher waits for the retained ``…/round`` message of round r,
   then publishes round r's N/P updates.

Bytes on the wire per update: the payload plus the MQTT 3.1.1 PUBLISH header (fixed header,
remaining-length varint, topic, packet id), computed exactly; the 4-byte PUBACK is not counted.

``--profile-clients K`` (0 = off) then runs one more job of K clients and 1 round with cProfile
enabled in the aggregator's main thread for that round, and reports where the time goes.

Quorum is N and every client sends once, so a round whose updates the broker drops can never
close: the run stops that round as soon as mosquitto logs "being dropped" (its default
`max_queued_messages` is 1000 per subscriber) and reports it incomplete, then reruns that size
with `max_queued_messages 0` appended to the generated config (``--no-rerun`` skips this).

Run:  .venv/bin/python benchmarks/mqtt_round.py [--clients 100 1000 2000] [--rounds 2]
Output: a table on stdout and benchmarks/results/mqtt_round.json. Timestamps are
time.monotonic() (CLOCK_MONOTONIC, shared by all processes of the machine). Every wait is
bounded; a phase that runs out of time is reported as incomplete, never hangs.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib.metadata
import io
import itertools
import json
import multiprocessing as mp
import os
import platform
import pstats
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import torch

from fedsb.aggregator.broker import free_port, start_mosquitto, write_mosquitto_config
from fedsb.aggregator.server import FederatedServer, RoundResult
from fedsb.aggregator.service import AggregatorService
from fedsb.aggregator.workers import WorkerAggregator
from fedsb.config import parse_config
from fedsb.methods import get_method
from fedsb.mqtt import Topics, parse_broker_url
from fedsb.protocol import UpdateMeta, encode_client_update, parse_round

RANK = 16
HIDDEN = 768
LAYERS = 12
MODULES = ("attention.self.query", "attention.self.key", "attention.self.value")
MODULES += ("attention.output.dense",)
MODULE_NAMES = [f"bert.encoder.layer.{i}.{m}" for i in range(LAYERS) for m in MODULES]
R_NAMES = [f"{m}.R" for m in MODULE_NAMES]
WAIT_CONNECT_S = 15.0
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "mqtt_round.json"


# ---------------------------------------------------------------- the job


def job_dict(name: str, clients: int, rounds: int) -> dict[str, Any]:
    """The job: N clients, quorum N, R rounds, rank 16, a deadline that never fires."""
    return {
        "name": name,
        "adapter": {"rank": RANK},
        "federation": {
            "method": "fedsb",
            "clients": clients,
            "min_clients": clients,
            "rounds": rounds,
            "round_timeout_s": 3600.0,
        },
    }


def build_server(job_raw: dict[str, Any]) -> FederatedServer:
    """A FederatedServer with BERT-base-sized Fed-SB state (48 R of 16×16, zeros)."""
    job = parse_config(job_raw)
    gen = torch.Generator().manual_seed(0)
    adapter: dict[str, torch.Tensor] = {}
    for module in MODULE_NAMES:
        adapter[f"{module}.A"] = torch.randn(RANK, HIDDEN, generator=gen) * 0.02
        adapter[f"{module}.B"] = torch.randn(HIDDEN, RANK, generator=gen) * 0.02
    broadcast = {name: torch.zeros(RANK, RANK) for name in R_NAMES}
    shapes = {name: (RANK, RANK) for name in R_NAMES}
    return FederatedServer(job, get_method("fedsb"), adapter, broadcast, shapes)


def client_id(index: int) -> str:
    return f"c{index:05d}"


def encode_updates(job: str, clients: int, rounds: int) -> list[list[tuple[str, bytes]]]:
    """[round][client] → (topic, payload), all encoded up front (random 16×16 blocks)."""
    topics = Topics(job)
    gen = torch.Generator().manual_seed(clients)
    out = []
    for round_no in range(rounds):
        batch = []
        for i in range(clients):
            state = {n: torch.randn(RANK, RANK, generator=gen) * 1e-3 for n in R_NAMES}
            meta = UpdateMeta(job, round_no, client_id(i), RANK, 10, 0.5)
            batch.append((topics.update(client_id(i)), encode_client_update(state, meta)))
        out.append(batch)
    return out


def publish_packet_bytes(topic: str, payload: bytes) -> int:
    """Exact size of an MQTT 3.1.1 QoS 1 PUBLISH: fixed header, varint length, topic, id, body."""
    remaining = 2 + len(topic.encode()) + 2 + len(payload)
    varint = next(n for n, limit in enumerate((128, 2**14, 2**21, 2**28), 1) if remaining < limit)
    return 1 + varint + remaining


# ---------------------------------------------------------------- aggregator process


def read_status_kb(field: str, pid: str = "self") -> int:
    """A `VmHWM`/`VmRSS` line of /proc/<pid>/status, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Stopped(Exception):
    """The parent asked the aggregator to stop (a round that cannot reach quorum)."""


def timed(fn: Any, totals: dict[str, float], key: str) -> Any:
    """`fn`, adding its wall time to totals[key]."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start

    return wrapper


class TimedService(AggregatorService):
    """The real service plus timestamps: when each round opens, and the inbound backlog."""

    def __init__(
        self, *args: Any, stop: Any, profile_round: int | None = None, **kwargs: Any
    ) -> None:
        self.stop = stop
        self.opened: list[float] = []
        self.opened_cpu: list[float] = []  # process CPU seconds (all threads) at each open
        self.max_backlog = 0
        self.profile_round = profile_round
        self.profiler = cProfile.Profile() if profile_round is not None else None
        super().__init__(*args, **kwargs)

    def publish_round(self, payload: bytes | None = None) -> None:
        super().publish_round(payload)
        self.opened.append(time.monotonic())
        self.opened_cpu.append(time.process_time())
        if self.profiler is not None and self.server.round == self.profile_round:
            self.profiler.enable()

    def step(self) -> None:
        if self.stop.is_set():
            raise Stopped("stopped by the benchmark")
        self.max_backlog = max(self.max_backlog, self.connection.messages.qsize())
        super().step()


class TimedWorkerAggregator(TimedService, WorkerAggregator):
    """`--workers N` > 1: the scaled-out coordinator with the same timestamps."""


def aggregator_main(
    url: str,
    job_raw: dict[str, Any],
    state_dir: str,
    result_path: str,
    max_seconds: float,
    profile_round: int | None,
    stop: Any,
    workers: int = 1,
) -> None:
    """Entry of the aggregator process: serve the job, write timings and memory as JSON.

    `stop` (set by the parent when a round cannot reach quorum) ends `run` between two
    messages with an exception, so the partial results are still written.
    """
    server = build_server(job_raw)
    baseline_kb = read_status_kb("VmRSS")
    closes: list[dict[str, Any]] = []
    service: TimedService | None = None
    seconds = {"submit": 0.0, "save_update": 0.0, "close_round": 0.0}

    def on_round_closed(result: RoundResult, payload: bytes) -> None:
        now = time.monotonic()
        if service is not None and service.profiler is not None:
            service.profiler.disable()
        closes.append(
            {
                "round": result.round,
                "t_close": now,
                "cpu_close": time.process_time(),
                "accepted": len(result.clients),
                "upload_bytes": sum(result.upload_bytes.values()),
                "rss_kb": read_status_kb("VmRSS"),
            }
        )

    service = (TimedWorkerAggregator if workers > 1 else TimedService)(
        parse_config(job_raw),
        server,
        parse_broker_url(url),
        state_dir,
        on_round_closed=on_round_closed,
        profile_round=profile_round,
        stop=stop,
        mqtt5=True,  # Receive Maximum: mosquitto holds the backlog, not the aggregator
        **({"workers": workers} if workers > 1 else {}),
    )
    # time the three things the service does per message, without a profiler's overhead
    server.submit = timed(server.submit, seconds, "submit")  # type: ignore[method-assign]
    service.checkpoint.save_update = timed(  # type: ignore[method-assign]
        service.checkpoint.save_update, seconds, "save_update"
    )
    service.close_round = timed(service.close_round, seconds, "close_round")  # type: ignore[method-assign]
    error = None
    try:
        service.run(max_seconds=max_seconds)
    except Exception as exc:  # reported to the parent, which marks the run incomplete
        error = f"{type(exc).__name__}: {exc}"
    if service.profiler is not None:
        service.profiler.disable()
        service.profiler.dump_stats(result_path + ".prof")
    result = {
        "opened": service.opened,
        "opened_cpu": service.opened_cpu,
        "closes": closes,
        "rejections": dict(server.rejections),
        "baseline_rss_kb": baseline_kb,
        "peak_rss_kb": read_status_kb("VmHWM"),
        "max_backlog": service.max_backlog,
        "seconds_in": seconds,
        "stopped_in_round": server.round,
        "pending_when_stopped": len(server.pending),
        "error": error,
    }
    if isinstance(service, WorkerAggregator):  # submit and spool writes happen in the workers
        result["worker_accepted"] = service.pool.accepted
        result["worker_peak_rss_kb"] = service.pool.peak_rss_kb
        result["worker_cpu_s"] = service.pool.cpu_s
    Path(result_path).write_text(json.dumps(result))


# ---------------------------------------------------------------- raw subscriber process


def raw_subscriber_main(
    host: str, port: int, topic: str, batch: int, ready: Any, stop: Any, out: Any, max_s: float
) -> None:
    """Entry of the bare subscriber: count messages; report (first, last, count) per burst.

    A burst ends with its `batch`-th message, or after 1 s without one (messages were lost).
    """
    lock = threading.Lock()
    burst = {"count": 0, "first": 0.0, "last": 0.0}

    def on_connect(client, userdata, flags, reason_code, properties):  # type: ignore[no-untyped-def]
        client.subscribe(topic, qos=1)

    def on_subscribe(client, userdata, mid, reason_codes, properties):  # type: ignore[no-untyped-def]
        ready.set()

    def on_message(client, userdata, msg):  # type: ignore[no-untyped-def]
        now = time.monotonic()
        with lock:
            if burst["count"] == 0:
                burst["first"] = now
            burst["count"] += 1
            burst["last"] = now

    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id="bench-raw-subscriber",
        clean_session=True,
        protocol=paho.MQTTv311,
    )
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect(host, port, keepalive=30)
    client.loop_start()
    end = time.monotonic() + max_s
    while not stop.wait(0.02) and time.monotonic() < end:
        with lock:
            full = burst["count"] >= batch
            idle = burst["count"] and time.monotonic() - burst["last"] > 1.0
            if full or idle:
                out.put((burst["first"], burst["last"], burst["count"]))
                burst["count"] = 0
    client.disconnect()
    client.loop_stop()


# ---------------------------------------------------------------- publishers (threads here)


class Publisher:
    """One paho connection that publishes the updates of many client ids (QoS 1)."""

    def __init__(self, index: int, host: str, port: int, job: str) -> None:
        self.topics = Topics(job)
        self.rounds: queue.Queue[dict[str, Any]] = queue.Queue()
        self.connected = threading.Event()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=f"bench-publisher-{index}",
            clean_session=True,
            protocol=paho.MQTTv311,
        )
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, msg: self.rounds.put(parse_round(msg.payload))
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(WAIT_CONNECT_S):
            self.close()
            raise RuntimeError(f"publisher {index} could not connect to {host}:{port}")

    def _on_connect(self, client, userdata, flags, reason_code, properties):  # type: ignore[no-untyped-def]
        client.subscribe(self.topics.round, qos=1)
        self.connected.set()

    def publish_all(self, batch: list[tuple[str, bytes]], deadline: float) -> tuple[float, float]:
        """Publish every message, wait for all PUBACKs; (start, all acked) or TimeoutError."""
        start = time.monotonic()
        infos = [self.client.publish(topic, payload, qos=1) for topic, payload in batch]
        for info in infos:
            info.wait_for_publish(timeout=max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise TimeoutError("PUBACKs did not all arrive in time")
        return start, time.monotonic()

    def wait_round(self, round_no: int, deadline: float, abort: threading.Event) -> None:
        """Block until the retained round message opens `round_no` (bounded, abortable)."""
        while True:
            if abort.is_set() or time.monotonic() > deadline:
                raise TimeoutError(f"round {round_no} did not open")
            try:
                body = self.rounds.get(timeout=0.1)
            except queue.Empty:
                continue
            if body.get("done"):
                raise RuntimeError(f"job finished before round {round_no} opened")
            if int(body["round"]) == round_no:
                return

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Threads:
    """One thread per callable; results are return values or the exceptions raised."""

    def __init__(self, targets: list[Any]) -> None:
        self.results: list[Any] = [TimeoutError("thread still running")] * len(targets)
        self.threads = [
            threading.Thread(target=self._wrap, args=(i, fn), daemon=True)
            for i, fn in enumerate(targets)
        ]
        for t in self.threads:
            t.start()

    def _wrap(self, index: int, fn: Any) -> None:
        try:
            self.results[index] = fn()
        except Exception as exc:  # collected, reported by the caller
            self.results[index] = exc

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def join(self, timeout_s: float) -> list[Any]:
        end = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        return list(self.results)


def shares(batch: list[tuple[str, bytes]], parts: int) -> list[list[tuple[str, bytes]]]:
    """Client ids dealt round-robin over the publishers."""
    return [batch[i::parts] for i in range(parts)]


# ---------------------------------------------------------------- the two phases


@contextlib.contextmanager
def mosquitto(max_queued: int | None = None) -> Iterator[tuple[str, Path]]:
    """A fresh mosquitto (generated config) in a directory its own user can enter.

    `max_queued` appends `max_queued_messages` to the generated config (0 = no limit): the
    setting the library does not write, tried here to show what it changes.
    """
    directory = Path(tempfile.mkdtemp(prefix="fedsb-bench-mqtt-"))
    directory.chmod(0o755)
    try:
        config = write_mosquitto_config(directory, port=free_port())
        if max_queued is not None:
            with open(config, "a", encoding="utf-8") as f:
                f.write(f"max_queued_messages {max_queued}\n")
        with start_mosquitto(config) as handle:
            yield handle.url, directory / "mosquitto.log"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def measure_raw(
    url: str, job: str, pubs: list[Publisher], batch: list[tuple[str, bytes]], reps: int
) -> list[dict[str, float]]:
    """Bare-subscriber rate for `reps` bursts of the same N messages."""
    ctx = mp.get_context("spawn")
    address = parse_broker_url(url)
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    args = (address.host, address.port, Topics(job).update_all, len(batch), ready, stop, out, 600)
    proc = ctx.Process(target=raw_subscriber_main, args=args, name="raw-subscriber")
    proc.start()
    runs = []
    try:
        if not ready.wait(60):
            raise RuntimeError("raw subscriber did not subscribe in time")
        for _ in range(reps):
            deadline = time.monotonic() + 120
            parts = shares(batch, len(pubs))
            done = Threads(
                [
                    lambda p=p, s=s, d=deadline: p.publish_all(s, d)
                    for p, s in zip(pubs, parts, strict=True)
                ]
            ).join(125)
            for r in done:
                if isinstance(r, BaseException):
                    raise r
            first_recv, last_recv, count = out.get(timeout=max(1.0, deadline - time.monotonic()))
            first_pub = min(start for start, _ in done)
            runs.append(
                {
                    "received": count,
                    "msgs_per_s": count / (last_recv - first_pub),
                    "msgs_per_s_first_to_last_received": (count - 1)
                    / max(1e-9, last_recv - first_recv),
                    "seconds": last_recv - first_pub,
                    "publish_seconds": max(end for _, end in done) - first_pub,
                }
            )
    finally:
        stop.set()
        proc.join(15)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    return runs


def measure_aggregator(
    url: str,
    log_file: Path,
    job_raw: dict[str, Any],
    pubs: list[Publisher],
    updates: list[list[tuple[str, bytes]]],
    *,
    max_round_s: float,
    profile_round: int | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Serve the job in a spawned process while the publishers play the fleet.

    A round that cannot reach quorum is cut short: as soon as mosquitto logs that it dropped
    messages (every client sends once, so quorum N is then out of reach), the aggregator dies,
    or a round does not open within `max_round_s`.
    """
    ctx = mp.get_context("spawn")
    rounds, n = len(updates), len(updates[0])
    work = Path(tempfile.mkdtemp(prefix="fedsb-bench-agg-"))
    result_path = work / "result.json"
    max_seconds = 30 + rounds * max_round_s
    stop = ctx.Event()
    state = str(work / "state")
    args = (url, job_raw, state, str(result_path), max_seconds, profile_round, stop, workers)
    proc = ctx.Process(target=aggregator_main, args=args, name="aggregator")
    abort = threading.Event()

    def fleet(pub: Publisher, index: int) -> list[tuple[float, float]]:
        times = []
        for r in range(rounds):
            deadline = time.monotonic() + max_round_s + (60 if r == 0 else 0)  # r 0: startup
            pub.wait_round(r, deadline, abort)
            times.append(pub.publish_all(shares(updates[r], len(pubs))[index], deadline))
        return times

    stop_reason = None
    drops_before = dropped_lines(log_file)  # the raw phase may have hit the limit already
    try:
        proc.start()
        threads = Threads([lambda p=p, i=i: fleet(p, i) for i, p in enumerate(pubs)])
        end = time.monotonic() + max_seconds + 60
        while (threads.alive() or proc.is_alive()) and time.monotonic() < end:
            if dropped_lines(log_file) > drops_before:
                stop_reason = "broker dropped messages (max_queued_messages)"
            elif not proc.is_alive():
                stop_reason = f"aggregator exited with code {proc.exitcode} before the fleet"
            elif not threads.alive() and any(isinstance(r, BaseException) for r in threads.results):
                stop_reason = "the fleet gave up waiting for a round"
            if stop_reason:
                break
            time.sleep(0.2)
        abort.set()
        fleet_times = threads.join(5)
        stop.set()  # the aggregator stops between messages and writes its partial results
        proc.join(15)
        agg = json.loads(result_path.read_text()) if result_path.exists() else {}
        profile = str(result_path) + ".prof"
        if Path(profile).exists():
            agg["profile"] = pstats.Stats(profile)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        shutil.rmtree(work, ignore_errors=True)
    errors = [stop_reason] if stop_reason else []
    errors += [repr(t) for t in fleet_times if isinstance(t, BaseException)]
    if agg.get("error"):
        errors.append(agg["error"])
    per_round = []
    for r, close in enumerate(agg.get("closes", [])):
        ok = [t[r] for t in fleet_times if not isinstance(t, BaseException) and len(t) > r]
        if len(ok) != len(pubs):
            break
        first_pub = min(start for start, _ in ok)
        seconds = close["t_close"] - first_pub
        per_round.append(
            {
                "round": r,
                "accepted": close["accepted"],
                "updates_per_s": n / seconds,
                "seconds": seconds,
                "open_to_close_s": close["t_close"] - agg["opened"][r],
                "aggregator_cpu_ms_per_update": 1e3
                * (close["cpu_close"] - agg["opened_cpu"][r])
                / max(1, close["accepted"]),
                "fleet_publish_s": max(end for _, end in ok) - first_pub,
                "rss_mb_at_close": close["rss_kb"] / 1024,
            }
        )
    closed = sum(c["accepted"] for c in agg.get("closes", []))
    handled = max(1, closed + (agg.get("pending_when_stopped") or 0))
    return {
        "per_round": per_round,
        "complete": len(per_round) == rounds and not errors,
        "errors": errors,
        "stopped_in_round": agg.get("stopped_in_round") if errors else None,
        "accepted_in_stopped_round": agg.get("pending_when_stopped") if errors else None,
        "rejections": agg.get("rejections", {}),
        "ms_per_update": {
            "submit (decode, validate, RoundSum.add)": 1e3
            * agg.get("seconds_in", {}).get("submit", 0)
            / handled,
            "checkpoint save_update (spool log append, no fsync)": 1e3
            * agg.get("seconds_in", {}).get("save_update", 0)
            / handled,
            "close_round (amortised)": 1e3
            * agg.get("seconds_in", {}).get("close_round", 0)
            / handled,
        },
        "baseline_rss_mb": agg.get("baseline_rss_kb", 0) / 1024,
        "peak_rss_mb": agg.get("peak_rss_kb", 0) / 1024,
        "max_inbound_backlog": agg.get("max_backlog"),
        "worker_accepted": agg.get("worker_accepted"),
        "worker_peak_rss_mb": [kb / 1024 for kb in agg.get("worker_peak_rss_kb", [])],
        "worker_cpu_ms_per_update": (  # all rounds, all workers: the work behind the sums
            1e3 * sum(agg["worker_cpu_s"]) / max(1, sum(agg["worker_accepted"]))
            if agg.get("worker_cpu_s")
            else None
        ),
        "profile": agg.get("profile"),
    }


def dropped_lines(log_file: Path) -> int:
    """mosquitto's 'Outgoing messages are being dropped' warnings (a queue limit was hit)."""
    with contextlib.suppress(OSError):
        return log_file.read_text(errors="replace").count("being dropped")
    return 0


def run_size(
    clients: int,
    rounds: int,
    publishers: int,
    raw_reps: int,
    max_round_s: float,
    *,
    max_queued: int | None = None,
    profile: bool = False,
    workers: int = 1,
) -> dict[str, Any]:
    """Raw ceiling and aggregator (`workers` processes) for one fleet size, on a fresh broker."""
    job = f"bench{'-profile' if profile else ''}-{clients}"
    t0 = time.monotonic()
    updates = encode_updates(job, clients, rounds)
    encode_s = time.monotonic() - t0
    topic, payload = updates[0][0]
    with mosquitto(max_queued) as (url, log_file):
        address = parse_broker_url(url)
        pubs = [Publisher(i, address.host, address.port, job) for i in range(publishers)]
        try:
            raw = measure_raw(url, job, pubs, updates[0], raw_reps) if raw_reps else []
            raw_drops = dropped_lines(log_file)
            agg = measure_aggregator(
                url,
                log_file,
                job_dict(job, clients, rounds),
                pubs,
                updates,
                max_round_s=max_round_s,
                profile_round=0 if profile else None,
                workers=workers,
            )
        finally:
            for pub in pubs:
                pub.close()
        agg["broker_dropped_warnings"] = dropped_lines(log_file) - raw_drops
    rounds_done = agg["per_round"]
    agg_rate = (
        clients * len(rounds_done) / sum(r["seconds"] for r in rounds_done) if rounds_done else 0.0
    )
    raw_full = [r for r in raw if r["received"] == clients]  # a lossy burst is no ceiling
    raw_best = max((r["msgs_per_s"] for r in raw_full), default=0.0)
    return {
        "clients": clients,
        "workers": workers,
        "rounds": rounds,
        "publishers": publishers,
        "broker_max_queued_messages": "fedsb config (100000)" if max_queued is None else max_queued,
        "encode_seconds": encode_s,
        "payload_bytes": len(payload),
        "wire_bytes_per_update": publish_packet_bytes(topic, payload),
        "aggregator_updates_per_s": agg_rate,
        "round_seconds_mean": (
            sum(r["seconds"] for r in rounds_done) / len(rounds_done) if rounds_done else None
        ),
        "raw_msgs_per_s": raw_best,
        "raw_runs": raw,
        "raw_broker_dropped_warnings": raw_drops,
        "ratio_aggregator_to_raw": agg_rate / raw_best if raw_best else None,
        "rejections": sum(agg["rejections"].values()),
        "aggregator": agg,
    }


# ---------------------------------------------------------------- profile summary

# (label, file suffix, function name): cumulative time of these in the profiled round
PROFILE_POINTS = [
    ("AggregatorService.step (whole loop)", "aggregator/service.py", "step"),
    ("  MqttConnection.get (paho's loop: read the socket, parse)", "sdk/mqtt.py", "get"),
    ("  FederatedServer.submit", "aggregator/server.py", "submit"),
    ("    validate_update (decode + checks)", "sdk/protocol.py", "validate_update"),
    ("      wire.decode_update_views", "sdk/wire.py", "decode_update_views"),
    ("    RoundSum.add (exact sums)", "sdk/aggregate.py", "add"),
    ("      ExactSum.add_block (int64 bins)", "sdk/accumulate.py", "add_block"),
    ("  AggregatorService.keep (spool append, then ack)", "aggregator/service.py", "keep"),
    ("    os.fsync", "~", "<built-in method posix.fsync>"),
    ("  AggregatorService.close_round", "aggregator/service.py", "close_round"),
]


def summarize_profile(stats: pstats.Stats, updates: int, top: int = 15) -> dict[str, Any]:
    """Cumulative seconds (and ms per update) at the points above, plus the top tottime rows."""
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    points = []
    for label, suffix, name in PROFILE_POINTS:
        cum, calls = 0.0, 0
        for (filename, _line, func), (_cc, nc, _tt, ct, _callers) in raw.items():
            if func == name and (filename == suffix or filename.endswith(suffix)):
                cum, calls = cum + ct, calls + nc
        points.append(
            {"what": label, "seconds": cum, "ms_per_update": 1e3 * cum / updates, "calls": calls}
        )
    text = io.StringIO()
    stats.stream = text  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    rows = [line for line in text.getvalue().splitlines() if line.strip()]
    start = next((i for i, line in enumerate(rows) if line.lstrip().startswith("ncalls")), 0)
    return {"points": points, "top_tottime": rows[start : start + top + 1]}


# ---------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mosq = subprocess.run(
        ["/usr/sbin/mosquitto", "-h"], capture_output=True, text=True, timeout=10
    ).stdout.splitlines()
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "paho_mqtt": importlib.metadata.version("paho-mqtt"),
        "mosquitto": mosq[0] if mosq else "",
    }


def print_table(sizes: list[dict[str, Any]]) -> None:
    head = (
        f"{'clients':>7} {'workers':>7} {'broker queue':>12} {'agg upd/s':>9} {'round s':>8} {'raw msg/s':>9} "
        f"{'agg/raw':>7} {'peak RSS MB':>11} {'backlog':>7} {'submit ms':>9} {'ckpt ms':>7} "
        f"{'wire B/upd':>10} {'rejected':>8}  complete"
    )
    print(head)
    print("-" * len(head))
    for s in sizes:
        agg = s["aggregator"]
        ms = list(agg["ms_per_update"].values())
        queue_limit = s["broker_max_queued_messages"]
        raw = f"{s['raw_msgs_per_s']:.0f}" if s["raw_msgs_per_s"] else "lossy"
        done = "yes"
        if not agg["complete"]:
            accepted = f"{agg['accepted_in_stopped_round']}/{s['clients']}"
            done = f"NO, {accepted} in round {agg['stopped_in_round']}: {agg['errors'][0]}"
        print(
            f"{s['clients']:>7} {s.get('workers', 1):>7} {'fedsb' if isinstance(queue_limit, str) else queue_limit or 'none':>12} "
            f"{s['aggregator_updates_per_s']:>9.0f} {s['round_seconds_mean'] or float('nan'):>8.2f} "
            f"{raw:>9} {(s['ratio_aggregator_to_raw'] or 0) * 100:>6.1f}% "
            f"{agg['peak_rss_mb']:>11.1f} {agg['max_inbound_backlog'] or 0:>7} "
            f"{ms[0]:>9.2f} {ms[1]:>7.2f} {s['wire_bytes_per_update']:>10,} "
            f"{s['rejections']:>8}  {done}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 2000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--publishers", type=int, default=4, help="publisher connections")
    parser.add_argument("--raw-reps", type=int, default=3, help="raw-ceiling bursts per size")
    parser.add_argument("--max-round-s", type=float, default=90.0, help="give up on a round")
    parser.add_argument("--profile-clients", type=int, default=1000, help="0: no profile run")
    parser.add_argument(
        "--max-queued-messages",
        type=int,
        default=None,
        help="append max_queued_messages to the generated mosquitto config (0: no limit)",
    )
    parser.add_argument(
        "--no-rerun",
        action="store_true",
        help="do not rerun a size with max_queued_messages 0 when the broker dropped messages",
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1],
        help="aggregator worker processes (> 1: scaled out behind a shared subscription); "
        "each size runs once per value",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    started = time.monotonic()
    sizes = []
    for n, workers in itertools.product(args.clients, args.workers):
        print(f"… {n} clients, {workers} aggregator worker(s)", flush=True)
        common = (n, args.rounds, args.publishers, args.raw_reps, args.max_round_s)
        sizes.append(run_size(*common, max_queued=args.max_queued_messages, workers=workers))
        last = sizes[-1]
        dropped = (
            last["aggregator"]["broker_dropped_warnings"] + last["raw_broker_dropped_warnings"]
        )
        if dropped and args.max_queued_messages is None and not args.no_rerun:
            print(f"… {n} clients again: the broker dropped messages; max_queued_messages 0")
            sizes.append(run_size(*common, max_queued=0, workers=workers))
    for size in sizes:
        size["aggregator"].pop("profile", None)
    profile = None
    if args.profile_clients:
        n = args.profile_clients
        print(f"… profile run: {n} clients, 1 round, cProfile in the aggregator", flush=True)
        run = run_size(
            n,
            1,
            args.publishers,
            0,
            args.max_round_s,
            max_queued=args.max_queued_messages,
            profile=True,
        )
        stats = run["aggregator"].pop("profile")
        profile = {
            "clients": n,
            "round_seconds_under_profiler": run["round_seconds_mean"],
            "updates_per_s_under_profiler": run["aggregator_updates_per_s"],
            "rejections": run["rejections"],
            **(summarize_profile(stats, n) if stats else {"error": run["aggregator"]["errors"]}),
        }

    complete = [s for s in sizes if s["aggregator"]["complete"]]
    # memory targets: the single process (a worker run's main process holds no sums)
    rss = [s["aggregator"]["peak_rss_mb"] for s in complete if s.get("workers", 1) == 1]
    report = {
        "benchmark": "mqtt_round",
        "command": ".venv/bin/python benchmarks/mqtt_round.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "setup": {
            "state": "48 Fed-SB R blocks of 16x16 float32 (BERT-base q/k/v/attn-out, 12 layers)",
            "adapter": "48 x (A 16x768 + B 768x16) float32, published once in 1 MiB chunks",
            "broker": "fresh mosquitto per size, config from write_mosquitto_config (127.0.0.1)",
            "publishers": f"{args.publishers} paho connections (threads), QoS 1, 100 in flight",
            "rate_definition": "N / (first publish of the round -> on_round_closed), mean of rounds",
            "raw_definition": "N / (first publish -> last message at a bare paho subscriber), best",
            "flow_control": "aggregator: paho's loop runs in the aggregator's own thread and "
            "reads the socket only when it takes the next update, so the backlog stays with the "
            "broker (MQTT 5 Receive Maximum 256 also requested)",
        },
        "sizes": sizes,
        "targets": {
            "evaluated_on": [
                f"{s['clients']} clients, queue {s['broker_max_queued_messages']}" for s in complete
            ],
            "all_sizes_complete": len({s["clients"] for s in complete}) == len(args.clients),
            "aggregator_at_least_60pct_of_raw": bool(complete)
            and all((s["ratio_aggregator_to_raw"] or 0) >= 0.6 for s in complete),
            "peak_rss_flat_within_10pct": bool(rss) and max(rss) <= 1.1 * min(rss),
            "peak_rss_below_300mb": bool(rss) and max(rss) < 300,
        },
        "profile": profile,
        "wall_seconds": time.monotonic() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print()
    print_table(sizes)
    if profile and "points" in profile:
        print(f"\nprofile of one {profile['clients']}-client round (cProfile, aggregator thread):")
        for p in profile["points"]:
            print(f"  {p['what']:<48} {p['seconds']:8.2f} s {p['ms_per_update']:8.3f} ms/update")
    print(f"\ntargets: {report['targets']}")
    print(f"wrote {args.out} ({report['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
