"""ExecuTorch training programs: only R and the head train, and 10 steps equal eager PyTorch SGD.

Exports are slow (tens of seconds for the tiny model, minutes for MiniLM on 2 cores), so each
program is exported once per module and shared by the tests below.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fedsb
from fedsb.cli import main
from fedsb.config import parse_config
from fedsb.edge_client.backends import TrainRequest
from fedsb.edge_client.backends.executorch_backend import ExecuTorchBackend
from fedsb.export import to_executorch
from fedsb.export.adapter_dir import load_adapted_model
from fedsb.export.executorch import MANIFEST, WEIGHTS_DATA
from fedsb.report import ADAPTER_WEIGHTS, adapter_description, save_adapter
from fedsb.training import Encoded, evaluate, train_local

from .conftest import make_tiny_adapted, tiny_job_dict, toml_of

STEPS = 10


def parity(
    backend: ExecuTorchBackend, model: torch.nn.Module, data: Encoded, lr: float, head_lr: float
) -> tuple[float, float, float]:
    """(max |ΔR|, max |Δhead|) ExecuTorch vs eager torch SGD after STEPS steps, max |R change|."""
    start = fedsb.trainable_state(model)
    eager = copy.deepcopy(model)
    train_local(
        eager, data, steps=STEPS, batch_size=8, lr=lr, head_lr=head_lr, seed=7,
        optimizer="sgd", dropout=False,
    )  # fmt: skip
    backend.load_trainable(start)
    backend.train(data, TrainRequest(steps=STEPS, batch_size=8, lr=lr, head_lr=head_lr, seed=7))
    torch_state, et_state = fedsb.trainable_state(eager), backend.trainable_state()
    assert et_state.keys() == torch_state.keys()
    r_keys = [k for k in torch_state if k.endswith(".R")]
    head_keys = [k for k in torch_state if not k.endswith(".R")]

    def diff(a: dict, b: dict, keys: list[str]) -> float:
        return max(float((a[k] - b[k]).abs().max()) for k in keys)

    return (
        diff(torch_state, et_state, r_keys),
        diff(torch_state, et_state, head_keys),
        diff(torch_state, start, r_keys),
    )


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir: Path, tiny_data: Encoded, tmp_path_factory) -> Path:
    """A saved adapter folder of the tiny model and its job file (job.toml next to it)."""
    root = tmp_path_factory.mktemp("et-adapter")
    raw = tiny_job_dict(tiny_model_dir)
    model = make_tiny_adapted(tiny_model_dir, tiny_data)
    save_adapter(
        root / "adapter",
        fedsb.adapter_state(model, ["classifier"]),
        adapter_description(parse_config(raw), [f"topic{i}" for i in range(5)]),
    )
    (root / "job.toml").write_text(toml_of(raw))
    return root / "adapter"


@pytest.fixture(scope="module")
def tiny_portable(tiny_adapter: Path) -> Path:
    """`fedsb export executorch --external-weights` of the tiny adapter: the CLI path itself."""
    out = tiny_adapter.parent / "et-portable"
    job = tiny_adapter.parent / "job.toml"
    argv = ["export", "executorch", "--config", str(job), "--adapter", str(tiny_adapter)]
    assert main([*argv, "--out", str(out), "--external-weights"]) == 0
    return out


@pytest.fixture(scope="module")
def tiny_xnnpack(tiny_model_dir: Path, tiny_data: Encoded, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("et-xnnpack")
    to_executorch(make_tiny_adapted(tiny_model_dir, tiny_data), out, xnnpack=True)
    return out


def test_cli_writes_programs_manifest_weights_and_tokenizer(tiny_portable: Path):
    files = sorted(p.name for p in tiny_portable.iterdir())
    assert files == [MANIFEST, "fedsb_infer.pte", "fedsb_train.pte", WEIGHTS_DATA, "tokenizer"]


def test_program_trains_exactly_the_trainable_state(tiny_portable: Path, tiny_adapter: Path):
    backend = ExecuTorchBackend(tiny_portable)
    program_names = list(backend.program.named_parameters())
    names = {t["program"]: t["state"] for t in backend.manifest["trainable"]}
    model = load_adapted_model(tiny_adapter).model
    assert sorted(names[n] for n in program_names) == sorted(fedsb.trainable_state(model))
    assert len(program_names) == 2 * 6 + 2  # R of 12 layers + classifier weight and bias
    assert not [
        n
        for n in program_names
        if not n.endswith((".lora_R.weight", "classifier.weight", "classifier.bias"))
    ]


def test_external_weights_round_trip(tiny_portable: Path, tiny_adapter: Path, tiny_data: Encoded):
    """Frozen weights live in the .ptd only; programs loaded with it give eager logits and loss."""
    ptd = (tiny_portable / WEIGHTS_DATA).stat().st_size
    train_pte = (tiny_portable / "fedsb_train.pte").stat().st_size
    frozen_bytes = sum(
        v.numel() * 4 for k, v in load_file(str(tiny_adapter / ADAPTER_WEIGHTS)).items()
    )
    assert ptd > 10 * train_pte  # W0, embeddings, A, B are out of the program
    assert ptd > frozen_bytes
    backend = ExecuTorchBackend(tiny_portable)
    model = load_adapted_model(tiny_adapter).model
    expected = evaluate(model, tiny_data)
    measured = backend.evaluate(tiny_data)
    assert measured["accuracy"] == expected["accuracy"]
    assert measured["loss"] == pytest.approx(expected["loss"], abs=1e-5)


@pytest.mark.parametrize(("lr", "head_lr"), [(0.5, 0.5), (0.5, 0.1)])
def test_portable_sgd_matches_eager_torch_on_tiny_model(
    tiny_portable: Path, tiny_adapter: Path, tiny_data: Encoded, lr: float, head_lr: float
):
    model = load_adapted_model(tiny_adapter).model
    r_diff, head_diff, moved = parity(
        ExecuTorchBackend(tiny_portable), model, tiny_data, lr, head_lr
    )
    assert moved > 1e-3  # R really trained
    assert r_diff <= 1e-5
    assert head_diff <= 1e-5


def test_xnnpack_sgd_matches_eager_torch_on_tiny_model(
    tiny_xnnpack: Path, tiny_model_dir: Path, tiny_data: Encoded
):
    model = make_tiny_adapted(tiny_model_dir, tiny_data)
    backend = ExecuTorchBackend(tiny_xnnpack)
    assert backend.manifest["backend"] == "xnnpack"
    r_diff, head_diff, moved = parity(backend, model, tiny_data, 0.5, 0.1)
    print(f"tiny xnnpack: max |ΔR| {r_diff:.2e}, max |Δhead| {head_diff:.2e}, R moved {moved:.2e}")
    assert moved > 1e-3
    assert r_diff <= 1e-5
    assert head_diff <= 1e-5


def test_bad_adapter_folder_is_a_one_line_error(tmp_path: Path, capsys):
    job = tmp_path / "job.toml"
    job.write_text('name = "x"\n')
    argv = ["export", "executorch", "--config", str(job), "--adapter", str(tmp_path / "nope")]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "is not a fedsb adapter folder" in err


def test_backend_rejects_adamw_and_unknown_names(tiny_portable: Path, tiny_data: Encoded):
    backend = ExecuTorchBackend(tiny_portable)
    request = TrainRequest(steps=1, batch_size=8, lr=0.1, head_lr=0.1, seed=0, optimizer="adamw")
    with pytest.raises(fedsb.ConfigError, match="optimizer 'sgd' and no dropout"):
        backend.train(tiny_data, request)
    with pytest.raises(fedsb.ModelError, match="unknown trainable tensors"):
        backend.load_trainable({"nope.R": torch.zeros(4, 4)})


@pytest.fixture(scope="module")
def minilm_programs(minilm_setup, tmp_path_factory) -> dict[str, Path]:
    """Real all-MiniLM-L6-v2 (rank 16, 36 layers) exported once as portable and XNNPACK."""
    model, _ = minilm_setup
    root = tmp_path_factory.mktemp("et-minilm")
    return {
        kind: to_executorch(
            model, root / kind, xnnpack=kind == "xnnpack", max_batch=8, max_seq_len=32
        ).out_dir
        for kind in ("portable", "xnnpack")
    }


@pytest.mark.parametrize("kind", ["portable", "xnnpack"])
def test_sgd_matches_eager_torch_on_minilm(minilm_programs, minilm_setup, kind: str):
    model, data = minilm_setup
    backend = ExecuTorchBackend(minilm_programs[kind])
    assert len(backend.params) == 36 + 2
    r_diff, head_diff, moved = parity(backend, model, data, 1e-1, 1e-1)
    print(f"MiniLM {kind}: max |ΔR| {r_diff:.2e}, max |Δhead| {head_diff:.2e}, R moved {moved:.2e}")
    assert moved > 1e-4
    assert r_diff <= 1e-5
    assert head_diff <= 1e-5
