"""The aggregator service: runs a job's rounds over MQTT, with checkpoints and resume.

It publishes the manifest, the adapter (chunked) and each round's global state as retained
messages, takes updates from `…/update/+`, closes a round at quorum or deadline, and
checkpoints to its state directory after every accepted update (one spooled file) and every
closed round (the global state), so a killed aggregator resumes where it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from fedsb.config import JobConfig, config_to_dict
from fedsb.errors import FedsbError, StateDirError
from fedsb.mqtt import BrokerAddress, Message, MqttConnection, Topics, packet_limit
from fedsb.protocol import round_message, split_into_chunks
from fedsb.selection import default_client_ids, sample_clients

from .init_phase import InitPhase
from .init_service import InitService
from .server import FederatedServer, RoundResult
from .spool import SpoolLog, read_spool

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
RECEIVE_MAXIMUM = 256  # unacknowledged updates the broker may push to the aggregator at once
SESSION_EXPIRY_S = 7 * 24 * 3600  # MQTT 5: how long the broker queues for a stopped aggregator


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write a temporary file, then rename it: readers see the old or the new file only.

    `durable` also fsyncs (survives power loss); without it the write survives a killed
    process, which is what per-update spooling needs at thousands of updates per second.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Checkpoint:
    """The state directory: global state per closed round, spooled updates of the open round."""

    directory: Path
    writer: str = "aggregator"  # this process's spool log name (scale-out workers differ)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log: SpoolLog | None = None

    def spool(self, round_no: int) -> Path:
        return self.directory / "spool" / f"round-{round_no:05d}"

    def save_update(self, round_no: int, client: str, payload: bytes) -> None:
        """Spool one accepted update: appended to this writer's log of the round."""
        folder = self.spool(round_no)
        if self.log is None or self.log.path.parent != folder:
            self.close()
            self.log = SpoolLog(folder, self.writer)
        try:
            self.log.append(client, payload)
        except OSError as err:
            raise self.unwritable(err, f"an update of round {round_no}") from err

    def close(self) -> None:
        """Close the open spool log (reopened, and a torn tail cut off, on the next write)."""
        if self.log is not None:
            self.log.close()
            self.log = None

    def unwritable(self, err: OSError, what: str) -> StateDirError:
        """The one-line reason the aggregator stops: nothing it acknowledged is lost."""
        return StateDirError(
            f"cannot write {what} to the state directory {self.directory} ({err.strerror}); "
            "stopped accepting updates: everything acknowledged so far is checkpointed there, "
            "and unacknowledged updates stay with the broker"
        )

    def spooled(self, round_no: int) -> list[tuple[str, bytes]]:
        """(client, payload) of every accepted update of the round, in client order."""
        return sorted(read_spool(self.spool(round_no)))

    def save_round(
        self, round_no: int, broadcast: dict[str, torch.Tensor], extra: dict[str, Any]
    ) -> None:
        """Commit a closed round: the global tensors first, then the JSON that points at them."""
        name = f"global-{round_no:05d}.safetensors"
        try:
            tensors = save({k: v.contiguous() for k, v in broadcast.items()})
            write_atomic(self.directory / name, tensors)
            write_atomic(
                self.directory / STATE_FILE,
                json.dumps({"round": round_no, "global": name} | extra).encode(),
            )
        except OSError as err:
            raise self.unwritable(err, f"the global state of round {round_no}") from err
        for old in sorted(self.directory.glob("global-*.safetensors"))[:-2]:
            old.unlink()
        self.close()
        shutil.rmtree(self.spool(round_no - 1), ignore_errors=True)  # now folded into the global

    def load(self) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
        """The last committed round, or None for a fresh directory."""
        path = self.directory / STATE_FILE
        if not path.exists():
            return None
        state = json.loads(path.read_text())
        return int(state["round"]), load_file(str(self.directory / state["global"])), state


