"""In-process federation: determinism, every method runs, bytes are measured on payloads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedsb.adapter import trainable_state
from fedsb.cli import run_simulation
from fedsb.export.adapter_dir import load_adapted_model
from fedsb.methods import METHODS


def test_same_seed_gives_bit_identical_final_state(tiny_config, tmp_path):
    job = tiny_config()
    a = run_simulation(job, tmp_path / "a", quiet=True)["final_state"]
    b = run_simulation(job, tmp_path / "b", quiet=True)["final_state"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_different_seed_changes_the_result(tiny_model_dir, tmp_path):
    from conftest import tiny_job

    from fedsb.config import parse_config

    a = run_simulation(parse_config(tiny_job(tiny_model_dir)), tmp_path / "a", quiet=True)
    raw = tiny_job(tiny_model_dir) | {"seed": 1}
    b = run_simulation(parse_config(raw), tmp_path / "b", quiet=True)
    keys = [k for k in a["final_state"] if k.endswith(".R")]
    assert any(not torch.equal(a["final_state"][k], b["final_state"][k]) for k in keys)


def test_run_folder_has_config_metrics_plot_and_adapter(tiny_config, tmp_path):
    run_simulation(tiny_config(rounds=2), tmp_path, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert json.loads((tmp_path / "config.json").read_text())["federation"]["rounds"] == 2
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    assert (tmp_path / "adapter" / "adapter.safetensors").stat().st_size > 0
    assert (
        json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["num_labels"] == 21
    )


def test_fedsb_upload_is_r_squared_per_layer_plus_head(tiny_config, tmp_path):
    run_simulation(tiny_config(rounds=1), tmp_path, quiet=True)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])
    # tiny BERT: 2 layers × 6 targets, rank 4, float32; head 21×32 + 21
    raw = 12 * 4 * 4 * 4 + (21 * 32 + 21) * 4
    assert raw < row["upload_bytes_per_client"] <= raw + 640  # fixed envelope: names + meta


def test_frozen_head_uploads_r_alone_and_never_changes(tiny_model_dir, tmp_path):
    """adapter.freeze_head: the probed head travels once in the adapter, never per round."""
    from conftest import frozen_head_job

    run_simulation(frozen_head_job(tiny_model_dir, rounds=1), tmp_path / "one", quiet=True)
    two = run_simulation(frozen_head_job(tiny_model_dir, rounds=2), tmp_path / "two", quiet=True)
    assert all(k.endswith(".R") for k in two["final_state"]) and len(two["final_state"]) == 12
    row = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[1])
    raw = 12 * 4 * 4 * 4  # 2 layers × 6 targets, rank 4, float32: no head
    assert raw < row["upload_bytes_per_client"] <= raw + 640
    heads = [
        load_file(str(tmp_path / d / "adapter" / "adapter.safetensors")) for d in ("one", "two")
    ]
    names = [k for k in heads[0] if k.startswith("classifier.")]
    assert sorted(names) == ["classifier.bias", "classifier.weight"]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in names)  # round 2 left it as it was
    assert any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[0] if k.endswith(".R"))
    reloaded = load_adapted_model(tmp_path / "two" / "adapter").model  # the head stays frozen
    assert sorted(trainable_state(reloaded)) == sorted(two["final_state"])


def test_a_baseline_freezes_the_same_head_fed_sb_probes(tiny_model_dir, tmp_path):
    """FFA-LoRA with freeze_head fits the head Fed-SB's probe fits, and uploads B alone."""
    from conftest import frozen_head_job

    fedsb = run_simulation(frozen_head_job(tiny_model_dir, rounds=1), tmp_path / "sb", quiet=True)
    ffa = run_simulation(
        frozen_head_job(tiny_model_dir, rounds=1, method="ffa"), tmp_path / "ffa", quiet=True
    )
    assert fedsb["final_state"] and all(k.endswith(".R") for k in fedsb["final_state"])
    assert ffa["final_state"] and all(k.endswith(".B") for k in ffa["final_state"])
    sb, fa = (
        load_file(str(tmp_path / d / "adapter" / "adapter.safetensors")) for d in ("sb", "ffa")
    )
    for name in ("classifier.weight", "classifier.bias"):
        assert torch.equal(sb[name], fa[name]), name


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_and_reports_bytes(tiny_config, tmp_path, method):
    summary = run_simulation(tiny_config(method=method, rounds=2), tmp_path, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["upload_bytes_per_client"] > 0 for r in rows[1:])
    assert 0.0 <= summary["accuracy_after"] <= 1.0
    assert all(torch.isfinite(v).all() for v in summary["final_state"].values())


def test_download_grows_with_clients_for_flora_only(tiny_config, tmp_path):
    def second_round_download(method: str, clients: int) -> int:
        """Bytes of the broadcast that opens round 2 (it carries round 1's aggregate)."""
        out = tmp_path / f"{method}-{clients}"
        run_simulation(tiny_config(method=method, clients=clients, rounds=2), out, quiet=True)
        last = (out / "metrics.jsonl").read_text().splitlines()[-1]
        return json.loads(last)["download_bytes_per_client"]

    assert second_round_download("fedsb", 2) == second_round_download("fedsb", 4)
    assert second_round_download("flora", 4) > second_round_download("flora", 2)
    assert second_round_download("fedex", 2) > 20 * second_round_download("fedsb", 2)


def test_heterogeneous_ranks_upload_their_block(tiny_config, tmp_path):
    summary = run_simulation(tiny_config(client_ranks=[1, 2, 4, 4]), tmp_path, quiet=True)
    r = [v for k, v in summary["final_state"].items() if k.endswith(".R")][0]
    assert r.shape == (4, 4)


@pytest.mark.parametrize("mode", ["truncate", "fold"])
def test_low_rank_client_trains_and_uploads_only_its_block(tiny_config, mode, monkeypatch):
    from fedsb.adapter import lora_layers
    from fedsb.aggregator.server import FederatedServer
    from fedsb.edge_client.client import FederatedClient
    from fedsb.simulation import initial_server_model, prepare_fleet
    from fedsb.wire import decode_update

    job = tiny_config(client_ranks=[2, 4, 4, 4], rank_mode=mode)
    fleet = prepare_fleet(job)
    model, method = initial_server_model(job, fleet)
    server = FederatedServer.from_model(job, model, method)
    client = FederatedClient("c", fleet.base_model, fleet.train, job, rank=2)
    client.receive_adapter(server.adapter_payload())
    client.receive_global(server.global_payload())
    before = {n: la.lora_R.weight.detach().clone() for n, la in lora_layers(client.model).items()}
    monkeypatch.setattr(client, "restore", lambda state: None)  # keep the trained R to inspect it
    state, meta = decode_update(client.train_round())
    assert meta["rank"] == "2"
    assert all(v.shape == (2, 2) for k, v in state.items() if k.endswith(".R"))
    for name, layer in lora_layers(client.model).items():
        after = layer.lora_R.weight.detach()
        outside = torch.ones(4, 4, dtype=torch.bool)
        outside[:2, :2] = False
        assert torch.equal(after[outside], before[name][outside])
        assert torch.equal(after[:2, :2] - before[name][:2, :2], state[name + ".R"])
    assert any(state[k].abs().max() > 0 for k in state if k.endswith(".R"))
