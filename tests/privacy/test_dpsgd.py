"""DP-SGD on a client: Opacus's per-sample gradients, clipping, BatchNorm refusal, eval-mode norms."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from fedsb.adapter import (
    LoraSBConfig,
    adapter_state,
    apply_lora_sb,
    lora_layers,
    mark_trainable,
)
from fedsb.edge_client.client import FederatedClient, round_seed
from fedsb.errors import ModelError
from fedsb.init import init_lora_sb
from fedsb.privacy import DPSGDSettings, check_private_trainable, train_private
from fedsb.privacy.dpsgd import poisson_batches, wrap_for_per_sample
from fedsb.protocol import encode_broadcast
from fedsb.simulation import initial_server_model, prepare_fleet
from fedsb.training import Batch
from fedsb.wire import decode_update


def no_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = 0.0
    return model


def per_sample_grads(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """torch.func: the gradient of each example's own loss, for every trainable parameter."""
    trainable = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v for k, v in model.named_parameters() if not v.requires_grad}
    frozen |= dict(model.named_buffers())

    def loss_of_one(params, ids, mask, label):
        inputs = {"input_ids": ids[None], "attention_mask": mask[None], "labels": label[None]}
        return functional_call(model, (params, frozen), args=(), kwargs=inputs).loss

    # vmap cannot trace HF's data-dependent padding-mask code: torch.func.grad per example
    rows = [
        grad(loss_of_one)(trainable, ids, mask, label)
        for ids, mask, label in zip(
            batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True
        )
    ]
    return {name: torch.stack([r[name] for r in rows]) for name in trainable}  # (B, *shape)


@pytest.fixture(scope="module")
def fleet_and_job(tiny_model_dir):
    from conftest import tiny_job

    from fedsb.config import parse_config

    job = parse_config(tiny_job(tiny_model_dir, clients=2))
    return prepare_fleet(job), job


def adapted_model(fleet, job) -> nn.Module:
    """The tiny model with LoRA-SB (SVD init, random R), only R and the head trainable."""
    model = no_dropout(apply_lora_sb(copy.deepcopy(fleet.base_model), job.lora_config()))
    config = LoraSBConfig(rank=4, modules_to_save=("classifier",), init="svd")
    init_lora_sb(model, None, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_R.weight.copy_(torch.randn(4, 4, generator=generator))
    mark_trainable(model, ["classifier"])
    return model


def test_opacus_per_sample_gradients_of_r_equal_torch_func(fleet_and_job):
    from opacus import GradSampleModule

    fleet, job = fleet_and_job
    model = adapted_model(fleet, job)
    batch = fleet.train.batch(torch.arange(6))
    expected = per_sample_grads(model, batch)
    wrapped = GradSampleModule(model, loss_reduction="mean")
    model.train()
    wrapped(**batch).loss.backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(n.endswith("lora_R.weight") for n in names) == 12  # 2 layers × 6 targets
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad_sample.shape == (6, *param.shape)
            torch.testing.assert_close(param.grad_sample, expected[name], rtol=1e-4, atol=1e-6)
    wrapped._close()


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_noise_free_step_with_tiny_clip_is_the_clipped_mean(tiny_model_dir, mode):
    """σ = 0, C = 1e-4, SGD: each client's ΔR = −η·Σ_i C·g_i/‖g_i‖ / E[B] on its Poisson batch."""
    from conftest import tiny_job

    from fedsb.config import parse_config

    privacy = {"mode": "dp-sgd", "noise_multiplier": 0.0, "max_grad_norm": 1e-4}
    privacy["grad_sample_mode"] = mode
    raw = tiny_job(tiny_model_dir, clients=2, local_steps=1, batch_size=8) | {"privacy": privacy}
    raw["federation"] |= {"optimizer": "sgd", "lr": 0.5, "head_lr": 2.0, "dropout": False}
    job = parse_config(raw)
    fleet = prepare_fleet(job)
    server_model, method = initial_server_model(job, fleet)
    adapter = encode_broadcast(
        adapter_state(server_model, ["classifier"]), job=job.name, round_no=0, kind="adapter"
    )
    start = method.initial_broadcast(server_model)
    payload = encode_broadcast(start, job=job.name, round_no=0, kind="global")
    for i, shard in enumerate(fleet.shards):
        client = FederatedClient(
            f"c{i}", copy.deepcopy(fleet.base_model), fleet.train.select(shard), job, rank=4
        )
        client.receive_adapter(adapter)
        client.receive_global(payload)
        delta, meta = decode_update(client.train_round())
        assert meta["epsilon"] == "inf"  # σ = 0 gives no privacy, and says so
        q = min(1.0, 8 / len(client.data))
        gen = torch.Generator().manual_seed(round_seed(job.seed, client.client_id, 0))
        (batch,) = poisson_batches(client.data, q, 1, gen)
        model = copy.deepcopy(client.model)
        model.eval()
        grads = per_sample_grads(model, batch)
        norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in grads.values()))  # (B,)
        factor = (1e-4 / (norms + 1e-6)).clamp(max=1.0)  # Opacus's clip factor
        expected_batch = max(1, round(q * len(client.data)))
        assert len(batch["labels"]) > 0 and (norms > 1e-3).all()
        for name, g in grads.items():
            key = name.replace(".lora_R.weight", ".R")
            lr = 2.0 if name.startswith("classifier") else 0.5
            want = -lr * torch.einsum("b,b...->...", factor, g) / expected_batch
            torch.testing.assert_close(delta[key], want, rtol=1e-4, atol=1e-8)  # float32 R − R0