def aggregator_connection(
    address: BrokerAddress,
    client_id: str,
    subscriptions: list[str],
    *,
    mqtt5: bool,
    max_packet: int | None = None,
) -> MqttConnection:
    """The aggregator's persistent session (manual acks, flow control); scale-out workers too."""
    return MqttConnection(
        address,
        client_id,
        subscriptions,
        manual_ack=True,
        # Flow control: paho's loop runs in this thread and reads the socket only when the
        # next update is wanted, so the backlog stays with the broker and memory stays flat
        # however many clients report. MQTT 5 (mosquitto; amqtt speaks 3.1.1 only) also asks
        # for a Receive Maximum and logs reason codes.
        mqtt5=mqtt5,
        receive_maximum=RECEIVE_MAXIMUM if mqtt5 else None,
        session_expiry_s=SESSION_EXPIRY_S if mqtt5 else None,
        network_thread=False,
        **({"max_packet": max_packet} if max_packet else {}),
    )


def admit(server: FederatedServer, selected: set[str] | None, client: str, payload: bytes) -> bool:
    """Validate and sum one update of the open round; False when it is rejected (and counted)."""
    if selected is not None and client not in selected:
        server.rejections["not-selected"] += 1
        log.warning("rejected update from %s: not selected for round %d", client, server.round)
        return False
    return server.submit(client, payload) is None


