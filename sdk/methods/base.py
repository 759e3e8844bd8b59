"""What every federated method declares: trainable factors, upload, broadcast, aggregation."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..adapter import load_trainable_state, lora_layers, mark_trainable, trainable_state

State = dict[str, torch.Tensor]


class Method:
    """A federated fine-tuning method over LoRA-SB layers.

    The server keeps a *broadcast* state (what every client receives at the start of a
    round); a client applies it with `client_receive`, trains, and sends `client_upload`;
    the server turns the round's uploads into the next broadcast with `server_aggregate`.
    """

    name = "base"
    trainable_factors = "R"  # which of the LoRA factors A, B, R train locally
    exact = True  # does the aggregate equal the mean of the clients' ΔW?

    def initialise(self, model: nn.Module, *, seed: int) -> None:
        """Server side, once: set the starting factors (Fed-SB: done by `init_lora_sb`)."""

    def mark_trainable(self, model: nn.Module, modules_to_save: Sequence[str]) -> None:
        """Make exactly this method's LoRA factors and `modules_to_save` trainable."""
        mark_trainable(model, modules_to_save, lora=self.trainable_factors)

    def initial_broadcast(self, model: nn.Module) -> State:
        """The broadcast of round 0: the model's trainable tensors."""
        return trainable_state(model)

    def client_receive(
        self, model: nn.Module, broadcast: Mapping[str, torch.Tensor], round_no: int
    ) -> None:
        """Apply a round's broadcast to a client model (called once per round and client)."""
        load_matching(model, broadcast)

    def client_upload(
        self, model: nn.Module, start: Mapping[str, torch.Tensor], rank: int
    ) -> State:
        """What a client sends after local training: deltas of its trainable tensors."""
        return state_delta(trainable_state(model), start)

    def server_aggregate(
        self,
        broadcast: Mapping[str, torch.Tensor],
        uploads: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        ranks: Sequence[int],
        padding: str,
    ) -> State:
        """The next round's broadcast from this round's uploads."""
        raise NotImplementedError


def state_delta(state: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]) -> State:
    """state − start, key by key."""
    return {key: value - start[key] for key, value in state.items()}


def load_matching(model: nn.Module, broadcast: Mapping[str, torch.Tensor]) -> None:
    """Copy the broadcast tensors that name trainable tensors of the model; ignore the rest."""
    trainable = trainable_state(model)
    load_trainable_state(model, {k: v for k, v in broadcast.items() if k in trainable})


def init_standard_lora(model: nn.Module, *, seed: int) -> None:
    """Classic LoRA start: A Kaiming-uniform (as PEFT), B = 0, and R = I so ΔW = s·B·A."""
    generator = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        A = layer.lora_A.weight
        bound = 1.0 / math.sqrt(A.shape[1])  # kaiming_uniform_(a=√5) on a (r, d_in) weight
        with torch.no_grad():
            A.copy_((torch.rand(A.shape, generator=generator) * 2 - 1) * bound)
            layer.lora_B.weight.zero_()
            layer.lora_R.weight.copy_(torch.eye(layer.rank))
