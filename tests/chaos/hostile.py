"""A seeded generator of hostile update messages, one kind after another.

Every message it yields must be rejected by the aggregator whatever round is open: round
numbers are absurd (negative, huge, not a number), and messages that would otherwise be
valid carry a defect on a topic of their own (`fuzz-…`), so none can take an honest
client's place.
"""

from __future__ import annotations

import base64
import json
import random
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import torch

from fedsb.config import JobConfig
from fedsb.protocol import UpdateMeta
from fedsb.synthetic import update_payload, update_state
from fedsb.wire import FORMAT_VERSION, LAYOUT_KEY, encode_update

KINDS = (
    "random-bytes",
    "truncated",
    "bit-flipped",
    "huge-header-claim",
    "huge-header",
    "absurd-shape",
    "size-claim-100MB",
    "zip-bomb-layout",
    "nan-inf",
    "wrong-dtype",
    "wrong-job",
    "wrong-round",
    "wrong-client",
    "wrong-rank",
    "unknown-tensor",
    "deep-json",
    "big-junk",
)
# kind -> one message in this many (the zip bomb costs the parser ~30 ms to refuse)
RARE = {"big-junk": 2000, "zip-bomb-layout": 250, "huge-header": 100}


def _container(header: dict[str, Any], data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _meta(config: JobConfig, who: str, changes: dict[str, str] | None = None) -> dict[str, str]:
    return UpdateMeta(config.name, 0, who, config.adapter.rank, 3, 0.5).to_wire() | (changes or {})


class Hostile:
    """Yields (topic client id, payload, kind)."""

    def __init__(self, job: JobConfig, seed: int = 0) -> None:
        self.job = job
        self.rng = random.Random(seed)
        self.honest = update_payload(job, 0, 0)  # a valid message of client c00000, round 0
        self.state = update_state(job.seed, 0, 0, job.adapter.rank)
        self.bomb = base64.b64encode(zlib.compress(b"[" * (48 * 2**20), 9)).decode()

    def messages(self, count: int) -> Iterator[tuple[str, bytes, str]]:
        """`count` messages; the costly kinds (megabytes to build or to refuse) are rarer."""
        cheap = [k for k in KINDS if k not in RARE]
        for n in range(count):
            kind = next((k for k, every in RARE.items() if n % every == every - 1), None)
            kind = kind or cheap[n % len(cheap)]
            client = f"fuzz-{n}"
            make = getattr(self, kind.replace("-", "_").replace("100MB", "100mb"))
            yield client, make(client), kind

    def encoded(
        self, who: str, state: dict[str, torch.Tensor] | None = None, **changes: str
    ) -> bytes:
        return encode_update(self.state if state is None else state, _meta(self.job, who, changes))

    def random_bytes(self, client: str) -> bytes:
        return self.rng.randbytes(self.rng.choice([0, 1, 7, 8, 9, 64, 4096]))

    def truncated(self, client: str) -> bytes:
        return self.honest[: self.rng.randrange(len(self.honest))]

    def bit_flipped(self, client: str) -> bytes:
        data = bytearray(self.honest)  # c00000's message on another topic: never acceptable
        for _ in range(self.rng.randint(1, 8)):
            bit = self.rng.randrange(len(data) * 8)
            data[bit // 8] ^= 1 << (bit % 8)
        return bytes(data)

    def huge_header_claim(self, client: str) -> bytes:
        length = self.rng.choice([2**20 + 1, 2**32, 2**63, 2**64 - 1])
        return struct.pack("<Q", length) + b'{"__metadata__":{}}'

    def huge_header(self, client: str) -> bytes:
        return _container({"__metadata__": {"pad": "x" * (2**20 + self.rng.randrange(99))}})

    def absurd_shape(self, client: str) -> bytes:
        shape = self.rng.choice([[2**31, 2**31], [2**62], [0, 2**40, 8], [1] * 40, [-1, 8]])
        entry = {"dtype": "F32", "shape": shape, "data_offsets": [0, 256]}
        metadata = {"fedsb.format": FORMAT_VERSION, LAYOUT_KEY: ""} | _meta(self.job, client)
        return _container({"__metadata__": metadata, "g0": entry}, b"\0" * 256)

    def size_claim_100mb(self, client: str) -> bytes:
        entry = {"dtype": "F32", "shape": [25 * 2**20], "data_offsets": [0, 100 * 2**20]}
        metadata = {"fedsb.format": FORMAT_VERSION, LAYOUT_KEY: ""} | _meta(self.job, client)
        return _container({"__metadata__": metadata, "g0": entry}, b"\0" * 64)

    def zip_bomb_layout(self, client: str) -> bytes:
        metadata = {"fedsb.format": FORMAT_VERSION, LAYOUT_KEY: self.bomb} | _meta(self.job, client)
        entry = {"dtype": "F32", "shape": [1, 8, 8], "data_offsets": [0, 256]}
        return _container({"__metadata__": metadata, "g0": entry}, b"\0" * 256)

    def nan_inf(self, client: str) -> bytes:
        state = {k: v.clone() for k, v in self.state.items()}
        key = self.rng.choice(sorted(state))
        state[key][self.rng.randrange(8), self.rng.randrange(8)] = self.rng.choice(
            [float("nan"), float("inf"), float("-inf")]
        )
        return self.encoded(client, state)

    def wrong_dtype(self, client: str) -> bytes:
        dtype = self.rng.choice([torch.float64, torch.float16, torch.bfloat16, torch.int64])
        return self.encoded(client, {k: v.to(dtype) for k, v in self.state.items()})

    def wrong_job(self, client: str) -> bytes:
        return self.encoded(client, job=self.rng.choice(["other", "", self.job.name + "x"]))

    def wrong_round(self, client: str) -> bytes:
        return self.encoded(client, round=self.rng.choice(["-1", "1000000", "zero", "", "1e3"]))

    def wrong_client(self, client: str) -> bytes:
        return self.encoded(client, **{"client": self.rng.choice(["c00001", "", client + "x"])})

    def wrong_rank(self, client: str) -> bytes:
        rank = self.rng.choice(["0", "-8", str(self.job.adapter.rank + 1), "eight"])
        return self.encoded(client, rank=rank)

    def unknown_tensor(self, client: str) -> bytes:
        state = dict(self.state) | {"bert.pooler.dense.weight": torch.zeros(8, 8)}
        return self.encoded(client, state)

    def deep_json(self, client: str) -> bytes:
        depth = self.rng.choice([1000, 100_000])
        text = b'{"__metadata__":' + b"[" * depth + b"]" * depth + b"}"
        return struct.pack("<Q", len(text)) + text

    def big_junk(self, client: str) -> bytes:
        return self.rng.randbytes(4 * 2**20)
