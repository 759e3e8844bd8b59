"""The in-memory dataset types every fedsb loader returns and every partitioner consumes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedsb.errors import DataError


@dataclass(frozen=True)
class TextDataset:
    """Labelled texts, with an optional per-example group used to partition by column.

    `labels[i]` indexes `label_names`; `groups[i]` (when present) is e.g. the drug condition or the
    language of example i, so that clients can be given whole groups.
    """

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    groups: list[str] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        """Reject inconsistent columns early, so errors point at the loader and not at training."""
        n = len(self.texts)
        if len(self.labels) != n:
            raise DataError(
                f"TextDataset {self.name!r}: got {n} texts but {len(self.labels)} labels; "
                "expected one label per text. Pass columns of equal length."
            )
        if self.groups is not None and len(self.groups) != n:
            raise DataError(
                f"TextDataset {self.name!r}: got {n} texts but {len(self.groups)} groups; "
                "expected one group per text or groups=None."
            )
        num_classes = len(self.label_names)
        bad = [y for y in self.labels if not 0 <= y < num_classes]
        if bad:
            raise DataError(
                f"TextDataset {self.name!r}: label {bad[0]!r} is out of range; expected integers in "
                f"0..{num_classes - 1} indexing label_names. Map labels to ids before building it."
            )

    def __len__(self) -> int:
        """Number of examples."""
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> TextDataset:
        """Return the examples at `indices` (in that order), keeping label names, groups and name."""
        n = len(self.texts)
        for i in indices:
            if not 0 <= i < n:
                raise DataError(
                    f"subset of {self.name!r}: index {i} is out of range; expected 0..{n - 1}."
                )
        idx = [int(i) for i in indices]
        return TextDataset(
            texts=[self.texts[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            label_names=list(self.label_names),
            groups=None if self.groups is None else [self.groups[i] for i in idx],
            name=self.name,
        )


@dataclass(frozen=True)
class DatasetSplit:
    """A train/test pair drawn from one dataset; both share `label_names`."""

    train: TextDataset
    test: TextDataset
