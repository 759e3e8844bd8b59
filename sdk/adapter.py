"""The LoRA-SB adapter: a frozen base layer plus s·B·R·A with only the r×r matrix R trainable."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import ConfigError, ModelError

# The two federated inits run through the federation (fedsb.init_federated), not init_lora_sb.
INIT_METHODS = ("lora-sb", "svd", "random", "lora-sb-federated", "lora-sb-federated-exact")

# Target presets per architecture family (DESIGN §1.1), keyed by `config.model_type`.
ENCODER_TARGETS = (
    "query",
    "key",
    "value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta"), ENCODER_TARGETS),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    **dict.fromkeys(("llama", "mistral", "qwen2", "gemma2"), DECODER_TARGETS),
}


@dataclass(frozen=True)
class LoraSBConfig:
    """Which layers get a LoRA-SB adapter, of which rank, and how it is initialised."""

    rank: int
    alpha: float | None = None  # default alpha = rank, so the scale s = alpha / rank = 1
    target_modules: Sequence[str] | str | None = None  # None: preset for the model family
    modules_to_save: Sequence[str] = field(default_factory=tuple)
    init: str = "lora-sb"
    init_samples: int = 64
    init_lr: float = 1e-3  # η of the estimated first Adam step −η·sign(G)
    init_probe_steps: int = 30  # head-only steps before G is taken (0: G under the initial head)
    init_probe_lr: float = 1e-2
    freeze_head: bool = False  # keep the probe's head and freeze it: the upload is R alone
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"alpha must be positive, got {self.alpha!r}")
        if self.init not in INIT_METHODS:
            raise ConfigError(f"init must be one of {', '.join(INIT_METHODS)}, got {self.init!r}")
        if self.init_samples < 1:
            raise ConfigError(f"init_samples must be at least 1, got {self.init_samples!r}")
        if self.init_probe_steps < 0:
            raise ConfigError(f"init_probe_steps must be >= 0, got {self.init_probe_steps!r}")
        saved = self.modules_to_save
        object.__setattr__(
            self, "modules_to_save", (saved,) if isinstance(saved, str) else tuple(saved)
        )
        if self.freeze_head and not (
            self.modules_to_save and self.init == "lora-sb" and self.init_probe_steps > 0
        ):
            raise ConfigError(
                "freeze_head keeps the head the init's probe fitted: it needs modules_to_save, "
                "init='lora-sb' and init_probe_steps > 0"
            )

    @property
    def trained_modules(self) -> tuple[str, ...]:
        """The `modules_to_save` that train every round (none when the head is frozen)."""
        return () if self.freeze_head else tuple(self.modules_to_save)

    @property
    def scaling(self) -> float:
        """s = alpha / rank."""
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


class LoraSBLayer(nn.Module):
    """y = base(x) + s · B(R(A(x))): A (r×d_in) and B (d_out×r) frozen, R (r×r) trainable.

    A, R and B are `nn.Linear` modules so that Opacus computes per-sample gradients of R
    with its built-in Linear rule. `active_rank` k < r uses only the leading k directions
    (B[:, :k], R[:k, :k], A[:k]) — a client of rank k in a heterogeneous fleet.
    """

    def __init__(self, base: nn.Module, rank: int, scaling: float) -> None:
        super().__init__()
        d_in, d_out = layer_dims(base)
        self.base = base
        self.lora_A = nn.Linear(d_in, rank, bias=False)
        self.lora_R = nn.Linear(rank, rank, bias=False)
        self.lora_B = nn.Linear(rank, d_out, bias=False)
        self.to(device=base_weight(base).device, dtype=base_weight(base).dtype)
        with torch.no_grad():
            self.lora_A.weight.zero_()
            self.lora_R.weight.zero_()
            self.lora_B.weight.zero_()
        self.rank = rank
        self.scaling = scaling
        self.active_rank = rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        k = self.active_rank
        if k == self.rank:
            h = self.lora_R(self.lora_A(x))  # (…, r)
            return y + self.scaling * self.lora_B(h)  # (…, d_out)
        h = x @ self.lora_A.weight[:k].T  # (…, k)
        h = h @ self.lora_R.weight[:k, :k].T  # (…, k)
        return y + self.scaling * (h @ self.lora_B.weight[:, :k].T)  # (…, d_out)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B·R·A in the (d_out, d_in) orientation of `nn.Linear`."""
        k = self.active_rank
        B, R, A = self.lora_B.weight[:, :k], self.lora_R.weight[:k, :k], self.lora_A.weight[:k]
        return self.scaling * (B @ R @ A)

    def fold_into_base(self, delta: torch.Tensor) -> None:
        """Add a (d_out, d_in) update to the frozen base weight W0 (FedEx residual, FLoRA merge)."""
        weight = base_weight(self.base)
        with torch.no_grad():
            weight += (
                delta.T.to(weight.dtype)
                if isinstance(self.base, Conv1D)
                else delta.to(weight.dtype)
            )


