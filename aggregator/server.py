"""The aggregator's round state machine: validate updates, aggregate exactly, advance rounds.

Transport-independent: it takes update bytes with the client id of their topic and produces
the adapter and global messages; MQTT or an in-process loop carries them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from fedsb.adapter import adapter_state, trainable_state
from fedsb.aggregate import RoundSum
from fedsb.config import JobConfig
from fedsb.errors import FedsbError, UpdateRejected
from fedsb.methods import Method
from fedsb.privacy import UserLevelDP
from fedsb.protocol import UpdateMeta, UpdateRules, encode_broadcast, validate_update
from fedsb.robust import bound_update, robust_aggregate

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What closing a round produced."""

    round: int
    clients: list[str]
    examples: int
    mean_loss: float
    upload_bytes: dict[str, int] = field(default_factory=dict)
    epsilon: float | None = None  # user-dp: the job's user-level ε after this round
    client_epsilon: float | None = None  # dp-sgd: the largest ε a client has reported
    budget_spent: list[str] = field(default_factory=list)  # dp-sgd: clients that stopped


@dataclass
class RoundPart:
    """One scale-out worker's share of the open round: what `FederatedServer.merge` adds."""

    round: int
    pending: dict[str, tuple[UpdateMeta, int]]
    uploads: dict[str, dict[str, torch.Tensor]]
    round_sum: RoundSum | None
    rejections: Counter[str]
    client_epsilon: dict[str, float]
    budget_spent: set[str]


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
        self.rules = UpdateRules(
            job=job.name,
            round=0,
            shapes=shapes,
            max_rank=job.adapter.rank,
            max_bytes=job.federation.max_update_bytes,
        )
        self.pending: dict[str, tuple[UpdateMeta, int]] = {}  # accepted this round: meta, bytes
        self.uploads: dict[str, dict[str, torch.Tensor]] = {}  # kept only by non-streaming methods
        self.rejections: Counter[str] = Counter()
        self.user_dp = UserLevelDP.from_job(job) if job.privacy.mode == "user-dp" else None
        self.budget_spent: set[str] = set()  # DP-SGD clients that said their ε is spent
        self.client_epsilon: dict[str, float] = {}  # DP-SGD: the last ε each client reported
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

    def set_initial_model(self, model: nn.Module) -> None:
        """Take the adapter and round-0 state of `model` (after a federated init phase)."""
        self.adapter = adapter_state(model, self.job.adapter.modules_to_save)
        self.restore(0, self.method.initial_broadcast(model))

    def new_round_sum(self) -> RoundSum | None:
        """Exact running sums for Fed-SB (memory independent of the number of clients)."""
        if self.user_dp is not None:  # clipped deltas, noise on the sum: linear methods only
            fedsb = self.method.name == "fedsb"
            return RoundSum(self.broadcast, self.job.federation.padding if fedsb else "replication")
        if self.method.name != "fedsb" or self.job.federation.aggregation != "exact-mean":
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
            fed = self.job.federation
            if fed.norm_bound is not None:
                state = bound_update(state, fed.norm_bound, fed.norm_bound_action)
            if self.user_dp is not None:
                state = self.user_dp.clip(state)
        except UpdateRejected as err:
            self.rejections[err.reason] += 1
            log.warning("rejected update from %s: %s", client_id, err)
            return err.reason
        if meta.epsilon is not None:
            self.client_epsilon[client_id] = meta.epsilon
        if meta.budget_spent:  # counts for the quorum, adds nothing
            if client_id not in self.budget_spent:
                self.budget_spent.add(client_id)
                log.warning(
                    "client %s has spent its privacy budget (ε = %s) and stops contributing; "
                    "the job goes on without it",
                    client_id,
                    meta.epsilon,
                )
        elif self.round_sum is not None:
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

    def part(self) -> RoundPart:
        """This server's share of the open round (a scale-out worker hands it to the coordinator)."""
        return RoundPart(
            self.round,
            dict(self.pending),
            dict(self.uploads),
            self.round_sum,
            Counter(self.rejections),
            dict(self.client_epsilon),
            set(self.budget_spent),
        )

    def merge(self, other: FederatedServer | RoundPart) -> None:
        """Scale-out: add another worker's accepted updates of the same round (exact, any order)."""
        part = other.part() if isinstance(other, FederatedServer) else other
        if part.round != self.round:
            raise FedsbError(f"cannot merge round {part.round} into round {self.round}")
        overlap = sorted(set(self.pending) & set(part.pending))
        if overlap:
            raise FedsbError(f"clients {overlap[:5]} were accepted by both workers")
        if self.round_sum is not None and part.round_sum is not None:
            self.round_sum.merge(part.round_sum)
        self.uploads |= part.uploads
        self.pending |= part.pending
        self.merge_counts(part)

    def merge_counts(self, part: RoundPart) -> None:
        """Add a worker's rejection counts and what its clients said of their privacy budget."""
        self.rejections.update(part.rejections)
        self.client_epsilon |= part.client_epsilon
        self.budget_spent |= part.budget_spent

    def close_round(self) -> RoundResult:
        """Aggregate the accepted updates (in client-id order) and open the next round."""
        if not self.pending:
            raise FedsbError(f"round {self.round} has no accepted update to aggregate")
        ids = sorted(i for i, (m, _) in self.pending.items() if not m.budget_spent)
        metas = [self.pending[i][0] for i in ids]
        weights = [self.weight(m) for m in metas]
        if not ids:
            log.warning("round %d: every client that answered has spent its budget", self.round)
        elif self.round_sum is not None:
            noise = self.user_dp.noise(self.broadcast, self.round) if self.user_dp else None
            self.broadcast = self.round_sum.result(noise)
        elif self.job.federation.aggregation != "exact-mean":
            self.broadcast = robust_aggregate(
                self.broadcast,
                [self.uploads[i] for i in ids],
                self.job.federation.aggregation,
                self.job.federation.trim_fraction,
            )
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
            mean_loss=sum(m.loss * w for m, w in zip(metas, weights, strict=True))
            / (sum(weights) or math.nan),
            upload_bytes={i: self.pending[i][1] for i in ids},
            epsilon=self.user_dp.epsilon(self.round + 1) if self.user_dp else None,
            client_epsilon=max(self.client_epsilon.values(), default=None),
            budget_spent=sorted(set(self.pending) - set(ids)),
        )
        self.restore(self.round + 1, self.broadcast)
        return result
