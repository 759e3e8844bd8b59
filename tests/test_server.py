"""The aggregator's validation: each bad update is rejected with its reason, the round goes on."""

from __future__ import annotations

import pytest
import torch

from fedsb.aggregator.server import FederatedServer
from fedsb.edge_client.client import FederatedClient
from fedsb.errors import FedsbError
from fedsb.protocol import UpdateMeta, encode_client_update
from fedsb.simulation import initial_server_model, prepare_fleet


@pytest.fixture(scope="module")
def world(tiny_model_dir):
    from conftest import tiny_job

    from fedsb.config import parse_config

    job = parse_config(tiny_job(tiny_model_dir, clients=2))
    fleet = prepare_fleet(job)
    model, method = initial_server_model(job, fleet)
    return job, fleet, model, method


def fresh(world):
    job, fleet, model, method = world
    import copy

    server = FederatedServer.from_model(job, copy.deepcopy(model), method)
    client = FederatedClient(
        "client-0000", copy.deepcopy(fleet.base_model), fleet.train, job, rank=4
    )
    client.receive_adapter(server.adapter_payload())
    client.receive_global(server.global_payload())
    return server, client


def update(server, rank=4, **meta):
    fields = {"job": "tiny", "round": 0, "client": "c1", "rank": rank, "examples": 10, "loss": 1.0}
    fields |= meta
    key = next(k for k in server.rules.shapes if k.endswith(".R"))
    tensors = {key: torch.zeros(fields["rank"], fields["rank"])}
    return encode_client_update(tensors, UpdateMeta(**fields))


def test_honest_update_is_accepted_and_round_advances(world):
    server, client = fresh(world)
    assert server.submit("client-0000", client.train_round()) is None
    result = server.close_round()
    assert (result.round, result.clients, server.round) == (0, ["client-0000"], 1)


@pytest.mark.parametrize(
    ("topic", "payload_args", "reason"),
    [
        ("c1", {"job": "other"}, "wrong-job"),
        ("c1", {"round": 3}, "future-round"),
        ("c2", {}, "client-mismatch"),
        ("c1", {"rank": 9}, "bad-rank"),
        ("c1", {"examples": 0}, "bad-metadata"),
    ],
)
def test_bad_updates_are_rejected_with_a_reason(world, topic, payload_args, reason):
    server, _ = fresh(world)
    assert server.submit(topic, update(server, **payload_args)) == reason
    assert server.rejections[reason] == 1 and not server.pending


def test_stale_duplicate_malformed_unknown_and_nan(world):
    server, client = fresh(world)
    honest = client.train_round()
    assert server.submit("client-0000", honest) is None
    assert server.submit("client-0000", honest) == "duplicate"
    assert server.submit("c1", b"\x00garbage") == "malformed"
    nan = encode_client_update(
        {next(iter(server.rules.shapes)): torch.full((4, 4), float("nan"))},
        UpdateMeta("tiny", 0, "c1", 4, 10, 1.0),
    )
    assert server.submit("c1", nan) == "malformed"
    unknown = encode_client_update(
        {"nope.R": torch.zeros(4, 4)}, UpdateMeta("tiny", 0, "c1", 4, 1, 1.0)
    )
    assert server.submit("c1", unknown) == "unknown-tensor"
    wrong_shape = encode_client_update(
        {"classifier.bias": torch.zeros(5)}, UpdateMeta("tiny", 0, "c1", 4, 1, 1.0)
    )
    assert server.submit("c1", wrong_shape) == "bad-shape"
    server.close_round()
    assert server.submit("client-0000", honest) == "stale-round"
    assert sum(server.rejections.values()) == 6


def test_closing_an_empty_round_is_an_error(world):
    server, _ = fresh(world)
    with pytest.raises(FedsbError, match="no accepted update"):
        server.close_round()


def test_the_update_size_limit_is_the_jobs(world):
    """federation.max_update_bytes sets the size check (a 70 kB message, too big or not)."""
    job, fleet, model, method = world
    import copy

    big = update(FederatedServer.from_model(job, copy.deepcopy(model), method)) + bytes(70_000)
    for max_bytes, reason in ((2**16, "oversize"), (2**17, "malformed")):
        federation = job.federation.model_copy(update={"max_update_bytes": max_bytes})
        server = FederatedServer.from_model(
            job.model_copy(update={"federation": federation}), copy.deepcopy(model), method
        )
        assert server.submit("c1", big) == reason
