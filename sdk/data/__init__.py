"""Datasets for federated fine-tuning: built-in loaders, a CSV/JSONL loader and client partitions.

All data comes from installed packages or local files; nothing is downloaded.
"""

from __future__ import annotations

from fedsb.data.dataset import DatasetSplit, TextDataset
from fedsb.data.loaders import DATASETS, load_dataset
from fedsb.data.partition import SCHEMES, partition

__all__ = ["DATASETS", "SCHEMES", "DatasetSplit", "TextDataset", "load_dataset", "partition"]
