"""Config validation: every bad value gives one line naming the key; the CLI prints it, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsb.cli import main
from fedsb.config import load_config, parse_config
from fedsb.errors import ConfigError

EXAMPLES = sorted(Path(__file__).parent.parent.joinpath("examples").glob("*.toml"))

BAD_CONFIGS = [
    (
        {"federation": {"rounds": 0}},
        r"^federation\.rounds: .*greater than or equal to 1 \(got 0\)$",
    ),
    ({"federation": {"rounds": "ten"}}, r"^federation\.rounds: .*integer"),
    ({"federation": {"method": "fedavg"}}, r"^federation\.method: .*'fedsb'"),
    ({"federation": {"padding": "mirror"}}, r"^federation\.padding: "),
    ({"federation": {"lr": -1.0}}, r"^federation\.lr: .*greater than 0"),
    (
        {"federation": {"max_update_bytes": 1000}},
        r"^federation\.max_update_bytes: .*greater than or equal to 65536 \(got 1000\)$",
    ),
    (
        {"federation": {"clients": 2, "clients_per_round": 3}},
        r"^federation: clients_per_round \(3\) exceeds",
    ),
    (
        {"federation": {"clients": 2, "client_ranks": [4]}},
        r"^federation: client_ranks has 1 entries",
    ),
    (
        {"federation": {"clients": 2, "client_ranks": [4, 32]}},
        r"^config: federation\.client_ranks may not exceed",
    ),
    ({"federation": {"rouds": 3}}, r"^federation\.rouds: unknown key$"),
    ({"adapter": {"rank": 0}}, r"^adapter\.rank: .*greater than or equal to 1"),
    ({"adapter": {"init": "gauss"}}, r"^adapter\.init: "),
    ({"adapter": {"init_lr": 0}}, r"^adapter\.init_lr: "),
    ({"adapter": {"init_probe_steps": -1}}, r"^adapter\.init_probe_steps: .*greater than or equal"),
    (
        {"adapter": {"freeze_head": True, "modules_to_save": []}},
        r"^adapter: freeze_head needs a head in modules_to_save \(got",
    ),
    (
        {"adapter": {"freeze_head": True, "init_probe_steps": 0}},
        r"^adapter: freeze_head keeps the head fitted by the init's probe: it needs "
        r"init = 'lora-sb' and init_probe_steps > 0 \(got",
    ),
    (
        {"adapter": {"freeze_head": True, "init": "lora-sb-federated", "init_probe_steps": 5}},
        r"^adapter: freeze_head keeps the head fitted by the init's probe",
    ),
    ({"data": {"alpha": 0}}, r"^data\.alpha: "),
    ({"data": {"partition": "random"}}, r"^data\.partition: "),
    ({"data": {"dataset": "file"}}, r"^data: dataset = 'file' needs data\.path"),
    ({"data": {"test_fraction": 1.5}}, r"^data\.test_fraction: "),
    ({"model": {"max_length": 1}}, r"^model\.max_length: "),
    ({"name": "has space"}, r"^name: "),
    ({"seed": -1}, r"^seed: "),
    ({"extra": 1}, r"^extra: unknown key$"),
]


@pytest.mark.parametrize(("raw", "pattern"), BAD_CONFIGS)
def test_bad_config_names_the_key_in_one_line(raw, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        parse_config(raw)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path):
    assert load_config(path).federation.rounds >= 1


def test_defaults_are_the_calibrated_demo():
    job = parse_config({})
    assert (job.adapter.rank, job.federation.clients, job.data.alpha) == (16, 10, 0.5)


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\nrounds = 3\n")
    with pytest.raises(ConfigError, match=r"invalid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"not found"):
        load_config(tmp_path / "missing.toml")


def test_overrides_apply_to_nested_keys(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("[federation]\nrounds = 3\n")
    assert load_config(path, {"federation.rounds": 7}).federation.rounds == 7


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    path = tmp_path / "job.toml"
    path.write_text("[federation]\nrounds = -2\n")
    assert main(["simulate", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: federation.rounds:")
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("adapter", "steps"),
    [
        ({}, 30),  # the central init probes the head on its pooled examples
        ({"init": "lora-sb-federated"}, 0),  # each client would fit it on a few examples only
        ({"init": "lora-sb-federated-exact"}, 0),
        ({"init": "lora-sb-federated", "init_probe_steps": 5}, 5),  # an explicit value wins
        ({"init_probe_steps": 0}, 0),
    ],
)
def test_head_probe_default_depends_on_the_init(adapter, steps):
    assert parse_config({"adapter": adapter}).lora_config().init_probe_steps == steps
