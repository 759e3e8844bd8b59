"""Training backends of the edge client: eager PyTorch, ONNX Runtime training, ExecuTorch."""

from .base import TrainingBackend, TrainRequest

__all__ = ["TrainRequest", "TrainingBackend"]
