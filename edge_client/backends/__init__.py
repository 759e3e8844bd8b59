"""Training backends of the edge client: eager PyTorch, ONNX Runtime training, ExecuTorch.

Each backend module defines `create_backend(model, work_dir=None) -> TrainingBackend`, which
builds the backend from the client's fedsb-adapted torch model once the adapter is installed
(exporting it where the runtime needs artifacts). Modules are imported only when chosen, so
a runtime that is not installed costs nothing until it is asked for.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from torch import nn

from fedsb.errors import ConfigError

from .base import TrainingBackend, TrainRequest

BACKENDS = {
    "torch": "fedsb.edge_client.backends.torch_backend",
    "onnxruntime": "fedsb.edge_client.backends.onnxruntime_backend",
    "executorch": "fedsb.edge_client.backends.executorch_backend",
}


def get_backend(name: str, model: nn.Module, *, work_dir: Path | None = None) -> TrainingBackend:
    """The backend `name` for a client's adapted model (one-line error for an unknown name)."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r} (expected one of {', '.join(BACKENDS)})")
    try:
        module = importlib.import_module(BACKENDS[name])
    except ModuleNotFoundError as err:
        if err.name == BACKENDS[name]:
            raise ConfigError(f"backend {name!r} is not available in this fedsb") from None
        raise ConfigError(f"backend {name!r} needs a missing package: {err}") from None
    backend: TrainingBackend = module.create_backend(model, work_dir)
    return backend


def check_backend_job(name: str, *, optimizer: str, dropout: bool, method: str) -> None:
    """Exported edge graphs train R with plain SGD and no dropout: say so in one line."""
    if name == "torch":
        return
    if optimizer != "sgd" or dropout:
        raise ConfigError(
            f'backend {name!r} needs federation.optimizer = "sgd" and federation.dropout = '
            f"false (got optimizer {optimizer!r}, dropout {str(dropout).lower()})"
        )
    if method != "fedsb":
        raise ConfigError(f"backend {name!r} trains R only: federation.method must be 'fedsb'")


__all__ = ["BACKENDS", "TrainRequest", "TrainingBackend", "check_backend_job", "get_backend"]
