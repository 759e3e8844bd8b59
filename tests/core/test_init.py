"""init_lora_sb: `lora-sb` against an independent gradient + SVD, `svd` and `random` properties."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedsb.adapter import (
    LoraSBConfig,
    apply_lora_sb,
    dense_weight,
    lora_layers,
    trainable_state,
)
from fedsb.errors import ConfigError, ModelError
from fedsb.init import init_lora_sb

from .conftest import MODEL_CASES, ModelCase, make_batches, make_model

RANK = 4
ALPHA = 8.0  # s = alpha / rank = 2, so R = diag(S)/2 is distinguishable from diag(S)
INIT_LR = 2e-3
INIT_SAMPLES = 10  # 3 batches of 4: the third one is cut to 2 examples
TOL = 1e-5
PROBE_STEPS, PROBE_LR = 5, 5e-2


def reference_gradients(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], names: list[str], n: int
) -> dict[str, torch.Tensor]:
    """Mean loss gradient over the first `n` examples, computed as one batch of `n` examples.

    Independent of the library: no adapters, eval mode, a single forward on the concatenated
    examples (the mean of the per-example losses), torch.autograd.grad on each weight, and the
    Conv1D weight (d_in × d_out) transposed to the (d_out × d_in) orientation of nn.Linear.
    """
    model.eval()
    joined = {k: torch.cat([b[k] for b in batches])[:n] for k in batches[0]}
    weights = [model.get_submodule(name).weight for name in names]
    for w in weights:
        w.requires_grad_(True)
    loss = model(**joined).loss  # mean over the n examples
    grads = torch.autograd.grad(loss, weights)
    out = {}
    for name, g in zip(names, grads, strict=True):
        conv = isinstance(model.get_submodule(name), Conv1D)
        out[name] = (g.T if conv else g).detach()
    return out


def best_rank_k(matrix: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


def lora_sb_model(
    case: ModelCase, probe_steps: int = 0, freeze_head: bool = False
) -> tuple[nn.Module, nn.Module, list]:
    """(adapted model before init, untouched float64 copy of the base, the init batches).

    The head probe is off unless asked for: most tests check the gradient under the initial head.
    """
    reference = make_model(case, dtype=torch.float64)
    model = make_model(case, dtype=torch.float64)
    config = LoraSBConfig(
        rank=RANK,
        alpha=ALPHA,
        modules_to_save=[case.head],
        init_lr=INIT_LR,
        init_samples=INIT_SAMPLES,
        init_probe_steps=probe_steps,
        init_probe_lr=PROBE_LR,
        freeze_head=freeze_head,
    )
    apply_lora_sb(model, config)
    batches = make_batches(3, batch_size=4, seed=7)
    return model, reference, batches


def test_lora_sb_init_matches_independent_computation(case: ModelCase) -> None:
    model, reference, batches = lora_sb_model(case)
    layers = lora_layers(model)
    w0 = {name: layer.base.weight.detach().clone() for name, layer in layers.items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()  # init must switch to eval (no dropout) and come back to train
    init_lora_sb(model, batches)
    assert model.training and all(m.training for m in model.modules())

    grads = reference_gradients(reference, batches, list(layers), INIT_SAMPLES)
    worst = 0.0
    for name, layer in layers.items():
        s = layer.scaling
        assert s == 2.0
        B, R, A = layer.lora_B.weight, layer.lora_R.weight, layer.lora_A.weight
        target = -INIT_LR * torch.sign(grads[name])
        assert target.shape == (B.shape[0], A.shape[1])
        for k in range(1, RANK + 1):
            got = s * B[:, :k] @ R[:k, :k] @ A[:k]
            err = (got - best_rank_k(target, k)).abs().max().item()
            worst = max(worst, err)
            assert err <= TOL, (name, k, err)
        eye = torch.eye(RANK, dtype=B.dtype)
        assert (B.T @ B - eye).abs().max() <= TOL  # orthonormal columns
        assert (A @ A.T - eye).abs().max() <= TOL  # orthonormal rows
        assert torch.equal(R, torch.diag(torch.diagonal(R)))  # R = diag(S_r)/s
        # W0 untouched, no stale gradient left on it
        assert torch.equal(layer.base.weight, w0[name])
        assert layer.base.weight.grad is None
    assert worst <= TOL
    # requires_grad restored exactly (only R and the head) and no gradients left anywhere
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_lora_sb_init_transposes_conv1d_gradient() -> None:
    """GPT-2's attn.c_proj is square: forgetting the Conv1D transpose would go unnoticed by shapes."""
    case = MODEL_CASES[1]
    model, reference, batches = lora_sb_model(case)
    init_lora_sb(model, batches)
    name = "transformer.h.0.attn.c_proj"
    layer = lora_layers(model)[name]
    assert isinstance(layer.base, Conv1D) and layer.base.weight.shape == (32, 32)
    stored = reference_gradients(reference, batches, [name], INIT_SAMPLES)[name].T  # d_in×d_out
    got = layer.delta_weight()
    right = best_rank_k(-INIT_LR * torch.sign(stored.T), RANK)
    wrong = best_rank_k(-INIT_LR * torch.sign(stored), RANK)
    assert (got - right).abs().max() <= TOL
    assert (got - wrong).abs().max() > 1e-4
    # The non-square c_attn (d_in 32, d_out 96): B is d_out × r, A is r × d_in
    c_attn = lora_layers(model)["transformer.h.0.attn.c_attn"]
    assert c_attn.lora_B.weight.shape == (96, RANK) and c_attn.lora_A.weight.shape == (RANK, 32)


