"""ONNX Runtime on-device training artifacts with only R (and `modules_to_save`) trainable.

Writes, in `out_dir`: `training_model.onnx`, `eval_model.onnx`, `optimizer_model.onnx`,
`checkpoint` (ORT training artifacts), `inference.onnx` (logits only) and `fedsb_onnx.json`
(which checkpoint parameter is which `fedsb.trainable_state` tensor, and its learning-rate
group). Batch size and sequence length are dynamic.

The logits graph is exported with the legacy exporter in training mode without constant
folding (PLATFORM-NOTES: folding renames R), and ORT adds its own CrossEntropyLoss: the
traced HF loss has no ORT gradient (SoftmaxCrossEntropyLoss without its log-prob output).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fedsb.adapter import lora_layers
from fedsb.config import JobConfig
from fedsb.errors import ConfigError, ModelError

from .adapter_dir import model_for_export
from .training_graph import (
    InferenceGraph,
    example_inputs,
    frozen_graph_names,
    is_lora_parameter,
    trainable_graph_names,
)

log = logging.getLogger(__name__)

MANIFEST = "fedsb_onnx.json"
INFERENCE_MODEL = "inference.onnx"
TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"
OPSET = 17
DYNAMIC_AXES = {
    "input_ids": {0: "batch", 1: "sequence"},
    "attention_mask": {0: "batch", 1: "sequence"},
    "logits": {0: "batch"},
}


@dataclass(frozen=True)
class OnnxArtifacts:
    """Paths of everything `to_onnx_training` wrote."""

    out_dir: Path
    training_model: Path
    eval_model: Path
    optimizer_model: Path
    checkpoint: Path
    inference_model: Path
    manifest: Path


def to_onnx_training(
    source: nn.Module | str | Path,
    out_dir: str | Path,
    *,
    job: JobConfig | None = None,
    optimizer: Literal["sgd", "adamw"] = "sgd",
) -> OnnxArtifacts:
    """Export a fedsb-adapted model (or a saved adapter folder) as ORT training artifacts.

    `source` is a model prepared by `fedsb.apply_lora_sb` (R and `modules_to_save`
    trainable) or an adapter folder written by `fedsb simulate`; `job` checks that folder.
    `optimizer="adamw"` gives ORT's AdamW, the Hugging Face variant (not torch's).
    """
    if optimizer not in ("sgd", "adamw"):
        raise ConfigError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, extra = model_for_export(source, job, out)
    graph = InferenceGraph(model)
    names = check_trainable(graph)
    hf_config: Any = model.config
    inputs = example_inputs(vocab_size=int(hf_config.vocab_size))[:2]
    export_logits_graph(graph, inputs, out / INFERENCE_MODEL, training=False)
    base_path = out / "base_for_training.onnx"
    export_logits_graph(graph, inputs, base_path, training=True)
    try:
        generate_training_artifacts(base_path, out, names, frozen_graph_names(graph), optimizer)
    finally:
        base_path.unlink(missing_ok=True)
    manifest = write_manifest(out, graph, names, optimizer, extra)
    return OnnxArtifacts(
        out,
        out / TRAINING_MODEL,
        out / EVAL_MODEL,
        out / OPTIMIZER_MODEL,
        out / CHECKPOINT,
        out / INFERENCE_MODEL,
        manifest,
    )


def check_trainable(graph: InferenceGraph) -> dict[str, str]:
    """Graph → state names of the trainable tensors; only R may train among LoRA factors."""
    if not lora_layers(graph.model):
        raise ModelError("the model has no LoRA-SB layers: call fedsb.apply_lora_sb first")
    if num_labels(graph.model) < 2:
        raise ModelError("edge export supports classifiers with num_labels >= 2 (cross-entropy)")
    names = trainable_graph_names(graph)
    not_r = [n for n in names if is_lora_parameter(n) and not n.endswith(".lora_R.weight")]
    if not_r:
        raise ModelError(
            f"{len(not_r)} LoRA A/B factors are trainable (e.g. {not_r[0]}); edge training "
            "exports train R only: prepare the model with fedsb.apply_lora_sb"
        )
    return names


def export_logits_graph(
    graph: InferenceGraph, inputs: tuple[torch.Tensor, ...], path: Path, *, training: bool
) -> None:
    """Legacy ONNX export of (input_ids, attention_mask) → logits with dynamic batch/sequence."""
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    was_training = graph.training
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            graph,
            inputs,
            str(path),
            dynamo=False,
            training=mode,
            do_constant_folding=not training,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes=DYNAMIC_AXES,
            opset_version=OPSET,
        )
    graph.train(was_training)


def generate_training_artifacts(
    base_path: Path,
    out: Path,
    names: dict[str, str],
    frozen: list[str],
    optimizer: str,
) -> None:
    """ORT training, eval and optimizer models plus the checkpoint, from the logits graph."""
    import onnx
    import onnxruntime
    from onnxruntime.training import artifacts

    onnxruntime.set_default_logger_severity(3)  # its graph transformers log at info level
    model = onnx.load(str(base_path))
    expose_layer_norm_statistics(model)
    initializers = {init.name for init in model.graph.initializer}
    missing = [n for n in names if n not in initializers]
    if missing:
        raise ModelError(f"trainable tensors {missing[:3]} were renamed by the ONNX export")
    with native_stderr_to_log():
        artifacts.generate_artifacts(
            model,
            requires_grad=list(names),
            frozen_params=[n for n in frozen if n in initializers],
            loss=artifacts.LossType.CrossEntropyLoss,
            optimizer=artifacts.OptimType.SGD if optimizer == "sgd" else artifacts.OptimType.AdamW,
            artifact_directory=str(out),
            additional_output_names=["logits"],
        )


@contextlib.contextmanager
def native_stderr_to_log() -> Iterator[None]:
    """Send what C++ code writes to stderr into the debug log.

    ORT's gradient-graph builder logs every graph transformer at info level, whatever
    `set_default_logger_severity` says: hundreds of lines per export.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            log.debug("onnxruntime: %s", capture.read().decode(errors="replace"))


