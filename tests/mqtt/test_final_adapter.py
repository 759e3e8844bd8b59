"""`fedsb aggregator`'s final adapter equals `fedsb simulate`'s, W0 folds (FedEx, FLoRA) included."""

from __future__ import annotations

import argparse
import threading

import pytest
import torch
from conftest import tiny_job
from safetensors.torch import load_file

from fedsb.aggregator.folded import BASE_DELTA, FOLDED_FILE
from fedsb.cli import aggregator_command, run_simulation
from fedsb.config import parse_config
from fedsb.edge_client.service import ClientService

from .helpers import write_job
from .test_services import JOB_S, fleet_clients, start_threads

WEIGHTS = "adapter/adapter.safetensors"


@pytest.mark.parametrize("method", ["fedex", "flora"])
def test_aggregator_adapter_carries_the_folded_weight(
    tiny_model_dir, tmp_path, mosquitto_broker, method
):
    raw = tiny_job(tiny_model_dir, clients=2, rounds=2, method=method)
    job = parse_config(raw)
    run_simulation(job, tmp_path / "simulate", transport="inproc", quiet=True)
    expected = load_file(str(tmp_path / "simulate" / WEIGHTS))

    state_dir = tmp_path / "aggregator"
    args = argparse.Namespace(
        config=str(write_job(tmp_path / "job.toml", raw)),
        broker=mosquitto_broker.url,
        state_dir=str(state_dir),
        ca_file=None,
        mqtt5=False,
        workers=1,
    )
    errors: list[BaseException] = []
    lock = threading.Lock()  # one client trains at a time, as in process (shared torch RNG)
    services = [
        ClientService(c, _address(mosquitto_broker), compute_lock=lock)
        for c in fleet_clients(job, 2)
    ]
    threads = start_threads(services, errors)
    assert aggregator_command(args) == 0
    for t in threads:
        t.join(JOB_S)
    assert errors == []

    got = load_file(str(state_dir / WEIGHTS))
    folds = sorted(k for k in got if k.endswith(BASE_DELTA))
    layers = sorted(k.removesuffix(".A") + BASE_DELTA for k in got if k.endswith(".A"))
    assert folds == layers and len(folds) == 12  # every adapted layer: 2 layers × 6 modules
    assert all(bool(got[k].any()) for k in folds)
    assert sorted(got) == sorted(expected)
    assert [k for k in got if not torch.equal(got[k], expected[k])] == []
    assert (state_dir / FOLDED_FILE).exists()  # checkpointed for a resumed aggregator


def _address(broker):  # type: ignore[no-untyped-def]
    from fedsb.mqtt import parse_broker_url

    return parse_broker_url(broker.url)
