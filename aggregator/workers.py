"""Scale-out: N local aggregator worker processes behind an MQTT 5 shared subscription.

One aggregator process is GIL-bound (network loop, decode, validation, exact sums, spool
writes). `WorkerAggregator` is the round owner, as `AggregatorService` (manifest, adapter,
rounds, quorum and deadline, checkpoints, resume), but it takes no update itself: it starts N
worker processes (multiprocessing "spawn"). Worker i keeps its own persistent MQTT 5 session
`fedsb-aggregator-{job}-w{i}` on `$share/fedsb-{job}/fedsb/{job}/update/+`, so the broker deals
the updates out among the workers; each one validates and sums its share exactly
(`FederatedServer.submit`), appends it to its own spool log, acknowledges it after the write,
and tells the coordinator which clients it accepted (in batches, for the quorum).

At quorum or deadline the coordinator seals the round: every worker stops taking messages (the
next ones wait, unacknowledged) and hands over its `RoundPart`; the coordinator
merges the exact partial sums (bit-identical to one aggregator), commits the round and opens the
next one. A client accepted twice (by two workers, or a spooled update redelivered after a
crash) counts once: the round is then rebuilt from the spool, one update per client.

A stopped worker's session stays in the share group (7-day expiry) and keeps receiving updates,
so a restart starts at least as many workers as have served the state directory.

Requires a broker with MQTT 5 shared subscriptions (mosquitto). The workers talk to the
coordinator over multiprocessing pipes and share its state directory: one host. Workers on
several hosts (a shared state store, a network control channel) are future work.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch

from fedsb.config import JobConfig
from fedsb.errors import ConfigError, FedsbError
from fedsb.methods import get_method
from fedsb.mqtt import BrokerAddress, Message, MqttConnection, Topics, TransportError, packet_limit

from .server import FederatedServer, RoundPart
from .service import AggregatorService, Checkpoint, admit, aggregator_connection

log = logging.getLogger(__name__)

REPORT_BATCH = 32  # accepted client ids per report to the coordinator (or fewer when idle)
START_TIMEOUT_S = 180.0  # spawn, import torch, connect: slow on a busy machine
ANSWER_TIMEOUT_S = 120.0  # a sealed worker's partial sums
IDLE_WAIT_S = 0.01  # a worker with nothing to read checks for commands this often


def shared_updates(topics: Topics) -> str:
    """The workers' shared subscription: the broker hands each update to one of them."""
    return f"$share/fedsb-{topics.job}/{topics.update_all}"


def worker_client_id(job: str, index: int) -> str:
    return f"fedsb-aggregator-{job}-w{index}"


WORKERS_RECORD = "workers.json"  # in the state directory: how many workers have served it


def worker_count(state_dir: Path, requested: int) -> int:
    """The workers to start: at least as many as have ever served this state directory.

    A worker's persistent session stays in the share group after it stops, so the broker keeps
    dealing it updates; with fewer workers those would wait, unread, until the session expires.
    """
    record = state_dir / WORKERS_RECORD
    previous = int(json.loads(record.read_text())["workers"]) if record.exists() else 0
    if previous > requested:
        log.warning(
            "%s was served by %d workers, whose broker sessions receive their share of the "
            "updates: starting %d workers, not %d (a new state directory starts afresh)",
            state_dir,
            previous,
            previous,
            requested,
        )
    return max(requested, previous)


def record_worker_count(state_dir: Path, count: int) -> None:
    """Note that `count` worker sessions now exist on the broker for this state directory."""
    (state_dir / WORKERS_RECORD).write_text(json.dumps({"workers": count}) + "\n")


def peak_rss_kb() -> int:
    """This process's peak resident memory (VmHWM), in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker builds its server and connection from (sent to the spawned process)."""

    job: JobConfig
    method: str
    broadcast: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    address: BrokerAddress
    state_dir: str
    max_packet: int | None
    log_level: int


# ---------------------------------------------------------------- the worker process
#
# coordinator → worker: ("open", round, broadcast, selected) | ("seal", round) | ("stop",)
# worker → coordinator: ("ready",) | ("accepted", [client ids]) | ("error", one line)
#                       | ("sealed", RoundPart, peak RSS kB, CPU seconds spent serving so far)


