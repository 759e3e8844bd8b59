"""Privacy accounting with Opacus's accountants (PRV or RDP) for the subsampled Gaussian mechanism.

A `PrivacyLedger` is one party's record of noisy steps: ε spent so far, whether more steps
fit its budget, and a `state_dict` so spent budget survives a restart. The same code counts
DP-SGD steps on a client and DP-FedAvg rounds at the aggregator.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError

ACCOUNTANTS = ("prv", "rdp")


def require_opacus() -> None:
    """Differential privacy needs the optional `opacus` package."""
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise ConfigError("privacy needs opacus: pip install 'fedsb[dp]'") from None


def epsilon_spent(
    history: Sequence[tuple[float, float, int]], *, delta: float, accountant: str = "prv"
) -> float:
    """ε after the compositions `history` = [(noise σ, sample rate q, steps), …]; inf if σ = 0."""
    return _epsilon(tuple(history), delta, accountant)


@functools.lru_cache(maxsize=4096)  # PRV takes ~0.1-1 s: every client asks twice per round
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    steps = [(s, q, n) for s, q, n in history if n > 0]
    if not steps:
        return 0.0
    if any(s == 0 for s, _, _ in steps):
        return math.inf
    require_opacus()
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in steps]
    with warnings.catch_warnings():  # RDP: "optimal order is the smallest alpha" for large ε
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=1024)  # a PRV search takes seconds; clients often share (q, steps)
def noise_for_budget(
    *, epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv"
) -> float:
    """The smallest σ (within Opacus's 0.01 tolerance on ε) spending at most `epsilon` in `steps`."""
    require_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )


class PrivacyLedger:
    """The noisy steps one party has taken, and its ε budget (None: no limit)."""

    def __init__(self, *, delta: float, accountant: str, budget: float | None = None) -> None:
        if accountant not in ACCOUNTANTS:
            raise ConfigError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        self.delta = delta
        self.accountant = accountant
        self.budget = budget
        self.history: list[tuple[float, float, int]] = []

    def record(self, noise: float, sample_rate: float, steps: int = 1) -> None:
        """Add `steps` steps of the Gaussian mechanism with noise σ at sampling rate q."""
        if self.history and self.history[-1][:2] == (noise, sample_rate):
            self.history[-1] = (noise, sample_rate, self.history[-1][2] + steps)
        else:
            self.history.append((noise, sample_rate, steps))

    @property
    def epsilon(self) -> float:
        """ε spent so far at this ledger's δ."""
        return epsilon_spent(self.history, delta=self.delta, accountant=self.accountant)

    def fits(self, noise: float, sample_rate: float, steps: int) -> bool:
        """Would `steps` more steps keep ε within the budget? (Always true without a budget.)"""
        if self.budget is None:
            return True
        trial = PrivacyLedger(delta=self.delta, accountant=self.accountant)
        trial.history = list(self.history)
        trial.record(noise, sample_rate, steps)
        return trial.epsilon <= self.budget

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