def test_lora_sb_init_is_deterministic(case: ModelCase) -> None:
    first, _, batches = lora_sb_model(case)
    second, _, _ = lora_sb_model(case)
    init_lora_sb(first, batches)
    init_lora_sb(second, batches)
    for (n1, p1), (n2, p2) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1


def probed_reference_head(reference: nn.Module, head: str, batches: list) -> None:
    """Fit `head` of `reference` as the probe should: full-batch AdamW on the first examples."""
    joined = {k: torch.cat([b[k] for b in batches])[:INIT_SAMPLES] for k in batches[0]}
    params = list(reference.get_submodule(head).parameters())
    optimizer = torch.optim.AdamW(params, lr=PROBE_LR, weight_decay=0.0)
    reference.eval()
    for _ in range(PROBE_STEPS):
        optimizer.zero_grad()
        grads = torch.autograd.grad(reference(**joined).loss, params)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        optimizer.step()


def test_head_probe_steers_the_init_and_restores_the_head(case: ModelCase) -> None:
    """B, A come from W0's gradient under the probed head; the head itself is left as it was."""
    model, reference, batches = lora_sb_model(case, probe_steps=PROBE_STEPS)
    unprobed, _, _ = lora_sb_model(case, probe_steps=0)
    head = {n: p.detach().clone() for n, p in model.get_submodule(case.head).named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    init_lora_sb(model, batches)
    init_lora_sb(unprobed, batches)

    for n, p in model.get_submodule(case.head).named_parameters():
        assert torch.equal(p, head[n]), n
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())

    layers = lora_layers(model)
    probed_reference_head(reference, case.head, batches)
    grads = reference_gradients(reference, batches, list(layers), INIT_SAMPLES)
    moved = 0.0
    for name, layer in layers.items():
        want = best_rank_k(-INIT_LR * torch.sign(grads[name]), RANK)
        assert (layer.delta_weight() - want).abs().max() <= TOL, name
        moved = max(
            moved,
            (layer.delta_weight() - lora_layers(unprobed)[name].delta_weight()).abs().max().item(),
        )
    assert moved > 1e-4  # the probe did change the directions


def test_frozen_head_keeps_the_probed_head_and_only_r_trains(case: ModelCase) -> None:
    """freeze_head: the same B, A as the restoring probe, the fitted head kept, and frozen."""
    model, reference, batches = lora_sb_model(case, probe_steps=PROBE_STEPS, freeze_head=True)
    restored, _, _ = lora_sb_model(case, probe_steps=PROBE_STEPS)
    init_lora_sb(model, batches)
    init_lora_sb(restored, batches)

    probed_reference_head(reference, case.head, batches)
    fitted = dict(reference.get_submodule(case.head).named_parameters())
    for n, p in model.get_submodule(case.head).named_parameters():
        assert (p - fitted[n]).abs().max() <= TOL, n
        assert not p.requires_grad, n
    assert sorted(trainable_state(model)) == sorted(f"{n}.R" for n in lora_layers(model))
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.delta_weight(), lora_layers(restored)[name].delta_weight())


