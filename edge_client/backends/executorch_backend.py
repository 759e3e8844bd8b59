"""ExecuTorch on-device training on programs from `fedsb.export.to_executorch`.

The training program runs forward and backward; ExecuTorch's SGD makes the step, one
optimizer per learning-rate group (R, `modules_to_save`). The parameters live in tensors the
runtime owns, returned by `named_parameters()` after a first `forward_backward`: loading a
global state copies into them. Evaluation runs the inference program with the current
trainable tensors as inputs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedsb.errors import ConfigError, ModelError
from fedsb.training import Batch, Encoded, TrainStats, sample_batches, sequential_batches

from .base import TrainingBackend, TrainRequest


def import_executorch_runtime() -> tuple[Any, Any, Any]:
    """(TrainingModule, get_sgd_optimizer, _load_for_executorch), or a one-line error."""
    try:
        from executorch.extension.pybindings.portable_lib import _load_for_executorch
        from executorch.extension.training import TrainingModule, get_sgd_optimizer
    except ImportError as err:
        raise ConfigError(
            f"the executorch backend needs executorch: pip install 'fedsb[executorch]' ({err})"
        ) from None
    return TrainingModule, get_sgd_optimizer, _load_for_executorch


class ExecuTorchBackend(TrainingBackend):
    """Trains R and the head inside ExecuTorch; the torch model is not touched."""

    name = "executorch"

    def __init__(self, artifact_dir: str | Path) -> None:
        from fedsb.export.executorch import read_manifest

        training_module, self._sgd, load = import_executorch_runtime()
        self.dir = Path(artifact_dir)
        self.manifest = read_manifest(self.dir)
        files = self.manifest["files"]
        data = str(self.dir / files["weights"]) if files.get("weights") else None
        self.method = self.manifest["method"]
        self.max_batch, self.max_seq_len = self.manifest["max_batch"], self.manifest["max_seq_len"]
        self.program = training_module(load(str(self.dir / files["training"]), data))
        self.inference = load(str(self.dir / files["inference"]), data)
        trainable = self.manifest["trainable"]
        self.names = {t["state"]: t["program"] for t in trainable}
        self.groups = {t["program"]: t["group"] for t in trainable}
        self.shapes = {t["program"]: tuple(t["shape"]) for t in trainable}
        self.scratch: tempfile.TemporaryDirectory[str] | None = None
        self.params = self.runtime_parameters()

    def runtime_parameters(self) -> dict[str, torch.Tensor]:
        """The runtime-owned parameter tensors; they exist after one forward_backward."""
        ids = torch.ones(1, 2, dtype=torch.long)  # the smallest batch the program takes
        self.program.forward_backward(self.method, (ids, torch.ones_like(ids), ids[:, 0] * 0))
        params: dict[str, torch.Tensor] = self.program.named_parameters()
        if set(params) != set(self.groups):
            raise ModelError(
                f"{self.dir / self.manifest['files']['training']} trains "
                f"{sorted(set(params) ^ set(self.groups))[:3]}… unlike its manifest"
            )
        return params

    def load_trainable(self, state: Mapping[str, torch.Tensor]) -> None:
        unknown = sorted(set(state) - set(self.names))
        if unknown:
            raise ModelError(f"unknown trainable tensors {unknown[:5]} for {self.dir}")
        for key, value in state.items():
            param = self.params[self.names[key]]
            if tuple(param.shape) != tuple(value.shape):
                raise ModelError(
                    f"{key!r} has shape {tuple(value.shape)}, the program expects "
                    f"{tuple(param.shape)}"
                )
            param.copy_(value.detach().to("cpu", torch.float32))

    def train(self, data: Encoded, request: TrainRequest) -> TrainStats:
        if request.optimizer != "sgd" or request.dropout:
            raise ConfigError(
                "the executorch backend trains with optimizer 'sgd' and no dropout: "
                'set federation.optimizer = "sgd" and federation.dropout = false'
            )
        optimizers = self.optimizers({"lora": request.lr, "head": request.head_lr})
        generator = torch.Generator().manual_seed(request.seed)
        total_loss, seen = 0.0, 0
        for batch in sample_batches(data, request.batch_size, request.steps, generator):
            loss = self.program.forward_backward(self.method, self.inputs(batch))[0]
            grads = self.program.named_gradients()
            for names, optimizer in optimizers:
                optimizer.step({n: grads[n] for n in names})
            total_loss += float(loss) * int(batch["labels"].shape[0])
            seen += int(batch["labels"].shape[0])
        return TrainStats(loss=total_loss / max(seen, 1), examples=seen, steps=request.steps)

    def optimizers(self, lrs: Mapping[str, float]) -> list[tuple[list[str], Any]]:
        """One ExecuTorch SGD per learning-rate group, over disjoint parameter sets."""
        result = []
        for group, lr in lrs.items():
            names = [n for n, g in self.groups.items() if g == group]
            if names:
                params = {n: self.params[n] for n in names}
                result.append((names, self._sgd(params, lr, 0.0, 0.0, 0.0, False)))
        return result

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {key: self.params[name].detach().clone() for key, name in self.names.items()}

    def logits(self, batch: Batch) -> torch.Tensor:
        """Logits of the inference program with the current trainable tensors."""
        trainable = [self.params[t["program"]] for t in self.manifest["trainable"]]
        inputs = (*self.inputs(batch)[:2], *trainable)
        out: torch.Tensor = self.inference.run_method(self.method, inputs)[0]
        return out

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """(input_ids, attention_mask, labels) as int64, within the shapes the programs take."""
        size, length = batch["input_ids"].shape
        if size > self.max_batch or length > self.max_seq_len:
            raise ConfigError(
                f"{self.dir} takes batches of up to {self.max_batch} sequences of up to "
                f"{self.max_seq_len} tokens, got {size}×{length}: export with larger "
                "max_batch / max_seq_len"
            )
        keys = ("input_ids", "attention_mask", "labels")
        return tuple(batch[k].to(torch.long).contiguous() for k in keys)

    def evaluate(self, data: Encoded) -> dict[str, float]:
        correct, total_loss = 0, 0.0
        for batch in sequential_batches(data, self.max_batch):
            logits = self.logits(batch)
            labels = batch["labels"]
            correct += int((logits.argmax(-1) == labels).sum())
            total_loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        n = max(len(data), 1)
        return {"accuracy": correct / n, "loss": total_loss / n}


def create_backend(model: nn.Module, work_dir: Path | None = None) -> ExecuTorchBackend:
    """Export `model` (its current A, B, W0, R and head) and load the programs.

    Portable kernels: the export takes far less time than XNNPACK lowering, which pays off
    on a device (`fedsb export executorch --xnnpack`), not in a simulation.
    """
    from fedsb.export.executorch import to_executorch

    import_executorch_runtime()
    scratch = None if work_dir else tempfile.TemporaryDirectory(prefix="fedsb-et-")
    out = Path(work_dir) if work_dir else Path(scratch.name)  # type: ignore[union-attr]
    to_executorch(model, out)
    backend = ExecuTorchBackend(out)
    backend.scratch = scratch  # removed with the backend
    return backend
