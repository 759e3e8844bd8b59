"""Rebuilding a fedsb-adapted model from a saved adapter folder (`fedsb.report.save_adapter`).

The folder holds `adapter.safetensors` (A, B, R of every layer + `modules_to_save`) and
`adapter_config.json` (`fedsb.report.adapter_description`: base model, labels, adapter config).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedsb.adapter import LoraSBConfig, apply_lora_sb, load_adapter_state, mark_trainable
from fedsb.config import JobConfig
from fedsb.errors import ConfigError
from fedsb.models import load_classifier
from fedsb.report import ADAPTER_CONFIG, ADAPTER_WEIGHTS

# Methods whose final model is base + s·B·R·A alone (FedEx and FLoRA fold updates into W0).
EXPORTABLE_METHODS = ("fedsb", "fedit", "ffa")


@dataclass
class AdaptedModel:
    """A model rebuilt around a saved adapter, with R and `modules_to_save` trainable."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    description: dict[str, Any]
    lora: LoraSBConfig


def read_description(adapter_dir: str | Path) -> dict[str, Any]:
    """adapter_config.json of a fedsb adapter folder; a one-line error if it is not one."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file() or not weights.is_file():
        raise ConfigError(
            f"{str(adapter_dir)!r} is not a fedsb adapter folder "
            f"(expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, as written by fedsb simulate)"
        )
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON: {err}") from None
    if description.get("format") != "fedsb-adapter/1":
        raise ConfigError(f"{path}: not a fedsb adapter description (format fedsb-adapter/1)")
    method = description.get("method", "fedsb")
    if method not in EXPORTABLE_METHODS:
        raise ConfigError(
            f"adapter of method {method!r} cannot be exported: it folds updates into W0, "
            f"which the adapter does not hold (exportable: {', '.join(EXPORTABLE_METHODS)})"
        )
    return dict(description)


def lora_config_of(description: dict[str, Any]) -> LoraSBConfig:
    """The `LoraSBConfig` an adapter was trained with."""
    a = description["adapter"]
    return LoraSBConfig(
        rank=a["rank"],
        alpha=a.get("alpha"),
        target_modules=a.get("target_modules"),
        modules_to_save=tuple(a.get("modules_to_save", ())),
        freeze_head=bool(a.get("freeze_head", False)),
    )


def load_adapted_model(adapter_dir: str | Path, job: JobConfig | None = None) -> AdaptedModel:
    """The base model with the adapter's A, B, R and saved modules; only R + head trainable.

    With `job`, its model and adapter rank must match the adapter's (a typo'd pair is a
    one-line error, not a silently different model).
    """
    description = read_description(adapter_dir)
    if job is not None:
        check_job_matches(job, description)
    lora = lora_config_of(description)
    model, tokenizer = load_classifier(description["base_model"], description["num_labels"])
    apply_lora_sb(model, lora)
    load_adapter_state(model, load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS)))
    mark_trainable(model, lora.trained_modules)
    model.eval()
    return AdaptedModel(model, tokenizer, description, lora)


def check_job_matches(job: JobConfig, description: dict[str, Any]) -> None:
    """The job config and the adapter must describe the same model and rank."""
    if job.model.name != description["base_model"]:
        raise ConfigError(
            f"config model.name is {job.model.name!r} but the adapter was trained on "
            f"{description['base_model']!r}"
        )
    if job.adapter.rank != description["adapter"]["rank"]:
        raise ConfigError(
            f"config adapter.rank is {job.adapter.rank} but the adapter has rank "
            f"{description['adapter']['rank']}"
        )


def model_for_export(
    source: nn.Module | str | Path, job: JobConfig | None, out: Path
) -> tuple[nn.Module, dict[str, Any]]:
    """The model to export and the manifest extras: a model as given, or one rebuilt from an
    adapter folder (its tokenizer is then copied into `out` and its label names returned)."""
    if isinstance(source, nn.Module):
        return source, {}
    adapted = load_adapted_model(source, job)
    adapted.tokenizer.save_pretrained(out / "tokenizer")
    return adapted.model, {"label_names": adapted.description.get("label_names", [])}
