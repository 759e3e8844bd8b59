"""The edge client over MQTT: adapter once (sha256-checked chunks), then one update per round.

A persistent session (QoS 1, clean start off) with paho's reconnect backoff, a retained will
message on its status topic and periodic heartbeats. The rounds it has sent are recorded in
its state file, so a restarted client rejoins a running job without retraining a round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from fedsb.errors import FedsbError, WireFormatError
from fedsb.mqtt import BrokerAddress, Message, MqttConnection, Topics, packet_limit
from fedsb.protocol import (
    is_selected,
    join_chunks,
    parse_chunk,
    parse_chunked_pointer,
    parse_round,
    split_into_chunks,
)

from .client import FederatedClient

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0


class ClientService:
    """Drives one `FederatedClient` from the messages of a broker."""

    def __init__(
        self,
        client: FederatedClient,
        address: BrokerAddress,
        *,
        state_file: str | Path | None = None,
        skip_round: Any = None,
        delay_s: float = 0.0,
        compute_lock: threading.Lock | None = None,
    ) -> None:
        self.client = client
        self.topics = Topics(client.job.name)
        self.state_file = Path(state_file) if state_file else None
        self.sent: set[int] = self.load_sent()
        self.skip_round = skip_round  # callable(round) -> bool: simulated dropout
        self.delay_s = delay_s
        self.compute_lock = compute_lock or threading.Lock()
        self.manifest: dict[str, Any] | None = None
        self.chunks: dict[int, bytes] = {}
        self.has_adapter = False
        self.round_info: dict[str, Any] | None = None
        self.global_payload: bytes | None = None
        # A federated init's open pass: (chunks, sha256) of its request, and the chunks in.
        self.init_pointer: tuple[int, str] | None = None
        self.init_chunks: dict[int, bytes] = {}
        self.init_stale: str | None = None  # sha256 whose join failed; reset by a new chunk
        self.init_answered: set[str] = set()  # sha256 of the requests answered
        self.done = False
        offline = json.dumps({"client": client.client_id, "state": "offline"}).encode()
        self.connection = MqttConnection(
            address,
            f"fedsb-{client.job.name}-{client.client_id}",
            [
                self.topics.manifest,
                self.topics.adapter_all,
                self.topics.round,
                self.topics.global_state,
                self.topics.init_request,
                self.topics.init_request_chunks,
            ],
            will=(self.topics.status(client.client_id), offline),
            max_packet=packet_limit(client.job.federation.max_update_bytes),
        )

    def load_sent(self) -> set[int]:
        if self.state_file and self.state_file.exists():
            saved = json.loads(self.state_file.read_text())
            if "privacy" in saved:  # DP-SGD: the ε already spent survives a restart
                self.client.load_privacy_state(saved["privacy"])
            return set(saved.get("sent_rounds", []))
        return set()

    def record_sent(self, round_no: int) -> None:
        self.sent.add(round_no)
        if self.state_file:
            state: dict[str, Any] = {"sent_rounds": sorted(self.sent)}
            privacy = self.client.privacy_state()
            if privacy is not None:
                state["privacy"] = privacy
            tmp = self.state_file.with_name(self.state_file.name + ".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(self.state_file)

    def run(self, *, max_seconds: float = 24 * 3600) -> None:
        """Take part until the job is done (or `max_seconds` pass)."""
        self.connection.start()
        try:
            self.heartbeat("online")
            next_beat = time.monotonic() + HEARTBEAT_S
            stop_at = time.monotonic() + max_seconds
            while not self.done:
                if time.monotonic() > stop_at:
                    raise FedsbError(
                        f"client {self.client.client_id}: job not done after {max_seconds:.0f} s"
                    )
                msg = self.connection.get(timeout_s=0.5)
                if msg is not None:
                    self.handle(msg)
                self.maybe_answer_init()
                self.maybe_train()
                if time.monotonic() > next_beat:
                    self.heartbeat("online")
                    next_beat = time.monotonic() + HEARTBEAT_S
            self.heartbeat("done")
        finally:
            self.connection.stop()

    def heartbeat(self, state: str) -> None:
        body = {
            "client": self.client.client_id,
            "state": state,
            "round": max(self.sent, default=-1),
            "ts": time.time(),
        }
        self.connection.publish(
            self.topics.status(self.client.client_id),
            json.dumps(body).encode(),
            retain=True,
            wait_s=None,
        )

    def handle(self, msg: Message) -> None:
        """Store what a server message says; a malformed one is logged and ignored."""
        try:
            if msg.topic == self.topics.manifest:
                self.manifest = json.loads(msg.payload)
            elif msg.topic.startswith(self.topics.base + "/adapter/"):
                index, _, data = parse_chunk(msg.payload)
                self.chunks[index] = data
            elif msg.topic == self.topics.round:
                self.round_info = parse_round(msg.payload)
                self.done = bool(self.round_info.get("done"))
            elif msg.topic == self.topics.global_state:
                self.global_payload = msg.payload
            elif msg.topic == self.topics.init_request:
                self.init_pointer = parse_chunked_pointer(msg.payload) if msg.payload else None
                if self.init_pointer is None:  # the init is over: free the request's chunks
                    self.init_chunks.clear()
            elif msg.topic.startswith(self.topics.init_request + "/") and msg.payload:
                index, _, data = parse_chunk(msg.payload)
                self.init_chunks[index] = data
                self.init_stale = None
            self.maybe_install_adapter()
        except (WireFormatError, ValueError) as err:
            log.warning(
                "client %s ignored a message on %s: %s", self.client.client_id, msg.topic, err
            )

    def open_init_request(self) -> tuple[str, bytes] | None:
        """(sha256, request) of the open pass once all its chunks are in and match; else None."""
        if self.init_pointer is None or self.has_adapter:
            return None
        total, digest = self.init_pointer
        if digest in self.init_answered or digest == self.init_stale:
            return None
        if any(i not in self.init_chunks for i in range(total)):
            return None
        try:
            return digest, join_chunks(self.init_chunks, total, digest)
        except WireFormatError:  # a chunk of an earlier pass: its replacement is on the way
            self.init_stale = digest
            return None

    def maybe_answer_init(self) -> None:
        """Answer each pass of a federated init once, before the adapter exists (chunked)."""
        opened = self.open_init_request()
        if opened is None:
            return
        digest, request = opened
        self.init_answered.add(digest)
        try:
            with self.compute_lock:
                reply = self.client.init_reply(request)
        except WireFormatError as err:
            log.warning("client %s ignored an init request: %s", self.client.client_id, err)
            return
        for chunk in split_into_chunks(reply):
            self.connection.publish(self.topics.init_reply(self.client.client_id), chunk)

    def maybe_install_adapter(self) -> None:
        if self.has_adapter or self.manifest is None:
            return
        total = int(self.manifest["adapter_chunks"])
        if len(self.chunks) < total:
            return
        payload = join_chunks(self.chunks, total, self.manifest["adapter_sha256"])
        with self.compute_lock:
            self.client.receive_adapter(payload)
        self.has_adapter = True
        self.chunks.clear()
        self.init_chunks.clear()

    def maybe_train(self) -> None:
        """Train and publish once the open round's global state has arrived."""
        info, payload = self.round_info, self.global_payload
        if not self.has_adapter or info is None or payload is None or self.done:
            return
        round_no = int(info["round"])
        if round_no in self.sent or hashlib.sha256(payload).hexdigest() != info["global_sha256"]:
            log.debug(
                "%s: round %s waits (sent %s)", self.client.client_id, round_no, sorted(self.sent)
            )
            return
        if not is_selected(info, self.client.client_id):
            self.sent.add(round_no)  # not in this round's sample: no training, no update
            return
        if self.skip_round is not None and self.skip_round(round_no):
            self.sent.add(round_no)  # dropped out of this round (simulation)
            return
        if self.delay_s:
            time.sleep(self.delay_s)
        with self.compute_lock:
            self.client.receive_global(payload)
            update = self.client.train_round()
        self.connection.publish(self.topics.update(self.client.client_id), update)
        self.record_sent(round_no)
