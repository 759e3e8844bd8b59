"""Accuracy vs cumulative upload on the demo task: Fed-SB against FedIT, FFA-LoRA, FedEx-LoRA, FLoRA.

Every method runs the same job (examples/demo.toml: all-MiniLM-L6-v2, chatterbot topics,
Dirichlet α=0.5) with the same rounds, local steps, batch and learning rates, in process, for
each fleet size and seed. Writes benchmarks/results/accuracy_comm.json (or
accuracy_comm_quick.json) and docs/img/accuracy_comm.png.
Usage: python experiments/accuracy_comm.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import transformers  # noqa: E402

from fedsb.cli import run_simulation  # noqa: E402
from fedsb.config import load_config  # noqa: E402
from fedsb.report import save_figure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUICK_RESULTS = Path("runs") / "evidence-quick"  # --quick output: smoke tests, not published
# (label, method, rank): Fed-SB and the LoRA baselines at a common, typical LoRA rank.
ARMS = [
    ("Fed-SB r=16", "fedsb", 16),
    ("FedIT r=8", "fedit", 8),
    ("FFA-LoRA r=8", "ffa", 8),
    ("FedEx-LoRA r=8", "fedex", 8),
    ("FLoRA r=8", "flora", 8),
]
# (seed, clients): seed 0 of both fleets first, so a cut-short run still covers both.
FULL = {
    "plan": [(0, 10), (0, 50), (1, 10), (2, 10), (1, 50), (2, 50)],
    "clients_per_round": 5,
    "rounds": 5,
    "arms": ARMS,
}
QUICK = {
    "plan": [(0, 4)],
    "clients_per_round": None,
    "rounds": 2,
    "arms": [ARMS[0], ARMS[1]],
    "overrides": {"data.max_train_examples": 400, "federation.local_steps": 2},
}


def run_arm(
    label: str,
    method: str,
    rank: int,
    clients: int,
    per_round: int | None,
    seed: int,
    rounds: int,
    out: Path,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """One federated run; its accuracy and cumulative upload after every round."""
    overrides = {
        "name": f"acc-{method}-r{rank}-c{clients}-s{seed}",
        "seed": seed,
        "adapter.rank": rank,
        "federation.method": method,
        "federation.clients": clients,
        "federation.clients_per_round": per_round,
        "federation.rounds": rounds,
        "simulation.transport": "inproc",
        **extra,
    }
    job = load_config(ROOT / "examples" / "demo.toml", overrides)
    run_dir = out / f"{method}-r{rank}-c{clients}-s{seed}"
    summary = run_simulation(job, run_dir, transport="inproc", quiet=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "label": label,
        "method": method,
        "rank": rank,
        "clients": clients,
        "clients_per_round": per_round or clients,
        "seed": seed,
        "accuracy_per_round": [r["accuracy"] for r in rows],
        "cumulative_upload_bytes": [r["cumulative_upload_bytes"] for r in rows],
        "upload_bytes_per_client_round": rows[-1]["upload_bytes_per_client"],
        "download_bytes_per_client_round": rows[-1]["download_bytes_per_client"],
        "adapter_download_bytes": rows[-1]["adapter_download_bytes"],
        "final_accuracy": summary["accuracy_after"],
        "seconds": summary["seconds"],
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds of each (arm, fleet)."""
    table: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        table.setdefault((r["label"], r["clients"]), []).append(r)
    rows = []
    for (label, clients), group in table.items():
        accs = [g["final_accuracy"] for g in group]
        rows.append(
            {
                "label": label,
                "clients": clients,
                "seeds": len(group),
                "accuracy_mean": statistics.mean(accs),
                "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "cumulative_upload_bytes": statistics.mean(
                    g["cumulative_upload_bytes"][-1] for g in group
                ),
                "upload_bytes_per_client_round": group[0]["upload_bytes_per_client_round"],
                "download_bytes_per_client_round": group[0]["download_bytes_per_client_round"],
                "adapter_download_bytes": group[0]["adapter_download_bytes"],
            }
        )
    return rows


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Pareto view: final accuracy (mean ± std) against cumulative upload, one panel per fleet."""
    fleets = sorted({s["clients"] for s in summary})
    fig, axes = plt.subplots(1, len(fleets), figsize=(5.5 * len(fleets), 4), squeeze=False)
    for ax, clients in zip(axes[0], fleets, strict=True):
        for s in (s for s in summary if s["clients"] == clients):
            marker = "*" if s["label"].startswith("Fed-SB") else "o"
            ax.errorbar(
                s["cumulative_upload_bytes"] / 1e6,
                100 * s["accuracy_mean"],
                yerr=100 * s["accuracy_std"],
                fmt=marker,
                markersize=12 if marker == "*" else 7,
                capsize=3,
                label=s["label"],
            )
        ax.set(
            xscale="log",
            xlabel="cumulative upload, all clients (MB, log)",
            ylabel="test accuracy (%)",
            title=f"{clients} non-IID clients",
        )
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
    parser.add_argument("--out", default=None, help="run folders (default: runs/...)")
    args = parser.parse_args()
    if args.replot:
        record = json.loads((ROOT / "benchmarks" / "results" / "accuracy_comm.json").read_text())
        plot(record["summary"], ROOT / "docs" / "img" / "accuracy_comm.png")
        return
    plan = QUICK if args.quick else FULL
    transformers.logging.set_verbosity_error()
    logging.basicConfig(level=logging.WARNING)
    started = time.time()
    runs: list[dict[str, Any]] = []
    result_name = "accuracy_comm_quick.json" if args.quick else "accuracy_comm.json"
    dest = (ROOT / QUICK_RESULTS if args.quick else ROOT / "benchmarks" / "results") / result_name
    dest.parent.mkdir(parents=True, exist_ok=True)
    for seed, clients in plan["plan"]:
        for label, method, rank in plan["arms"]:
            run = run_arm(
                label,
                method,
                rank,
                clients,
                plan["clients_per_round"],
                seed,
                plan["rounds"],
                Path(
                    args.out
                    or ROOT / "runs" / ("accuracy_comm_quick" if args.quick else "accuracy_comm")
                ),
                plan.get("overrides", {}),
            )
            runs.append(run)
            print(
                f"seed {seed} {clients:3d} clients {label:15s} "
                f"acc {100 * run['final_accuracy']:5.1f}%  "
                f"up/client/round {run['upload_bytes_per_client_round']:,} B  "
                f"{run['seconds']} s",
                flush=True,
            )
            record = {
                "task": "examples/demo.toml (all-MiniLM-L6-v2, chatterbot topics, Dirichlet 0.5)",
                "rounds": plan["rounds"],
                "local_steps": plan.get("overrides", {}).get("federation.local_steps", 5),
                "clients_per_round": plan["clients_per_round"],
                "quick": args.quick,
                "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
                "wall_seconds": round(time.time() - started, 1),
                "summary": summarise(runs),
                "runs": runs,
            }
            dest.write_text(json.dumps(record, indent=2) + "\n")  # partial results survive
            if not args.quick:
                plot(record["summary"], ROOT / "docs" / "img" / "accuracy_comm.png")
    for s in record["summary"]:
        print(
            f"{s['clients']:3d} clients {s['label']:15s} "
            f"{100 * s['accuracy_mean']:5.1f} ± {100 * s['accuracy_std']:.1f}%  "
            f"cumulative upload {s['cumulative_upload_bytes'] / 1e6:.2f} MB"
        )


if __name__ == "__main__":
    main()
