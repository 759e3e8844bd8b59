"""Bytes per client per round, up and down, of Fed-SB and the LoRA baselines on real model shapes.

The models are built on the meta device from their published configurations (no weights). What
each method uploads comes from its real `client_upload`; the broadcast of the round from the
shape rules of its `server_aggregate` (both checked against real aggregations and real encodings
on a two-layer BERT-base-wide model, see `check_against_real`). Sizes are those of the
`fedsb.protocol` messages: `encoded_size` builds the same safetensors header `fedsb.wire` writes,
without materialising tensors that would not fit in memory (Mistral-7B FedEx broadcasts 28 GB).
Writes benchmarks/results/communication.json and docs/img/communication.png.
Usage: python experiments/communication.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: E402

from fedsb import wire  # noqa: E402
from fedsb.adapter import LoraSBConfig, adapter_state, apply_lora_sb, lora_layers  # noqa: E402
from fedsb.methods import get_method  # noqa: E402
from fedsb.methods.fedex import RESIDUAL  # noqa: E402
from fedsb.methods.flora import STACK_A, STACK_B  # noqa: E402
from fedsb.protocol import (  # noqa: E402
    DEFAULT_MAX_UPDATE_BYTES,
    UpdateMeta,
    encode_broadcast,
    encode_client_update,
)
from fedsb.report import save_figure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUICK_RESULTS = Path("runs") / "evidence-quick"  # --quick output: smoke tests, not published
JOB = "comm"
METHODS = ("fedsb", "fedit", "ffa", "fedex", "flora")
LABELS = {
    "fedsb": "Fed-SB",
    "fedit": "FedIT",
    "ffa": "FFA-LoRA",
    "fedex": "FedEx-LoRA",
    "flora": "FLoRA",
}
FEDSB_RANKS = (16, 32, 64, 128, 200)
BASELINE_RANK = 32  # the Fed-SB paper's LoRA baselines (reproduces its 83.9M for Mistral-7B FedIT)

# Published configurations (Hugging Face config.json of each model), only the fields that shape
# the adapted layers. Clients: 25 in the Fed-SB paper's LLM runs (reference code default);
# 3 in its BERT-base private runs; RoBERTa-large: our choice, 3 as for BERT-base.
MODELS: dict[str, dict[str, Any]] = {
    "BERT-base": {
        "clients": 3,
        "head": True,
        "config": {
            "model_type": "bert",
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "vocab_size": 30522,
        },
    },
    "RoBERTa-large": {
        "clients": 3,
        "head": True,
        "config": {
            "model_type": "roberta",
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
            "vocab_size": 50265,
            "max_position_embeddings": 514,
            "type_vocab_size": 1,
        },
    },
    "Llama-3.2-3B": {
        "clients": 25,
        "head": False,
        "config": {
            "model_type": "llama",
            "hidden_size": 3072,
            "num_hidden_layers": 28,
            "num_attention_heads": 24,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "intermediate_size": 8192,
            "vocab_size": 128256,
            "tie_word_embeddings": True,
        },
    },
    "Mistral-7B": {
        "clients": 25,
        "head": False,
        "config": {
            "model_type": "mistral",
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 14336,
            "vocab_size": 32000,
        },
    },
    "Gemma-2-9B": {
        "clients": 25,
        "head": False,
        "config": {
            "model_type": "gemma2",
            "hidden_size": 3584,
            "num_hidden_layers": 42,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 256,
            "intermediate_size": 14336,
            "vocab_size": 256000,
        },
    },
}
NUM_LABELS = 3  # NLI heads (SNLI/MNLI) for the encoders
PAPER = {
    "mistral_fedsb_r200_params": 8.96e6,
    "mistral_fedit_params": 83.9e6,
    "mistral_exact_params": 2097e6,
    "gemma_ratio": 230,
}


# ---------------------------------------------------------------- sizes


def encoded_size(state: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> int:
    """len(fedsb.wire.encode_update(state, meta)) computed from names, dtypes and shapes only.

    Mirrors `wire._serialize`: same groups, same layout entry, same JSON header, same padding;
    the data section is the raw bytes. Works on meta tensors.
    """
    groups = wire._group_names(state)
    metadata = dict(sorted(wire._check_user_meta(meta).items()))
    metadata[wire.FORMAT_KEY] = wire.FORMAT_VERSION
    metadata[wire.LAYOUT_KEY] = wire._pack_layout([names for _, names in groups])
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for i, ((code, shape), names) in enumerate(groups):
        size = len(names) * math.prod(shape) * wire._ITEMSIZE[code]
        header[f"g{i}"] = {
            "dtype": code,
            "shape": [len(names), *shape],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return 8 + len(text) + (-len(text) % 8) + offset


def update_meta(rank: int) -> UpdateMeta:
    return UpdateMeta(job=JOB, round=0, client="client-0000", rank=rank, examples=128, loss=0.5)


def broadcast_meta(kind: str) -> dict[str, str]:
    return {"kind": kind, "job": JOB, "round": "0"}


def params(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values())


# ---------------------------------------------------------------- models and payload shapes


def build_model(spec: Mapping[str, Any], rank: int, device: str = "meta") -> nn.Module:
    """The model on `device` from its configuration, with LoRA-SB layers of rank `rank`."""
    fields = dict(spec["config"])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device(device):
        if spec["head"]:
            config.num_labels = NUM_LABELS
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    return apply_lora_sb(model, LoraSBConfig(rank=rank, modules_to_save=save_list(spec)))


def save_list(spec: Mapping[str, Any]) -> list[str]:
    return ["classifier"] if spec["head"] else []


def broadcast_shapes(
    method: str, start: Mapping[str, torch.Tensor], model: nn.Module, clients: int, rank: int
) -> dict[str, torch.Tensor]:
    """The round's broadcast (meta tensors) by the rules of each method's `server_aggregate`."""
    out = dict(start)
    if method == "fedex":
        for name, layer in lora_layers(model).items():
            out[name + RESIDUAL] = torch.empty(
                layer.lora_B.weight.shape[0], layer.lora_A.weight.shape[1], device="meta"
            )
    elif method == "flora":
        for name, layer in lora_layers(model).items():
            del out[name + ".A"], out[name + ".B"]
            out[name + STACK_B] = torch.empty(
                layer.lora_B.weight.shape[0], clients * rank, device="meta"
            )
            out[name + STACK_A] = torch.empty(
                clients * rank, layer.lora_A.weight.shape[1], device="meta"
            )
    return out


_META_MODELS: dict[tuple[str, int], nn.Module] = {}


def meta_model(name: str, rank: int) -> nn.Module:
    """`build_model` on the meta device, built once per (model, rank): only shapes are read."""
    if (name, rank) not in _META_MODELS:
        _META_MODELS.clear()  # keep one: a meta model is cheap, but 20 of them are not
        _META_MODELS[name, rank] = build_model(MODELS[name], rank)
    return _META_MODELS[name, rank]


def method_row(
    name: str, spec: Mapping[str, Any], method: str, rank: int, clients: int
) -> dict[str, Any]:
    """Parameters and encoded bytes of one (model, method, rank, clients)."""
    model = meta_model(name, rank)
    m = get_method(method)
    m.mark_trainable(model, save_list(spec))
    start = m.initial_broadcast(model)
    upload = m.client_upload(model, start, rank)
    down = broadcast_shapes(method, start, model, clients, rank)
    adapter = adapter_state(model, save_list(spec))
    heads = {k: v for k, v in upload.items() if k.startswith("classifier")}
    row = {
        "model": name,
        "method": method,
        "rank": rank,
        "clients": clients,
        "adapted_layers": len(lora_layers(model)),
        "up_params": params(upload),
        "up_adapter_params": params(upload) - params(heads),
        "up_bytes": encoded_size(upload, update_meta(rank).to_wire()),
        "down_params": params(down),
        "down_adapter_params": params(down) - params(heads),
        "down_bytes": encoded_size(down, broadcast_meta("global")),
        "adapter_download_params": params(adapter),
        "adapter_download_bytes": encoded_size(adapter, broadcast_meta("adapter")),
    }
    row["up_exceeds_default_max_update_bytes"] = row["up_bytes"] > DEFAULT_MAX_UPDATE_BYTES
    return row


# ---------------------------------------------------------------- check on real payloads


def check_against_real(clients: int = 3, rank: int = 8) -> list[dict[str, Any]]:
    """Real uploads, real `server_aggregate` and real encodings on a 2-layer BERT-base-wide model;
    their byte counts must equal `encoded_size` of the shapes used for the big models."""
    spec = {
        **MODELS["BERT-base"],
        "config": {**MODELS["BERT-base"]["config"], "num_hidden_layers": 2},
    }
    checks = []
    for method in METHODS:
        torch.manual_seed(0)
        model = build_model(spec, rank, device="cpu")
        m = get_method(method)
        if method == "fedsb":
            for layer in lora_layers(model).values():
                for p in (layer.lora_A.weight, layer.lora_B.weight, layer.lora_R.weight):
                    nn.init.normal_(p, std=0.02)
        else:
            m.initialise(model, seed=0)
        m.mark_trainable(model, save_list(spec))
        start = m.initial_broadcast(model)
        uploads = []
        for _ in range(clients):
            m.client_receive(model, start, 0)
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(torch.randn_like(p) * 1e-3)
            uploads.append(m.client_upload(model, start, rank))
        down = m.server_aggregate(start, uploads, [1.0] * clients, [rank] * clients, "replication")
        real_up = len(encode_client_update(uploads[0], update_meta(rank)))
        real_down = len(encode_broadcast(down, job=JOB, round_no=0, kind="global"))
        shapes = broadcast_shapes(method, start, build_model(spec, rank), clients, rank)
        checks.append(
            {
                "method": method,
                "real_up_bytes": real_up,
                "computed_up_bytes": encoded_size(uploads[0], update_meta(rank).to_wire()),
                "real_down_bytes": real_down,
                "computed_down_bytes": encoded_size(shapes, broadcast_meta("global")),
                "same_keys_and_shapes": {k: tuple(v.shape) for k, v in down.items()}
                == {k: tuple(v.shape) for k, v in shapes.items()},
            }
        )
    return checks


# ---------------------------------------------------------------- report


def paper_comparison(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The Fed-SB paper's headline numbers next to ours."""

    def find(model: str, method: str, rank: int) -> dict[str, Any]:
        return next(
            r for r in rows if (r["model"], r["method"], r["rank"]) == (model, method, rank)
        )

    mistral = find("Mistral-7B", "fedsb", 200)
    gemma_sb = find("Gemma-2-9B", "fedsb", 200)
    out: dict[str, Any] = {
        "mistral_fedsb_r200_params_per_round": mistral["up_params"],
        "paper_mistral_fedsb_r200_params": PAPER["mistral_fedsb_r200_params"],
        "mistral_fedit_r32_params": find("Mistral-7B", "fedit", BASELINE_RANK)["up_params"],
        "paper_mistral_fedit_params": PAPER["mistral_fedit_params"],
    }
    for method in ("flora", "fedex"):
        m_row = find("Mistral-7B", method, BASELINE_RANK)
        g_row = find("Gemma-2-9B", method, BASELINE_RANK)
        out[f"mistral_{method}_down_params"] = m_row["down_adapter_params"]
        out[f"gemma_{method}_vs_fedsb_r200_params_ratio"] = (
            g_row["down_adapter_params"] / gemma_sb["down_params"]
        )
        out[f"gemma_{method}_vs_fedsb_r200_bytes_ratio"] = (
            g_row["up_bytes"] + g_row["down_bytes"]
        ) / (gemma_sb["up_bytes"] + gemma_sb["down_bytes"])
    out["paper_mistral_exact_params"] = PAPER["mistral_exact_params"]
    out["paper_gemma_ratio"] = PAPER["gemma_ratio"]
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Bytes per client per round (up + down), log scale, per model and method."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    arms = [("fedsb", 16), ("fedsb", 200), *((m, BASELINE_RANK) for m in METHODS[1:])]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(arms)
    for j, (method, rank) in enumerate(arms):
        values = []
        for model in models:
            row = next(
                r for r in rows if (r["model"], r["method"], r["rank"]) == (model, method, rank)
            )
            values.append((row["up_bytes"] + row["down_bytes"]) / 1e6)
        xs = [i + (j - len(arms) / 2 + 0.5) * width for i in range(len(models))]
        ax.bar(xs, values, width, label=f"{LABELS[method]} r={rank}")
    ax.set_xticks(range(len(models)), [f"{m}\n({MODELS[m]['clients']} clients)" for m in models])
    ax.set(
        yscale="log",
        ylabel="MB per client per round (up + down)",
        title="encoded fedsb payloads, per client per round",
    )
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize=8, ncol=2)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="Mistral-7B and Gemma-2-9B, r = 16 and 200"
    )
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    started = time.time()
    names = ["Mistral-7B", "Gemma-2-9B"] if args.quick else list(MODELS)
    ranks = (16, 200) if args.quick else FEDSB_RANKS
    rows = []
    for name in names:
        spec = MODELS[name]
        for rank in ranks:
            rows.append(method_row(name, spec, "fedsb", rank, spec["clients"]))
        for method in METHODS[1:]:
            rows.append(method_row(name, spec, method, BASELINE_RANK, spec["clients"]))
    growth = [
        method_row("Mistral-7B", MODELS["Mistral-7B"], method, BASELINE_RANK, k)
        for k in ((3, 100) if args.quick else (3, 10, 25, 50, 100))
        for method in ("fedsb", "flora", "fedex")
    ]
    record = {
        "quick": args.quick,
        "fedsb_ranks": list(ranks),
        "baseline_rank": BASELINE_RANK,
        "rows": rows,
        "growth_with_clients_mistral": growth,
        "paper": paper_comparison(rows),
        "check_against_real": check_against_real(),
        "seconds": round(time.time() - started, 1),
    }
    name = "communication_quick.json" if args.quick else "communication.json"
    dest = (ROOT / QUICK_RESULTS if args.quick else ROOT / "benchmarks" / "results") / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(record, indent=2) + "\n")
    if not args.quick:
        plot(rows, ROOT / "docs" / "img" / "communication.png")
    for r in rows:
        print(
            f"{r['model']:14s} {LABELS[r['method']]:10s} r={r['rank']:3d} K={r['clients']:2d}  "
            f"up {r['up_params'] / 1e6:9.3f}M params {r['up_bytes']:>14,} B  "
            f"down {r['down_params'] / 1e6:10.3f}M {r['down_bytes']:>15,} B  "
            f"adapter {r['adapter_download_bytes']:>15,} B"
        )
    print(json.dumps(record["paper"], indent=2))


if __name__ == "__main__":
    main()
