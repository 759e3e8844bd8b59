"""Defences against Byzantine clients: a norm bound on each update, robust coordinate-wise means.

`bound_update` clips (or refuses) a client's delta whose L2 norm over all its tensors exceeds
`norm_bound`; then every accepted delta lies in the ball of that radius, and so does their
weighted mean, the step of the global state (for clients of equal rank).

`robust_aggregate` replaces the exact weighted mean by a coordinate-wise median or trimmed
mean over the clients' deltas. Both are unweighted and not exact sums: they trade the
bit-exact, order-independent Fed-SB mean for robustness to a minority of outliers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .errors import ConfigError, UpdateRejected

State = Mapping[str, torch.Tensor]
ROBUST_AGGREGATIONS = ("median", "trimmed-mean")


def update_norm(update: State) -> float:
    """L2 norm of the whole update (all tensors flattened together), in float64."""
    return math.sqrt(sum(float(t.to(torch.float64).square().sum()) for t in update.values()))


def bound_update(update: State, norm_bound: float, action: str) -> dict[str, torch.Tensor]:
    """The update, scaled down to `norm_bound` ("clip") or refused ("reject") when larger."""
    norm = update_norm(update)
    if norm <= norm_bound:
        return dict(update)
    if action == "reject":
        raise UpdateRejected("norm-bound", f"update norm {norm:.4g} > bound {norm_bound:.4g}")
    scale = norm_bound / norm
    clipped = {k: (v.to(torch.float64) * scale).to(v.dtype) for k, v in update.items()}
    # rounding to float32 may land a hair above the bound: shrink until it does not
    while update_norm(clipped) > norm_bound:
        scale *= 1 - 1e-6
        clipped = {k: (v.to(torch.float64) * scale).to(v.dtype) for k, v in update.items()}
    return clipped


def robust_aggregate(
    global_state: State,
    updates: Sequence[State],
    how: str,
    trim_fraction: float = 0.1,
) -> dict[str, torch.Tensor]:
    """global + coordinate-wise median or trimmed mean of the deltas (equal-shape deltas only).

    A tensor no client sent keeps its global value. The trimmed mean drops the
    ⌊trim_fraction·n⌋ smallest and largest values of each coordinate.
    """
    if how not in ROBUST_AGGREGATIONS:
        raise ConfigError(f"robust aggregation must be one of {ROBUST_AGGREGATIONS}, got {how!r}")
    new = {}
    for key, value in global_state.items():
        deltas = [u[key] for u in updates if key in u]
        if not deltas:
            new[key] = value.clone()
            continue
        if any(tuple(d.shape) != tuple(value.shape) for d in deltas):
            raise ConfigError(
                f"robust aggregation needs full-size deltas; {key!r} came in another shape "
                "(clients of a lower rank): use aggregation = 'exact-mean'"
            )
        stacked = torch.stack([d.to(torch.float64) for d in deltas])  # (n, *shape)
        new[key] = value + _combine(stacked, how, trim_fraction).to(value.dtype)
    return new


def _combine(stacked: torch.Tensor, how: str, trim_fraction: float) -> torch.Tensor:
    """Median or trimmed mean over dimension 0 (the clients)."""
    ordered = stacked.sort(dim=0).values  # sorting first makes the result order-independent
    n = ordered.shape[0]
    if how == "median":  # the mean of the two middle values when n is even
        return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    cut = int(math.floor(trim_fraction * n))
    return ordered[cut : n - cut].mean(dim=0)