class Worker:
    """One worker: takes its share of the updates, sums them exactly, spools and acks them."""

    def __init__(self, index: int, spec: WorkerSpec, pipe: Connection) -> None:
        self.pipe = pipe
        method = get_method(spec.method)
        # No adapter: only the coordinator publishes it; a worker validates and sums updates.
        self.server = FederatedServer(spec.job, method, {}, spec.broadcast, spec.shapes)
        self.topics = Topics(spec.job.name)
        self.checkpoint = Checkpoint(Path(spec.state_dir), writer=f"worker-{index}")
        self.connection = aggregator_connection(
            spec.address,
            worker_client_id(spec.job.name, index),
            [shared_updates(self.topics)],
            mqtt5=True,
            max_packet=spec.max_packet or packet_limit(spec.job.federation.max_update_bytes),
        )
        self.open = False
        self.selected: set[str] | None = None
        self.held: Message | None = None  # taken off the connection while the round was sealed
        self.unreported: list[str] = []
        self.cpu_start = 0.0

    def serve(self) -> None:
        """Take updates while a round is open, until told to stop or the coordinator is gone."""
        self.connection.start()
        try:
            self.held = self.connection.get(timeout_s=IDLE_WAIT_S)  # the SUBSCRIBE goes out
            self.pipe.send(("ready",))
            self.cpu_start = time.process_time()
            while self.obey():
                if self.open:
                    self.take_one()
                elif self.held is None:
                    self.held = self.connection.get(timeout_s=IDLE_WAIT_S)  # keeps the session up
                else:
                    self.pipe.poll(0.05)
        finally:
            self.connection.stop()
            self.checkpoint.close()

    def obey(self) -> bool:
        """Carry out the coordinator's commands; False: stop (asked to, or the coordinator died)."""
        try:
            while self.pipe.poll():
                command, *args = self.pipe.recv()
                if command == "stop":
                    return False
                if command == "open":
                    self.open_round(*args)
                elif command == "seal":
                    self.seal(*args)
        except (EOFError, OSError):  # the coordinator is gone: what is unacked stays queued
            return False
        return True

    def open_round(
        self, round_no: int, broadcast: dict[str, torch.Tensor], selected: set[str] | None
    ) -> None:
        self.server.restore(round_no, broadcast)
        self.selected = selected
        self.open = True

    def take_one(self) -> None:
        """Handle one message: validate and sum, spool, ack (in that order), then report."""
        msg, self.held = self.held, None
        if msg is None:
            msg = self.connection.get(timeout_s=0.002 if self.unreported else IDLE_WAIT_S)
        if msg is None:  # a pause in the stream: tell the coordinator now
            self.report()
            return
        client = None
        if msg.topic.startswith(self.topics.base + "/update/"):
            sender = self.topics.client_of(msg.topic)
            if admit(self.server, self.selected, sender, msg.payload):
                client = sender
                self.checkpoint.save_update(self.server.round, client, msg.payload)
        self.connection.ack(msg)
        if client is not None:
            self.unreported.append(client)
            if len(self.unreported) >= REPORT_BATCH:
                self.report()

    def report(self) -> None:
        if self.unreported:
            self.pipe.send(("accepted", self.unreported))
            self.unreported = []

    def seal(self, round_no: int) -> None:
        """Stop taking messages and hand over this worker's share of round `round_no`."""
        self.report()
        self.open = False
        self.checkpoint.close()  # the coordinator deletes the round's spool once committed
        part = self.server.part()
        self.server.rejections.clear()  # each rejection is handed over once
        if part.round != round_no:
            raise FedsbError(f"asked to seal round {round_no}, but round {part.round} is open")
        cpu_s = time.process_time() - self.cpu_start
        self.pipe.send(("sealed", part, peak_rss_kb(), cpu_s))


