"""Fed-SB updates aggregated per second in process, single core, against the memory-bandwidth bound.

Each update is a real `fedsb.protocol` message, pre-encoded; the timed loop is
`FederatedServer.submit` — the aggregator's own path: decode, validate (format, metadata, shapes,
finite values), exact accumulation into the round's sums. The bound is what a machine that only
moves bytes could do: every update's payload read once plus a float64 running sum read and written
once per element (payload + 16 B per value), at the memcpy bandwidth measured here.
Writes benchmarks/results/aggregation_throughput.json (or aggregation_throughput_quick.json).
Usage: python benchmarks/aggregation_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from fedsb.aggregator.server import FederatedServer
from fedsb.config import parse_config
from fedsb.methods import get_method
from fedsb.protocol import UpdateMeta, encode_client_update, validate_update
from fedsb.report import save_figure

ROOT = Path(__file__).resolve().parent.parent
QUICK_RESULTS = Path("runs") / "evidence-quick"  # --quick output: smoke tests, not published
JOB = "throughput"
ENCODER = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
DECODER = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
# (label, R names, head shapes): the fedsb target presets of BERT-base and Llama-3.2-3B.
SHAPES = {
    "BERT-base": (
        [f"bert.encoder.layer.{i}.{t}.R" for i in range(12) for t in ENCODER],
        {"classifier.weight": (3, 768), "classifier.bias": (3,)},
    ),
    "Llama-3.2-3B": ([f"model.layers.{i}.{t}.R" for i in range(28) for t in DECODER], {}),
}
FULL = [("BERT-base", 16, 400), ("Llama-3.2-3B", 16, 200), ("Llama-3.2-3B", 200, 6)]
QUICK = [("BERT-base", 16, 40), ("Llama-3.2-3B", 16, 10)]


def memcpy_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second moved by one core copying a large buffer (read + write counted)."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def make_server(
    model: str, rank: int, max_bytes: int
) -> tuple[FederatedServer, dict[str, torch.Tensor]]:
    """A Fed-SB aggregator at round 0 for this model's shapes; and its global state."""
    names, head = SHAPES[model]
    state = {n: torch.zeros(rank, rank) for n in names} | {
        k: torch.zeros(s) for k, s in head.items()
    }
    job = parse_config({"name": JOB, "adapter": {"rank": rank}})
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    server = FederatedServer(job, get_method("fedsb"), {}, dict(state), shapes)
    server.rules = dataclasses.replace(server.rules, max_bytes=max_bytes)
    return server, state


def measure(model: str, rank: int, updates: int, seed: int = 0) -> dict[str, Any]:
    """Updates/s through `submit` for one round of `updates` distinct clients."""
    generator = torch.Generator().manual_seed(seed)
    _, template = make_server(model, rank, 2**31)
    payloads = []
    for i in range(updates):
        delta = {k: torch.randn(v.shape, generator=generator) * 1e-3 for k, v in template.items()}
        meta = UpdateMeta(job=JOB, round=0, client=f"c{i:05d}", rank=rank, examples=32, loss=0.5)
        payloads.append(encode_client_update(delta, meta))
    server, _ = make_server(model, rank, 2 * len(payloads[0]))
    t0 = time.perf_counter()  # the decode + validate part alone, for the split
    for i, payload in enumerate(payloads):
        validate_update(payload, f"c{i:05d}", server.rules)
    validate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i, payload in enumerate(payloads):
        if server.submit(f"c{i:05d}", payload) is not None:
            raise RuntimeError(f"update {i} rejected: {dict(server.rejections)}")
    submit_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    server.close_round()
    close_s = time.perf_counter() - t1
    values = sum(v.numel() for v in template.values())
    return {
        "model": model,
        "rank": rank,
        "r_blocks": len(SHAPES[model][0]),
        "values_per_update": values,
        "payload_bytes": len(payloads[0]),
        "updates": updates,
        "submit_seconds": round(submit_s, 4),
        "updates_per_second": updates / submit_s,
        "ms_per_update": 1000 * submit_s / updates,
        "decode_validate_ms_per_update": 1000 * validate_s / updates,
        "close_round_seconds": round(close_s, 4),
        "bytes_touched_per_update": len(payloads[0]) + 16 * values,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Measured updates/s next to the memory-bandwidth bound, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']} r={r['rank']}\n{r['payload_bytes'] / 1e3:,.0f} kB" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(
        [x - 0.2 for x in xs], [r["updates_per_second"] for r in rows], 0.4, label="fedsb submit"
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [r["bound_updates_per_second"] for r in rows],
        0.4,
        label="memory-bandwidth bound",
    )
    for x, r in zip(xs, rows, strict=True):
        ax.annotate(
            f"{100 * r['fraction_of_bound']:.1f}%",
            (x - 0.2, r["updates_per_second"]),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set(
        yscale="log",
        ylabel="updates per second (one core)",
        title="Fed-SB aggregation in process: decode + validate + exact sum",
    )
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and smaller updates")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bandwidth = memcpy_bandwidth(64 if args.quick else 256)
    rows = []
    for model, rank, updates in QUICK if args.quick else FULL:
        row = measure(model, rank, updates)
        row["bound_updates_per_second"] = bandwidth / row["bytes_touched_per_update"]
        row["fraction_of_bound"] = row["updates_per_second"] / row["bound_updates_per_second"]
        rows.append(row)
        print(
            f"{model:13s} r={rank:3d} ({row['payload_bytes']:,} B): "
            f"{row['updates_per_second']:9.1f} updates/s ({row['ms_per_update']:.3f} ms each, "
            f"{row['decode_validate_ms_per_update']:.3f} ms decode+validate); "
            f"bound {row['bound_updates_per_second']:,.0f}/s; "
            f"{100 * row['fraction_of_bound']:.1f}% of bound; close {row['close_round_seconds']} s"
        )
    record = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "memcpy_bytes_per_second": bandwidth,
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": args.quick,
        "rows": rows,
    }
    name = "aggregation_throughput_quick.json" if args.quick else "aggregation_throughput.json"
    dest = (ROOT / QUICK_RESULTS if args.quick else ROOT / "benchmarks" / "results") / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(record, indent=2) + "\n")
    if not args.quick:
        plot(rows, ROOT / "docs" / "img" / "aggregation_throughput.png")
    print(f"memcpy bandwidth {bandwidth / 1e9:.2f} GB/s (one core)")


if __name__ == "__main__":
    main()
