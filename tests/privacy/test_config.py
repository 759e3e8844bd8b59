"""The [privacy] block: valid combinations load, mistakes give one line naming the problem."""

from __future__ import annotations

import pytest

from fedsb.config import parse_config
from fedsb.errors import ConfigError


def job(privacy: dict, **federation: object) -> dict:
    return {"federation": {"clients": 4} | federation, "privacy": privacy}


def test_default_is_no_privacy():
    assert parse_config({}).privacy.mode == "none"


def test_dp_sgd_with_a_target_epsilon_loads():
    p = parse_config(job({"mode": "dp-sgd", "epsilon": 3, "accountant": "rdp"})).privacy
    assert (p.epsilon, p.delta, p.accountant, p.max_grad_norm) == (3.0, 1e-5, "rdp", 1.0)


@pytest.mark.parametrize(
    ("privacy", "federation", "message"),
    [
        ({"mode": "dp-sgd"}, {}, r"^privacy: privacy.mode = 'dp-sgd' needs exactly one of epsilon"),
        (
            {"mode": "user-dp", "epsilon": 1, "noise_multiplier": 1},
            {"weighting": "uniform"},
            "needs exactly one of epsilon or noise_multiplier",
        ),
        ({"epsilon": 1}, {}, "privacy.epsilon is set but privacy.mode is 'none'"),
        ({"mode": "dp-sgd", "epsilon": -1}, {}, r"privacy.epsilon: .*greater than 0"),
        ({"mode": "dp-sgd", "epsilon": 1, "accountant": "gdp"}, {}, r"privacy.accountant: "),
        ({"mode": "dp-sgd", "epsilon": 1, "delta": 1.5}, {}, r"privacy.delta: "),
        ({"mode": "dp", "epsilon": 1}, {}, r"privacy.mode: "),
        ({"mode": "dp-sgd", "epsilon": 1, "eps": 2}, {}, r"privacy.eps: unknown key"),
        (
            {"mode": "user-dp", "epsilon": 1},
            {},
            "user-dp' needs federation.weighting = 'uniform'",
        ),
        (
            {"mode": "user-dp", "epsilon": 1},
            {"weighting": "uniform", "method": "fedex"},
            "needs a linear aggregate; method 'fedex'",
        ),
        (
            {"mode": "dp-sgd", "epsilon": 1},
            {"client_ranks": [2, 4, 4, 4]},
            "dp-sgd' needs every client at adapter.rank",
        ),
    ],
)
def test_mistakes_are_one_line_errors(privacy, federation, message):
    raw = job(privacy, **federation) | {"adapter": {"rank": 4}}
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(raw)
    assert "\n" not in str(err.value)
