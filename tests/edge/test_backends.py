"""The client's backend choice: torch is the old path bit for bit; edge backends check the job."""

from __future__ import annotations

import copy

import pytest
import torch

from fedsb.adapter import trainable_state
from fedsb.aggregator.server import FederatedServer
from fedsb.edge_client.client import FederatedClient, round_seed
from fedsb.errors import ConfigError
from fedsb.simulation import initial_server_model, prepare_fleet
from fedsb.training import train_local
from fedsb.wire import decode_update


def test_torch_backend_update_is_bit_identical_to_train_local(tiny_config):
    job = tiny_config()  # adamw with dropout: the default torch path
    fleet = prepare_fleet(job)
    model, method = initial_server_model(job, fleet)
    server = FederatedServer.from_model(job, model, method)
    client = FederatedClient("c", fleet.base_model, fleet.train, job, rank=4)
    client.receive_adapter(server.adapter_payload())
    client.receive_global(server.global_payload())
    reference = copy.deepcopy(client.model)
    start = trainable_state(reference)
    fed = job.federation
    train_local(
        reference, fleet.train, steps=fed.local_steps, batch_size=fed.batch_size, lr=fed.lr,
        head_lr=fed.head_lr, seed=round_seed(job.seed, "c", 0), optimizer=fed.optimizer,
        dropout=fed.dropout,
    )  # fmt: skip
    update, _ = decode_update(client.train_round())
    expected = {k: v - start[k] for k, v in trainable_state(reference).items()}
    assert update.keys() == expected.keys()
    assert all(torch.equal(update[k], expected[k]) for k in update)
    assert type(client.backend).__name__ == "TorchBackend"


def test_edge_backends_refuse_low_rank_clients_and_other_methods(tiny_config, tiny_model_dir):
    from transformers import BertForSequenceClassification

    base = BertForSequenceClassification.from_pretrained(tiny_model_dir)
    data = None
    job = tiny_config(optimizer="sgd", dropout=False)
    with pytest.raises(ConfigError, match="rank 2 clients need backend 'torch'"):
        FederatedClient("c", base, data, job, rank=2, backend="onnxruntime")  # type: ignore[arg-type]
    job = tiny_config(optimizer="sgd", dropout=False, method="fedit")
    with pytest.raises(ConfigError, match="federation.method must be 'fedsb'"):
        FederatedClient("c", base, data, job, rank=4, backend="onnxruntime")  # type: ignore[arg-type]
