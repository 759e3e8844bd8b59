"""FedIT: FedAvg of the LoRA factors B and A separately — inexact, mean(B)·mean(A) ≠ mean(B·A)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..aggregate import aggregate
from .base import Method, State, init_standard_lora


class FedIT(Method):
    """Clients train A and B (R fixed to I) and send their deltas; the server averages each."""

    name = "fedit"
    trainable_factors = "AB"
    exact = False

    def initialise(self, model: nn.Module, *, seed: int) -> None:
        init_standard_lora(model, seed=seed)

    def server_aggregate(
        self,
        broadcast: Mapping[str, torch.Tensor],
        uploads: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        ranks: Sequence[int],
        padding: str,
    ) -> State:
        return aggregate(broadcast, uploads, weights)
