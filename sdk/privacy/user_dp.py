"""User-level DP at the aggregator (DP-FedAvg): clip each client's delta, add noise to the sum.

Each client's whole delta (every R and `modules_to_save`) is clipped to L2 norm C, so one
client changes the round's sum by at most C; Gaussian noise N(0, (σC)²) per entry is added
once to the sum. The exact sums (`fedsb.accumulate`) stay exact for the clipped deltas; the
noise is drawn from a generator seeded by (job seed, round), so a resumed aggregator adds the
same noise. ε over rounds comes from Opacus's accountant with client sampling rate q.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..config import JobConfig
from ..robust import bound_update
from .accounting import epsilon_spent, noise_for_budget


class UserLevelDP:
    """The aggregator's DP-FedAvg mechanism: clip norm C, noise σ, client sampling rate q."""

    def __init__(
        self,
        *,
        clip_norm: float,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        accountant: str = "prv",
        seed: int = 0,
    ) -> None:
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.delta = delta
        self.accountant = accountant
        self.seed = seed

    @classmethod
    def from_job(cls, job: JobConfig) -> UserLevelDP:
        """σ from the config, or calibrated so that `federation.rounds` rounds spend ε."""
        p, fed = job.privacy, job.federation
        rate = p.client_sampling_rate or (fed.clients_per_round or fed.clients) / fed.clients
        noise = p.noise_multiplier
        if noise is None:
            noise = noise_for_budget(
                epsilon=p.epsilon or 0.0,  # the config validator guarantees one of the two
                delta=p.delta,
                sample_rate=rate,
                steps=fed.rounds,
                accountant=p.accountant,
            )
        return cls(
            clip_norm=p.clip_norm,
            noise_multiplier=noise,
            sample_rate=rate,
            delta=p.delta,
            accountant=p.accountant,
            seed=job.seed,
        )

    def clip(self, update: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The client's delta scaled down to L2 norm ≤ C (all its tensors together)."""
        return bound_update(update, self.clip_norm, "clip")

    def noise(self, like: Mapping[str, torch.Tensor], round_no: int) -> dict[str, torch.Tensor]:
        """N(0, (σC)²) per entry of every tensor of `like`, float64, seeded by (seed, round)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + round_no)
        std = self.noise_multiplier * self.clip_norm
        return {
            key: torch.randn(like[key].shape, generator=generator, dtype=torch.float64) * std
            for key in sorted(like)
        }

    def epsilon(self, rounds: int) -> float:
        """ε after `rounds` rounds of the mechanism (each with client sampling rate q)."""
        return epsilon_spent(
            [(self.noise_multiplier, self.sample_rate, rounds)],
            delta=self.delta,
            accountant=self.accountant,
        )
