"""Fixtures of the edge-runtime tests: a tiny adapted model, real MiniLM, tokenised real text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification

import fedsb
from fedsb.config import parse_config
from fedsb.data import load_dataset
from fedsb.models import load_classifier
from fedsb.report import adapter_description, save_adapter
from fedsb.training import Encoded, encode_texts


def randomise_r(model: torch.nn.Module, seed: int) -> None:
    """A trained-looking R (not the init's diagonal) so that R·A and B·R matter in every test."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in fedsb.lora_layers(model).values():
            R = layer.lora_R.weight
            R.add_(0.1 * torch.randn(R.shape, generator=generator))


def real_text(tokenizer, count: int, max_length: int) -> Encoded:
    """`count` real chatterbot utterances with their topic labels (5 topics kept)."""
    split = load_dataset("chatterbot-topics", seed=0, max_examples=400)
    keep = [i for i, y in enumerate(split.train.labels) if y < 5][:count]
    texts = [split.train.texts[i] for i in keep]
    labels = [split.train.labels[i] for i in keep]
    return encode_texts(tokenizer, texts, labels, max_length)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_data(tiny_tokenizer) -> Encoded:
    return real_text(tiny_tokenizer, 48, 16)


def make_tiny_adapted(model_dir: Path, data: Encoded) -> torch.nn.Module:
    """The tiny BERT with LoRA-SB (rank 4, every linear layer, head trainable), Fed-SB init."""
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        model_dir, num_labels=5, ignore_mismatched_sizes=True
    )
    config = fedsb.LoraSBConfig(rank=4, modules_to_save=["classifier"], init_samples=16)
    fedsb.apply_lora_sb(model, config)
    fedsb.init_lora_sb(model, [data.batch(torch.arange(16))], config)
    randomise_r(model, 1)
    return model.eval()


@pytest.fixture
def tiny_adapted(tiny_model_dir: Path, tiny_data: Encoded) -> torch.nn.Module:
    return make_tiny_adapted(tiny_model_dir, tiny_data)


@pytest.fixture(scope="session")
def minilm_setup() -> tuple[torch.nn.Module, Encoded]:
    """Real all-MiniLM-L6-v2 as in the demo: rank 16 on all 36 linear layers, Fed-SB init."""
    model, tokenizer = load_classifier("all-MiniLM-L6-v2", 5, seed=0)
    data = real_text(tokenizer, 64, 32)
    config = fedsb.LoraSBConfig(rank=16, modules_to_save=["classifier"], init_samples=32)
    fedsb.apply_lora_sb(model, config)
    fedsb.init_lora_sb(model, [data.batch(torch.arange(32))], config)
    return model.eval(), data


def tiny_job_dict(model_dir: Path, **federation: object) -> dict:
    fed = {"clients": 3, "rounds": 2, "local_steps": 2, "batch_size": 8} | federation
    return {
        "name": "edge",
        "seed": 0,
        "model": {"name": str(model_dir), "max_length": 16},
        "data": {"dataset": "chatterbot-topics", "max_train_examples": 120},
        "adapter": {"rank": 4, "init_samples": 16},
        "federation": {"optimizer": "sgd", "dropout": False} | fed,
        "simulation": {"transport": "mqtt"},
    }


@pytest.fixture
def tiny_adapter_dir(tiny_model_dir: Path, tiny_data: Encoded, tmp_path: Path) -> Path:
    """A saved fedsb adapter folder (as `fedsb simulate` writes) and its job file next to it."""
    model = make_tiny_adapted(tiny_model_dir, tiny_data)
    raw = tiny_job_dict(tiny_model_dir)
    job = parse_config(raw)
    labels = [f"topic{i}" for i in range(5)]
    out = save_adapter(
        tmp_path / "adapter",
        fedsb.adapter_state(model, ["classifier"]),
        adapter_description(job, labels),
    )
    (tmp_path / "job.toml").write_text(toml_of(raw))
    return out


def toml_of(raw: dict) -> str:
    """A tiny TOML writer for the job dicts above (strings, numbers, booleans, one level)."""
    lines = [f"name = {json.dumps(raw['name'])}", f"seed = {raw['seed']}"]
    for section in ("model", "data", "adapter", "federation", "simulation"):
        lines.append(f"[{section}]")
        for key, value in raw[section].items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"
