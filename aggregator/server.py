"""The aggregator's round state machine: validate updates, aggregate exactly, advance rounds.

Transport-independent: it takes update bytes with the client id of their topic and produces
the adapter and global messages; MQTT or an in-process loop carries them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from fedsb.adapter import adapter_state, trainable_state
from fedsb.aggregate import RoundSum
from fedsb.config import JobConfig
from fedsb.errors import FedsbError, UpdateRejected
from fedsb.methods import Method
from fedsb.protocol import UpdateMeta, UpdateRules, encode_broadcast, validate_update

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What closing a round produced."""

    round: int
    clients: list[str]
    examples: int
    mean_loss: float
    upload_bytes: dict[str, int] = field(default_factory=dict)


class FederatedServer:
    """Holds the global state of a job; one round open at a time."""

    def __init__(
        self,
        job: JobConfig,
        method: Method,
        adapter: dict[str, torch.Tensor],
        broadcast: dict[str, torch.Tensor],
        shapes: dict[str, tuple[int, ...]],
    ) -> None:
        self.job = job
        self.method = method
        self.round = 0
        self.adapter = adapter
        self.broadcast = broadcast
        self.rules = UpdateRules(job=job.name, round=0, shapes=shapes, max_rank=job.adapter.rank)
        self.pending: dict[str, tuple[UpdateMeta, int]] = {}  # accepted this round: meta, bytes
        self.uploads: dict[str, dict[str, torch.Tensor]] = {}  # kept only by non-streaming methods
        self.rejections: Counter[str] = Counter()
        self.round_sum = self.new_round_sum()

    @classmethod
    def from_model(cls, job: JobConfig, model: nn.Module, method: Method) -> FederatedServer:
        """A server for an adapted, initialised model (its adapter, trainable shapes, round 0)."""
        return cls(
            job,
            method,
            adapter_state(model, job.adapter.modules_to_save),
            method.initial_broadcast(model),
            {k: tuple(v.shape) for k, v in trainable_state(model).items()},
        )

    def new_round_sum(self) -> RoundSum | None:
        """Exact running sums for Fed-SB (memory independent of the number of clients)."""
        if self.method.name != "fedsb":
            return None
        return RoundSum(self.broadcast, self.job.federation.padding)

    def weight(self, meta: UpdateMeta) -> float:
        return float(meta.examples) if self.job.federation.weighting == "examples" else 1.0

    def restore(self, round_no: int, broadcast: dict[str, torch.Tensor]) -> None:
        """Continue from a checkpoint: the global state that opens `round_no`."""
        self.round = round_no
        self.broadcast = broadcast
        self.pending.clear()
        self.uploads.clear()
        self.round_sum = self.new_round_sum()
        self.rules = dataclasses.replace(self.rules, round=round_no)

    def adapter_payload(self) -> bytes:
        """The one-time adapter message (frozen factors, starting trainable tensors)."""
        return encode_broadcast(self.adapter, job=self.job.name, round_no=0, kind="adapter")

    def global_payload(self) -> bytes:
        """The current round's global message."""
        return encode_broadcast(
            self.broadcast, job=self.job.name, round_no=self.round, kind="global"
        )

    def submit(self, client_id: str, payload: bytes) -> str | None:
        """Accept an update for the open round; return the rejection reason, or None if accepted."""
        try:
            state, meta = validate_update(payload, client_id, self.rules)
            if client_id in self.pending:
                raise UpdateRejected("duplicate", f"{client_id} already sent round {self.round}")
        except UpdateRejected as err:
            self.rejections[err.reason] += 1
            log.warning("rejected update from %s: %s", client_id, err)
            return err.reason
        if self.round_sum is not None:
            try:
                self.round_sum.add(state, self.weight(meta), meta.rank)
            except (FedsbError, ValueError) as err:  # validated already: a bug, not a crash
                self.rejections["invalid"] += 1
                log.error("update from %s could not be added: %s", client_id, err)
                return "invalid"
        else:
            self.uploads[client_id] = state
        self.pending[client_id] = (meta, len(payload))
        return None

    def merge(self, other: FederatedServer) -> None:
        """Scale-out: add another worker's accepted updates of the same round (exact, any order)."""
        if other.round != self.round:
            raise FedsbError(f"cannot merge round {other.round} into round {self.round}")
        overlap = sorted(set(self.pending) & set(other.pending))
        if overlap:
            raise FedsbError(f"clients {overlap[:5]} were accepted by both workers")
        if self.round_sum is not None and other.round_sum is not None:
            self.round_sum.merge(other.round_sum)
        self.uploads |= other.uploads
        self.pending |= other.pending
        self.rejections.update(other.rejections)

    def close_round(self) -> RoundResult:
        """Aggregate the accepted updates (in client-id order) and open the next round."""
        if not self.pending:
            raise FedsbError(f"round {self.round} has no accepted update to aggregate")
        ids = sorted(self.pending)
        metas = [self.pending[i][0] for i in ids]
        weights = [self.weight(m) for m in metas]
        if self.round_sum is not None:
            self.broadcast = self.round_sum.result()
        else:
            self.broadcast = self.method.server_aggregate(
                self.broadcast,
                [self.uploads[i] for i in ids],
                weights,
                [m.rank for m in metas],
                self.job.federation.padding,
            )
        result = RoundResult(
            round=self.round,
            clients=ids,
            examples=sum(m.examples for m in metas),
            mean_loss=sum(m.loss * w for m, w in zip(metas, weights, strict=True)) / sum(weights),
            upload_bytes={i: self.pending[i][1] for i in ids},
        )
        self.restore(self.round + 1, self.broadcast)
        return result
