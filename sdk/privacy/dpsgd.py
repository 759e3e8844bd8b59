"""DP-SGD on one client with Opacus: per-example clipping and Gaussian noise on the trainable tensors.

Only R (and `modules_to_save`) train, all of them `nn.Linear`, so Opacus's per-sample
gradients are exact and cheap. Batches are Poisson-sampled (rate q = batch_size / examples)
so the accountant's amplification by subsampling holds; frozen normalisation layers run in
eval mode, since batch statistics would mix examples.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from ..training import Batch, Encoded, TrainStats, make_optimizer

GRAD_SAMPLE_MODES = ("hooks", "ghost")
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class DPSGDSettings:
    """One client's DP-SGD: noise σ, clip norm, sampling rate, expected batch size."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: int
    grad_sample_mode: str = "hooks"


def check_private_trainable(model: nn.Module) -> None:
    """Refuse a model that would train a BatchNorm layer: its batch statistics break per-example DP."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(
            p.requires_grad for p in module.parameters()
        ):
            raise ModelError(
                f"privacy.mode = 'dp-sgd' cannot train BatchNorm layer {name!r}: its batch "
                "statistics mix examples; freeze it (drop it from modules_to_save) or use GroupNorm"
            )


def set_train_mode(model: nn.Module, dropout: bool) -> None:
    """Dropout as asked; layers with trainable parameters in train mode (Opacus needs it).

    Normalisation layers stay in eval mode: batch statistics would mix examples, which
    per-example DP forbids.
    """
    model.train(dropout)
    for module in model.modules():
        if isinstance(module, NORM_LAYERS):
            module.eval()
        elif any(p.requires_grad for p in module.parameters(recurse=False)):
            module.train()


def poisson_batches(
    data: Encoded, sample_rate: float, steps: int, generator: torch.Generator
) -> list[Batch]:
    """`steps` batches, each example in each batch independently with probability q (seeded)."""
    batches = []
    for _ in range(steps):
        keep = torch.rand(len(data), generator=generator) < sample_rate  # (N,)
        batches.append(data.batch(keep.nonzero().flatten()))
    return batches


def train_private(
    model: nn.Module,
    data: Encoded,
    settings: DPSGDSettings,
    *,
    steps: int,
    lr: float,
    head_lr: float,
    seed: int,
    optimizer: str = "adamw",
    dropout: bool = True,
) -> TrainStats:
    """`steps` DP-SGD steps on Poisson batches of `data`; noise and batches come from `seed`."""
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

    check_private_trainable(model)
    ghost = settings.grad_sample_mode == "ghost"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base_opt = make_optimizer(model, lr, head_lr, optimizer)
        wrapped = wrap_for_per_sample(model, settings)
        opt_class = DPOptimizerFastGradientClipping if ghost else DPOptimizer
        dp_opt = opt_class(
            base_opt,
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            expected_batch_size=settings.expected_batch_size,
            loss_reduction="mean",
            generator=torch.Generator().manual_seed(seed + 1),
        )
        generator = torch.Generator().manual_seed(seed)
        try:
            # the frozen embeddings give Opacus's backward hooks no input that needs a gradient
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            set_train_mode(model, dropout)
            total_loss, seen = 0.0, 0
            for batch in poisson_batches(data, settings.sample_rate, steps, generator):
                dp_opt.zero_grad(set_to_none=True)
                n = int(batch["labels"].shape[0])
                if n == 0:  # an empty Poisson batch still takes a (noise-only) step
                    empty_gradients(dp_opt, ghost)
                else:
                    loss = private_loss(wrapped, dp_opt, batch, ghost)
                    loss.backward()
                    total_loss += float(loss.detach()) * n
                    seen += n
                dp_opt.step()
        finally:
            model.eval()
            wrapped._close()  # removes Opacus's hooks and per-sample buffers
    return TrainStats(loss=total_loss / max(seen, 1), examples=seen, steps=steps)


def wrap_for_per_sample(model: nn.Module, settings: DPSGDSettings) -> Any:
    """Opacus's per-sample gradient hooks (or ghost-clipping norms) on the trainable layers."""
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    try:
        if settings.grad_sample_mode == "ghost":
            return GradSampleModuleFastGradientClipping(
                model, loss_reduction="mean", max_grad_norm=settings.max_grad_norm
            )
        return GradSampleModule(model, loss_reduction="mean")
    except (NotImplementedError, ValueError) as err:  # a trainable layer Opacus cannot handle
        detail = " ".join(str(err).split())
        raise ModelError(f"privacy.mode = 'dp-sgd': Opacus refuses this model: {detail}") from None


def private_loss(wrapped: Any, dp_opt: Any, batch: Batch, ghost: bool) -> torch.Tensor:
    """The batch's mean loss; in ghost mode wrapped so backward() clips per example."""
    if not ghost:
        return wrapped(**batch).loss  # type: ignore[no-any-return]
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    logits = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    criterion = DPLossFastGradientClipping(wrapped, dp_opt, nn.CrossEntropyLoss(), "mean")
    return criterion(logits, batch["labels"])  # type: ignore[no-any-return]


def empty_gradients(dp_opt: Any, ghost: bool) -> None:
    """Zero per-sample gradients for a batch with no example: the step adds noise only."""
    for p in dp_opt.params:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
