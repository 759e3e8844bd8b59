"""PEFT export: the LoRA adapter B' = s·B·R, A' = A and the merged model give fedsb's logits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

import fedsb
from fedsb.errors import ConfigError
from fedsb.export import to_peft
from fedsb.export.adapter_dir import load_adapted_model
from fedsb.models import load_classifier
from fedsb.report import adapter_description, save_adapter

from .conftest import randomise_r


def logits(model: torch.nn.Module, data, n: int = 16) -> torch.Tensor:
    with torch.no_grad():
        batch = data.batch(torch.arange(n))
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_peft_adapter_and_merged_model_from_a_model(tiny_adapted, tiny_data, tmp_path: Path):
    base = tmp_path / "base"
    to_peft(tiny_adapted, tmp_path / "lora")
    to_peft(tiny_adapted, tmp_path / "merged", merged=True)
    expected = logits(tiny_adapted, tiny_data)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (
        config["r"] == 4
        and config["lora_alpha"] == 4
        and config["modules_to_save"] == ["classifier"]
    )
    assert sorted(config["target_modules"]) == sorted(
        ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    )
    # the base: the same network without the adapter (W0 and a head to be replaced)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    for name, layer in fedsb.lora_layers(tiny_adapted).items():
        plain.get_submodule(name).weight.data.copy_(layer.base.weight)
    plain.save_pretrained(base)
    peft_model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(base), tmp_path / "lora"
    ).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert (logits(peft_model, tiny_data) - expected).abs().max() <= 1e-5
    assert (logits(merged, tiny_data) - expected).abs().max() <= 1e-5
    assert (logits(plain.eval(), tiny_data) - expected).abs().max() > 1e-3  # the adapter matters


def test_peft_round_trip_on_minilm_adapter_folder(minilm_setup, tmp_path: Path):
    model, data = copy.deepcopy(minilm_setup[0]), minilm_setup[1]
    randomise_r(model, 2)
    job = fedsb.config.parse_config({"adapter": {"rank": 16}})
    labels = [f"topic{i}" for i in range(5)]
    save_adapter(
        tmp_path / "adapter",
        fedsb.adapter_state(model, ["classifier"]),
        adapter_description(job, labels),
    )
    rebuilt = load_adapted_model(tmp_path / "adapter").model
    expected = logits(rebuilt, data)
    assert (expected - logits(model, data)).abs().max() == 0
    to_peft(tmp_path / "adapter", tmp_path / "lora")
    to_peft(tmp_path / "adapter", tmp_path / "merged", merged=True)
    base, _ = load_classifier("all-MiniLM-L6-v2", 5)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    peft_gap = float((logits(peft_model, data) - expected).abs().max())
    merged_gap = float((logits(merged, data) - expected).abs().max())
    print(
        f"MiniLM r=16 PEFT round trip: max |Δlogit| adapter {peft_gap:.1e}, merged {merged_gap:.1e}"
    )
    assert peft_gap <= 1e-5 and merged_gap <= 1e-5
    assert merged.config.id2label[3] == "topic3"
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()


def test_not_an_adapter_folder_is_a_one_line_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="is not a fedsb adapter folder"):
        to_peft(tmp_path, tmp_path / "out")
