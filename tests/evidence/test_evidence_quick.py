"""Smoke tests of the evidence scripts: each `--quick` mode runs and produces the right numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "runs" / "evidence-quick"
ENV = os.environ | {
    "OMP_WAIT_POLICY": "PASSIVE",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "FLWR_TELEMETRY_ENABLED": "0",
}


def run_quick(script: str, name: str, *extra: str) -> dict[str, Any]:
    """Run `script --quick` from the repository root; return the JSON it wrote."""
    (RESULTS / name).unlink(missing_ok=True)
    subprocess.run(
        [sys.executable, script, "--quick", *extra],
        cwd=ROOT,
        env=ENV,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads((RESULTS / name).read_text())


def test_communication_reproduces_the_paper_counts() -> None:
    record = run_quick("experiments/communication.py", "communication_quick.json")
    paper = record["paper"]
    assert paper["mistral_fedsb_r200_params_per_round"] == 8_960_000  # 32 layers × 7 × 200²
    assert paper["mistral_fedit_r32_params"] == 83_886_080
    assert paper["mistral_flora_down_params"] == 2_097_152_000  # 25 clients × FedIT
    assert 229 < paper["gemma_flora_vs_fedsb_r200_params_ratio"] < 231
    for check in record["check_against_real"]:  # sizes of the big models = real encodings
        assert check["real_up_bytes"] == check["computed_up_bytes"], check
        assert check["real_down_bytes"] == check["computed_down_bytes"], check
        assert check["same_keys_and_shapes"], check
    growth = {(r["method"], r["clients"]): r for r in record["growth_with_clients_mistral"]}
    assert growth["fedsb", 3]["down_bytes"] == growth["fedsb", 100]["down_bytes"]
    assert 3 * growth["flora", 100]["down_params"] == 100 * growth["flora", 3]["down_params"]


def test_aggregation_throughput_is_measured_against_the_bound() -> None:
    record = run_quick("benchmarks/aggregation_throughput.py", "aggregation_throughput_quick.json")
    rows = {r["model"]: r for r in record["rows"]}
    assert rows["BERT-base"]["values_per_update"] == 72 * 16 * 16 + 3 * 768 + 3
    assert rows["Llama-3.2-3B"]["values_per_update"] == 196 * 16 * 16
    for row in rows.values():
        assert row["payload_bytes"] > 4 * row["values_per_update"]
        assert 0 < row["fraction_of_bound"] < 1
    assert record["machine"]["memcpy_bytes_per_second"] > 1e8


def test_client_cost_compares_fedsb_and_fedit() -> None:
    record = run_quick("benchmarks/client_cost.py", "client_cost_quick.json")
    fedsb, fedit = record["rows"]
    head = 21 * 384 + 21
    assert fedsb["trainable_parameters"] == 36 * 16 * 16 + head
    assert fedit["trainable_parameters"] == 6 * 16 * (4 * 768 + 2 * 1920) + head
    assert fedsb["optimizer_state_bytes"] * 30 < fedit["optimizer_state_bytes"]
    assert fedsb["peak_rss_bytes"] > 100 * 2**20


def test_flower_compare_fedsb_transports_send_the_same_bytes() -> None:
    record = run_quick("benchmarks/flower_compare.py", "flower_compare_quick.json", "--skip-flower")
    inproc, mqtt = record["results"]["fedsb inproc"], record["results"]["fedsb mqtt"]
    assert inproc["upload_bytes_per_round"] == mqtt["upload_bytes_per_round"] > 3 * 4 * 36 * 256
    assert inproc["download_bytes_per_round"] == mqtt["download_bytes_per_round"]
    assert len(inproc["rounds"]) == len(mqtt["rounds"]) == 2


def test_accuracy_comm_quick_run_learns_and_counts_upload() -> None:
    record = run_quick("experiments/accuracy_comm.py", "accuracy_comm_quick.json")
    summary = {s["label"]: s for s in record["summary"]}
    fedsb, fedit = summary["Fed-SB r=16"], summary["FedIT r=8"]
    frozen = summary["Fed-SB r=21, frozen head"]
    assert fedit["upload_bytes_per_client_round"] > 10 * fedsb["upload_bytes_per_client_round"]
    # no head in the upload: 36 R blocks of 21×21 float32 and the envelope
    assert 36 * 21 * 21 * 4 < frozen["upload_bytes_per_client_round"] <= 36 * 21 * 21 * 4 + 700
    assert fedsb["accuracy_mean"] > 0.15  # 21 classes: chance is 4.8%
    assert frozen["accuracy_mean"] > 0.15
    assert len(record["runs"][0]["accuracy_per_round"]) == record["rounds"] + 1
    gaps = {(g["reference"], g["against"]): g for g in record["paired_gaps"]}  # 1 fleet, seed 0
    assert set(gaps) == {("Fed-SB r=21, frozen head", "FedIT r=8"), ("Fed-SB r=16", "FedIT r=8")}
    gap = gaps["Fed-SB r=16", "FedIT r=8"]
    assert gap["seeds"] == [0]
    assert gap["gap_mean"] == fedsb["accuracy_mean"] - fedit["accuracy_mean"]


def test_hetero_ranks_quick_run_covers_each_padding() -> None:
    record = run_quick("experiments/hetero_ranks.py", "hetero_ranks_quick.json")
    assert set(record["summary"]) == {"replication", "zero"}
    for padding in record["summary"].values():
        assert len(padding["curve_mean"]) == record["rounds"] + 1
        assert padding["final_accuracy_mean"] > 0.15
