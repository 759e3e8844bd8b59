"""Exactness of each method's server aggregation, in float64 (DESIGN §1.3 and the baselines)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedsb.adapter import (
    LoraSBConfig,
    apply_lora_sb,
    dense_weight,
    lora_layers,
    trainable_state,
)
from fedsb.init import init_lora_sb
from fedsb.methods import METHODS, FedExLoRA, FedIT, FedSB, FFALoRA, FLoRA, get_method

from .conftest import MODEL_CASES, make_model

F64 = torch.float64
N_CLIENTS = 5
RANK = 4
SCALE = 2.0  # s = alpha / rank
# (d_out, d_in) of three synthetic layers: square, wide and tall
LAYERS = {"enc.0.query": (16, 16), "enc.0.up": (48, 16), "enc.0.down": (16, 48)}
TOL = 1e-10


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_weights(seed: int) -> list[float]:
    return (torch.rand(N_CLIENTS, generator=generator(seed), dtype=F64) * 9 + 1).tolist()


def wmean(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return sum(w * t for t, w in zip(tensors, weights, strict=True)) / sum(weights)


def test_fedsb_average_of_r_is_exact() -> None:
    gen = generator(0)
    weights = random_weights(1)
    broadcast, uploads, truth, factors = {}, [{} for _ in range(N_CLIENTS)], {}, {}
    for layer, (d_out, d_in) in LAYERS.items():
        B = torch.randn(d_out, RANK, generator=gen, dtype=F64)
        A = torch.randn(RANK, d_in, generator=gen, dtype=F64)
        R_global = torch.randn(RANK, RANK, generator=gen, dtype=F64)
        R_clients = [torch.randn(RANK, RANK, generator=gen, dtype=F64) for _ in range(N_CLIENTS)]
        broadcast[layer + ".R"] = R_global
        for upload, R_k in zip(uploads, R_clients, strict=True):
            upload[layer + ".R"] = R_k - R_global  # clients send ΔR
        truth[layer] = wmean([SCALE * B @ R_k @ A for R_k in R_clients], weights)
        factors[layer] = (B, A)
    new = FedSB().server_aggregate(broadcast, uploads, weights, [RANK] * N_CLIENTS, "replication")
    worst = 0.0
    for layer, (B, A) in factors.items():
        err = (SCALE * B @ new[layer + ".R"] @ A - truth[layer]).abs().max().item()
        worst = max(worst, err)
    assert worst <= TOL


def fedit_round(seed: int, *, train_a: bool = True) -> tuple:
    """Start factors, 5 clients' trained factors (B_k, A_k), their delta uploads, weights."""
    gen = generator(seed)
    start, clients = {}, [{} for _ in range(N_CLIENTS)]
    for layer, (d_out, d_in) in LAYERS.items():
        start[layer + ".A"] = torch.randn(RANK, d_in, generator=gen, dtype=F64) / 4
        start[layer + ".B"] = torch.randn(d_out, RANK, generator=gen, dtype=F64) / 4
        for client in clients:
            client[layer + ".B"] = start[layer + ".B"] + torch.randn(
                d_out, RANK, generator=gen, dtype=F64
            )
            client[layer + ".A"] = start[layer + ".A"] + (
                torch.randn(RANK, d_in, generator=gen, dtype=F64) if train_a else 0
            )
    uploads = [{k: c[k] - start[k] for k in c} for c in clients]  # upload = value − start
    return start, clients, uploads, random_weights(seed + 1)


def true_mean_product(clients: list[dict], weights: list[float], layer: str) -> torch.Tensor:
    return wmean([SCALE * c[layer + ".B"] @ c[layer + ".A"] for c in clients], weights)


def test_fedit_is_inexact() -> None:
    start, clients, uploads, weights = fedit_round(2)
    new = FedIT().server_aggregate(start, uploads, weights, [RANK] * N_CLIENTS, "replication")
    gaps = []
    for layer in LAYERS:
        # FedAvg of each factor is right …
        mean_B = wmean([c[layer + ".B"] for c in clients], weights)
        mean_A = wmean([c[layer + ".A"] for c in clients], weights)
        assert (new[layer + ".B"] - mean_B).abs().max() <= TOL
        assert (new[layer + ".A"] - mean_A).abs().max() <= TOL
        # … but the product of the means is not the mean of the products
        product = SCALE * new[layer + ".B"] @ new[layer + ".A"]
        gaps.append((product - true_mean_product(clients, weights, layer)).abs().max().item())
    assert min(gaps) > 1e-3
    assert FedIT.exact is False


def test_ffa_is_exact_with_frozen_a() -> None:
    start, clients, uploads, weights = fedit_round(3, train_a=False)
    uploads = [{k: v for k, v in u.items() if k.endswith(".B")} for u in uploads]  # B only
    new = FFALoRA().server_aggregate(start, uploads, weights, [RANK] * N_CLIENTS, "replication")
    for layer in LAYERS:
        assert torch.equal(new[layer + ".A"], start[layer + ".A"])
        product = SCALE * new[layer + ".B"] @ new[layer + ".A"]
        assert (product - true_mean_product(clients, weights, layer)).abs().max() <= TOL