def expose_layer_norm_statistics(model: Any) -> None:
    """Give every LayerNormalization its optional mean/inv-std outputs: ORT's gradient needs them."""
    for i, node in enumerate(n for n in model.graph.node if n.op_type == "LayerNormalization"):
        while len(node.output) < 3:
            node.output.append(f"{node.name or 'layer_norm'}_{i}_stat{len(node.output)}")


def write_manifest(
    out: Path, graph: InferenceGraph, names: dict[str, str], optimizer: str, extra: dict[str, Any]
) -> Path:
    """fedsb_onnx.json: checkpoint name → state name and lr group of every trainable tensor."""
    manifest = {
        "format": "fedsb-onnx/1",
        "inputs": ["input_ids", "attention_mask", "labels"],
        "outputs": ["loss", "logits"],
        "optimizer": optimizer,
        "num_labels": num_labels(graph.model),
        "trainable": [
            {
                "onnx": onnx_name,
                "state": state,
                "group": "lora" if is_lora_parameter(onnx_name) else "head",
            }
            for onnx_name, state in names.items()
        ],
        "files": {
            "training": TRAINING_MODEL,
            "eval": EVAL_MODEL,
            "optimizer": OPTIMIZER_MODEL,
            "checkpoint": CHECKPOINT,
            "inference": INFERENCE_MODEL,
        },
        **extra,
    }
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def num_labels(model: nn.Module) -> int:
    """Classes of an HF sequence classifier (2 if its config does not say)."""
    return int(getattr(getattr(model, "config", None), "num_labels", 2))


def read_manifest(artifact_dir: str | Path) -> dict[str, Any]:
    """The manifest of an artifact folder; a one-line error if the folder is not one."""
    path = Path(artifact_dir) / MANIFEST
    if not path.is_file():
        raise ConfigError(
            f"{str(artifact_dir)!r} has no {MANIFEST}: export it with `fedsb export onnx`"
        )
    manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return manifest
