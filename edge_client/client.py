"""The edge client: receives the adapter once and the global state each round, trains, uploads.

Transport-independent: it consumes and produces message bytes; MQTT or an in-process loop
carries them. One client owns one model (as one device would).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping

import torch
from torch import nn

from fedsb.adapter import (
    apply_lora_sb,
    load_adapter_state,
    load_trainable_state,
    restrict_training_to_block,
    set_active_rank,
    trainable_state,
)
from fedsb.config import JobConfig
from fedsb.errors import FedsbError
from fedsb.methods import get_method
from fedsb.protocol import UpdateMeta, decode_broadcast, encode_client_update
from fedsb.training import Encoded, evaluate, train_local

log = logging.getLogger(__name__)


class FederatedClient:
    """One participant: its base model, its local data, its rank."""

    def __init__(
        self, client_id: str, base_model: nn.Module, data: Encoded, job: JobConfig, *, rank: int
    ) -> None:
        self.client_id = client_id
        self.job = job
        self.data = data
        self.rank = rank
        self.method = get_method(job.federation.method)
        self.model = apply_lora_sb(base_model, job.lora_config())
        self.model.eval()
        self.round: int | None = None
        self.start_state: dict[str, torch.Tensor] = {}

    def receive_adapter(self, payload: bytes) -> None:
        """Install the frozen factors (and starting trainable tensors) sent once by the server."""
        state, _ = decode_broadcast(payload, job=self.job.name, kind="adapter")
        load_adapter_state(self.model, state)
        self.method.mark_trainable(self.model, self.job.adapter.modules_to_save)
        if self.job.federation.rank_mode == "truncate":
            set_active_rank(self.model, self.rank)  # rank-k compute: the client sees the block only
        elif self.rank < self.job.adapter.rank:
            restrict_training_to_block(self.model, self.rank)  # full global R, block trains

    def receive_global(self, payload: bytes) -> int:
        """Apply a round's global state; idempotent for a round already applied."""
        state, round_no = decode_broadcast(payload, job=self.job.name, kind="global")
        if round_no != self.round:
            self.method.client_receive(self.model, state, round_no)
            self.round = round_no
        return round_no

    def train_round(self) -> bytes:
        """Train locally from the current global state and return the encoded update."""
        if self.round is None:
            raise FedsbError(f"client {self.client_id} has no global state yet")
        fed = self.job.federation
        start = trainable_state(self.model)
        stats = train_local(
            self.model,
            self.data,
            steps=fed.local_steps,
            batch_size=fed.batch_size,
            lr=fed.lr,
            head_lr=fed.head_lr,
            seed=round_seed(self.job.seed, self.client_id, self.round),
            optimizer=fed.optimizer,
            dropout=fed.dropout,
        )
        upload = self.method.client_upload(self.model, start, self.rank)
        self.restore(start)
        meta = UpdateMeta(
            self.job.name, self.round, self.client_id, self.rank, len(self.data), stats.loss
        )
        return encode_client_update(upload, meta)

    def restore(self, state: Mapping[str, torch.Tensor]) -> None:
        """Return to the round's global state (the next broadcast starts from it)."""
        load_trainable_state(self.model, state)

    def evaluate(self, data: Encoded | None = None) -> dict[str, float]:
        """Accuracy and loss of the current model on `data` (default: the local data)."""
        return evaluate(self.model, self.data if data is None else data)


def round_seed(seed: int, client_id: str, round_no: int) -> int:
    """A per-client, per-round seed that does not depend on Python's hash randomisation."""
    return (seed * 1_000_003 + zlib.crc32(client_id.encode()) * 7919 + round_no) % (2**63)
