"""Building the pieces of a simulated federation: data, model, partitions, the initial adapter.

Knows nothing of transports or of the client and aggregator runtimes: `fedsb.cli` wires them.
"""

from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass

import torch
from torch import nn

from .adapter import apply_lora_sb
from .config import JobConfig
from .data import DatasetSplit, TextDataset, load_dataset, partition
from .data.split import stratified_split
from .init import fit_frozen_head, init_lora_sb
from .init_federated import FEDERATED_INITS
from .methods import Method, get_method
from .models import load_classifier
from .training import Encoded, encode_texts, sequential_batches

log = logging.getLogger(__name__)


@dataclass
class FleetSetup:
    """Everything a simulated job starts from."""

    split: DatasetSplit  # its `test` is the validation set when data.evaluate_on = "validation"
    base_model: nn.Module  # the pretrained classifier, never adapted: copy it per participant
    train: Encoded
    test: Encoded
    shards: list[list[int]]  # example indices of each client


def prepare_fleet(job: JobConfig) -> FleetSetup:
    """Load the real data and model, tokenise once and partition the training set."""
    d = job.data
    split = load_dataset(
        d.dataset,
        seed=job.seed,
        test_fraction=d.test_fraction,
        path=d.path,
        text_column=d.text_column,
        label_column=d.label_column,
        group_column=d.group_column,
        max_examples=d.max_train_examples,
    )
    if d.evaluate_on == "validation":
        split = validation_split(split.train, d.test_fraction, job.seed)
    model, tokenizer = load_classifier(job.model.name, len(split.train.label_names), seed=job.seed)
    train = encode_texts(tokenizer, split.train.texts, split.train.labels, job.model.max_length)
    test = encode_texts(tokenizer, split.test.texts, split.test.labels, job.model.max_length)
    shards = partition(
        split.train, job.federation.clients, scheme=d.partition, alpha=d.alpha, seed=job.seed
    )
    return FleetSetup(split, model, train, test, shards)


def validation_split(train: TextDataset, fraction: float, seed: int) -> DatasetSplit:
    """A stratified, seeded validation set carved out of `train`, as (rest, validation).

    Tuning evaluates on it, so hyper-parameters are chosen without ever seeing the test set.
    """
    rest, held_out = stratified_split(train.labels, fraction, random.Random(f"validation-{seed}"))
    return DatasetSplit(train=train.subset(rest), test=train.subset(held_out))


def init_examples(fleet: FleetSetup, count: int, seed: int) -> Encoded:
    """`count` training examples drawn across all clients (the reference's pooled init data)."""
    generator = torch.Generator().manual_seed(seed)
    pooled = torch.tensor(sorted(i for shard in fleet.shards for i in shard))
    pick = pooled[torch.randperm(len(pooled), generator=generator)[:count]]
    return fleet.train.select(pick)


def initial_server_model(job: JobConfig, fleet: FleetSetup) -> tuple[nn.Module, Method]:
    """The server's adapted model after initialisation, and the job's method."""
    lora = job.lora_config()
    method = get_method(job.federation.method)
    model = apply_lora_sb(copy.deepcopy(fleet.base_model), lora)
    batches = sequential_batches(init_examples(fleet, lora.init_samples, job.seed), 16)
    if lora.init in FEDERATED_INITS:
        pass  # B, A, R stay zero until the federation's init phase sets them
    elif method.name == "fedsb":
        init_lora_sb(model, batches if lora.init == "lora-sb" else None, lora)
    else:
        method.initialise(model, seed=job.seed)
        if lora.freeze_head:  # the same head Fed-SB's probe fits: its ΔW is zero then too
            fit_frozen_head(model, batches, lora)
    method.mark_trainable(model, job.adapter.trained_modules)
    return model, method
