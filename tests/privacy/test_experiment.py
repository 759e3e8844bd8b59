"""experiments/privacy.py --quick on the tiny model: every method trains privately, results written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_privacy_experiment_writes_results_and_plot(tiny_model_dir, tmp_path):
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "privacy.py"),
            "--quick",
            "--model",
            str(tiny_model_dir),
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    record = json.loads((tmp_path / "benchmarks" / "results" / "privacy.json").read_text())
    by_variant = record["results"]["3"]
    assert set(by_variant) == {
        "Fed-SB",
        "Fed-SB, federated init",
        "FFA-LoRA",
        "FedIT",
        "FedEx-LoRA",
    }
    for runs in by_variant.values():
        assert 0.99 * 1.0 <= runs["1"]["epsilon_spent"] <= 1.0  # every client spent its ε = 1
        assert 0.0 <= runs["1"]["accuracy"] <= 1.0
    assert (tmp_path / "docs" / "img" / "privacy.png").stat().st_size > 10_000