class AggregatorService:
    """One job's aggregator over a broker."""

    def __init__(
        self,
        job: JobConfig,
        server: FederatedServer,
        address: BrokerAddress,
        state_dir: str | Path,
        *,
        on_round_closed: Callable[[RoundResult, bytes], None] | None = None,
        max_packet: int | None = None,
        mqtt5: bool = False,
        init_phase: InitPhase | None = None,
        on_init_done: Callable[[dict[str, Any]], None] | None = None,
        roster: list[str] | None = None,
    ) -> None:
        self.job = job
        self.server = server
        self.roster = roster or default_client_ids(job)  # who `clients_per_round` samples from
        self.selected: set[str] | None = None  # this round's sample (None: everyone)
        self.topics = Topics(job.name)
        self.checkpoint = Checkpoint(Path(state_dir))
        self.on_round_closed = on_round_closed
        fed = job.federation
        self.quorum = fed.min_clients or fed.clients_per_round or fed.clients
        self.timeout_s = fed.round_timeout_s
        self.connection = aggregator_connection(
            address,
            self.client_name(),
            self.subscriptions(init=init_phase is not None),
            mqtt5=mqtt5,
            max_packet=max_packet or packet_limit(job.federation.max_update_bytes),
        )
        self.deadline = 0.0
        self.on_init_done = on_init_done
        self.init = None
        if init_phase is not None:  # federated init: a phase before round 1 (or its checkpoint)
            self.init = InitService(
                init_phase, server, self.connection, self.checkpoint.directory, self.timeout_s
            )
            self.init.load()
        self.resume()

    def resume(self) -> None:
        """Load the last closed round and replay the spooled updates of the open one."""
        saved = self.checkpoint.load()
        round_no = 0
        if saved is not None:
            round_no, broadcast, _ = saved
            self.server.restore(round_no, broadcast)
        for client, payload in self.checkpoint.spooled(round_no):
            self.server.submit(client, payload)
        log.info("resumed at round %d with %d spooled updates", round_no, len(self.server.pending))

    def run(self, *, max_seconds: float = 24 * 3600) -> Path:
        """Serve the job until its last round closes; return the state directory."""
        self.connection.start()
        try:
            stop_at = time.monotonic() + max_seconds
            if self.init is not None:
                traffic = self.init.run(stop_at)
                if self.on_init_done:
                    self.on_init_done(traffic)
            self.publish_job()
            self.publish_round()
            while self.server.round < self.job.federation.rounds:
                if time.monotonic() > stop_at:
                    raise FedsbError(f"job did not finish within {max_seconds:.0f} s")
                self.step()
            self.connection.publish(
                self.topics.round, round_message(self.server.round, done=True), retain=True
            )
        finally:
            self.connection.stop()
            self.checkpoint.close()
        return self.checkpoint.directory

    def client_name(self) -> str:
        """The MQTT client id of this process (its persistent session on the broker)."""
        return f"fedsb-aggregator-{self.job.name}"

    def subscriptions(self, *, init: bool) -> list[str]:
        """What this process takes from the broker: every update (and init replies)."""
        return [self.topics.update_all] + ([self.topics.init_reply_all] if init else [])

    def step(self) -> None:
        """Handle at most one message, then close the round if quorum or deadline is reached."""
        msg = self.connection.get(timeout_s=0.2)
        if msg is not None and msg.topic.startswith(self.topics.base + "/update/"):
            client = self.topics.client_of(msg.topic)
            round_no = self.server.round
            accepted = client if admit(self.server, self.selected, client, msg.payload) else None
            self.keep(msg, round_no, accepted)
        elif msg is not None:
            self.keep(msg, self.server.round, None)
        self.check_round(len(self.server.pending))

    def check_round(self, accepted: int) -> None:
        """Close the round at quorum, or at the deadline once at least one update was accepted."""
        quorum = accepted >= self.quorum
        late = time.monotonic() > self.deadline
        if quorum or (late and accepted):
            self.close_round()
        elif late:
            log.warning(
                "round %d: deadline passed with no update; waiting longer", self.server.round
            )
            self.deadline = time.monotonic() + self.timeout_s

    def keep(self, msg: Message, round_no: int, client: str | None) -> None:
        """Spool an accepted update (client given), then ack: a crash loses nothing acked."""
        if client is not None:
            self.checkpoint.save_update(round_no, client, msg.payload)
        self.connection.ack(msg)

    def close_round(self) -> None:
        result = self.server.close_round()
        self.checkpoint.save_round(
            self.server.round, self.server.broadcast, {"rejections": dict(self.server.rejections)}
        )
        payload = self.server.global_payload()
        if self.on_round_closed:
            self.on_round_closed(result, payload)
        if self.server.round < self.job.federation.rounds:
            self.publish_round(payload)

    def publish_job(self) -> None:
        """Manifest and adapter chunks, retained: late and restarted clients find them."""
        adapter = self.server.adapter_payload()
        chunks = split_into_chunks(adapter)
        manifest = {
            "job": self.job.name,
            "method": self.job.federation.method,
            "rounds": self.job.federation.rounds,
            "adapter_chunks": len(chunks),
            "adapter_sha256": hashlib.sha256(adapter).hexdigest(),
            "config": config_to_dict(self.job),
        }
        for i, chunk in enumerate(chunks):
            self.connection.publish(self.topics.adapter(i), chunk, retain=True)
        self.connection.publish(self.topics.manifest, json.dumps(manifest).encode(), retain=True)

    def publish_round(self, payload: bytes | None = None) -> None:
        """The global state, then the round message that points at it by sha256."""
        payload = payload or self.server.global_payload()
        self.deadline = time.monotonic() + self.timeout_s
        # No wait for the PUBACKs: the inbound backlog may be full (flow control), and the
        # connection sends these in order as soon as the next update is taken off it.
        self.connection.publish(self.topics.global_state, payload, retain=True, wait_s=None)
        sample = None
        per_round = self.job.federation.clients_per_round
        if per_round is not None and per_round < len(self.roster):
            sample = sample_clients(self.job, self.roster, self.server.round)
        self.selected = None if sample is None else set(sample)
        message = round_message(
            self.server.round,
            global_sha256=hashlib.sha256(payload).hexdigest(),
            deadline_s=self.timeout_s,
            selected=sample,
        )
        self.connection.publish(self.topics.round, message, retain=True, wait_s=None)