def test_batchnorm_in_a_trainable_path_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(ModelError, match=r"cannot train BatchNorm layer '1': its batch statistics"):
        check_private_trainable(model)
    model[1].requires_grad_(False)
    check_private_trainable(model)  # frozen: fine, it runs in eval mode


def test_frozen_batchnorm_stays_in_eval_mode(fleet_and_job):
    """A frozen BatchNorm before the trained head keeps its running statistics."""
    fleet, job = fleet_and_job
    model = adapted_model(fleet, job)
    hidden = model.classifier.in_features
    model.classifier = nn.Sequential(nn.BatchNorm1d(hidden), model.classifier)
    mark_trainable(model, ["classifier.1"])
    before = model.classifier[0].running_mean.clone()
    settings = DPSGDSettings(1.0, 1.0, 0.2, 8)
    train_private(model, fleet.train, settings, steps=2, lr=0.1, head_lr=0.1, seed=0)
    assert torch.equal(model.classifier[0].running_mean, before)
    with pytest.raises(ModelError, match="cannot train BatchNorm layer 'classifier.0'"):
        mark_trainable(model, ["classifier"])
        train_private(model, fleet.train, settings, steps=1, lr=0.1, head_lr=0.1, seed=0)


def test_only_trainable_tensors_change_and_hooks_are_removed(fleet_and_job):
    fleet, job = fleet_and_job
    model = adapted_model(fleet, job)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = DPSGDSettings(1.0, 1.0, 0.3, 8)
    train_private(model, fleet.train, settings, steps=2, lr=0.1, head_lr=0.1, seed=0)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(
        k.endswith("lora_R.weight") or k.startswith("classifier") for k in changed
    )
    assert not any(
        hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters()
    )
    assert all(not m._forward_hooks for m in model.modules())


def test_a_trainable_layer_opacus_cannot_handle_is_a_one_line_error():
    class Scale(nn.Module):  # a direct trainable parameter next to a buffer
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))
            self.register_buffer("count", torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

    settings = DPSGDSettings(1.0, 1.0, 0.5, 2)
    with pytest.raises(ModelError, match="^privacy.mode = 'dp-sgd': Opacus refuses") as err:
        wrap_for_per_sample(nn.Sequential(nn.Linear(3, 3), Scale()), settings)
    assert "\n" not in str(err.value)