def worker_main(index: int, spec: WorkerSpec, pipe: Connection) -> None:
    """Entry of a worker process; errors go to the coordinator as one line (exit code 2)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the coordinator stops the workers
    logging.basicConfig(
        level=spec.log_level, format=f"%(levelname)s worker {index} %(name)s: %(message)s"
    )
    try:
        Worker(index, spec, pipe).serve()
    except FedsbError as err:
        try:
            pipe.send(("error", str(err)))
        except OSError:
            pass
        sys.exit(2)


# ---------------------------------------------------------------- the coordinator's side


class WorkerPool:
    """N worker processes and a pipe to each: start, open, collect reports, seal, stop."""

    def __init__(self, spec: WorkerSpec, count: int) -> None:
        self.spec = spec
        self.count = count
        self.processes: list[BaseProcess] = []
        self.pipes: list[Connection] = []
        self.accepted = [0] * count  # updates each worker has reported accepted
        self.peak_rss_kb = [0] * count  # as of each worker's last seal
        self.cpu_s = [0.0] * count  # CPU seconds each worker spent serving, as of its last seal

    @property
    def started(self) -> bool:
        return bool(self.processes)

    def start(self) -> None:
        """Spawn the workers and wait (bounded) until each one is connected to the broker."""
        context = mp.get_context("spawn")
        for i in range(self.count):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=worker_main, args=(i, self.spec, theirs), name=f"fedsb-worker-{i}"
            )
            process.daemon = True
            process.start()
            theirs.close()
            self.processes.append(process)
            self.pipes.append(ours)
        deadline = time.monotonic() + START_TIMEOUT_S
        for i in range(self.count):
            self.expect(i, "ready", deadline)
        log.info("%d aggregator workers connected", self.count)

    def open(
        self, round_no: int, broadcast: dict[str, torch.Tensor], selected: set[str] | None
    ) -> None:
        for i in range(self.count):
            self.send(i, ("open", round_no, broadcast, selected))

    def poll(self, timeout_s: float) -> list[str]:
        """Client ids the workers accepted since the last poll; raises if a worker died."""
        wait([*self.pipes, *(p.sentinel for p in self.processes)], timeout_s)
        ids: list[str] = []
        for i in range(self.count):
            while self.pipes[i].poll():
                ids += self.accepted_ids(i, self.receive(i))
            if not self.processes[i].is_alive():
                raise self.died(i)
        return ids

    def seal(self, round_no: int) -> list[RoundPart]:
        """Every worker's share of the round, once each has stopped taking messages."""
        for i in range(self.count):
            self.send(i, ("seal", round_no))
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        parts = []
        for i in range(self.count):
            _, part, self.peak_rss_kb[i], self.cpu_s[i] = self.expect(i, "sealed", deadline)
            parts.append(part)
        return parts

    def stop(self) -> None:
        """Ask every worker to stop; kill (by PID) one that does not within 10 s."""
        for i in range(len(self.processes)):
            try:
                self.send(i, ("stop",))
            except FedsbError:
                pass  # already gone
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)
        for pipe in self.pipes:
            pipe.close()
        self.processes, self.pipes = [], []

    def expect(self, index: int, kind: str, deadline: float) -> tuple[Any, ...]:
        """The next `kind` message of worker `index` (reports on the way are counted)."""
        pipe, process = self.pipes[index], self.processes[index]
        while True:
            ready = wait([pipe, process.sentinel], max(0.0, deadline - time.monotonic()))
            if pipe in ready:
                message = self.receive(index)
                if message[0] == kind:
                    return message
                self.accepted_ids(index, message)
            elif ready:
                raise self.died(index)
            else:
                raise FedsbError(f"aggregator worker {index} did not answer {kind!r} in time")

    def accepted_ids(self, index: int, message: tuple[Any, ...]) -> list[str]:
        if message[0] != "accepted":
            log.warning("unexpected message %r from aggregator worker %d", message[0], index)
            return []
        self.accepted[index] += len(message[1])
        return list(message[1])

    def receive(self, index: int) -> tuple[Any, ...]:
        try:
            message = self.pipes[index].recv()
        except (EOFError, OSError):
            raise self.died(index) from None
        if message[0] == "error":
            self.processes[index].join(5)
            raise FedsbError(f"aggregator worker {index} stopped: {message[1]}")
        return tuple(message)

    def send(self, index: int, message: tuple[Any, ...]) -> None:
        try:
            self.pipes[index].send(message)
        except OSError:
            raise self.died(index) from None

    def died(self, index: int) -> FedsbError:
        """The one-line reason the coordinator stops when a worker is gone."""
        process = self.processes[index]
        process.join(5)
        return FedsbError(
            f"aggregator worker {index} (pid {process.pid}) exited with code {process.exitcode}; "
            f"stopped: every update acknowledged so far is in {self.spec.state_dir}, the rest "
            "stays with the broker; run the same command again to resume"
        )


