"""FedEx-LoRA: FedAvg of B and A plus the residual mean(B_k·A_k) − mean(B)·mean(A) folded into W0."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..adapter import lora_layers
from ..aggregate import aggregate, weighted_mean
from .base import State, load_matching
from .fedit import FedIT

RESIDUAL = ".residual"


class FedExLoRA(FedIT):
    """Exact, but the broadcast carries a full d_out×d_in residual per adapted layer."""

    name = "fedex"
    exact = True

    def client_receive(
        self, model: nn.Module, broadcast: Mapping[str, torch.Tensor], round_no: int
    ) -> None:
        for name, layer in lora_layers(model).items():
            if name + RESIDUAL in broadcast:
                layer.fold_into_base(layer.scaling * broadcast[name + RESIDUAL])
        load_matching(model, broadcast)

    def server_aggregate(
        self,
        broadcast: Mapping[str, torch.Tensor],
        uploads: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        ranks: Sequence[int],
        padding: str,
    ) -> State:
        factors = {k: v for k, v in broadcast.items() if not k.endswith(RESIDUAL)}
        new = aggregate(factors, uploads, weights)
        for layer in {k[: -len(".A")] for k in factors if k.endswith(".A")}:
            new[layer + RESIDUAL] = residual(factors, uploads, weights, layer)
        return new


def client_product(
    start: Mapping[str, torch.Tensor], upload: Mapping[str, torch.Tensor], layer: str
) -> torch.Tensor:
    """B_k·A_k of one client in float64, from the round's start factors and its deltas."""
    B = (start[layer + ".B"] + upload[layer + ".B"]).to(torch.float64)
    A = (start[layer + ".A"] + upload[layer + ".A"]).to(torch.float64)
    return B @ A  # (d_out, d_in)


def residual(
    start: Mapping[str, torch.Tensor],
    uploads: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    layer: str,
) -> torch.Tensor:
    """mean_k(B_k A_k) − mean(B)·mean(A) of one layer, before the scale s."""
    pairs = list(zip(uploads, weights, strict=True))
    products = [(client_product(start, u, layer), w) for u, w in pairs]
    mean_B = start[layer + ".B"].to(torch.float64) + weighted_mean(
        [(u[layer + ".B"], w) for u, w in pairs]
    )
    mean_A = start[layer + ".A"].to(torch.float64) + weighted_mean(
        [(u[layer + ".A"], w) for u, w in pairs]
    )
    return (weighted_mean(products) - mean_B @ mean_A).to(start[layer + ".A"].dtype)