def base_weight(base: nn.Module) -> torch.Tensor:
    """The weight of a supported base layer."""
    return base.weight  # type: ignore[return-value]


def layer_dims(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an `nn.Linear` or an HF `Conv1D` (whose weight is stored transposed)."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, Conv1D):
        d_in, d_out = base.weight.shape
        return int(d_in), int(d_out)
    raise ModelError(
        f"unsupported layer type {type(base).__name__}: LoRA-SB adapts nn.Linear and "
        "transformers Conv1D layers; remove this module from target_modules"
    )


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base weight as (d_out, d_in), whatever the layer's storage orientation."""
    weight = base_weight(base)
    return weight.T if isinstance(base, Conv1D) else weight


def resolve_targets(
    model: nn.Module, target_modules: Sequence[str] | str | None
) -> Sequence[str] | str:
    """The user's targets, or the preset for the model's family."""
    if target_modules is not None:
        return target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in TARGET_PRESETS:
        raise ModelError(
            f"no target_modules preset for model type {model_type!r}; "
            f"set target_modules explicitly (presets exist for {', '.join(sorted(TARGET_PRESETS))})"
        )
    return TARGET_PRESETS[model_type]


def matches(name: str, targets: Sequence[str] | str) -> bool:
    """PEFT semantics: a string is a full regex; a list matches a name or a dotted suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora_sb(model: nn.Module, config: LoraSBConfig) -> nn.Module:
    """Replace every targeted layer of `model` with a `LoraSBLayer` and freeze all but R.

    Parameters of `config.modules_to_save` stay trainable (unless `config.freeze_head`: they are
    fitted once by the init's head probe, then frozen). The model is changed in place
    and returned. Call an initialiser (`init_lora_sb`) before training: A, B, R start at 0.
    """
    targets = resolve_targets(model, config.target_modules)
    names = [name for name, _ in model.named_modules() if name and matches(name, targets)]
    if not names:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)]
        raise ModelError(
            f"no module matched target_modules={targets!r}; linear layers of this model "
            f"include: {', '.join(linear[:8]) or 'none'}"
        )
    for name in names:  # check every target before changing anything
        check_target(name, model.get_submodule(name), config.rank)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraSBLayer(model.get_submodule(name), config.rank, config.scaling))
    mark_trainable(model, config.trained_modules)
    model.fedsb_config = config  # type: ignore[assignment]
    return model


def check_target(name: str, base: nn.Module, rank: int) -> None:
    """A target must be a supported, not yet adapted layer with rank <= min(d_in, d_out)."""
    if isinstance(base, LoraSBLayer):
        raise ModelError(f"module {name!r} already has a LoRA-SB adapter")
    d_in, d_out = layer_dims(base)
    if rank > min(d_in, d_out):
        raise ModelError(
            f"rank {rank} is larger than min(d_in, d_out) = {min(d_in, d_out)} "
            f"of module {name!r}; choose rank <= {min(d_in, d_out)}"
        )


def mark_trainable(model: nn.Module, modules_to_save: Sequence[str], *, lora: str = "R") -> None:
    """Freeze everything, then unfreeze the LoRA factors named in `lora` and `modules_to_save`."""
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in lora_layers(model).values():
        layer.lora_A.weight.requires_grad_("A" in lora)
        layer.lora_R.weight.requires_grad_("R" in lora)
        layer.lora_B.weight.requires_grad_("B" in lora)
    for param in saved_parameters(model, modules_to_save):
        param.requires_grad_(True)


def saved_parameters(model: nn.Module, modules_to_save: Sequence[str]) -> list[nn.Parameter]:
    """The parameters of the `modules_to_save` (each once); ModelError if a name matches nothing."""
    saved = [name for name, _ in model.named_modules() if name and matches(name, modules_to_save)]
    missing = [m for m in modules_to_save if not any(matches(n, [m]) for n in saved)]
    if missing:
        raise ModelError(f"modules_to_save {missing} matched no module of the model")
    params = (p for name in saved for p in model.get_submodule(name).parameters())
    return list({id(p): p for p in params}.values())


def lora_layers(model: nn.Module) -> dict[str, LoraSBLayer]:
    """Every LoRA-SB layer of the model, by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraSBLayer)}


