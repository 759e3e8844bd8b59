"""ONNX Runtime on-device training on artifacts from `fedsb.export.to_onnx_training`.

ORT runs forward and backward (the training model). With one learning rate for every
trainable tensor, ORT's own SGD optimizer model makes the step. ORT's optimizer has a
single learning rate, so when R and `modules_to_save` have different ones (lr ≠ head_lr)
the backend applies the same SGD update p ← p − lr_group·∇p itself from ORT's gradients.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsb.errors import ConfigError, ModelError
from fedsb.training import Batch, Encoded, TrainStats, sample_batches, sequential_batches

from .base import TrainingBackend, TrainRequest


def import_ort_training() -> Any:
    """`onnxruntime.training.api`, or a one-line error saying what to install."""
    try:
        from onnxruntime.training import api
    except ImportError as err:
        raise ConfigError(
            "the onnxruntime backend needs onnxruntime-training: pip install 'fedsb[ort]' "
            f"(and not the plain onnxruntime package) ({err})"
        ) from None
    return api


class OnnxRuntimeBackend(TrainingBackend):
    """Trains R and the head inside ORT; the torch model is not touched."""

    name = "onnxruntime"

    def __init__(self, artifact_dir: str | Path) -> None:
        from fedsb.export.onnx import read_manifest

        api = import_ort_training()
        import onnxruntime

        self.dir = Path(artifact_dir)
        self.manifest = read_manifest(self.dir)
        if self.manifest["optimizer"] != "sgd":
            raise ConfigError(
                f"{self.dir} was exported with optimizer {self.manifest['optimizer']!r}; "
                "the onnxruntime backend trains with sgd (export with optimizer='sgd')"
            )
        files = self.manifest["files"]
        onnxruntime.set_default_logger_severity(3)  # shape-merge warnings of the training graph
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.state = api.CheckpointState.load_checkpoint(str(self.dir / files["checkpoint"]))
        self.module = api.Module(
            str(self.dir / files["training"]),
            self.state,
            str(self.dir / files["eval"]),
            session_options=options,
        )
        self.optimizer = api.Optimizer(str(self.dir / files["optimizer"]), self.module)
        self.names = {t["state"]: t["onnx"] for t in self.manifest["trainable"]}
        self.groups = {t["onnx"]: t["group"] for t in self.manifest["trainable"]}
        self.scratch: tempfile.TemporaryDirectory[str] | None = None

    def load_trainable(self, state: Mapping[str, torch.Tensor]) -> None:
        unknown = sorted(set(state) - set(self.names))
        if unknown:
            raise ModelError(f"unknown trainable tensors {unknown[:5]} for {self.dir}")
        for key, value in state.items():
            param = self.state.parameters[self.names[key]]
            array = value.detach().to("cpu", torch.float32).numpy()
            if tuple(param.data.shape) != array.shape:
                raise ModelError(
                    f"{key!r} has shape {array.shape}, the artifacts expect {param.data.shape}"
                )
            self.state.parameters[self.names[key]] = np.ascontiguousarray(array)

    def train(self, data: Encoded, request: TrainRequest) -> TrainStats:
        if request.optimizer != "sgd" or request.dropout:
            raise ConfigError(
                "the onnxruntime backend trains with optimizer 'sgd' and no dropout: "
                'set federation.optimizer = "sgd" and federation.dropout = false'
            )
        generator = torch.Generator().manual_seed(request.seed)
        lrs = {"lora": request.lr, "head": request.head_lr}
        one_lr = len({lrs[g] for g in self.groups.values()}) == 1
        self.optimizer.set_learning_rate(request.lr if one_lr else 0.0)
        self.module.train()
        total_loss, seen = 0.0, 0
        for batch in sample_batches(data, request.batch_size, request.steps, generator):
            loss, _ = self.module(*ort_inputs(batch))
            if one_lr:
                self.optimizer.step()
            else:
                self.sgd_step(lrs)
            self.module.lazy_reset_grad()
            total_loss += float(loss) * int(batch["labels"].shape[0])
            seen += int(batch["labels"].shape[0])
        self.module.eval()
        return TrainStats(loss=total_loss / max(seen, 1), examples=seen, steps=request.steps)

    def sgd_step(self, lrs: Mapping[str, float]) -> None:
        """p ← p − lr·∇p with the learning rate of p's group, from the gradients ORT computed."""
        for name, group in self.groups.items():
            param = self.state.parameters[name]
            step = np.float32(lrs[group]) * param.grad
            self.state.parameters[name] = param.data - step

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {
            key: torch.from_numpy(np.array(self.state.parameters[name].data, dtype=np.float32))
            for key, name in self.names.items()
        }

    def evaluate(self, data: Encoded) -> dict[str, float]:
        self.module.eval()
        correct, total_loss = 0, 0.0
        for batch in sequential_batches(data, 64):
            loss, logits = self.module(*ort_inputs(batch))
            correct += int((logits.argmax(-1) == batch["labels"].numpy()).sum())
            total_loss += float(loss) * int(batch["labels"].shape[0])
        n = max(len(data), 1)
        return {"accuracy": correct / n, "loss": total_loss / n}


def ort_inputs(batch: Batch) -> tuple[np.ndarray, ...]:
    """(input_ids, attention_mask, labels) as int64 arrays, the training model's inputs."""
    return tuple(
        np.ascontiguousarray(batch[k].numpy().astype(np.int64))
        for k in ("input_ids", "attention_mask", "labels")
    )


def create_backend(model: nn.Module, work_dir: Path | None = None) -> OnnxRuntimeBackend:
    """Export `model` (its current A, B, W0, R and head) and load the artifacts in ORT."""
    from fedsb.export.onnx import to_onnx_training

    import_ort_training()
    scratch = None if work_dir else tempfile.TemporaryDirectory(prefix="fedsb-ort-")
    out = Path(work_dir) if work_dir else Path(scratch.name)  # type: ignore[union-attr]
    to_onnx_training(model, out, optimizer="sgd")
    backend = OnnxRuntimeBackend(out)
    backend.scratch = scratch  # removed with the backend
    return backend
