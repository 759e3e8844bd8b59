"""A client's privacy budget under DP-SGD: σ calibrated once, ε spent per round, stop when spent."""

from __future__ import annotations

from torch import nn

from ..config import JobConfig
from ..training import Encoded, TrainStats
from .accounting import PrivacyLedger, noise_for_budget
from .dpsgd import DPSGDSettings, train_private


class ClientPrivacy:
    """DP-SGD rounds of one client: its σ, its sampling rate, its ledger of ε spent.

    With a target ε, σ is the smallest noise that spends ε over `budget_rounds` rounds of
    `local_steps` steps (default: every round of the job); a round that would exceed the
    budget is not trained (`can_train_round` is false) and the client stops contributing.
    """

    def __init__(self, job: JobConfig, examples: int) -> None:
        p, fed = job.privacy, job.federation
        self.job = job
        self.steps = fed.local_steps
        self.sample_rate = min(1.0, fed.batch_size / max(examples, 1))
        rounds = p.budget_rounds or fed.rounds
        if p.noise_multiplier is not None:
            noise = p.noise_multiplier
        else:
            noise = noise_for_budget(
                epsilon=p.epsilon or 0.0,  # the config validator guarantees one of the two
                delta=p.delta,
                sample_rate=self.sample_rate,
                steps=rounds * self.steps,
                accountant=p.accountant,
            )
        self.settings = DPSGDSettings(
            noise_multiplier=noise,
            max_grad_norm=p.max_grad_norm,
            sample_rate=self.sample_rate,
            expected_batch_size=max(1, round(self.sample_rate * examples)),
            grad_sample_mode=p.grad_sample_mode,
        )
        self.ledger = PrivacyLedger(delta=p.delta, accountant=p.accountant, budget=p.epsilon)

    @property
    def epsilon(self) -> float:
        """ε spent so far (0 before the first round, inf with σ = 0)."""
        return self.ledger.epsilon

    def can_train_round(self) -> bool:
        """Does one more round of local steps fit the budget?"""
        return self.ledger.fits(self.settings.noise_multiplier, self.sample_rate, self.steps)

    def train_round(self, model: nn.Module, data: Encoded, *, seed: int) -> TrainStats:
        """One round of DP-SGD, recorded in the ledger."""
        fed = self.job.federation
        stats = train_private(
            model,
            data,
            self.settings,
            steps=self.steps,
            lr=fed.lr,
            head_lr=fed.head_lr,
            seed=seed,
            optimizer=fed.optimizer,
            dropout=fed.dropout,
        )
        self.ledger.record(self.settings.noise_multiplier, self.sample_rate, self.steps)
        return stats
