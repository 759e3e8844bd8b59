"""The runtime-neutral training graph: loss first, dropout off, fedsb's trainable names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fedsb
from fedsb.edge_client.backends.onnxruntime_backend import OnnxRuntimeBackend
from fedsb.errors import ConfigError
from fedsb.export import to_onnx_training
from fedsb.export.training_graph import (
    InferenceGraph,
    TrainingGraph,
    frozen_graph_names,
    trainable_graph_names,
)


def test_graph_names_map_to_trainable_state(tiny_adapted):
    graph = TrainingGraph(tiny_adapted)
    names = trainable_graph_names(graph)
    assert list(names.values()) == list(fedsb.trainable_state(tiny_adapted))
    assert names["model.bert.encoder.layer.1.output.dense.lora_R.weight"] == (
        "bert.encoder.layer.1.output.dense.R"
    )
    frozen = frozen_graph_names(graph)
    assert "model.bert.encoder.layer.1.output.dense.lora_B.weight" in frozen
    assert not set(names) & set(frozen)


def test_training_graph_returns_loss_first_without_dropout(tiny_adapted, tiny_data):
    graph = TrainingGraph(tiny_adapted).train()  # what exporters do: the inner model stays in eval
    assert graph.training and not tiny_adapted.training
    batch = tiny_data.batch(torch.arange(8))
    loss, logits = graph(batch["input_ids"], batch["attention_mask"], batch["labels"])
    again, _ = graph(batch["input_ids"], batch["attention_mask"], batch["labels"])
    expected = tiny_adapted(**batch)
    assert loss.ndim == 0 and torch.equal(loss, again)  # no dropout: deterministic
    assert torch.equal(loss, expected.loss) and torch.equal(logits, expected.logits)
    inference = InferenceGraph(tiny_adapted).train()
    assert torch.equal(inference(batch["input_ids"], batch["attention_mask"]), expected.logits)


def test_adamw_artifacts_are_written_but_the_backend_trains_with_sgd(tiny_adapted, tmp_path: Path):
    to_onnx_training(tiny_adapted, tmp_path, optimizer="adamw")
    assert (tmp_path / "optimizer_model.onnx").stat().st_size > 0
    with pytest.raises(ConfigError, match="was exported with optimizer 'adamw'"):
        OnnxRuntimeBackend(tmp_path)