_FACTOR_SUFFIX = {".lora_R.weight": ".R", ".lora_A.weight": ".A", ".lora_B.weight": ".B"}


def state_key(param_name: str) -> str:
    """`x.lora_R.weight` → `x.R` (likewise A, B); other parameter names are kept as they are."""
    for suffix, short in _FACTOR_SUFFIX.items():
        if param_name.endswith(suffix):
            return param_name[: -len(suffix)] + short
    return param_name


def _trainable_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, param in model.named_parameters():
        if param.requires_grad:
            yield state_key(name), param


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every trainable tensor: R of each layer (`<module>.R`) plus `modules_to_save`."""
    return {key: param.detach().clone() for key, param in _trainable_parameters(model)}


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy `state` (as returned by `trainable_state`) into the model's trainable tensors.

    Every key must name a trainable tensor of the same shape; keys may be a subset.
    """
    copy_checked(dict(_trainable_parameters(model)), state, "trainable tensors")


def copy_checked(
    params: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str
) -> None:
    """Copy every tensor of `state` into the same-named parameter; unknown names or shapes fail."""
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ModelError(
            f"unknown {what} {unknown[:5]} (the model has e.g. {list(params)[:3]}); "
            "were model and config the same on both sides?"
        )
    with torch.no_grad():
        for key, value in state.items():
            if params[key].shape != value.shape:
                raise ModelError(
                    f"{key!r} has shape {tuple(value.shape)}, the model expects "
                    f"{tuple(params[key].shape)}"
                )
            params[key].copy_(value)


def set_active_rank(model: nn.Module, rank: int) -> None:
    """Use only the leading `rank` directions of every adapter (heterogeneous-rank clients)."""
    for name, layer in lora_layers(model).items():
        if not 1 <= rank <= layer.rank:
            raise ModelError(f"active rank {rank} is outside 1..{layer.rank} for layer {name!r}")
        layer.active_rank = rank


def restrict_training_to_block(model: nn.Module, rank: int) -> None:
    """`fold` mode: the forward pass keeps the full R, but only R[:rank, :rank] receives gradients."""
    for layer in lora_layers(model).values():
        mask = torch.zeros_like(layer.lora_R.weight)
        mask[:rank, :rank] = 1
        layer.lora_R.weight.register_hook(lambda grad, mask=mask: grad * mask)


def count_trainable(model: nn.Module) -> int:
    """Number of trainable scalars (n_layers·r² + modules_to_save for Fed-SB)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state(model: nn.Module, modules_to_save: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Everything a client needs on top of the base model: A, B, R of every layer + saved modules.

    Sent once per job (the frozen factors never change); keys `<module>.A|B|R` and parameter names.
    """
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        state[name + ".A"] = layer.lora_A.weight.detach().clone()
        state[name + ".B"] = layer.lora_B.weight.detach().clone()
        state[name + ".R"] = layer.lora_R.weight.detach().clone()
    for name, module in model.named_modules():
        if name and matches(name, modules_to_save):
            for pname, param in module.named_parameters():
                state[f"{name}.{pname}"] = param.detach().clone()
    return state


def load_adapter_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load an `adapter_state` into a model prepared by `apply_lora_sb` with the same config."""
    copy_checked({state_key(n): p for n, p in model.named_parameters()}, state, "adapter tensors")
