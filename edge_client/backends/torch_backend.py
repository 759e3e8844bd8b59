"""Eager PyTorch: trains the client's own model in place (CPU or CUDA, e.g. a Jetson)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from fedsb.adapter import load_trainable_state, trainable_state
from fedsb.training import Encoded, TrainStats, evaluate, train_local

from .base import TrainingBackend, TrainRequest


class TorchBackend(TrainingBackend):
    """`fedsb.training.train_local` on the model itself: AdamW or SGD, dropout optional."""

    name = "torch"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def load_trainable(self, state: Mapping[str, torch.Tensor]) -> None:
        load_trainable_state(self.model, state)

    def train(self, data: Encoded, request: TrainRequest) -> TrainStats:
        return train_local(
            self.model,
            data,
            steps=request.steps,
            batch_size=request.batch_size,
            lr=request.lr,
            head_lr=request.head_lr,
            seed=request.seed,
            optimizer=request.optimizer,
            dropout=request.dropout,
        )

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.to("cpu", torch.float32) for k, v in trainable_state(self.model).items()}

    def evaluate(self, data: Encoded) -> dict[str, float]:
        return evaluate(self.model, data)


def create_backend(model: nn.Module, work_dir: Path | None = None) -> TorchBackend:
    """The registry's factory: the backend trains `model` itself (no export)."""
    return TorchBackend(model)
