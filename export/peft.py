"""Export of a trained LoRA-SB adapter as a standard PEFT LoRA adapter or a merged model.

s·B·R·A is an ordinary rank-r LoRA update with B' = s·B·R and A' = A; with
`lora_alpha = r` (PEFT scaling 1) `peft.PeftModel.from_pretrained(base, OUT)` computes
exactly the fedsb model. `merged=True` writes W0 + s·B·R·A as a plain transformers model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedsb.adapter import LoraSBLayer, lora_layers, resolve_targets, state_key
from fedsb.config import JobConfig
from fedsb.errors import ModelError

from .adapter_dir import load_adapted_model

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."


def to_peft(
    source: nn.Module | str | Path,
    out: str | Path,
    merged: bool = False,
    *,
    job: JobConfig | None = None,
) -> Path:
    """Write a PEFT LoRA adapter (or, with `merged`, a full transformers model) to `out`.

    `source` is a fedsb-adapted model or an adapter folder written by `fedsb simulate`
    (`job`, if given, must match that folder's model and rank).
    """
    out_path = Path(out)
    if isinstance(source, nn.Module):
        model, tokenizer = source, None
    else:
        adapted = load_adapted_model(source, job)
        model, tokenizer = adapted.model, adapted.tokenizer
        label_names = adapted.description.get("label_names") or []
        if label_names:
            hf_config: Any = model.config
            hf_config.id2label = dict(enumerate(label_names))
            hf_config.label2id = {name: i for i, name in enumerate(label_names)}
    if not lora_layers(model):
        raise ModelError("the model has no LoRA-SB layers: nothing to export")
    if merged:
        merged_model(model).save_pretrained(out_path)
    else:
        peft_model(model).save_pretrained(str(out_path))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_path)
    return out_path


def lora_factors(layer: LoraSBLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') = (A, s·B·R): the same update as a plain LoRA pair with scaling 1."""
    k = layer.active_rank
    B, R, A = layer.lora_B.weight[:, :k], layer.lora_R.weight[:k, :k], layer.lora_A.weight[:k]
    B_prime = layer.scaling * (B.double() @ R.double())  # (d_out, k)
    return A.detach().clone(), B_prime.to(B.dtype)


def plain_copy(model: nn.Module, fold: bool) -> nn.Module:
    """A copy of the model with every LoRA-SB layer replaced by its base layer (ΔW folded in if `fold`)."""
    copied = copy.deepcopy(model)
    for name, layer in lora_layers(copied).items():
        if fold:
            layer.fold_into_base(layer.delta_weight().detach())
        parent_name, _, child = name.rpartition(".")
        parent = copied.get_submodule(parent_name) if parent_name else copied
        setattr(parent, child, layer.base)
    if hasattr(copied, "fedsb_config"):
        del copied.fedsb_config
    for param in copied.parameters():
        param.requires_grad_(True)
    return copied


def merged_model(model: nn.Module) -> Any:
    """The transformers model with W0 + s·B·R·A in every adapted layer."""
    return plain_copy(model, fold=True)


def peft_model(model: nn.Module) -> Any:
    """A `peft.PeftModel` over the unadapted base carrying A', B' and the saved modules."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from peft import set_peft_model_state_dict as set_state

    layers = lora_layers(model)
    config = getattr(model, "fedsb_config", None)
    saved: Sequence[str] = config.modules_to_save if config is not None else ()
    targets = resolve_targets(model, config.target_modules if config is not None else list(layers))
    rank = max(layer.active_rank for layer in layers.values())
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # PEFT scaling alpha/r = 1: the scale s is folded into B'
        target_modules=targets if isinstance(targets, str) else list(targets),
        modules_to_save=list(saved) or None,
        fan_in_fan_out=any(isinstance(layer.base, Conv1D) for layer in layers.values()),
        lora_dropout=0.0,
        bias="none",
    )
    wrapped = get_peft_model(plain_copy(model, fold=False), lora_config)
    state = {name: p.detach() for name, p in model.named_parameters()}
    factors = {name: lora_factors(layer) for name, layer in layers.items()}
    values = {}
    for key in get_peft_model_state_dict(wrapped):
        values[key] = peft_value(key.removeprefix(PEFT_PREFIX), factors, state)
    result: Any = set_state(wrapped, values)
    if result.unexpected_keys:
        raise ModelError(f"PEFT did not accept {result.unexpected_keys[:3]}")
    return wrapped


def peft_value(
    name: str,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    state: dict[str, torch.Tensor],
) -> torch.Tensor:
    """The tensor for one PEFT state-dict entry: A', B' of a layer, or a saved module's parameter."""
    for suffix, index in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
        if name.endswith(suffix) and name.removesuffix(suffix) in factors:
            return factors[name.removesuffix(suffix)][index]
    by_state_key = {state_key(k): v for k, v in state.items()}
    for candidate in (name, name.replace(".base.", ".")):
        if candidate in state:
            return state[candidate]
        if candidate in by_state_key:
            return by_state_key[candidate]
    raise ModelError(f"PEFT expects {name!r}, which the fedsb model does not have")
