"""`fedsb export onnx|peft` and `fedsb client --backend` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsb.cli import main


def test_export_onnx_from_adapter_folder(tiny_adapter_dir: Path, tmp_path: Path):
    out = tmp_path / "onnx"
    config = tiny_adapter_dir.parent / "job.toml"
    assert main(["export", "onnx", "--config", str(config), "--adapter", str(tiny_adapter_dir), "--out", str(out)]) == 0  # fmt: skip
    manifest = json.loads((out / "fedsb_onnx.json").read_text())
    assert [t["state"] for t in manifest["trainable"]][-2:] == [
        "classifier.weight",
        "classifier.bias",
    ]
    assert sum(t["group"] == "lora" for t in manifest["trainable"]) == 12
    assert manifest["label_names"] == [f"topic{i}" for i in range(5)]
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", "inference.onnx"):  # fmt: skip
        assert (out / name).exists()
    assert (out / "tokenizer" / "tokenizer_config.json").is_file()


def test_export_peft_and_merged(tiny_adapter_dir: Path, tmp_path: Path):
    assert main(["export", "peft", "--adapter", str(tiny_adapter_dir), "--out", str(tmp_path / "p")]) == 0  # fmt: skip
    assert main(["export", "peft", "--adapter", str(tiny_adapter_dir), "--out", str(tmp_path / "m"), "--merged"]) == 0  # fmt: skip
    assert (tmp_path / "p" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_export_of_a_missing_adapter_is_one_line(tmp_path: Path, capsys):
    code = main(["export", "peft", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and "is not a fedsb adapter folder" in err
    assert len(err.splitlines()) == 1


def test_export_onnx_with_a_config_of_another_rank(tiny_adapter_dir: Path, tmp_path: Path, capsys):
    config = tiny_adapter_dir.parent / "job.toml"
    config.write_text(config.read_text().replace("rank = 4", "rank = 8"))
    code = main(["export", "onnx", "--config", str(config), "--adapter", str(tiny_adapter_dir), "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "error: config adapter.rank is 8 but the adapter has rank 4"


@pytest.mark.parametrize("backend", ["onnxruntime", "executorch"])
def test_client_backend_needs_sgd_without_dropout(tiny_adapter_dir: Path, capsys, backend):
    config = tiny_adapter_dir.parent / "job.toml"
    config.write_text(config.read_text().replace('optimizer = "sgd"', 'optimizer = "adamw"'))
    argv = ["client", "--config", str(config), "--broker", "mqtt://127.0.0.1:1", "--client-id", "c1"]  # fmt: skip
    code = main([*argv, "--backend", backend])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (
        f"error: backend '{backend}' needs federation.optimizer = \"sgd\" and "
        "federation.dropout = false (got optimizer 'adamw', dropout false)"
    )


def test_simulate_rejects_an_unknown_backend_in_one_line(tiny_adapter_dir: Path, capsys):
    config = tiny_adapter_dir.parent / "job.toml"
    code = main(["simulate", "--config", str(config), "--backends", "torch,tflite", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: simulation.backends.1: Input should be 'torch'")
    assert len(err.splitlines()) == 1
