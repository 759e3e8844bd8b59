"""Federated methods: Fed-SB and the baselines it is compared with, one module each."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Method
from .fedex import FedExLoRA
from .fedit import FedIT
from .fedsb import FedSB
from .ffa import FFALoRA
from .flora import FLoRA

METHODS: dict[str, type[Method]] = {m.name: m for m in (FedSB, FedIT, FFALoRA, FedExLoRA, FLoRA)}


def get_method(name: str) -> Method:
    """A fresh instance of the method called `name`."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]()


__all__ = ["METHODS", "FedExLoRA", "FedIT", "FedSB", "FFALoRA", "FLoRA", "Method", "get_method"]
