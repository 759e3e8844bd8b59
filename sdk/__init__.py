"""fedsb — federated fine-tuning of foundation models on edge devices with Fed-SB.

Each adapted layer gets a frozen LoRA-SB pair (B, A) and a tiny trainable r×r matrix R;
clients exchange R only, and averaging R is exact.
"""

from __future__ import annotations

from .adapter import (
    LoraSBConfig,
    LoraSBLayer,
    adapter_state,
    apply_lora_sb,
    count_trainable,
    load_adapter_state,
    load_trainable_state,
    lora_layers,
    set_active_rank,
    trainable_state,
)
from .aggregate import aggregate
from .config import JobConfig, load_config
from .errors import ConfigError, DataError, FedsbError, ModelError, UpdateRejected, WireFormatError
from .init import init_lora_sb
from .methods import METHODS, get_method
from .wire import decode_update, encode_update

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "ConfigError",
    "DataError",
    "FedsbError",
    "JobConfig",
    "LoraSBConfig",
    "LoraSBLayer",
    "ModelError",
    "UpdateRejected",
    "WireFormatError",
    "adapter_state",
    "aggregate",
    "apply_lora_sb",
    "count_trainable",
    "decode_update",
    "encode_update",
    "get_method",
    "init_lora_sb",
    "load_adapter_state",
    "load_config",
    "load_trainable_state",
    "lora_layers",
    "set_active_rank",
    "trainable_state",
]