def test_head_probe_config_errors() -> None:
    with pytest.raises(ConfigError, match="init_probe_steps must be >= 0, got -1"):
        LoraSBConfig(rank=2, init_probe_steps=-1)
    needs = "freeze_head keeps the head the init's probe fitted: it needs modules_to_save"
    with pytest.raises(ConfigError, match=needs):
        LoraSBConfig(rank=2, freeze_head=True)  # no head to freeze
    with pytest.raises(ConfigError, match=needs):
        LoraSBConfig(rank=2, modules_to_save=["classifier"], init_probe_steps=0, freeze_head=True)
    with pytest.raises(ConfigError, match=needs):
        LoraSBConfig(rank=2, modules_to_save=["classifier"], init="svd", freeze_head=True)


def test_svd_init(case: ModelCase) -> None:
    model = make_model(case, dtype=torch.float64)
    apply_lora_sb(model, LoraSBConfig(rank=RANK, init="svd", seed=5, modules_to_save=[case.head]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    init_lora_sb(model, None)
    again = make_model(case, dtype=torch.float64)
    apply_lora_sb(again, LoraSBConfig(rank=RANK, init="svd", seed=5, modules_to_save=[case.head]))
    init_lora_sb(again, None)
    for name, layer in lora_layers(model).items():
        W0 = dense_weight(layer.base).detach()  # (d_out, d_in), Conv1D transposed
        assert torch.equal(layer.base.weight, before[name + ".base.weight"])
        B, A, R = layer.lora_B.weight, layer.lora_A.weight, layer.lora_R.weight
        S = torch.linalg.svdvals(W0)[:RANK]
        # B, A are the top-r singular vectors: Bᵀ W0 Aᵀ = diag(S_r)
        assert (B.T @ W0 @ A.T - torch.diag(S)).abs().max() <= TOL
        eye = torch.eye(RANK, dtype=B.dtype)
        assert (B.T @ B - eye).abs().max() <= TOL and (A @ A.T - eye).abs().max() <= TOL
        # R is small seeded noise (not zero, not the singular values)
        assert 0 < R.abs().max() < 1e-3
        assert torch.equal(R, lora_layers(again)[name].lora_R.weight)


def test_random_init(case: ModelCase) -> None:
    def init(seed: int) -> nn.Module:
        model = make_model(case)
        apply_lora_sb(model, LoraSBConfig(rank=RANK, init="random", seed=seed))
        return init_lora_sb(model, None)

    a, b, c = init(1), init(1), init(2)
    layers_a, layers_b, layers_c = lora_layers(a), lora_layers(b), lora_layers(c)
    eye = torch.eye(RANK)
    first_B = None
    for name, layer in layers_a.items():
        B, A, R = layer.lora_B.weight, layer.lora_A.weight, layer.lora_R.weight
        assert (B.T @ B - eye).abs().max() <= TOL
        assert (A @ A.T - eye).abs().max() <= TOL
        assert torch.equal(R, torch.zeros(RANK, RANK))
        assert torch.equal(B, layers_b[name].lora_B.weight)  # seeded: reproducible
        assert torch.equal(A, layers_b[name].lora_A.weight)
        assert not torch.equal(B, layers_c[name].lora_B.weight)  # another seed, other factors
        if first_B is None:
            first_B = B
        elif B.shape == first_B.shape:
            assert not torch.equal(B, first_B)  # each layer draws its own factors


def test_init_errors() -> None:
    case = MODEL_CASES[0]
    with pytest.raises(ModelError, match="no LoRA-SB layers"):
        init_lora_sb(make_model(case), None, LoraSBConfig(rank=2, init="random"))
    with pytest.raises(ConfigError, match="needs a LoraSBConfig"):
        init_lora_sb(make_model(case), None)
    model = apply_lora_sb(make_model(case), LoraSBConfig(rank=2))
    with pytest.raises(ConfigError, match="needs example batches"):
        init_lora_sb(model, None)
    with pytest.raises(ConfigError, match="batches are empty"):
        init_lora_sb(model, [])
    # A failed init leaves the flags as they were (the context manager restores them)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.lora_R.weight" for n in lora_layers(model)
    }


def test_lora_sb_init_under_no_grad() -> None:
    case = MODEL_CASES[0]
    model = apply_lora_sb(make_model(case), LoraSBConfig(rank=2))
    with torch.no_grad():
        init_lora_sb(model, make_batches(1))
    assert all(layer.lora_R.weight.abs().sum() > 0 for layer in lora_layers(model).values())
