"""Which clients train a round: a seeded sample of `clients_per_round`, the same everywhere.

The in-process simulation and the MQTT aggregator draw it with this one function, so both
select the same clients for the same seed and round, and their results stay bit-identical.
"""

from __future__ import annotations

import torch

from .config import JobConfig


def default_client_ids(job: JobConfig) -> list[str]:
    """The ids of the job's clients when nobody lists them: `client-0000`, `client-0001`, …"""
    return [f"client-{i:04d}" for i in range(job.federation.clients)]


def sample_clients(job: JobConfig, client_ids: list[str], round_no: int) -> list[str]:
    """The round's seeded sample of `clients_per_round` ids (all of them without it), in order."""
    k = job.federation.clients_per_round
    if k is None or k >= len(client_ids):
        return list(client_ids)
    generator = torch.Generator().manual_seed(job.seed * 7919 + round_no)
    picked = sorted(torch.randperm(len(client_ids), generator=generator)[:k].tolist())
    return [client_ids[i] for i in picked]
