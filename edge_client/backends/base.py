"""The one small interface every training backend implements.

The federation logic (what is uploaded, how the global state is applied) stays in
`FederatedClient` on the PyTorch model; a backend only turns the round's starting
trainable tensors into trained ones. Tensor names are those of `fedsb.trainable_state`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedsb.training import Encoded, TrainStats


@dataclass(frozen=True)
class TrainRequest:
    """One round of local training: how many steps, on what batches, with what optimizer.

    Batches must be drawn with `fedsb.training.sample_batches(data, batch_size, steps,
    torch.Generator().manual_seed(seed))` so every backend sees the same batches.
    """

    steps: int
    batch_size: int
    lr: float
    head_lr: float
    seed: int
    optimizer: str = "sgd"
    dropout: bool = False  # only the torch backend can train with dropout


class TrainingBackend(ABC):
    """Trains a client's trainable tensors (R and `modules_to_save`) on local data."""

    name: ClassVar[str]

    @abstractmethod
    def load_trainable(self, state: Mapping[str, torch.Tensor]) -> None:
        """Set the trainable tensors (the round's starting point) by name."""

    @abstractmethod
    def train(self, data: Encoded, request: TrainRequest) -> TrainStats:
        """Run `request.steps` optimizer steps on batches of `data`."""

    @abstractmethod
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The current trainable tensors, by name, as float32 CPU tensors."""

    @abstractmethod
    def evaluate(self, data: Encoded) -> dict[str, float]:
        """Accuracy and mean loss on `data` with the current trainable tensors."""
