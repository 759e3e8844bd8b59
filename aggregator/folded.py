"""The aggregator's final adapter, including what FedEx and FLoRA fold into W0 every round.

Those methods do not keep everything in the adapter's factors: each round the clients add a
residual (FedEx) or the stacked product (FLoRA) to the frozen base weight. `FoldedModel`
applies every closed round's global to the server's model exactly as a client does, and the
adapter it writes carries, per adapted layer, `<layer>.base_delta` = W0(now) − W0(start)
(the weight's own orientation) next to A, B, R and the head. It is checkpointed after every
round, so a resumed aggregator still writes the whole adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from fedsb.adapter import adapter_state, base_weight, lora_layers
from fedsb.config import JobConfig
from fedsb.errors import FedsbError
from fedsb.methods import Method
from fedsb.methods.base import load_matching
from fedsb.protocol import decode_broadcast

from .service import write_atomic

FOLDED_FILE = "final-adapter.safetensors"
BASE_DELTA = ".base_delta"
ROUND_KEY = "round"


class FoldedModel:
    """The server's model after every closed round's global, applied as a client applies it."""

    def __init__(self, job: JobConfig, model: nn.Module, method: Method, state_dir: Path) -> None:
        self.job, self.model, self.method = job, model, method
        self.path = Path(state_dir) / FOLDED_FILE
        self.start = {
            n: base_weight(m.base).detach().clone() for n, m in lora_layers(model).items()
        }
        self.round = 0
        if self.path.exists():  # resumed: the adapter as of the last round it saw
            self.load()

    def apply(self, payload: bytes) -> None:
        """Apply a closed round's global message (once per round) and checkpoint the result."""
        state, round_no = decode_broadcast(payload, job=self.job.name, kind="global")
        self.apply_state(state, round_no)

    def apply_state(self, state: dict[str, torch.Tensor], round_no: int) -> None:
        if round_no <= self.round:
            return
        self.method.client_receive(self.model, state, round_no)
        self.round = round_no
        write_atomic(self.path, save(self.adapter(), metadata={ROUND_KEY: str(round_no)}))

    def catch_up(self, committed_round: int, committed: dict[str, torch.Tensor]) -> None:
        """After a crash between a round's commit and its checkpoint here: apply that round."""
        if committed_round > self.round + 1:
            raise FedsbError(
                f"{self.path} holds round {self.round} but the state directory is at round "
                f"{committed_round}: the final adapter cannot be rebuilt"
            )
        self.apply_state(committed, committed_round)

    def adapter(self) -> dict[str, torch.Tensor]:
        return adapter_with_folds(self.model, self.start, self.job.adapter.modules_to_save)

    def load(self) -> None:
        """Restore the model from the checkpointed adapter: W0 changes and trainable tensors."""
        with safe_open(str(self.path), "pt") as f:
            self.round = int((f.metadata() or {}).get(ROUND_KEY, "0"))
        saved = load_file(str(self.path))
        with torch.no_grad():
            for name, layer in lora_layers(self.model).items():
                if name + BASE_DELTA in saved:
                    base_weight(layer.base).add_(saved[name + BASE_DELTA])
        load_matching(self.model, saved)


def adapter_with_folds(
    model: nn.Module, start: dict[str, torch.Tensor], modules_to_save: list[str]
) -> dict[str, torch.Tensor]:
    """A, B, R and saved modules, plus each layer's W0 change (vs `start`) where one was folded."""
    state = adapter_state(model, modules_to_save)
    for name, layer in lora_layers(model).items():
        delta = base_weight(layer.base).detach() - start[name]
        if bool(delta.any()):
            state[name + BASE_DELTA] = delta.clone()
    return state
