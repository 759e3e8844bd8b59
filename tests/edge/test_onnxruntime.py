"""ONNX Runtime training: only R and the head train, and 10 steps equal eager PyTorch SGD."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import fedsb
from fedsb.edge_client.backends import TrainRequest, get_backend
from fedsb.edge_client.backends.onnxruntime_backend import OnnxRuntimeBackend
from fedsb.errors import ConfigError
from fedsb.export import to_onnx_training
from fedsb.training import Encoded, evaluate, train_local

STEPS = 10


def max_r_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if k.endswith(".R"))


def parity(model: torch.nn.Module, data: Encoded, lr: float, head_lr: float) -> tuple[float, float]:
    """(max |ΔR| ORT vs eager torch SGD after STEPS steps, max |R change| of eager torch)."""
    start = fedsb.trainable_state(model)
    backend = get_backend("onnxruntime", model)
    eager = copy.deepcopy(model)
    train_local(
        eager, data, steps=STEPS, batch_size=8, lr=lr, head_lr=head_lr, seed=7,
        optimizer="sgd", dropout=False,
    )  # fmt: skip
    backend.load_trainable(start)
    request = TrainRequest(steps=STEPS, batch_size=8, lr=lr, head_lr=head_lr, seed=7)
    backend.train(data, request)
    torch_state, ort_state = fedsb.trainable_state(eager), backend.trainable_state()
    assert ort_state.keys() == torch_state.keys()
    head = max(float((torch_state[k] - ort_state[k]).abs().max()) for k in torch_state)
    assert head <= 1e-5
    return max_r_difference(torch_state, ort_state), max_r_difference(torch_state, start)


def test_checkpoint_trains_exactly_the_trainable_state(tiny_adapted, tmp_path: Path):
    from onnxruntime.training.api import CheckpointState

    artifacts = to_onnx_training(tiny_adapted, tmp_path)
    state = CheckpointState.load_checkpoint(str(artifacts.checkpoint))
    trainable = sorted(
        name.removeprefix("model.").replace(".lora_R.weight", ".R")
        for name, param in state.parameters
        if param.requires_grad
    )
    assert trainable == sorted(fedsb.trainable_state(tiny_adapted))
    frozen = [name for name, param in state.parameters if not param.requires_grad]
    assert all(not n.endswith((".lora_A.weight", ".lora_B.weight")) for n in trainable)
    assert sum(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in frozen) == 2 * 12
    assert "model.bert.encoder.layer.0.attention.self.query.base.weight" in frozen
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [
        "checkpoint",
        "eval_model.onnx",
        "fedsb_onnx.json",
        "inference.onnx",
        "optimizer_model.onnx",
        "training_model.onnx",
    ]


@pytest.mark.parametrize(("lr", "head_lr"), [(0.5, 0.5), (0.5, 0.1)])
def test_ort_sgd_matches_eager_torch_on_tiny_model(tiny_adapted, tiny_data, lr, head_lr):
    difference, moved = parity(tiny_adapted, tiny_data, lr, head_lr)
    assert moved > 1e-3  # R really trained
    assert difference <= 1e-5


def test_ort_sgd_matches_eager_torch_on_minilm(minilm_setup):
    model, data = minilm_setup
    difference, moved = parity(model, data, lr=1e-1, head_lr=1e-1)
    print(f"MiniLM-L6 r=16: max |ΔR| ORT vs torch after {STEPS} SGD steps = {difference:.2e}")
    print(f"(max |R change| in those steps = {moved:.2e})")
    assert moved > 1e-4
    assert difference <= 1e-5


def test_dynamic_batch_and_sequence_length(tiny_adapted, tiny_data, tmp_path: Path):
    import onnxruntime

    artifacts = to_onnx_training(tiny_adapted, tmp_path)
    session = onnxruntime.InferenceSession(str(artifacts.inference_model))
    for batch, length in ((1, 16), (5, 9)):
        ids = tiny_data.input_ids[:batch, :length]
        mask = tiny_data.attention_mask[:batch, :length]
        (logits,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        with torch.no_grad():
            expected = tiny_adapted(input_ids=ids, attention_mask=mask).logits.numpy()
        assert logits.shape == (batch, 5)
        assert np.abs(logits - expected).max() <= 1e-5


def test_backend_evaluates_like_torch(tiny_adapted, tiny_data):
    backend = get_backend("onnxruntime", tiny_adapted)
    assert isinstance(backend, OnnxRuntimeBackend)
    got, expected = backend.evaluate(tiny_data), evaluate(tiny_adapted, tiny_data)
    assert got["accuracy"] == expected["accuracy"]
    assert abs(got["loss"] - expected["loss"]) <= 1e-5


def test_backend_refuses_adamw_and_dropout(tiny_adapted, tiny_data):
    backend = get_backend("onnxruntime", tiny_adapted)
    with pytest.raises(ConfigError, match='federation.optimizer = "sgd"'):
        backend.train(tiny_data, TrainRequest(2, 8, 0.1, 0.1, 0, optimizer="adamw"))
    with pytest.raises(ConfigError, match="federation.dropout = false"):
        backend.train(tiny_data, TrainRequest(2, 8, 0.1, 0.1, 0, dropout=True))


def test_unknown_backend_is_a_one_line_error(tiny_adapted):
    with pytest.raises(ConfigError, match="unknown backend 'tflite'"):
        get_backend("tflite", tiny_adapted)
