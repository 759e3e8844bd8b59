"""Norm bounds and robust aggregation (fedsb.robust) and their use by the server."""

from __future__ import annotations

import pytest
import torch

from fedsb.aggregator.synthetic import synthetic_server
from fedsb.errors import ConfigError, UpdateRejected
from fedsb.robust import bound_update, robust_aggregate, update_norm
from fedsb.synthetic import client_id, synthetic_job, update_payload


def test_bound_update_clips_to_the_bound_and_keeps_direction():
    update = {"a.R": torch.full((2, 2), 3.0), "b.R": torch.full((2, 2), 4.0)}  # norm 10
    clipped = bound_update(update, 1.0, "clip")
    assert update_norm(clipped) <= 1.0
    assert update_norm(clipped) == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(clipped["b.R"] / clipped["a.R"], torch.full((2, 2), 4 / 3))
    assert bound_update(update, 10.5, "clip") == update  # within the bound: untouched


def test_bound_update_rejects_with_a_reason():
    with pytest.raises(UpdateRejected, match="norm-bound: update norm 10 > bound 1"):
        bound_update({"a.R": torch.full((1,), 10.0)}, 1.0, "reject")


def test_median_and_trimmed_mean_ignore_an_outlier_and_the_order():
    glob = {"x.R": torch.zeros(2, 2)}
    updates = [{"x.R": torch.full((2, 2), v)} for v in (1.0, 2.0, 3.0, 4.0, 1e9)]
    median = robust_aggregate(glob, updates, "median")
    assert torch.equal(median["x.R"], torch.full((2, 2), 3.0))
    trimmed = robust_aggregate(glob, updates[::-1], "trimmed-mean", trim_fraction=0.2)
    assert torch.equal(trimmed["x.R"], torch.full((2, 2), 3.0))  # mean of 2, 3, 4
    even = robust_aggregate(glob, updates[:4], "median")
    assert torch.equal(even["x.R"], torch.full((2, 2), 2.5))


def test_robust_aggregation_needs_full_size_blocks():
    with pytest.raises(ConfigError, match="full-size deltas"):
        robust_aggregate({"x.R": torch.zeros(4, 4)}, [{"x.R": torch.zeros(2, 2)}], "median")


def test_server_clips_byzantine_update_and_counts_rejections():
    job = synthetic_job("byz", 3, 1, norm_bound=0.1, norm_bound_action="reject")
    server = synthetic_server(job)
    assert server.submit(client_id(0), update_payload(job, 0, 0)) is None
    assert server.submit(client_id(1), update_payload(job, 0, 1, scale=10.0)) == "norm-bound"
    assert dict(server.rejections) == {"norm-bound": 1}


def test_config_refuses_robust_aggregation_with_lower_client_ranks():
    with pytest.raises(ConfigError, match="client_ranks below adapter.rank"):
        synthetic_job("x", 2, 1, aggregation="median", client_ranks=[8, 4])