def test_fedex_residual_makes_it_exact() -> None:
    start, clients, uploads, weights = fedit_round(4)
    gen = generator(40)
    W0 = {layer: torch.randn(*shape, generator=gen, dtype=F64) for layer, shape in LAYERS.items()}
    new = FedExLoRA().server_aggregate(start, uploads, weights, [RANK] * N_CLIENTS, "replication")
    assert set(new) == set(start) | {layer + ".residual" for layer in LAYERS}
    worst, naive = 0.0, 0.0
    for layer, (d_out, d_in) in LAYERS.items():
        residual = new[layer + ".residual"]
        assert residual.shape == (d_out, d_in)
        folded = W0[layer] + SCALE * residual  # what client_receive adds to W0
        effective = folded + SCALE * new[layer + ".B"] @ new[layer + ".A"]
        truth = W0[layer] + true_mean_product(clients, weights, layer)
        worst = max(worst, (effective - truth).abs().max().item())
        naive = max(naive, (SCALE * residual).abs().max().item())
    assert worst <= TOL
    assert naive > 1e-3  # the residual is what FedIT misses


def test_flora_stack_is_exact() -> None:
    start, clients, _, weights = fedit_round(5)
    uploads = [dict(c) for c in clients]  # FLoRA uploads absolute A, B
    new = FLoRA().server_aggregate(start, uploads, weights, [RANK] * N_CLIENTS, "replication")
    worst = 0.0
    for layer, (d_out, d_in) in LAYERS.items():
        stack_B, stack_A = new[layer + ".stack_B"], new[layer + ".stack_A"]
        assert stack_B.shape == (d_out, N_CLIENTS * RANK)
        assert stack_A.shape == (N_CLIENTS * RANK, d_in)
        err = (SCALE * stack_B @ stack_A - true_mean_product(clients, weights, layer)).abs().max()
        worst = max(worst, err.item())
    assert worst <= TOL
    assert not any(k.endswith((".A", ".B")) for k in new)  # clients restart their factors


# --- the same through a real model: client_receive folds into W0 (GPT-2 Conv1D, transposed) -----


def simulated_round(method_name: str, seed: int) -> tuple:
    """A float64 tiny GPT-2 (Conv1D layers), 5 clients that perturb their trainable tensors."""
    case = MODEL_CASES[1]
    method = get_method(method_name)
    server = make_model(case, dtype=F64)
    apply_lora_sb(
        server,
        LoraSBConfig(rank=RANK, alpha=RANK * SCALE, init="random", modules_to_save=["score"]),
    )
    if method_name == "fedsb":
        init_lora_sb(server, None)  # orthonormal A, B; R = 0
    method.initialise(server, seed=seed)
    method.mark_trainable(server, ["score"])
    broadcast = method.initial_broadcast(server)
    gen = generator(seed)
    clients, uploads = [], []
    for _ in range(N_CLIENTS):
        client = copy.deepcopy(server)
        method.client_receive(client, broadcast, 0)
        start = trainable_state(client)  # as the edge client does after receiving
        with torch.no_grad():  # "local training": a random move of every trainable tensor
            for p in client.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.1)
        clients.append(client)
        uploads.append(method.client_upload(client, start, RANK))
    weights = random_weights(seed + 1)
    new = method.server_aggregate(broadcast, uploads, weights, [RANK] * N_CLIENTS, "replication")
    receiver = copy.deepcopy(server)
    method.client_receive(receiver, new, 1)
    return server, clients, receiver, weights


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """W0 + s·B·R·A of a LoRA-SB layer, (d_out, d_in)."""
    return dense_weight(layer.base) + layer.delta_weight()


@pytest.mark.parametrize("method_name", ["fedsb", "fedex", "flora", "ffa"])
def test_round_through_model_is_exact(method_name: str) -> None:
    server, clients, receiver, weights = simulated_round(method_name, seed=6)
    worst = 0.0
    for name, layer in lora_layers(receiver).items():
        truth = wmean([effective_weight(lora_layers(c)[name]) for c in clients], weights)
        worst = max(worst, (effective_weight(layer) - truth).abs().max().item())
    assert worst <= TOL
    head = wmean([c.score.weight for c in clients], weights)
    assert (receiver.score.weight - head).abs().max() <= TOL
    assert METHODS[method_name].exact is True


def test_fedit_round_through_model_is_inexact() -> None:
    _, clients, receiver, weights = simulated_round("fedit", seed=6)
    gap = 0.0
    for name, layer in lora_layers(receiver).items():
        truth = wmean([effective_weight(lora_layers(c)[name]) for c in clients], weights)
        gap = max(gap, (effective_weight(layer) - truth).abs().max().item())
    assert gap > 1e-3


def test_fedsb_upload_is_the_leading_block() -> None:
    case = MODEL_CASES[0]
    model = make_model(case)
    apply_lora_sb(model, LoraSBConfig(rank=RANK, init="random", modules_to_save=["classifier"]))
    method = FedSB()
    start = method.initial_broadcast(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    upload = method.client_upload(model, start, 2)
    r_keys = [k for k in upload if k.endswith(".R")]
    assert len(r_keys) == case.n_adapted
    assert all(torch.equal(upload[k], torch.ones(2, 2)) for k in r_keys)
    assert upload["classifier.weight"].shape == (3, 32)  # the head goes whole, (w + 1) − w ≈ 1
    torch.testing.assert_close(upload["classifier.weight"], torch.ones(3, 32))
