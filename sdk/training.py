"""Local training and evaluation of a model's trainable tensors on tokenised text batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .adapter import lora_layers
from .errors import ConfigError

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Encoded:
    """A tokenised dataset held as tensors: (N, T) ids and mask, (N,) labels."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, indices: Sequence[int] | torch.Tensor) -> Encoded:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Encoded(self.input_ids[idx], self.attention_mask[idx], self.labels[idx])

    def batch(self, idx: torch.Tensor) -> Batch:
        return {
            "input_ids": self.input_ids[idx],
            "attention_mask": self.attention_mask[idx],
            "labels": self.labels[idx],
        }


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], labels: Sequence[int], max_length: int
) -> Encoded:
    """Tokenise once, padded and truncated to `max_length` tokens."""
    enc = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return Encoded(
        enc["input_ids"], enc["attention_mask"], torch.as_tensor(list(labels), dtype=torch.long)
    )


def sample_batches(
    data: Encoded, batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[Batch]:
    """`steps` batches drawn by reshuffling the data as often as needed (seeded)."""
    if len(data) == 0:
        raise ConfigError("cannot train on an empty dataset")
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while order.numel() < min(batch_size, len(data)):
            order = torch.cat([order, torch.randperm(len(data), generator=generator)])
        idx, order = order[:batch_size], order[batch_size:]
        yield data.batch(idx)


def sequential_batches(data: Encoded, batch_size: int) -> Iterator[Batch]:
    """The data in order, in batches (evaluation, initialisation)."""
    for start in range(0, len(data), batch_size):
        yield data.batch(torch.arange(start, min(start + batch_size, len(data))))


@dataclass(frozen=True)
class TrainStats:
    loss: float
    examples: int
    steps: int


def make_optimizer(
    model: nn.Module, lr: float, head_lr: float, kind: str = "adamw"
) -> torch.optim.Optimizer:
    """AdamW (no weight decay) or plain SGD, one learning rate for LoRA factors, one for saved modules."""
    lora_params = {id(p) for layer in lora_layers(model).values() for p in layer.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) in lora_params], "lr": lr},
        {"params": [p for p in trainable if id(p) not in lora_params], "lr": head_lr},
    ]
    groups = [g for g in groups if g["params"]]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    if kind == "adamw":
        return torch.optim.AdamW(groups, weight_decay=0.0)
    raise ConfigError(f"unknown optimizer {kind!r} (expected 'adamw' or 'sgd')")


def train_local(
    model: nn.Module,
    data: Encoded,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    head_lr: float,
    seed: int,
    optimizer: str = "adamw",
    dropout: bool = True,
) -> TrainStats:
    """`steps` optimizer steps on batches of `data`; returns the mean loss and examples seen.

    Batch order and dropout masks come from `seed` alone (the global RNG is forked and
    restored), so a client's round gives the same result whatever else runs in the process.
    With `dropout=False` the model trains in eval mode, as exported edge graphs do.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        opt = make_optimizer(model, lr, head_lr, optimizer)
        return _train_steps(model, data, steps, batch_size, opt, seed, dropout)


def _train_steps(
    model: nn.Module,
    data: Encoded,
    steps: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    seed: int,
    dropout: bool = True,
) -> TrainStats:
    generator = torch.Generator().manual_seed(seed)
    model.train(dropout)
    total_loss, seen = 0.0, 0
    for batch in sample_batches(data, batch_size, steps, generator):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        total_loss += float(loss.detach()) * int(batch["labels"].shape[0])
        seen += int(batch["labels"].shape[0])
    model.eval()
    return TrainStats(loss=total_loss / max(seen, 1), examples=seen, steps=steps)


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, *, batch_size: int = 64) -> dict[str, float]:
    """Accuracy and mean loss of `model` on `data`."""
    model.eval()
    correct, total_loss = 0, 0.0
    for batch in sequential_batches(data, batch_size):
        out = model(**batch)
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        total_loss += float(out.loss) * int(batch["labels"].shape[0])
    n = max(len(data), 1)
    return {"accuracy": correct / n, "loss": total_loss / n}
