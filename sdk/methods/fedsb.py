"""Fed-SB: train only R; averaging R is exact because B·mean(R_k)·A = mean(B·R_k·A)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..adapter import trainable_state
from ..aggregate import aggregate
from .base import Method, State, state_delta


class FedSB(Method):
    """Clients send ΔR (their r_k×r_k block) and the head delta; the server averages exactly."""

    name = "fedsb"
    trainable_factors = "R"
    exact = True

    def client_upload(
        self, model: nn.Module, start: Mapping[str, torch.Tensor], rank: int
    ) -> State:
        delta = state_delta(trainable_state(model), start)
        return {k: v[:rank, :rank].clone() if k.endswith(".R") else v for k, v in delta.items()}

    def server_aggregate(
        self,
        broadcast: Mapping[str, torch.Tensor],
        uploads: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        ranks: Sequence[int],
        padding: str,
    ) -> State:
        return aggregate(broadcast, uploads, weights, ranks, padding=padding)
