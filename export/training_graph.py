"""The graph every edge runtime exports: (input_ids, attention_mask, labels) → (loss, logits).

Runtime-neutral: ONNX Runtime and ExecuTorch both trace `TrainingGraph` (loss first, as
`_export_forward_backward` and ORT's pass-through loss need), with dropout off so that a
step equals `fedsb.training.train_local(..., dropout=False)`. Only R of each LoRA-SB layer
and `modules_to_save` require grad; W0, A, B and the rest are frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from fedsb.adapter import state_key

GRAPH_PREFIX = "model."  # TrainingGraph holds the adapted model as its child `model`
INPUT_NAMES = ("input_ids", "attention_mask", "labels")
OUTPUT_NAMES = ("loss", "logits")


class TrainingGraph(nn.Module):
    """A fedsb-adapted HF sequence classifier as a pure function of three tensors.

    The inner model stays in eval mode even when the wrapper is put in training mode (the
    legacy ONNX exporter does that with `TrainingMode.TRAINING`): exported graphs have no
    dropout, so their steps are deterministic and comparable with eager PyTorch.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.model.eval()

    def train(self, mode: bool = True) -> TrainingGraph:
        super().train(mode)
        self.model.eval()
        return self

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, return_dict=True
        )
        return out.loss, out.logits  # (), (B, num_labels)


class InferenceGraph(nn.Module):
    """(input_ids, attention_mask) → logits, for serving the trained model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.model.eval()

    def train(self, mode: bool = True) -> InferenceGraph:
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return out.logits  # (B, num_labels)


def state_name(graph_param_name: str) -> str:
    """`model.x.lora_R.weight` → `x.R`: a graph parameter's name as `fedsb.trainable_state` has it."""
    return state_key(graph_param_name.removeprefix(GRAPH_PREFIX))


def is_lora_parameter(graph_param_name: str) -> bool:
    """True for a LoRA factor (lr group of R), False for `modules_to_save` (head lr group)."""
    return graph_param_name.endswith((".lora_R.weight", ".lora_A.weight", ".lora_B.weight"))


def trainable_graph_names(graph: nn.Module) -> dict[str, str]:
    """Graph parameter name → `fedsb.trainable_state` name, for every trainable parameter.

    In module order, so the values list equals `list(fedsb.trainable_state(graph.model))`.
    """
    return {name: state_name(name) for name, p in graph.named_parameters() if p.requires_grad}


def frozen_graph_names(graph: nn.Module) -> list[str]:
    """Every frozen parameter of the graph (W0, A, B, embeddings, …), by graph name."""
    return [name for name, p in graph.named_parameters() if not p.requires_grad]


def example_inputs(
    batch_size: int = 2, seq_len: int = 8, vocab_size: int = 100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tracing inputs: token ids, an all-ones mask and class-0 labels of the given shape."""
    input_ids = torch.randint(1, vocab_size, (batch_size, seq_len), dtype=torch.long)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    labels = torch.zeros(batch_size, dtype=torch.long)
    return input_ids, attention_mask, labels
