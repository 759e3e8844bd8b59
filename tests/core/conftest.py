"""Tiny random models of the three supported families, built from configs (nothing downloaded).

`MODEL_CASES` is a parametrised table in the spirit of PEFT's TEST_CASES: one row per family
with the numbers a test can assert (adapted layers with the preset targets, head parameters).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

VOCAB = 100
NUM_LABELS = 3
SEQ_LEN = 8


def tiny_bert() -> nn.Module:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=NUM_LABELS,
    )
    return BertForSequenceClassification(config)


def tiny_gpt2() -> nn.Module:
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        num_labels=NUM_LABELS,
        pad_token_id=0,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )
    return GPT2ForSequenceClassification(config)


def tiny_llama() -> nn.Module:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=NUM_LABELS,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(config)


@dataclass(frozen=True)
class ModelCase:
    """One model family: how to build it and what `apply_lora_sb` must do to it."""

    family: str
    build: Callable[[], nn.Module]
    head: str  # the classification head, kept trainable through modules_to_save
    head_params: int  # scalars of the head
    n_adapted: int  # layers adapted by the family's target preset
    conv1d: bool  # are the targets transformers Conv1D (weight stored d_in × d_out)?


MODEL_CASES = [
    # BERT: query, key, value, attention.output.dense, intermediate.dense, output.dense per layer
    ModelCase("bert", tiny_bert, "classifier", 32 * NUM_LABELS + NUM_LABELS, 2 * 6, False),
    # GPT-2: c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj per layer (score has no bias)
    ModelCase("gpt2", tiny_gpt2, "score", 32 * NUM_LABELS, 2 * 4, True),
    # Llama: q, k, v, o, gate, up, down per layer (score has no bias)
    ModelCase("llama", tiny_llama, "score", 32 * NUM_LABELS, 2 * 7, False),
]


@pytest.fixture(params=MODEL_CASES, ids=[c.family for c in MODEL_CASES])
def case(request: pytest.FixtureRequest) -> ModelCase:
    return request.param


def make_model(case: ModelCase, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A fresh tiny model of the family, deterministic in `seed`, in eval mode."""
    torch.manual_seed(seed)
    return case.build().to(dtype).eval()


def make_batches(
    n_batches: int = 3, batch_size: int = 4, seed: int = 1
) -> list[dict[str, torch.Tensor]]:
    """Random token batches (no padding token 0 inside) with labels."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        input_ids = torch.randint(1, VOCAB, (batch_size, SEQ_LEN), generator=generator)
        batches.append(
            {
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "labels": torch.randint(0, NUM_LABELS, (batch_size,), generator=generator),
            }
        )
    return batches


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
