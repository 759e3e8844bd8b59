"""FLoRA: stack every client's B and A; the product of the stacks is the exact weighted sum.

s·[w_1 B_1 | … | w_K B_K]·[A_1; …; A_K] = s·Σ w_k B_k A_k (weights normalised). Clients fold
it into W0 and restart their LoRA factors, so the download grows with the number of clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..adapter import lora_layers, trainable_state
from ..aggregate import aggregate
from .base import State, init_standard_lora, load_matching, state_delta
from .fedit import FedIT

STACK_A, STACK_B = ".stack_A", ".stack_B"


class FLoRA(FedIT):
    """Exact by stacking; every round the clients merge the stack and re-initialise A, B."""

    name = "flora"
    exact = True

    def client_receive(
        self, model: nn.Module, broadcast: Mapping[str, torch.Tensor], round_no: int
    ) -> None:
        for name, layer in lora_layers(model).items():
            if name + STACK_B in broadcast:
                delta = broadcast[name + STACK_B].to(torch.float64) @ broadcast[name + STACK_A].to(
                    torch.float64
                )
                layer.fold_into_base(layer.scaling * delta)
        init_standard_lora(model, seed=1000 + round_no)  # the same fresh start on every client
        load_matching(model, broadcast)

    def client_upload(
        self, model: nn.Module, start: Mapping[str, torch.Tensor], rank: int
    ) -> State:
        state = trainable_state(model)
        delta = state_delta(state, start)
        # A and B travel as absolute values (the server stacks them); other tensors as deltas.
        return {k: state[k] if k.endswith((".A", ".B")) else delta[k] for k in state}

    def server_aggregate(
        self,
        broadcast: Mapping[str, torch.Tensor],
        uploads: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        ranks: Sequence[int],
        padding: str,
    ) -> State:
        total = float(sum(weights))
        layers = sorted({k[: -len(".A")] for k in uploads[0] if k.endswith(".A")})
        new: State = {}
        for layer in layers:
            new[layer + STACK_B] = torch.cat(
                [u[layer + ".B"] * (w / total) for u, w in zip(uploads, weights, strict=True)],
                dim=1,
            )
            new[layer + STACK_A] = torch.cat([u[layer + ".A"] for u in uploads], dim=0)
        others = {
            k: v for k, v in broadcast.items() if not k.endswith((STACK_A, STACK_B, ".A", ".B"))
        }
        dense = [{k: v for k, v in u.items() if k in others} for u in uploads]
        new.update(aggregate(others, dense, weights))
        return new