class WorkerAggregator(AggregatorService):
    """The round owner of a scaled-out aggregator: `AggregatorService` minus the update intake."""

    def __init__(
        self,
        job: JobConfig,
        server: FederatedServer,
        address: BrokerAddress,
        state_dir: str | Path,
        *,
        workers: int,
        max_packet: int | None = None,
        **options: Any,
    ) -> None:
        if workers < 2:
            raise ConfigError(f"a scaled-out aggregator needs at least 2 workers, got {workers}")
        self.accepted: set[str] = set()  # this round, as the workers report (for the quorum)
        self.duplicates_merged = 0  # clients accepted twice in a round, counted once
        options["mqtt5"] = True  # shared subscriptions are MQTT 5
        super().__init__(job, server, address, state_dir, max_packet=max_packet, **options)
        spec = WorkerSpec(
            job,
            server.method.name,
            server.broadcast,
            dict(server.rules.shapes),
            address,
            str(self.checkpoint.directory),
            max_packet,
            logging.getLogger().getEffectiveLevel(),
        )
        self.pool = WorkerPool(spec, worker_count(self.checkpoint.directory, workers))

    def client_name(self) -> str:
        return f"fedsb-aggregator-{self.job.name}-coordinator"

    def subscriptions(self, *, init: bool) -> list[str]:
        return [self.topics.init_reply_all] if init else []  # updates go to the workers

    def run(self, *, max_seconds: float = 24 * 3600) -> Path:
        self.check_mqtt5()
        try:
            return super().run(max_seconds=max_seconds)
        finally:
            self.pool.stop()

    def check_mqtt5(self) -> None:
        """Fail fast, in one line, on a broker without MQTT 5 (the embedded amqtt broker)."""
        probe = MqttConnection(
            self.pool.spec.address, f"{self.client_name()}-probe", [], mqtt5=True, clean_start=True
        )
        try:
            probe.start(timeout_s=10.0)
        except TransportError as err:
            raise ConfigError(
                f"--workers {self.pool.count} needs an MQTT 5 broker with shared subscriptions "
                "(mosquitto: `fedsb broker --mosquitto`; the embedded broker speaks MQTT 3.1.1 "
                f"only): {err}"
            ) from err
        probe.stop()

    def publish_job(self) -> None:
        self.pool.start()  # subscribed before any client learns of a round
        record_worker_count(self.checkpoint.directory, self.pool.count)
        super().publish_job()

    def publish_round(self, payload: bytes | None = None) -> None:
        super().publish_round(payload)
        self.accepted = set(self.server.pending)  # replayed from the spool on resume
        self.pool.open(self.server.round, self.server.broadcast, self.selected)

    def step(self) -> None:
        """Count the workers' reports, then close the round at quorum or deadline."""
        self.accepted.update(self.pool.poll(timeout_s=0.05))
        msg = self.connection.get(timeout_s=0.01)  # serves the session: PUBACKs, keepalive
        if msg is not None:
            self.connection.ack(msg)
        self.check_round(len(self.accepted))

    def close_round(self) -> None:
        self.merge(self.pool.seal(self.server.round))
        super().close_round()

    def merge(self, parts: list[RoundPart]) -> None:
        """Add the workers' exact partial sums; a client accepted twice counts once."""
        copies = Counter([*self.server.pending, *(c for part in parts for c in part.pending)])
        duplicates = sum(n - 1 for n in copies.values())
        if not duplicates:
            for part in parts:
                self.server.merge(part)
            return
        # The spool holds every accepted copy; `submit` keeps one per client (in client order).
        log.warning(
            "round %d: %d update(s) accepted twice (two workers, or redelivered after a crash); "
            "rebuilding the round from the spool",
            self.server.round,
            duplicates,
        )
        rejections = Counter(self.server.rejections)
        self.server.restore(self.server.round, self.server.broadcast)
        for client, payload in self.checkpoint.spooled(self.server.round):
            self.server.submit(client, payload)
        self.server.rejections = rejections
        for part in parts:
            self.server.merge_counts(part)
        self.server.rejections["duplicate"] += duplicates
        self.duplicates_merged += duplicates
