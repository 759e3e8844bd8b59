"""Export of fedsb models: edge training artifacts (ONNX Runtime, ExecuTorch) and PEFT adapters."""

from .executorch import to_executorch
from .onnx import to_onnx_training
from .peft import to_peft

__all__ = ["to_executorch", "to_onnx_training", "to_peft"]
