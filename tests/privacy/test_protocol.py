"""The optional ε and budget-spent fields of an update: backward compatible, validated."""

from __future__ import annotations

import math

import pytest
import torch

from fedsb.errors import UpdateRejected
from fedsb.protocol import UpdateMeta, UpdateRules, encode_client_update, validate_update
from fedsb.wire import encode_update

RULES = UpdateRules(job="j", round=2, shapes={"l.R": (4, 4)}, max_rank=4)
STATE = {"l.R": torch.ones(4, 4)}


def test_without_privacy_the_metadata_is_unchanged():
    assert UpdateMeta("j", 2, "c", 4, 10, 0.5).to_wire() == {
        "kind": "update",
        "job": "j",
        "round": "2",
        "client": "c",
        "rank": "4",
        "examples": "10",
        "loss": "0.5",
    }


def test_epsilon_travels_with_the_update():
    payload = encode_client_update(STATE, UpdateMeta("j", 2, "c", 4, 10, 0.5, epsilon=1.25))
    _, meta = validate_update(payload, "c", RULES)
    assert (meta.epsilon, meta.budget_spent) == (1.25, False)


def test_budget_spent_notice_carries_no_tensors():
    notice = encode_client_update({}, UpdateMeta("j", 2, "c", 4, 0, 0.0, 3.0, True))
    state, meta = validate_update(notice, "c", RULES)
    assert state == {} and meta.budget_spent and meta.epsilon == 3.0
    assert math.isnan(meta.loss)
    with pytest.raises(UpdateRejected, match="a budget-spent notice carries no tensors"):
        validate_update(
            encode_client_update(STATE, UpdateMeta("j", 2, "c", 4, 1, 0.0, 3.0, True)), "c", RULES
        )


@pytest.mark.parametrize("value", ["-1", "nan", "lots"])
def test_bad_epsilon_is_rejected(value):
    meta = UpdateMeta("j", 2, "c", 4, 10, 0.5).to_wire() | {"epsilon": value}
    with pytest.raises(UpdateRejected, match="'epsilon'"):
        validate_update(encode_update(STATE, meta), "c", RULES)
