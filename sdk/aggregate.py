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
    each sum part of the round and a coordinator adds their sums, bit for bit.
    """

    def __init__(self, global_state: State, padding: str = "replication") -> None:
        if padding not in PADDINGS:
            raise ConfigError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
        self.global_state = dict(global_state)
        self.padding = padding
        self.num = {k: ExactSum(tuple(v.shape)) for k, v in global_state.items()}
        self.den = {k: ExactSum(self.weight_shape(k, v)) for k, v in global_state.items()}

    def weight_shape(self, key: str, value: torch.Tensor) -> tuple[int, ...]:
        """Replication keeps one weight sum per entry of R; everything else one per tensor."""
        return tuple(value.shape) if key.endswith(".R") and self.padding == "replication" else ()

    def add(self, update: State, weight: float, rank: int | None = None) -> None:
        """Add one client's deltas with its weight (HetLoRA: the norm of each R delta)."""
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"aggregation weights must be finite and non-negative, got {weight}")
        check_update_shapes(self.global_state, update, rank)
        for key, delta in update.items():
            w = weight
            if key.endswith(".R") and self.padding == "hetlora":
                w = float(delta.to(torch.float64).norm())
            self.num[key].add_block(delta, w)
            if self.den[key].shape:
                self.den[key].add_block(torch.ones(delta.shape, dtype=torch.float64), w)
            else:
                self.den[key].add(torch.tensor(1.0, dtype=torch.float64), w)

    def merge(self, other: RoundSum) -> None:
        """Add another worker's sums of the same round."""
        for key in self.num:
            self.num[key].merge(other.num[key])
            self.den[key].merge(other.den[key])

    def result(self) -> dict[str, torch.Tensor]:
        """global + Σ w Δ / Σ w per entry; entries nobody trained keep their global value."""
        new = {}
        for key, value in self.global_state.items():
            if self.den[key].count == 0:
                new[key] = value.clone()
                continue
            num, den = self.num[key].result(), self.den[key].result()
            step = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
            new[key] = value + step.to(value.dtype)
        return new

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The sums as tensors (checkpoints)."""
        out: dict[str, torch.Tensor] = {}
        for kind, sums in (("num", self.num), ("den", self.den)):
            for key, acc in sums.items():
                out |= {f"{kind}/{key}/{name}": t for name, t in acc.state_dict().items()}
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for kind, sums in (("num", self.num), ("den", self.den)):
            for key in sums:
                prefix = f"{kind}/{key}/"
                sums[key] = ExactSum.from_state_dict(
                    {n[len(prefix) :]: t for n, t in state.items() if n.startswith(prefix)}
                )


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
