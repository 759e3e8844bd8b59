"""The edge client: receives the adapter once and the global state each round, trains, uploads.

Transport-independent: it consumes and produces message bytes; MQTT or an in-process loop
carries them. One client owns one model (as one device would).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from typing import Any

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
from fedsb.errors import ConfigError, FedsbError
from fedsb.init_federated import client_reply, local_gradient_sums
from fedsb.methods import get_method
from fedsb.privacy import ClientPrivacy
from fedsb.protocol import (
    InitReplyMeta,
    UpdateMeta,
    decode_broadcast,
    decode_init_request,
    encode_client_update,
    encode_init_reply,
)
from fedsb.training import Encoded, TrainStats, evaluate

from .backends import TrainingBackend, TrainRequest, check_backend_job, get_backend

log = logging.getLogger(__name__)


class FederatedClient:
    """One participant: its base model, its local data, its rank."""

    def __init__(
        self,
        client_id: str,
        base_model: nn.Module,
        data: Encoded,
        job: JobConfig,
        *,
        rank: int,
        backend: str = "torch",
    ) -> None:
        check_client_backend(backend, job, rank)
        self.backend_name = backend
        self.backend: TrainingBackend | None = None  # built from the model once the adapter is in
        self.client_id = client_id
        self.job = job
        self.data = data
        self.rank = rank
        self.method = get_method(job.federation.method)
        self.model = apply_lora_sb(base_model, job.lora_config())
        self.model.eval()
        self.round: int | None = None
        self.start_state: dict[str, torch.Tensor] = {}
        self.init_gradients: tuple[dict[str, torch.Tensor], int] | None = None
        self._privacy: ClientPrivacy | None = None

    def init_reply(self, payload: bytes) -> bytes:
        """Answer one pass of a federated init request from this client's own gradient sums.

        Only sketches (or, in exact mode, the summed gradients) leave: never examples or
        per-example gradients. The sums are computed once, before the adapter exists (ΔW = 0).
        """
        bases, request = decode_init_request(payload, job=self.job.name)
        if self.init_gradients is None:
            self.init_gradients = local_gradient_sums(
                self.model, self.data, self.job, self.client_id
            )
        grads, examples = self.init_gradients
        reply = client_reply(
            grads,
            request.mode,
            request.pass_no,
            bases=bases,
            sketch_seed=request.sketch_seed,
            sketch_cols=request.sketch_cols,
            clip_norm=self.job.adapter.init_clip_norm,
        )
        meta = InitReplyMeta(
            self.job.name, request.attempt, request.pass_no, self.client_id, examples
        )
        return encode_init_reply(reply, meta)

    def receive_adapter(self, payload: bytes) -> None:
        """Install the frozen factors (and starting trainable tensors) sent once by the server."""
        state, _ = decode_broadcast(payload, job=self.job.name, kind="adapter")
        self.init_gradients = None  # the init is over
        self.backend = None  # a new adapter: the backend is rebuilt (re-exported) from the model
        load_adapter_state(self.model, state)
        self.method.mark_trainable(self.model, self.job.adapter.trained_modules)
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
        privacy = self.privacy()
        if privacy is not None and not privacy.can_train_round():
            return self.budget_spent_notice(privacy.epsilon)
        start = trainable_state(self.model)
        seed = round_seed(self.job.seed, self.client_id, self.round)
        if privacy is not None:  # DP-SGD: a torch-only path
            stats = privacy.train_round(self.model, self.data, seed=seed)
        else:
            stats = self.train_with_backend(start, seed)
        upload = self.method.client_upload(self.model, start, self.rank)
        self.restore(start)
        meta = UpdateMeta(
            self.job.name,
            self.round,
            self.client_id,
            self.rank,
            len(self.data),
            stats.loss,
            epsilon=privacy.epsilon if privacy is not None else None,
        )
        return encode_client_update(upload, meta)

    def train_with_backend(self, start: Mapping[str, torch.Tensor], seed: int) -> TrainStats:
        """Local steps in the chosen runtime from `start`; the trained tensors land in the model."""
        fed = self.job.federation
        if self.backend is None:
            self.backend = get_backend(self.backend_name, self.model)
        self.backend.load_trainable(start)
        request = TrainRequest(
            steps=fed.local_steps,
            batch_size=fed.batch_size,
            lr=fed.lr,
            head_lr=fed.head_lr,
            seed=seed,
            optimizer=fed.optimizer,
            dropout=fed.dropout,
        )
        stats = self.backend.train(self.data, request)
        load_trainable_state(self.model, self.backend.trainable_state())
        return stats

    def privacy(self) -> ClientPrivacy | None:
        """This client's DP-SGD budget (privacy.mode = 'dp-sgd'), set up on first use."""
        if self.job.privacy.mode == "dp-sgd" and self._privacy is None:
            self._privacy = ClientPrivacy(self.job, len(self.data))
        return self._privacy

    def privacy_state(self) -> dict[str, Any] | None:
        """The DP-SGD ledger (ε spent so far), saved with the client's state across restarts."""
        return self._privacy.ledger.state_dict() if self._privacy is not None else None

    def load_privacy_state(self, state: dict[str, Any]) -> None:
        """Continue from a saved ledger: budget spent before a restart stays spent."""
        privacy = self.privacy()
        if privacy is not None:
            privacy.ledger.load_state_dict(state)

    def budget_spent_notice(self, epsilon: float) -> bytes:
        """Instead of an update: this client's ε budget is spent, it no longer contributes."""
        log.info(
            "client %s: privacy budget spent (ε = %.3g); not training", self.client_id, epsilon
        )
        meta = UpdateMeta(
            self.job.name, int(self.round or 0), self.client_id, self.rank, 0, 0.0, epsilon, True
        )
        return encode_client_update({}, meta)

    def restore(self, state: Mapping[str, torch.Tensor]) -> None:
        """Return to the round's global state (the next broadcast starts from it)."""
        load_trainable_state(self.model, state)

    def evaluate(self, data: Encoded | None = None) -> dict[str, float]:
        """Accuracy and loss of the current model on `data` (default: the local data)."""
        return evaluate(self.model, self.data if data is None else data)


def check_client_backend(backend: str, job: JobConfig, rank: int) -> None:
    """Edge runtimes train the exported full-rank R with SGD, no dropout, no DP-SGD."""
    fed = job.federation
    check_backend_job(backend, optimizer=fed.optimizer, dropout=fed.dropout, method=fed.method)
    if backend != "torch" and job.privacy.mode == "dp-sgd":
        raise ConfigError(f"backend {backend!r} cannot train with DP-SGD; use backend 'torch'")
    if backend != "torch" and rank != job.adapter.rank:
        raise ConfigError(
            f"backend {backend!r} trains the full rank-{job.adapter.rank} R; "
            f"rank {rank} clients need backend 'torch'"
        )


def round_seed(seed: int, client_id: str, round_no: int) -> int:
    """A per-client, per-round seed that does not depend on Python's hash randomisation."""
    return (seed * 1_000_003 + zlib.crc32(client_id.encode()) * 7919 + round_no) % (2**63)
