"""A federated init phase over MQTT, run by the aggregator before round 1.

The open pass's request is retained in sha256-checked chunks on `…/init/request/{i}`, then a
pointer to it (chunk count, sha256) on `…/init/request`: a sketch's bases for a 3B model are
≈ 74 MB, far over one MQTT packet. Clients answer on `…/init/reply/{client}`, chunked the same
way (an exact-mode reply is a full-weight upload).
The result (the adapter) is checkpointed as `init.safetensors` + `init.json`; an aggregator
killed during the phase starts it again with a fresh attempt id (clients keep their gradient
sums, so answering again is cheap, and replies to the old attempt are rejected as stale).
The most chunk topics any attempt's request used is kept in `init_request_chunks`, so the
clean-up after the phase also clears a chunk only an earlier attempt published.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save

from fedsb.adapter import adapter_state, load_adapter_state
from fedsb.errors import FedsbError, WireFormatError
from fedsb.mqtt import MqttConnection, Topics
from fedsb.protocol import (
    MAX_CHUNK_BYTES,
    chunked_pointer,
    join_chunk_map,
    parse_chunk,
    split_into_chunks,
)

from .init_phase import InitPhase
from .server import FederatedServer

log = logging.getLogger(__name__)

INIT_TENSORS = "init.safetensors"
INIT_FILE = "init.json"
REQUEST_CHUNKS_FILE = "init_request_chunks"  # the most chunk topics a request used, any attempt
REQUEST_CHUNK_BYTES = MAX_CHUNK_BYTES  # a module constant so that tests can shrink it


class InitService:
    """Drives an `InitPhase` through an aggregator's connection; hands the result to the server."""

    def __init__(
        self,
        phase: InitPhase,
        server: FederatedServer,
        connection: MqttConnection,
        directory: Path,
        timeout_s: float,
    ) -> None:
        self.phase = phase
        self.server = server
        self.connection = connection
        self.topics = Topics(phase.job.name)
        self.directory = directory
        self.timeout_s = timeout_s
        self.chunks: dict[str, tuple[int, dict[int, bytes]]] = {}  # client → (total, chunks)
        self.traffic: dict[str, Any] | None = None
        mark = directory / REQUEST_CHUNKS_FILE
        self.request_chunks = int(mark.read_text()) if mark.exists() else 0

    def load(self) -> bool:
        """Take a checkpointed init result, if any; True when the phase is already done."""
        path = self.directory / INIT_FILE
        if not path.exists():
            return False
        load_adapter_state(self.phase.model, load_file(str(self.directory / INIT_TENSORS)))
        self.server.set_initial_model(self.phase.model)
        self.phase.done = True
        self.traffic = json.loads(path.read_text())
        return True

    def run(self, stop_at: float) -> dict[str, Any]:
        """Serve the passes until the adapter is set; return the init's traffic."""
        if self.traffic is not None:  # checkpointed: a kill may have come before the clean-up
            self.clear_request()
            return self.traffic
        self.publish_request()
        while not self.phase.done:
            if time.monotonic() > stop_at:
                raise FedsbError("the federated init did not finish in time")
            self.step()
        self.server.set_initial_model(self.phase.model)
        self.traffic = self.phase.traffic() | {"init_rejections": dict(self.phase.rejections)}
        self.save()
        self.clear_request()
        return self.traffic

    def publish_request(self) -> None:
        """The open pass's request: its chunks first, then the pointer that makes it current."""
        self.deadline = time.monotonic() + self.timeout_s
        request = self.phase.request
        chunks = split_into_chunks(request, REQUEST_CHUNK_BYTES)
        if len(chunks) > self.request_chunks:  # recorded before the topics exist
            from .service import write_atomic

            write_atomic(self.directory / REQUEST_CHUNKS_FILE, str(len(chunks)).encode())
            self.request_chunks = len(chunks)
        for i, chunk in enumerate(chunks):
            self.connection.publish(self.topics.init_request_chunk(i), chunk, retain=True)
        pointer = chunked_pointer(request, len(chunks))
        self.connection.publish(self.topics.init_request, pointer, retain=True)

    def clear_request(self) -> None:
        """Remove the retained request: an empty pointer tells clients the init is over."""
        self.connection.publish(self.topics.init_request, b"", retain=True)
        for i in range(self.request_chunks):
            self.connection.publish(self.topics.init_request_chunk(i), b"", retain=True)

    def step(self) -> None:
        """Handle at most one message; close the pass at quorum (or deadline with replies)."""
        msg = self.connection.get(timeout_s=0.2)
        if msg is not None:
            if msg.topic.startswith(self.topics.base + "/init/reply/"):
                client = self.topics.client_of(msg.topic)
                payload = self.collect(client, msg.payload)
                if payload is not None:
                    self.phase.submit(client, payload)
            self.connection.ack(msg)  # a crash restarts the whole phase: nothing to spool
        late = time.monotonic() > self.deadline
        if self.phase.ready or (late and self.phase.replied):
            self.phase.close_pass()
            if not self.phase.done:
                self.publish_request()
        elif late:
            log.warning("init pass %d: deadline passed with no reply", self.phase.pass_no)
            self.deadline = time.monotonic() + self.timeout_s

    def collect(self, client: str, message: bytes) -> bytes | None:
        """Add one chunk of a client's reply; the whole reply once its last chunk is in."""
        try:
            index, total, data = parse_chunk(message)
        except WireFormatError as err:
            self.phase.rejections["malformed"] += 1
            log.warning("bad init chunk from %s: %s", client, err)
            return None
        known, chunks = self.chunks.get(client, (total, {}))
        if known != total:  # a new message started: drop the partial one
            chunks = {}
        chunks[index] = data
        self.chunks[client] = (total, chunks)
        payload = join_chunk_map(chunks, total)
        if payload is not None:
            del self.chunks[client]
        return payload

    def save(self) -> None:
        """`init.safetensors` (the adapter) first, then `init.json` that marks the phase done."""
        from .service import write_atomic

        state = adapter_state(self.phase.model, self.phase.job.adapter.modules_to_save)
        write_atomic(
            self.directory / INIT_TENSORS, save({k: v.contiguous() for k, v in state.items()})
        )
        write_atomic(self.directory / INIT_FILE, json.dumps(self.traffic).encode())
