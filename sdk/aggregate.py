"""Exact Fed-SB aggregation of client deltas, with padding rules for heterogeneous ranks.

R_g ← R_g + Σ w_k ΔR_k / Σ w_k (DESIGN §1.3). A client of rank r_k sends the top-left
r_k×r_k block of ΔR; `padding` decides how blocks of different sizes are combined (§1.5):

- `replication`: each entry is averaged over the clients that trained it only; entries no
  client trained keep their global value (arXiv 2406.17477).
- `zero`: blocks are zero-padded to r_max and averaged over all clients (dilutes).
- `hetlora`: zero padding, each update weighted by its Frobenius norm (HetLoRA).

Tensors whose shape equals the global one (e.g. a classifier head) are plain FedAvg over the
clients that sent them. Pure functions: inputs are never mutated, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .accumulate import ExactSum, exact_weighted_mean
from .errors import ConfigError

PADDINGS = ("replication", "zero", "hetlora")

State = Mapping[str, torch.Tensor]


def aggregate(
    global_state: State,
    updates: Sequence[State],
    weights: Sequence[float] | None = None,
    ranks: Sequence[int] | None = None,
    padding: str = "replication",
) -> dict[str, torch.Tensor]:
    """New global state from client deltas; bit-identical whatever the order of `updates`.

    The weighted sums are exact (`RoundSum`), so the result does not depend on arrival order.
    `ranks[i]`, when given, is checked against the block size of every R of update i.
    """
    weights = [1.0] * len(updates) if weights is None else [float(w) for w in weights]
    if len(weights) != len(updates) or (ranks is not None and len(ranks) != len(updates)):
        raise ConfigError("updates, weights and ranks must have the same length")
    round_sum = RoundSum(global_state, padding)
    for i, (update, weight) in enumerate(zip(updates, weights, strict=True)):
        round_sum.add(update, weight, None if ranks is None else ranks[i])
    return round_sum.result()


class RoundSum:
    """Exact running sums of one round's weighted deltas: O(size of the global state) memory.

    Order-independent and mergeable (`merge`), so workers behind a shared subscription can
    each sum part of the round and a coordinator adds their sums, bit for bit. R matrices of
    one shape are summed stacked, (n, r, r), so an update costs a few calls, not 2 per layer.
    """

    def __init__(self, global_state: State, padding: str = "replication") -> None:
        if padding not in PADDINGS:
            raise ConfigError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
        self.global_state = dict(global_state)
        self.padding = padding
        stack_r = padding != "hetlora"  # HetLoRA weighs every R by its own norm: one sum each
        self.groups: dict[str, list[str]] = {}
        for key, value in global_state.items():
            name = f"R{tuple(value.shape)}" if stack_r and key.endswith(".R") else key
            self.groups.setdefault(name, []).append(key)
        self.num = {g: ExactSum(self.stacked_shape(keys)) for g, keys in self.groups.items()}
        self.den = {g: ExactSum(self.weight_shape(g, keys)) for g, keys in self.groups.items()}

    def stacked_shape(self, keys: list[str]) -> tuple[int, ...]:
        return (len(keys), *self.global_state[keys[0]].shape)  # (n, *shape)

    def weight_shape(self, group: str, keys: list[str]) -> tuple[int, ...]:
        """Replication keeps a weight sum per entry of R; otherwise one per tensor."""
        per_entry = keys[0].endswith(".R") and self.padding == "replication"
        return self.stacked_shape(keys) if per_entry else (len(keys),)

    def add(self, update: State, weight: float, rank: int | None = None) -> None:
        """Add one client's deltas with its weight (HetLoRA: the norm of each R delta)."""
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"aggregation weights must be finite and non-negative, got {weight}")
        check_update_shapes(self.global_state, update, rank)
        for group, keys in self.groups.items():
            present = [k for k in keys if k in update]
            if not present:
                continue
            w = weight
            if group.endswith(".R") and self.padding == "hetlora":
                w = float(update[group].to(torch.float64).norm())
            self.add_group(group, keys, update, w)

    def add_group(self, group: str, keys: list[str], update: State, weight: float) -> None:
        """Stack the group's deltas (zeros where a key is absent) and add them with their weights."""
        block = max((tuple(update[k].shape) for k in keys if k in update), key=lambda s: s)
        if all(k in update and tuple(update[k].shape) == block for k in keys):  # the usual case
            values = torch.stack([update[k] for k in keys]).to(torch.float64)  # (n, *block)
            mask = torch.ones_like(values)
        else:
            values, mask = self.stack_sparse(keys, update, block)
        self.num[group].add_block(values, weight)
        if len(self.den[group].shape) > 1:
            self.den[group].add_block(mask, weight)
        else:
            self.den[group].add(mask.flatten(1).amax(dim=1), weight)  # (n,): key present or not

    @staticmethod
    def stack_sparse(
        keys: list[str], update: State, block: tuple[int, ...]
    ) -> tuple[torch.Tensor, ...]:
        """Deltas and presence mask of a group where some keys are missing or smaller."""
        values = torch.zeros((len(keys), *block), dtype=torch.float64)  # (n, *block)
        mask = torch.zeros((len(keys), *block), dtype=torch.float64)
        for i, key in enumerate(keys):
            if key in update:
                delta = update[key]
                values[i][tuple(slice(0, d) for d in delta.shape)] = delta.to(torch.float64)
                mask[i][tuple(slice(0, d) for d in delta.shape)] = 1.0
        return values, mask

    def merge(self, other: RoundSum) -> None:
        """Add another worker's sums of the same round."""
        for group in self.num:
            self.num[group].merge(other.num[group])
            self.den[group].merge(other.den[group])

    def result(self) -> dict[str, torch.Tensor]:
        """global + Σ w Δ / Σ w per entry; entries nobody trained keep their global value."""
        new = {}
        for group, keys in self.groups.items():
            num, den = self.num[group].result(), self.den[group].result()
            den = den.reshape(den.shape + (1,) * (num.dim() - den.dim()))  # broadcast per tensor
            step = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
            for i, key in enumerate(keys):
                value = self.global_state[key]
                new[key] = (
                    value + step[i].to(value.dtype) if self.num[group].count else value.clone()
                )
        return new


def weighted_mean(deltas: Sequence[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Σ w_k Δ_k / Σ w_k, exact sums rounded once (zero when all weights are zero)."""
    return exact_weighted_mean([d for d, _ in deltas], [w for _, w in deltas])


def check_update_shapes(global_state: State, update: State, rank: int | None) -> None:
    """Every update tensor must be known and fit inside the global tensor (square blocks for R)."""
    for key, delta in update.items():
        if key not in global_state:
            raise ConfigError(f"update has tensor {key!r} that the global state does not have")
        full = global_state[key]
        same = delta.shape == full.shape
        block = (
            key.endswith(".R")
            and delta.dim() == 2 == full.dim()
            and delta.shape[0] == delta.shape[1]
            and all(d <= f for d, f in zip(delta.shape, full.shape, strict=True))
        )
        if not (same or block):
            raise ConfigError(
                f"update tensor {key!r} has shape {tuple(delta.shape)}, which does not fit the "
                f"global shape {tuple(full.shape)}"
            )
        if rank is not None and key.endswith(".R") and tuple(delta.shape) != (rank, rank):
            raise ConfigError(
                f"update tensor {key!r} is {tuple(delta.shape)}, expected rank {rank}"
            )
