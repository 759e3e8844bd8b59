"""Messages exchanged by the aggregator and the clients, and the validation of updates.

Transport-independent: the same payloads travel in process or over MQTT. All metadata is in
the payload (DESIGN §3), never in transport properties.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import UpdateRejected, WireFormatError
from .wire import DecodedUpdate, decode_update, decode_update_views, encode_update

DEFAULT_MAX_UPDATE_BYTES = 16 * 2**20


@dataclass(frozen=True)
class UpdateMeta:
    """What a client says about its update."""

    job: str
    round: int
    client: str
    rank: int
    examples: int
    loss: float
    epsilon: float | None = None  # DP-SGD: ε the client has spent so far (optional field)
    budget_spent: bool = False  # DP-SGD: no tensors, the client has stopped contributing

    def to_wire(self) -> dict[str, str]:
        wire = {
            "kind": "update",
            "job": self.job,
            "round": str(self.round),
            "client": self.client,
            "rank": str(self.rank),
            "examples": str(self.examples),
            "loss": repr(self.loss),
        }
        if self.epsilon is not None:
            wire["epsilon"] = repr(self.epsilon)
        if self.budget_spent:
            wire["budget_spent"] = "1"
        return wire


def encode_client_update(state: Mapping[str, torch.Tensor], meta: UpdateMeta) -> bytes:
    """An update message: the trained tensors and the client's metadata."""
    return encode_update(state, meta.to_wire())


def encode_broadcast(
    state: Mapping[str, torch.Tensor], *, job: str, round_no: int, kind: str
) -> bytes:
    """A server message (`adapter` once, `global` each round)."""
    return encode_update(state, {"kind": kind, "job": job, "round": str(round_no)})


def decode_broadcast(payload: bytes, *, job: str, kind: str) -> tuple[dict[str, torch.Tensor], int]:
    """The tensors and round of a server message, checked to be of this job and kind."""
    state, meta = decode_update(payload, dtypes=(torch.float32,))
    if meta.get("kind") != kind or meta.get("job") != job:
        raise WireFormatError(
            f"expected a {kind!r} message of job {job!r}, got {meta.get('kind')!r}/{meta.get('job')!r}"
        )
    return state, int(meta.get("round", "0"))


@dataclass(frozen=True)
class UpdateRules:
    """What the aggregator accepts this round."""

    job: str
    round: int
    shapes: Mapping[str, tuple[int, ...]]  # full shape of every uploadable tensor
    max_rank: int
    max_bytes: int = DEFAULT_MAX_UPDATE_BYTES
    # (rank, wire groups' names and shapes) already checked against `shapes`: every client of
    # a rank sends the same layout, so the per-tensor check runs once per layout.
    checked_layouts: set[tuple[Any, ...]] = field(default_factory=set, compare=False, repr=False)


def _int_field(meta: Mapping[str, str], key: str) -> int:
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        raise UpdateRejected("bad-metadata", f"{key!r} missing or not an integer") from None


def validate_update(
    payload: bytes, topic_client: str, rules: UpdateRules
) -> tuple[DecodedUpdate, UpdateMeta]:
    """Decode and check an update before it touches any state; raise UpdateRejected with a reason."""
    if len(payload) > rules.max_bytes:
        raise UpdateRejected("oversize", f"{len(payload)} bytes > {rules.max_bytes}")
    try:
        state, meta = decode_update_views(payload, max_bytes=rules.max_bytes)
    except WireFormatError as err:
        raise UpdateRejected("malformed", str(err)) from None
    if meta.get("kind") != "update":
        raise UpdateRejected("bad-metadata", f"kind is {meta.get('kind')!r}, expected 'update'")
    if meta.get("job") != rules.job:
        raise UpdateRejected("wrong-job", f"job {meta.get('job')!r} is not {rules.job!r}")
    round_no = _int_field(meta, "round")
    if round_no < rules.round:
        raise UpdateRejected("stale-round", f"round {round_no} < current {rules.round}")
    if round_no > rules.round:
        raise UpdateRejected("future-round", f"round {round_no} > current {rules.round}")
    if meta.get("client") != topic_client:
        raise UpdateRejected(
            "client-mismatch", f"client {meta.get('client')!r} sent on {topic_client!r}"
        )
    rank, examples = _int_field(meta, "rank"), _int_field(meta, "examples")
    if not 1 <= rank <= rules.max_rank:
        raise UpdateRejected("bad-rank", f"rank {rank} outside 1..{rules.max_rank}")
    epsilon = _epsilon_field(meta)
    if meta.get("budget_spent") == "1":  # a notice: the client's privacy budget is spent
        if state:
            raise UpdateRejected("bad-metadata", "a budget-spent notice carries no tensors")
        return state, UpdateMeta(
            rules.job, round_no, topic_client, rank, 0, math.nan, epsilon, True
        )
    if examples < 1:
        raise UpdateRejected("bad-metadata", f"examples must be positive, got {examples}")
    layout = (rank, *((names, t.shape) for names, t in state.groups))
    if layout not in rules.checked_layouts:
        check_shapes(state, rules.shapes, rank)
        if len(rules.checked_layouts) < 1024:
            rules.checked_layouts.add(layout)
    try:
        loss = float(meta.get("loss", "nan"))
    except ValueError:
        loss = math.nan
    return state, UpdateMeta(rules.job, round_no, topic_client, rank, examples, loss, epsilon)


