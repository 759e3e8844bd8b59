"""Building a tiny federation with a federated init, and an independent reference gradient."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedsb.aggregator.init_phase import InitPhase
from fedsb.config import JobConfig, parse_config
from fedsb.edge_client.client import FederatedClient
from fedsb.init_federated import local_init_indices
from fedsb.simulation import FleetSetup, initial_server_model, prepare_fleet
from fedsb.training import Encoded


def federated_job(model_dir: Path, init: str, clients: int, **adapter: Any) -> JobConfig:
    """The tiny job (real chatterbot subset, 2-layer BERT of width 32) with a federated init."""
    from conftest import tiny_job

    raw = tiny_job(model_dir, clients=clients, rounds=1)
    # No head probe unless asked: the maths is checked against the gradient under the initial head.
    raw["adapter"] |= {"init": init, "init_samples": 8 * clients, "init_probe_steps": 0} | adapter
    return parse_config(raw)


@dataclass
class Federation:
    job: JobConfig
    fleet: FleetSetup
    model: nn.Module  # the server's adapted model, set by the init phase
    phase: InitPhase
    clients: list[FederatedClient]


def build(job: JobConfig) -> Federation:
    fleet = prepare_fleet(job)
    model, _ = initial_server_model(job, fleet)
    clients = [
        FederatedClient(
            f"client-{i:04d}",
            copy.deepcopy(fleet.base_model),
            fleet.train.select(shard),
            job,
            rank=job.adapter.rank,
        )
        for i, shard in enumerate(fleet.shards)
    ]
    return Federation(job, fleet, model, InitPhase(job, model), clients)


def run_init(fed: Federation) -> list[tuple[str, bytes]]:
    """Every pass in process; returns (client, reply bytes) of everything uploaded."""
    sent = []
    while not fed.phase.done:
        for client in fed.clients:
            reply = client.init_reply(fed.phase.request)
            sent.append((client.client_id, reply))
            assert fed.phase.submit(client.client_id, reply) is None
        fed.phase.close_pass()
    return sent


def pooled_init_examples(fed: Federation) -> Encoded:
    """The union of the clients' own init examples (what a central init would pool)."""
    count = -(-fed.job.adapter.init_samples // fed.job.federation.clients)
    picks = []
    for client in fed.clients:
        idx = local_init_indices(len(client.data), count, fed.job.seed, client.client_id)
        picks.append(client.data.select(idx))
    return Encoded(
        torch.cat([p.input_ids for p in picks]),
        torch.cat([p.attention_mask for p in picks]),
        torch.cat([p.labels for p in picks]),
    )


def reference_gradient_sums(
    base: nn.Module, data: Encoded, names: list[str]
) -> dict[str, torch.Tensor]:
    """Σ over examples of the loss gradient of each named weight: float64, one batch, no adapters."""
    model = copy.deepcopy(base).double().eval()
    weights = [model.get_submodule(name).weight for name in names]
    loss = model(
        input_ids=data.input_ids, attention_mask=data.attention_mask, labels=data.labels
    ).loss
    grads = torch.autograd.grad(loss * len(data), weights)
    return dict(zip(names, grads, strict=True))


def delta_weight(layer: nn.Module) -> torch.Tensor:
    """s·B·R·A in float64."""
    b, r, a = (getattr(layer, f"lora_{x}").weight.double() for x in "BRA")
    return layer.scaling * b @ r @ a


def truncated(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def principal_angles_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees) between the column spans of a and b."""
    qa, _ = torch.linalg.qr(a.double())
    qb, _ = torch.linalg.qr(b.double())
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return torch.rad2deg(torch.arccos(cos))
