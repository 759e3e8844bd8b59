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
from fractions import Fraction

import torch

from .accumulate import ExactSum, exact_weighted_mean
from .errors import ConfigError
from .wire import DecodedUpdate

PADDINGS = ("replication", "zero", "hetlora")

State = Mapping[str, torch.Tensor]
Plan = tuple[str, list[str], tuple[int, ...], bool]  # group, keys, largest block, dense


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
        for key, value in sorted(global_state.items()):  # sorted: the wire's stacking order
            name = f"R{tuple(value.shape)}" if stack_r and key.endswith(".R") else key
            self.groups.setdefault(name, []).append(key)
        self.group_names = {group: tuple(keys) for group, keys in self.groups.items()}
        self.num = {g: ExactSum(self.stacked_shape(keys)) for g, keys in self.groups.items()}
        self.den = {g: ExactSum(self.weight_shape(g, keys)) for g, keys in self.groups.items()}
        # Σ w of the updates that sent a whole group as one block shape: their presence mask is
        # all ones, so an exact scalar per block replaces an ExactSum add of ones per update.
        self.covered: dict[str, dict[tuple[int, ...], Fraction | int]] = {
            g: {} for g in self.groups
        }
        self.plans: dict[tuple[object, ...], list[Plan]] = {}

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
        for group, keys, block, dense in self.plan(update, rank):
            w = weight
            if group.endswith(".R") and self.padding == "hetlora":
                w = float(update[group].to(torch.float64).norm())
            self.add_group(group, keys, update, w, block, dense)

    def plan(self, update: State, rank: int | None) -> list[Plan]:
        """Shapes checked, then (group, keys, largest block, dense) of each group the update has.

        Dense: every key of the group is there with the same block shape (the usual case).
        Remembered per shape signature: every client of a rank sends the same shapes.
        """
        items = (
            ((n, t.shape) for n, t in update.groups)  # a decoded message: its layout says it all
            if isinstance(update, DecodedUpdate)
            else ((k, v.shape) for k, v in update.items())
        )
        signature = (rank, *items)
        if signature in self.plans:
            return self.plans[signature]
        check_update_shapes(self.global_state, update, rank)
        plan = []
        for group, keys in self.groups.items():
            shapes = [tuple(update[k].shape) for k in keys if k in update]
            if shapes:
                block = max(shapes)
                plan.append((group, keys, block, shapes == [block] * len(keys)))
        if len(self.plans) < 1024:
            self.plans[signature] = plan
        return plan

    def add_group(
        self,
        group: str,
        keys: list[str],
        update: State,
        weight: float,
        block: tuple[int, ...],
        dense: bool,
    ) -> None:
        """Stack the group's deltas (zeros where a key is absent) and add them with their weights."""
        if dense:
            stacked = self.stacked_on_wire(group, update)
            if stacked is None:
                stacked = torch.stack([update[k] for k in keys])
            self.num[group].add_block(stacked, weight)
            covered = self.covered[group]
            exact = int(weight) if weight.is_integer() else Fraction(weight)  # int: cheaper
            covered[block] = covered.get(block, 0) + exact
            return
        values, mask = self.stack_sparse(keys, update, block)
        self.num[group].add_block(values, weight)
        if len(self.den[group].shape) > 1:
            self.den[group].add_block(mask, weight)
        else:
            self.den[group].add(mask.flatten(1).amax(dim=1), weight)  # (n,): key present or not

    def stacked_on_wire(self, group: str, update: State) -> torch.Tensor | None:
        """The decoded message's own stacked tensor of exactly this group's keys, if it has one."""
        names = self.group_names[group]
        if isinstance(update, DecodedUpdate):
            for wire_names, tensor in update.groups:
                if wire_names == names:
                    return tensor
        return None

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
            for block, total in other.covered[group].items():
                self.covered[group][block] = self.covered[group].get(block, 0) + total

    def weight_sum(self, group: str) -> torch.Tensor:
        """Σ w per entry (replication) or per tensor: sparse masks plus the covered blocks."""
        den = ExactSum(self.den[group].shape)
        den.merge(self.den[group])
        for block, total in self.covered[group].items():
            per_entry = len(den.shape) > 1  # (n, *block) of ones, or one per tensor
            ones = torch.ones((den.shape[0], *block) if per_entry else den.shape)
            for part in float_parts(total):
                den.add_block(ones, part)
        return den.result()

    def result(self, noise: State | None = None) -> dict[str, torch.Tensor]:
        """global + (Σ w Δ + noise) / Σ w per entry; entries nobody trained keep their global value.

        `noise` (user-level DP) maps every key of the global state to a float64 tensor of its shape.
        """
        new = {}
        for group, keys in self.groups.items():
            num, den = self.num[group].result(), self.weight_sum(group)
            if noise is not None:
                num = num + torch.stack([noise[k] for k in keys])  # (n, *shape)
            den = den.reshape(den.shape + (1,) * (num.dim() - den.dim()))  # broadcast per tensor
            step = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
            for i, key in enumerate(keys):
                value = self.global_state[key]
                new[key] = (
                    value + step[i].to(value.dtype) if self.num[group].count else value.clone()
                )
        return new


def float_parts(total: Fraction | int) -> list[float]:
    """Non-negative floats whose exact sum is `total` (≥ 0, a dyadic rational such as Σ w)."""
    parts = []
    while total:
        part = float(total)
        if Fraction(part) > total:
            part = math.nextafter(part, 0.0)
        parts.append(part)
        total -= Fraction(part)
    return parts


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
