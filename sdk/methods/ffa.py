"""FFA-LoRA: A stays at its random start, only B trains — averaging B is then exact."""

from __future__ import annotations

from .fedit import FedIT


class FFALoRA(FedIT):
    """FedIT with A frozen: half the upload, exact aggregation, less expressive."""

    name = "ffa"
    trainable_factors = "B"
    exact = True
