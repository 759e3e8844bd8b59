"""Differential privacy: DP-SGD on clients (Opacus), user-level DP-FedAvg at the aggregator."""

from __future__ import annotations

from .accounting import PrivacyLedger, epsilon_spent, noise_for_budget
from .budget import ClientPrivacy
from .dpsgd import DPSGDSettings, check_private_trainable, train_private
from .user_dp import UserLevelDP

__all__ = [
    "ClientPrivacy",
    "DPSGDSettings",
    "PrivacyLedger",
    "UserLevelDP",
    "check_private_trainable",
    "epsilon_spent",
    "noise_for_budget",
    "train_private",
]
