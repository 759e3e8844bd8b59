"""Initialisation of the frozen factors B, A and the starting R (DESIGN §1.2)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .adapter import (
    LoraSBConfig,
    LoraSBLayer,
    base_weight,
    dense_weight,
    lora_layers,
    saved_parameters,
)
from .errors import ConfigError, ModelError

log = logging.getLogger(__name__)

# Above this size a randomized SVD (a few power iterations) replaces the exact one.
EXACT_SVD_MAX_DIM = 2048


def init_lora_sb(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]] | None,
    config: LoraSBConfig | None = None,
) -> nn.Module:
    """Set B, A and R of every adapter by `config.init`; `batches` is needed for `lora-sb` only.

    `lora-sb`: B = U_r, A = V_rᵀ, R = diag(S_r)/s from the rank-r SVD of the estimated first
    Adam step −η·sign(G), G the task-loss gradient of W0 averaged over `init_samples` examples.
    """
    config = config or getattr(model, "fedsb_config", None)
    if config is None:
        raise ConfigError(
            "init_lora_sb needs a LoraSBConfig (apply_lora_sb stores one on the model)"
        )
    layers = lora_layers(model)
    if not layers:
        raise ModelError("the model has no LoRA-SB layers: call apply_lora_sb first")
    if config.init.startswith("lora-sb-federated"):
        raise ConfigError(
            f"init={config.init!r} runs across the clients: use the federation "
            "(fedsb simulate / fedsb aggregator), see fedsb.init_federated"
        )
    if config.init == "lora-sb":
        if batches is None:
            raise ConfigError("init='lora-sb' needs example batches to estimate the first step")
        grads = accumulate_base_gradients(model, batches, config.init_samples, HeadProbe.of(config))
        targets = {name: -config.init_lr * torch.sign(grads[name]) for name in layers}
        for name, layer in layers.items():
            set_factors_from_svd(layer, targets[name], scale_r=True)
    elif config.init == "svd":
        generator = torch.Generator().manual_seed(config.seed)
        for layer in layers.values():
            set_factors_from_svd(layer, dense_weight(layer.base).detach(), scale_r=False)
            noise = torch.randn(layer.rank, layer.rank, generator=generator) * 1e-4
            layer.lora_R.weight.data.copy_(noise)
    else:
        generator = torch.Generator().manual_seed(config.seed)
        for layer in layers.values():
            set_random_orthonormal(layer, generator)
    return model


def fit_frozen_head(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], config: LoraSBConfig
) -> None:
    """Run the head probe alone and keep its head: the frozen head of a method that does not run
    the LoRA-SB init (a baseline with `freeze_head`), in eval mode as inside the init."""
    examples = first_examples(batches, config.init_samples)
    was_training = model.training
    model.eval()
    try:
        with probed_head(model, examples, HeadProbe.of(config)):
            pass
    finally:
        model.train(was_training)


def best_rank_approximation(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, ...]:
    """(U_r, S_r, V_rᵀ) of the best rank-r approximation, in float64."""
    m = matrix.detach().to(torch.float64)
    if min(m.shape) <= EXACT_SVD_MAX_DIM:
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    U, S, V = torch.svd_lowrank(m, q=min(rank + 10, min(m.shape)), niter=4)
    return U[:, :rank], S[:rank], V[:, :rank].T


def set_factors_from_svd(layer: LoraSBLayer, target: torch.Tensor, *, scale_r: bool) -> None:
    """B = U_r, A = V_rᵀ of `target` (d_out × d_in); R = diag(S_r)/s if `scale_r`."""
    U, S, Vh = best_rank_approximation(target, layer.rank)
    dtype = layer.lora_R.weight.dtype
    with torch.no_grad():
        layer.lora_B.weight.copy_(U.to(dtype))
        layer.lora_A.weight.copy_(Vh.to(dtype))
        if scale_r:
            layer.lora_R.weight.copy_(torch.diag(S / layer.scaling).to(dtype))


def set_random_orthonormal(layer: LoraSBLayer, generator: torch.Generator) -> None:
    """Orthonormal B columns and A rows drawn from `generator`, R = 0."""
    d_out, r = layer.lora_B.weight.shape
    d_in = layer.lora_A.weight.shape[1]
    B, _ = torch.linalg.qr(torch.randn(d_out, r, generator=generator, dtype=torch.float64))
    A, _ = torch.linalg.qr(torch.randn(d_in, r, generator=generator, dtype=torch.float64))
    dtype = layer.lora_R.weight.dtype
    with torch.no_grad():
        layer.lora_B.weight.copy_(B.to(dtype))
        layer.lora_A.weight.copy_(A.T.to(dtype))
        layer.lora_R.weight.zero_()


def first_examples(
    batches: Iterable[Mapping[str, torch.Tensor]], max_examples: int
) -> list[dict[str, torch.Tensor]]:
    """The first `max_examples` examples of `batches`, the last batch cut to fit."""
    taken: list[dict[str, torch.Tensor]] = []
    seen = 0
    for batch in batches:
        take = min(int(batch["labels"].shape[0]), max_examples - seen)
        if take <= 0:
            break
        taken.append({k: v[:take] for k, v in batch.items()})
        seen += take
    if seen == 0:
        raise ConfigError("the initialisation batches are empty: no gradient to estimate")
    return taken


def backward_examples(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> int:
    """Backpropagate the summed loss of all examples of `batches`; return how many."""
    seen = 0
    for batch in batches:
        n = int(batch["labels"].shape[0])
        (model(**batch).loss * n).backward()  # the sum over examples
        seen += n
    return seen


def oriented_gradient(model: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
    """The accumulated gradient of a base weight as (d_out, d_in) (Conv1D stores it transposed)."""
    if weight.grad is None:
        raise ModelError(f"layer {name!r} received no gradient: is it used by the model's loss?")
    layer = model.get_submodule(name)
    grad = weight.grad if isinstance(layer.base, nn.Linear) else weight.grad.T
    return grad.detach().clone()


@contextlib.contextmanager
def base_weights_require_grad(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Temporarily make only the base weights W0 of the adapters trainable; restore on exit."""
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    weights = {name: base_weight(layer.base) for name, layer in lora_layers(model).items()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        yield weights
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
            if p.grad is not None and not saved[name]:
                p.grad = None


def accumulate_base_gradients(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    max_examples: int,
    probe: HeadProbe | None = None,
) -> dict[str, torch.Tensor]:
    """Mean task-loss gradient of each adapted W0 over the first `max_examples` examples.

    The gradients are returned as (d_out, d_in) float32, the orientation of `nn.Linear`.
    """
    sums, seen = base_gradient_sums(model, batches, max_examples, probe)
    log.info("LoRA-SB init: gradients from %d examples over %d layers", seen, len(sums))
    return {name: grad / seen for name, grad in sums.items()}


def base_gradient_sums(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    max_examples: int,
    probe: HeadProbe | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Σ over examples of the task-loss gradient of each adapted W0 (d_out × d_in), and the count.

    Computed in eval mode (no dropout) with the adapters' ΔW as they are (zero before init),
    under the head fitted by `probe` when one is given (the head is restored afterwards).
    """
    examples = first_examples(batches, max_examples)
    was_training = model.training
    model.eval()
    try:
        with probed_head(model, examples, probe or HeadProbe()):
            with torch.enable_grad(), base_weights_require_grad(model) as weights:
                seen = backward_examples(model, examples)
                sums = {
                    name: oriented_gradient(model, name, w).float() for name, w in weights.items()
                }
    finally:
        model.train(was_training)
    return sums, seen


@dataclass(frozen=True)
class HeadProbe:
    """Fit the saved modules (the head) alone before W0's gradient is taken: `steps` full-batch
    AdamW steps at `lr` on the init examples. Under a freshly initialised head the gradient
    points at random class directions; under a fitted one it points where fine-tuning goes.
    The fitted head is put back to its initial values unless `keep` (a frozen head)."""

    modules: tuple[str, ...] = ()
    steps: int = 0
    lr: float = 1e-2
    keep: bool = False

    @classmethod
    def of(cls, config: LoraSBConfig) -> HeadProbe:
        """The probe a `LoraSBConfig` asks for."""
        return cls(
            tuple(config.modules_to_save),
            config.init_probe_steps,
            config.init_probe_lr,
            keep=config.freeze_head,
        )


@contextlib.contextmanager
def probed_head(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], probe: HeadProbe
) -> Iterator[None]:
    """Inside the block the head is fitted by `probe`; on exit its values are restored
    (unless `probe.keep`, then the fitted head stays)."""
    params = saved_parameters(model, probe.modules)
    if probe.steps == 0 or not params:
        yield
        return
    saved = [] if probe.keep else [(p, p.detach().clone()) for p in params]
    try:
        fit_parameters(model, params, batches, probe.steps, probe.lr)  # restores requires_grad
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


def fit_parameters(
    model: nn.Module,
    params: list[nn.Parameter],
    batches: list[dict[str, torch.Tensor]],
    steps: int,
    lr: float,
) -> None:
    """`steps` AdamW steps on `params` alone, each on the summed loss of all `batches`."""
    frozen = {id(param): param.requires_grad for param in model.parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = sum(int(b["labels"].shape[0]) for b in batches)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                for batch in batches:
                    n = int(batch["labels"].shape[0])
                    (model(**batch).loss * (n / total)).backward()
                optimizer.step()
    finally:
        for param in model.parameters():
            param.requires_grad_(frozen[id(param)])
            param.grad = None