def _epsilon_field(meta: Mapping[str, str]) -> float | None:
    """The optional ε a DP-SGD client reports: a non-negative number (inf for σ = 0)."""
    if "epsilon" not in meta:
        return None
    try:
        epsilon = float(meta["epsilon"])
    except ValueError:
        raise UpdateRejected("bad-metadata", "'epsilon' is not a number") from None
    if not epsilon >= 0:  # also refuses nan
        raise UpdateRejected("bad-metadata", f"'epsilon' must be non-negative, got {epsilon}")
    return epsilon


def check_shapes(
    state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], rank: int
) -> None:
    """Known names only; R blocks must be rank×rank, everything else its full shape."""
    if not state:
        raise UpdateRejected("empty", "the update carries no tensors")
    for key, value in state.items():
        if key not in shapes:
            raise UpdateRejected("unknown-tensor", f"{key!r} is not a trainable tensor of this job")
        expected = (rank, rank) if key.endswith(".R") else tuple(shapes[key])
        if tuple(value.shape) != expected:
            raise UpdateRejected(
                "bad-shape", f"{key!r} has shape {tuple(value.shape)}, expected {expected}"
            )


CHUNK_MAGIC = b"FSB1"
CHUNK_HEADER = struct.Struct("<4sII32s")  # magic, index, total, sha256 of the chunk data
MAX_CHUNK_BYTES = 2**20


def split_into_chunks(payload: bytes, chunk_bytes: int = MAX_CHUNK_BYTES) -> list[bytes]:
    """Split a large message (the adapter, an init request or reply) into chunks ≤ 1 MiB,
    each carrying its index, the chunk count and its sha256."""
    pieces = [payload[i : i + chunk_bytes] for i in range(0, len(payload), chunk_bytes)] or [b""]
    return [
        CHUNK_HEADER.pack(CHUNK_MAGIC, i, len(pieces), hashlib.sha256(p).digest()) + p
        for i, p in enumerate(pieces)
    ]


def parse_chunk(message: bytes) -> tuple[int, int, bytes]:
    """(index, total, data) of a chunk whose sha256 matches; WireFormatError otherwise."""
    if len(message) < CHUNK_HEADER.size:
        raise WireFormatError("chunk shorter than its header")
    magic, index, total, digest = CHUNK_HEADER.unpack_from(message)
    data = message[CHUNK_HEADER.size :]
    if magic != CHUNK_MAGIC or not 0 <= index < total:
        raise WireFormatError(f"not a chunk (magic {magic!r}, index {index}/{total})")
    if hashlib.sha256(data).digest() != digest:
        raise WireFormatError(f"chunk {index} fails its sha256 check")
    return index, total, data


def join_chunks(chunks: Mapping[int, bytes], total: int, sha256_hex: str) -> bytes:
    """The whole message, checked against the sha256 its manifest or pointer gives."""
    payload = b"".join(chunks[i] for i in range(total))
    if hashlib.sha256(payload).hexdigest() != sha256_hex:
        raise WireFormatError("the assembled message does not match its sha256")
    return payload


def chunked_pointer(payload: bytes, chunks: int) -> bytes:
    """The message that says which chunked payload is current: its chunk count and sha256."""
    return json.dumps({"chunks": chunks, "sha256": hashlib.sha256(payload).hexdigest()}).encode()


def parse_chunked_pointer(message: bytes) -> tuple[int, str]:
    """(chunks, sha256 hex) of a `chunked_pointer` message; WireFormatError if it is not one."""
    try:
        body = json.loads(message)
        chunks, digest = body["chunks"], body["sha256"]
    except (ValueError, TypeError, KeyError):
        raise WireFormatError("not a chunked-payload pointer") from None
    if type(chunks) is not int or chunks < 1 or not isinstance(digest, str) or len(digest) != 64:
        raise WireFormatError(f"bad chunked-payload pointer {body!r}")
    return chunks, digest


def round_message(
    round_no: int,
    *,
    global_sha256: str = "",
    deadline_s: float = 0.0,
    done: bool = False,
    selected: list[str] | None = None,
) -> bytes:
    """The retained `…/round` message: which round is open and which global state it uses.

    `selected`: the clients that train this round (a sample); absent when all of them do.
    """
    body: dict[str, Any] = {
        "round": round_no,
        "global_sha256": global_sha256,
        "deadline_s": deadline_s,
        "done": done,
    }
    if selected is not None:
        body["selected"] = selected
    return json.dumps(body).encode()


def is_selected(round_info: Mapping[str, Any], client_id: str) -> bool:
    """Whether a round message asks `client_id` to train (no `selected` list: everyone)."""
    selected = round_info.get("selected")
    return selected is None or client_id in selected


