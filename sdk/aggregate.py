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

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch

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

    Updates are put in a canonical order (by content digest) and summed in float64, so the
    result does not depend on arrival order. `ranks[i]`, when given, is checked against the
    block size of every R-like tensor of update i.
    """
    if padding not in PADDINGS:
        raise ConfigError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
    weights = [1.0] * len(updates) if weights is None else [float(w) for w in weights]
    if len(weights) != len(updates) or (ranks is not None and len(ranks) != len(updates)):
        raise ConfigError("updates, weights and ranks must have the same length")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ConfigError(f"aggregation weights must be finite and non-negative, got {weights}")
    for i, update in enumerate(updates):
        check_update_shapes(global_state, update, None if ranks is None else ranks[i])
    ordered = sorted(zip(updates, weights, strict=True), key=lambda uw: update_digest(*uw))
    return {
        key: aggregate_tensor(key, value, [(u[key], w) for u, w in ordered if key in u], padding)
        for key, value in global_state.items()
    }


def aggregate_tensor(
    key: str, global_value: torch.Tensor, deltas: Sequence[tuple[torch.Tensor, float]], padding: str
) -> torch.Tensor:
    """Aggregate the deltas of one tensor (already in canonical order) into its new value.

    Only R matrices (keys ending in `.R`) follow the padding rule; other tensors are FedAvg.
    """
    if not deltas:
        return global_value.clone()
    if not key.endswith(".R"):
        return global_value + weighted_mean(deltas).to(global_value.dtype)
    if padding == "replication":
        step = aggregate_replication(global_value.shape, deltas)
    elif padding == "zero":
        step = aggregate_zero(global_value.shape, deltas)
    else:
        step = aggregate_hetlora(global_value.shape, deltas)
    return global_value + step.to(global_value.dtype)


def weighted_mean(deltas: Sequence[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Σ w_k Δ_k / Σ w_k in float64 (zero when all weights are zero)."""
    total = sum(w for _, w in deltas)
    acc = torch.zeros_like(deltas[0][0], dtype=torch.float64)
    for delta, w in deltas:
        acc += w * delta.to(torch.float64)
    return acc / total if total > 0 else acc


def aggregate_replication(
    shape: torch.Size, deltas: Sequence[tuple[torch.Tensor, float]]
) -> torch.Tensor:
    """Each entry averaged over the clients whose block covers it; uncovered entries: 0 step."""
    num = torch.zeros(shape, dtype=torch.float64)
    den = torch.zeros(shape, dtype=torch.float64)
    for delta, w in deltas:
        rows, cols = delta.shape
        num[:rows, :cols] += w * delta.to(torch.float64)
        den[:rows, :cols] += w
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def aggregate_zero(shape: torch.Size, deltas: Sequence[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Zero-pad every block to the full shape, then the plain weighted mean."""
    return weighted_mean([(pad_block(d, shape), w) for d, w in deltas])


def aggregate_hetlora(
    shape: torch.Size, deltas: Sequence[tuple[torch.Tensor, float]]
) -> torch.Tensor:
    """Zero padding with each update weighted by its Frobenius norm (HetLoRA)."""
    return aggregate_zero(shape, [(d, float(d.to(torch.float64).norm())) for d, _ in deltas])


def pad_block(block: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The block in the top-left corner of a zero tensor of `shape`, in float64."""
    out = torch.zeros(shape, dtype=torch.float64)
    out[: block.shape[0], : block.shape[1]] = block.to(torch.float64)
    return out


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


def update_digest(update: State, weight: float) -> bytes:
    """A content digest giving updates a canonical order independent of their arrival."""
    h = hashlib.sha256(repr(float(weight)).encode())
    for key in sorted(update):
        t = update[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()
