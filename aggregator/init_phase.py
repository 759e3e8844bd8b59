"""The server side of a federated LoRA-SB init: one request per pass, validated replies, factors.

Transport-independent like `FederatedServer`: it produces request bytes and takes reply bytes
with the client id of their topic. The maths is in `fedsb.init_federated`. Every restart of
the phase gets a fresh `attempt` id, so replies to an interrupted attempt are rejected as stale.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import Counter
from typing import Any

from torch import nn

from fedsb.adapter import lora_layers
from fedsb.config import JobConfig
from fedsb.errors import FedsbError, UpdateRejected
from fedsb.init_federated import (
    EXACT,
    PASSES,
    SKETCH,
    SumOfReplies,
    factors_from_projection,
    layer_shapes,
    orthonormal_basis,
    reply_shapes,
    set_factors,
    set_sign_step_factors,
)
from fedsb.privacy.accounting import epsilon_spent
from fedsb.protocol import (
    InitReplyRules,
    InitRequest,
    encode_init_request,
    validate_init_reply,
)

log = logging.getLogger(__name__)


class InitPhase:
    """Runs the passes of `job.adapter.init` and sets B, A, R of the server's `model` at the end."""

    def __init__(self, job: JobConfig, model: nn.Module, *, attempt: str | None = None) -> None:
        if job.adapter.init not in PASSES:
            raise FedsbError(f"adapter.init = {job.adapter.init!r} is not a federated init")
        self.job = job
        self.model = model
        self.mode = job.adapter.init
        self.attempt = attempt or secrets.token_hex(8)
        self.layers = layer_shapes(model)
        self.cols = job.adapter.rank + job.adapter.init_oversample
        fed = job.federation
        self.quorum = min(fed.min_clients or fed.clients, fed.clients)
        self.pass_no = 0
        self.done = False
        self.bases: dict[str, Any] = {}  # Q of every layer after the sketch's pass 0
        self.rejections: Counter[str] = Counter()
        self.upload: Counter[str] = Counter()  # reply bytes of each client, all passes
        self.download: list[int] = []  # request bytes of each pass (every client gets each)
        self.clients: set[str] = set()
        self.open_pass()

    def open_pass(self) -> None:
        shapes = reply_shapes(self.mode, self.pass_no, self.layers, self.cols)
        self.rules = InitReplyRules(self.job.name, self.attempt, self.pass_no, shapes)
        self.sum = SumOfReplies(shapes)
        self.replied: set[str] = set()
        self.request = encode_init_request(
            self.bases if self.pass_no else {},
            InitRequest(
                self.job.name, self.attempt, self.pass_no, self.mode, self.job.seed, self.cols
            ),
        )
        self.download.append(len(self.request))

    def submit(self, client_id: str, payload: bytes) -> str | None:
        """Accept a reply to the open pass; return the rejection reason, or None if accepted."""
        try:
            if self.done:
                raise UpdateRejected("stale-init", "the init phase is over")
            state, meta = validate_init_reply(payload, client_id, self.rules)
            if client_id in self.replied:
                raise UpdateRejected("duplicate", f"{client_id} already replied to this pass")
        except UpdateRejected as err:
            self.rejections[err.reason] += 1
            log.warning("rejected init reply from %s: %s", client_id, err)
            return err.reason
        self.sum.add(state, meta.examples)
        self.replied.add(client_id)
        self.clients.add(client_id)
        self.upload[client_id] += len(payload)
        return None

    @property
    def ready(self) -> bool:
        """Whether the open pass has its quorum of replies."""
        return len(self.replied) >= self.quorum

    def close_pass(self) -> None:
        """Combine the open pass's replies: the bases Q, or (last pass) the model's factors."""
        if not self.replied:
            raise FedsbError(f"init pass {self.pass_no} has no reply to combine")
        cfg = self.job.adapter
        noise = cfg.init_noise_multiplier * (cfg.init_clip_norm or 0.0)
        sums = self.sum.result(noise, seed=self.job.seed * 1_000_003 + 101 + self.pass_no)
        log.info("init pass %d closed: %d clients", self.pass_no, len(self.replied))
        if self.mode == SKETCH and self.pass_no == 0:
            self.bases = {name: orthonormal_basis(y) for name, y in sums.items()}
            self.pass_no += 1
            self.open_pass()
            return
        for name, layer in lora_layers(self.model).items():
            if self.mode == EXACT:
                set_sign_step_factors(layer, sums[name], cfg.init_lr)
            else:
                b, a, s = factors_from_projection(
                    self.bases[name], sums[name], cfg.rank, cfg.init_lr, cfg.init_sketch_step
                )
                set_factors(layer, b, a, s)
        self.done = True

    def traffic(self) -> dict[str, Any]:
        """Bytes of the init: per client (mean over those that replied) and in total."""
        n = max(len(self.clients), 1)
        up = sum(self.upload.values())
        down = sum(self.download) * len(self.clients)
        return self.privacy() | {
            "init": self.mode,
            "init_passes": len(self.download),
            "init_clients": len(self.clients),
            "init_upload_bytes": up,
            "init_download_bytes": down,
            "init_upload_bytes_per_client": math.ceil(up / n),
            "init_download_bytes_per_client": math.ceil(down / n),
        }

    def privacy(self) -> dict[str, float]:
        """User-level ε of the noisy sums: one Gaussian mechanism (sensitivity C) per pass."""
        sigma = self.job.adapter.init_noise_multiplier
        if sigma == 0:
            return {}
        p = self.job.privacy
        steps = [(sigma, 1.0, len(self.download))]  # every client in every pass
        epsilon = epsilon_spent(steps, delta=p.delta, accountant=p.accountant)
        return {"init_epsilon": epsilon, "init_delta": p.delta}