def parse_round(message: bytes) -> dict[str, Any]:
    """The fields of a round message; WireFormatError if it is not one."""
    try:
        body = json.loads(message)
        int(body["round"])
    except (ValueError, KeyError, TypeError) as err:
        raise WireFormatError(f"invalid round message: {err}") from None
    return dict(body)


# ---- federated initialisation (DESIGN §1.2): one request per pass, one reply per client ----


@dataclass(frozen=True)
class InitRequest:
    """What the server asks in one pass of a federated init; `attempt` changes on every restart."""

    job: str
    attempt: str
    pass_no: int
    mode: str
    sketch_seed: int
    sketch_cols: int

    def to_wire(self) -> dict[str, str]:
        return {
            "kind": "init-request",
            "job": self.job,
            "attempt": self.attempt,
            "pass": str(self.pass_no),
            "mode": self.mode,
            "sketch_seed": str(self.sketch_seed),
            "sketch_cols": str(self.sketch_cols),
        }


@dataclass(frozen=True)
class InitReplyMeta:
    """What a client says about its init reply."""

    job: str
    attempt: str
    pass_no: int
    client: str
    examples: int

    def to_wire(self) -> dict[str, str]:
        return {
            "kind": "init-reply",
            "job": self.job,
            "attempt": self.attempt,
            "pass": str(self.pass_no),
            "client": self.client,
            "examples": str(self.examples),
        }


def encode_init_request(state: Mapping[str, torch.Tensor], request: InitRequest) -> bytes:
    """A request message: the pass's server tensors (pass 1 of the sketch: the bases Q)."""
    return encode_update(state, request.to_wire())


def decode_init_request(payload: bytes, *, job: str) -> tuple[dict[str, torch.Tensor], InitRequest]:
    """The tensors and fields of an init request of this job; WireFormatError otherwise."""
    state, meta = decode_update(payload)
    if meta.get("kind") != "init-request" or meta.get("job") != job:
        raise WireFormatError(
            f"expected an init request of job {job!r}, got {meta.get('kind')!r}/{meta.get('job')!r}"
        )
    try:
        request = InitRequest(
            job,
            meta["attempt"],
            int(meta["pass"]),
            meta["mode"],
            int(meta["sketch_seed"]),
            int(meta["sketch_cols"]),
        )
    except (KeyError, ValueError) as err:
        raise WireFormatError(f"invalid init request field: {err}") from None
    return state, request


def encode_init_reply(state: Mapping[str, torch.Tensor], meta: InitReplyMeta) -> bytes:
    """A client's reply: its sketch (or gradient sum) of every adapted layer."""
    return encode_update(state, meta.to_wire())


@dataclass(frozen=True)
class InitReplyRules:
    """What the server accepts in the open init pass: exactly these layers with these shapes."""

    job: str
    attempt: str
    pass_no: int
    shapes: Mapping[str, tuple[int, ...]]
    max_bytes: int = 4 * DEFAULT_MAX_UPDATE_BYTES  # an exact-mode reply is a full-weight upload


def validate_init_reply(
    payload: bytes, topic_client: str, rules: InitReplyRules
) -> tuple[dict[str, torch.Tensor], InitReplyMeta]:
    """Decode and check an init reply; raise UpdateRejected with a reason."""
    if len(payload) > rules.max_bytes:
        raise UpdateRejected("oversize", f"{len(payload)} bytes > {rules.max_bytes}")
    try:
        state, meta = decode_update(
            payload, max_bytes=rules.max_bytes, expected_shapes=rules.shapes
        )
    except WireFormatError as err:
        raise UpdateRejected("malformed", str(err)) from None
    if meta.get("kind") != "init-reply":
        raise UpdateRejected("bad-metadata", f"kind is {meta.get('kind')!r}, expected 'init-reply'")
    if meta.get("job") != rules.job:
        raise UpdateRejected("wrong-job", f"job {meta.get('job')!r} is not {rules.job!r}")
    if meta.get("attempt") != rules.attempt or _int_field(meta, "pass") != rules.pass_no:
        raise UpdateRejected(
            "stale-init", f"init {meta.get('attempt')}/{meta.get('pass')} is not the open pass"
        )
    if meta.get("client") != topic_client:
        raise UpdateRejected(
            "client-mismatch", f"client {meta.get('client')!r} sent on {topic_client!r}"
        )
    if set(state) != set(rules.shapes):
        raise UpdateRejected("missing-tensor", "an init reply must cover every adapted layer")
    examples = _int_field(meta, "examples")
    if examples < 1:
        raise UpdateRejected("bad-metadata", f"examples must be positive, got {examples}")
    return state, InitReplyMeta(rules.job, rules.attempt, rules.pass_no, topic_client, examples)


def join_chunk_map(chunks: Mapping[int, bytes], total: int) -> bytes | None:
    """The whole message once all `total` chunks are there (each already sha256-checked)."""
    if len(chunks) < total:
        return None
    return b"".join(chunks[i] for i in range(total))
