"""apply_lora_sb on tiny BERT, GPT-2 (Conv1D) and Llama: injection, freezing, errors, identity."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedsb.adapter import (
    TARGET_PRESETS,
    LoraSBConfig,
    LoraSBLayer,
    apply_lora_sb,
    count_trainable,
    lora_layers,
    matches,
    trainable_state,
)
from fedsb.errors import ConfigError, ModelError
from fedsb.init import init_lora_sb

from .conftest import MODEL_CASES, ModelCase, clone_model, make_batches, make_model

RANK = 4


def adapted(case: ModelCase, rank: int = RANK, init: str = "random", seed: int = 0) -> nn.Module:
    model = make_model(case, seed=seed)
    apply_lora_sb(model, LoraSBConfig(rank=rank, init=init, modules_to_save=[case.head], seed=seed))
    return model


def test_injection_replaces_every_target(case: ModelCase) -> None:
    base = make_model(case)
    preset = TARGET_PRESETS[case.family]
    expected = {name: type(m) for name, m in base.named_modules() if name and matches(name, preset)}
    model = adapted(case)
    layers = lora_layers(model)
    assert sorted(layers) == sorted(expected)
    assert len(layers) == case.n_adapted
    for name, layer in layers.items():
        assert isinstance(model.get_submodule(name), LoraSBLayer)
        assert type(layer.base) is expected[name]
        assert isinstance(layer.base, Conv1D) is case.conv1d
        d_out, d_in = (
            layer.base.weight.shape[::-1] if case.conv1d else tuple(layer.base.weight.shape)
        )
        assert tuple(layer.lora_A.weight.shape) == (RANK, d_in)
        assert tuple(layer.lora_R.weight.shape) == (RANK, RANK)
        assert tuple(layer.lora_B.weight.shape) == (d_out, RANK)
        assert layer.scaling == 1.0
    # No adapted layer is left as a plain Linear/Conv1D anywhere under its old name.
    for name, m in model.named_modules():
        if name in expected:
            assert isinstance(m, LoraSBLayer)


def test_only_r_and_saved_modules_are_trainable(case: ModelCase) -> None:
    model = adapted(case)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{n}.lora_R.weight" for n in lora_layers(model)}
    expected |= {f"{case.head}.{n}" for n, _ in model.get_submodule(case.head).named_parameters()}
    assert trainable == expected
    assert count_trainable(model) == case.n_adapted * RANK**2 + case.head_params
    state = trainable_state(model)
    assert set(state) == {f"{n}.R" for n in lora_layers(model)} | {
        f"{case.head}.{n}" for n, _ in model.get_submodule(case.head).named_parameters()
    }


def test_training_step_changes_only_r_and_head(case: ModelCase) -> None:
    model = adapted(case)
    init_lora_sb(model, None)  # init="random": orthonormal A, B and R = 0 (R gets a gradient)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    # Hand every parameter to AdamW with weight decay: a frozen one would still move if it had
    # a gradient, so this also checks that no frozen tensor receives one.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    batch = make_batches(1)[0]
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable  # every R and the head moved, nothing else by a single bit
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n


def test_zero_r_gives_base_logits_exactly(case: ModelCase) -> None:
    base = make_model(case)
    model = clone_model(base)
    batch = make_batches(1, batch_size=5)[0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def logits(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(**inputs).logits

    expected = logits(base)
    apply_lora_sb(model, LoraSBConfig(rank=RANK, modules_to_save=[case.head]))
    assert torch.equal(logits(model), expected)  # A = B = R = 0 right after apply
    init_lora_sb(model, None, LoraSBConfig(rank=RANK, init="random", seed=3))
    assert all(layer.lora_A.weight.abs().sum() > 0 for layer in lora_layers(model).values())
    assert torch.equal(logits(model), expected)  # A, B orthonormal, R = 0
    init_lora_sb(model, make_batches(2), LoraSBConfig(rank=RANK, init="lora-sb"))
    assert not torch.equal(logits(model), expected)  # R ≠ 0: the output moves
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_R.weight.zero_()
    assert torch.equal(logits(model), expected)  # zeroed R: the base model again


# --- errors -----------------------------------------------------------------------------------


def test_no_module_matched(case: ModelCase) -> None:
    model = make_model(case)
    with pytest.raises(ModelError, match="no module matched target_modules"):
        apply_lora_sb(model, LoraSBConfig(rank=RANK, target_modules=["does_not_exist"]))
    with pytest.raises(ModelError, match="no module matched target_modules"):
        apply_lora_sb(model, LoraSBConfig(rank=RANK, target_modules=r"nothing\..*"))
    assert not lora_layers(model)


def test_rank_larger_than_layer(case: ModelCase) -> None:
    model = make_model(case)
    with pytest.raises(ModelError, match=r"rank 33 is larger than min\(d_in, d_out\) = 32"):
        apply_lora_sb(model, LoraSBConfig(rank=33))
    assert not lora_layers(model)  # the first targeted layer is 32 wide: nothing was replaced


def test_rank_equal_to_smallest_dimension_is_accepted() -> None:
    # Llama's k_proj is 32 → 16 (two key/value heads of 8): rank 16 fits everywhere, 17 does not.
    case = MODEL_CASES[2]
    apply_lora_sb(make_model(case), LoraSBConfig(rank=16))
    with pytest.raises(ModelError, match=r"rank 17 is larger than min\(d_in, d_out\) = 16"):
        apply_lora_sb(make_model(case), LoraSBConfig(rank=17))


def test_failed_apply_leaves_model_unchanged() -> None:
    # Llama with GQA: q_proj is 32→32 but k_proj is 32→16, so rank 17 fails on the 2nd layer.
    model = make_model(MODEL_CASES[2])
    with pytest.raises(ModelError, match="rank 17 is larger"):
        apply_lora_sb(model, LoraSBConfig(rank=17))
    assert list(lora_layers(model)) == []  # got ['model.layers.0.self_attn.q_proj']
    apply_lora_sb(model, LoraSBConfig(rank=16))  # a retry with a valid rank must work


@pytest.mark.parametrize("kind", ["layernorm", "embedding"])
def test_unsupported_layer_type(case: ModelCase, kind: str) -> None:
    model = make_model(case)
    wanted = nn.LayerNorm if kind == "layernorm" else nn.Embedding
    names = [n for n, m in model.named_modules() if isinstance(m, wanted)]
    if not names:  # Llama normalises with LlamaRMSNorm, not nn.LayerNorm
        names = [n for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")]
    regex = re.escape(names[0])
    type_name = type(model.get_submodule(names[0])).__name__
    with pytest.raises(ModelError, match=f"unsupported layer type {type_name}"):
        apply_lora_sb(model, LoraSBConfig(rank=2, target_modules=regex))


def test_applying_twice(case: ModelCase) -> None:
    model = adapted(case)
    with pytest.raises(ModelError, match="already has a LoRA-SB adapter"):
        apply_lora_sb(model, LoraSBConfig(rank=RANK))
    assert len(lora_layers(model)) == case.n_adapted
    assert all(not isinstance(layer.base, LoraSBLayer) for layer in lora_layers(model).values())


def test_missing_module_to_save(case: ModelCase) -> None:
    with pytest.raises(ModelError, match=r"modules_to_save \['no_head'\] matched no module"):
        apply_lora_sb(make_model(case), LoraSBConfig(rank=RANK, modules_to_save=["no_head"]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be a positive integer, got 0"),
        ({"rank": -3}, "rank must be a positive integer, got -3"),
        ({"rank": 2.0}, "rank must be a positive integer, got 2.0"),
        (
            {"rank": 4, "init": "pissa"},
            "init must be one of lora-sb, svd, random, lora-sb-federated, lora-sb-federated-exact, got 'pissa'",
        ),
        ({"rank": 4, "alpha": 0.0}, "alpha must be positive"),
        ({"rank": 4, "init_samples": 0}, "init_samples must be at least 1"),
    ],
)
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        LoraSBConfig(**kwargs)


def test_scaling_is_alpha_over_rank() -> None:
    assert LoraSBConfig(rank=4).scaling == 1.0
    assert LoraSBConfig(rank=4, alpha=8).scaling == 2.0
    assert LoraSBConfig(rank=8, alpha=2).scaling == 0.25
