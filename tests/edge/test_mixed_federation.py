"""A federation whose clients train in different runtimes, over the embedded MQTT broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsb.cli import Simulation
from fedsb.config import parse_config

from .conftest import tiny_job_dict

BACKENDS = ["torch", "onnxruntime", "executorch"]


def run(job, out: Path) -> tuple[Simulation, dict]:
    """The job through the embedded broker; the summary gets the round-0 global state too."""
    sim = Simulation(job, out, quiet=True)
    start = {k: v.clone() for k, v in sim.server.broadcast.items()}
    sim.run_mqtt(None)
    return sim, sim.finish() | {"start_state": start}


@pytest.mark.parametrize("freeze_head", [False, True], ids=["trained-head", "frozen-head"])
def test_mixed_backends_match_a_torch_only_run(
    tiny_model_dir: Path, tmp_path: Path, freeze_head: bool
):
    """Every runtime trains the same R (and head, unless frozen: then R alone is trainable)."""
    backends = BACKENDS
    raw = tiny_job_dict(tiny_model_dir, clients=len(backends) + 1, rounds=3, lr=0.5, head_lr=0.2)
    raw["adapter"] = raw.get("adapter", {}) | {"freeze_head": freeze_head}
    torch_job = parse_config(raw)
    raw["simulation"]["backends"] = backends
    mixed_job = parse_config(raw)

    mixed, mixed_summary = run(mixed_job, tmp_path / "mixed")
    _, torch_summary = run(torch_job, tmp_path / "torch")

    names = [type(c.backend).__name__ for c in mixed.clients]
    assert names == ["TorchBackend", "OnnxRuntimeBackend", "ExecuTorchBackend", "TorchBackend"]
    a, b = mixed_summary["final_state"], torch_summary["final_state"]
    assert a.keys() == b.keys()
    assert any(k.startswith("classifier.") for k in a) is not freeze_head
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float((a[k] - mixed_summary["start_state"][k]).abs().max()) for k in a)
    print(f"mixed {backends} vs torch-only, 3 rounds: max |Δ final state| = {gap:.2e}")
    assert gap <= 1e-5
    assert moved > 1e-2
    rows = [r["loss"] for r in mixed.recorder.rows]
    assert rows[-1] < rows[0]  # the global model's test loss goes down
    assert mixed_summary["rejections"] == {}
