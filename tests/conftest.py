"""Shared fixtures: a tiny random BERT saved next to the real MiniLM tokenizer, job configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from fedsb.config import parse_config
from fedsb.models import resolve_model_path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random BERT with MiniLM's real tokenizer, saved as a local model directory."""
    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path("all-MiniLM-L6-v2"), local_files_only=True
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_job(model_dir: Path, **federation: object) -> dict:
    """A small but real job dict: tiny model, real chatterbot data subset."""
    fed = {"clients": 4, "rounds": 2, "local_steps": 2, "batch_size": 8} | federation
    return {
        "name": "tiny",
        "seed": 0,
        "model": {"name": str(model_dir), "max_length": 16},
        "data": {"dataset": "chatterbot-topics", "max_train_examples": 120},
        "adapter": {"rank": 4, "init_samples": 16},
        "federation": fed,
        "simulation": {"transport": "inproc"},
    }


def frozen_head_job(model_dir: Path, **federation: object):
    """The tiny job with `adapter.freeze_head`: the probed head is kept and never trained."""
    raw = tiny_job(model_dir, **federation)
    raw["adapter"] |= {"freeze_head": True}
    return parse_config(raw)


@pytest.fixture
def tiny_config(tiny_model_dir: Path):
    def make(**federation: object):
        return parse_config(tiny_job(tiny_model_dir, **federation))

    return make
