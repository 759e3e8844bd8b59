"""Synthetic Fed-SB jobs: BERT-base-sized R blocks and seeded, pre-computed client updates.

For scale runs, benchmarks and fault-injection tests, where what matters is the traffic and
the aggregator, not training: a client's update for a round is a deterministic function of
(seed, round, client index), so any run can be replayed and compared bit for bit.
Shapes: the query, key, value and attention-output modules of BERT-base's 12 layers, i.e.
48 R blocks of rank×rank (the paper also adapts the two feed-forward modules: 72 blocks).
"""

from __future__ import annotations

from typing import Any

import torch

from .config import JobConfig, parse_config
from .protocol import UpdateMeta, encode_client_update

LAYERS = 12
MODULES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
)


def r_names(layers: int = LAYERS) -> list[str]:
    """The R tensor names of a BERT-base-like model (4 modules per layer)."""
    return [f"bert.encoder.layer.{i}.{m}.R" for i in range(layers) for m in MODULES]


def synthetic_job_dict(
    name: str, clients: int, rounds: int, rank: int = 8, seed: int = 0, **federation: Any
) -> dict[str, Any]:
    """A Fed-SB job of `clients` clients (quorum: all of them unless `min_clients` is given)."""
    fed = {"clients": clients, "rounds": rounds, "min_clients": clients} | federation
    return {"name": name, "seed": seed, "adapter": {"rank": rank}, "federation": fed}


def synthetic_job(name: str, clients: int, rounds: int, **options: Any) -> JobConfig:
    """`synthetic_job_dict` parsed and checked."""
    return parse_config(synthetic_job_dict(name, clients, rounds, **options))


def client_id(index: int) -> str:
    return f"c{index:05d}"


def initial_global(rank: int, layers: int = LAYERS) -> dict[str, torch.Tensor]:
    """The round-0 global state: every R zero (as LoRA-SB starts)."""
    return {name: torch.zeros(rank, rank) for name in r_names(layers)}


def update_state(
    seed: int, round_no: int, index: int, rank: int, scale: float = 1e-3, layers: int = LAYERS
) -> dict[str, torch.Tensor]:
    """Client `index`'s ΔR for `round_no`: seeded Gaussian blocks times `scale`."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + round_no * 100_019 + index)
    blocks = torch.randn(len(r_names(layers)), rank, rank, generator=gen) * scale
    return dict(zip(r_names(layers), blocks, strict=True))


def update_payload(
    job: JobConfig, round_no: int, index: int, *, seed: int | None = None, scale: float = 1e-3
) -> bytes:
    """The encoded update message of client `index` for `round_no` (examples = 1 + index % 7)."""
    rank = job.adapter.rank
    state = update_state(job.seed if seed is None else seed, round_no, index, rank, scale)
    meta = UpdateMeta(job.name, round_no, client_id(index), rank, 1 + index % 7, 0.5)
    return encode_client_update(state, meta)
