"""One error hierarchy for fedsb: library code raises these, the CLI turns them into one line."""

from __future__ import annotations


class FedsbError(Exception):
    """Base class of every error fedsb raises on purpose."""


class ConfigError(FedsbError):
    """A configuration value is missing, of the wrong type or out of range."""


class ModelError(FedsbError):
    """A model cannot be adapted (no target matched, rank too large, unsupported layer)."""


class DataError(FedsbError):
    """A dataset cannot be read, parsed or partitioned."""


class WireFormatError(FedsbError):
    """An encoded message is malformed, oversized, non-finite or of the wrong shape or dtype."""


class StateDirError(FedsbError):
    """The aggregator's state directory cannot be written (disk full, read-only)."""


class UpdateRejected(FedsbError):
    """A client update failed validation at the aggregator; `reason` is a short stable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
