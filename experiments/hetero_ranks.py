"""Heterogeneous ranks: replication vs zero vs HetLoRA padding on the same non-IID demo run.

Clients of ranks 2, 4, 8 and 16 (r_max = 16; few high-rank clients, where zero padding dilutes
most), every rule on the same job and seeds, in process. Writes benchmarks/results/hetero_ranks.json
(or hetero_ranks_quick.json) and docs/img/hetero_ranks.png.
Usage: python experiments/hetero_ranks.py [--quick] [--rounds N]
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

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import transformers  # noqa: E402

from fedsb.cli import run_simulation  # noqa: E402
from fedsb.config import load_config  # noqa: E402
from fedsb.report import save_figure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUICK_RESULTS = Path("runs") / "evidence-quick"  # --quick output: smoke tests, not published
RANKS = [2, 2, 2, 4, 4, 4, 8, 8, 16, 16]  # four device classes, r_max = 16
PADDINGS = ("replication", "zero", "hetlora")
FULL = {"ranks": RANKS, "seeds": [0, 1, 2], "rounds": 5, "paddings": PADDINGS, "overrides": {}}
QUICK = {
    "ranks": [2, 4, 8, 16],
    "seeds": [0],
    "rounds": 2,
    "paddings": ("replication", "zero"),
    "overrides": {"data.max_train_examples": 400, "federation.local_steps": 2},
}


def run_padding(padding: str, seed: int, plan: dict[str, Any], out: Path) -> dict[str, Any]:
    """One run with this padding rule; accuracy after every round."""
    job = load_config(
        ROOT / "examples" / "demo.toml",
        {
            "seed": seed,
            "federation.clients": len(plan["ranks"]),
            "federation.rounds": plan["rounds"],
            "federation.client_ranks": plan["ranks"],
            "federation.padding": padding,
            "simulation.transport": "inproc",
            "name": f"hetero-{padding}-s{seed}",
            **plan["overrides"],
        },
    )
    run_dir = out / f"{padding}-s{seed}"
    summary = run_simulation(job, run_dir, transport="inproc", quiet=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "padding": padding,
        "seed": seed,
        "accuracy_per_round": [r["accuracy"] for r in rows],
        "final_accuracy": summary["accuracy_after"],
        "mean_upload_bytes_per_client": rows[-1]["upload_bytes_per_client"],
        "seconds": summary["seconds"],
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per padding: mean ± std of the final accuracy and of the curve, over seeds."""
    out: dict[str, Any] = {}
    for padding in dict.fromkeys(r["padding"] for r in runs):
        group = [r for r in runs if r["padding"] == padding]
        finals = [r["final_accuracy"] for r in group]
        curves = list(zip(*(r["accuracy_per_round"] for r in group), strict=True))
        out[padding] = {
            "seeds": len(group),
            "final_accuracy_mean": statistics.mean(finals),
            "final_accuracy_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "curve_mean": [statistics.mean(c) for c in curves],
            "curve_std": [statistics.stdev(c) if len(c) > 1 else 0.0 for c in curves],
            "mean_upload_bytes_per_client": group[0]["mean_upload_bytes_per_client"],
        }
    return out


def plot(summary: dict[str, Any], ranks: list[int], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for padding, s in summary.items():
        mean = [100 * a for a in s["curve_mean"]]
        std = [100 * a for a in s["curve_std"]]
        xs = range(len(mean))
        ax.plot(xs, mean, marker="o", label=f"{padding} (n={s['seeds']})")
        ax.fill_between(
            xs,
            [m - d for m, d in zip(mean, std, strict=True)],
            [m + d for m, d in zip(mean, std, strict=True)],
            alpha=0.2,
        )
    ax.set(
        xlabel="round",
        ylabel="test accuracy (%)",
        title=f"heterogeneous ranks {'/'.join(map(str, sorted(set(ranks))))}, {len(ranks)} clients",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=None, help="run folders (default: runs/...)")
    args = parser.parse_args()
    plan = dict(QUICK if args.quick else FULL)
    if args.rounds:
        plan["rounds"] = args.rounds
    transformers.logging.set_verbosity_error()
    logging.basicConfig(level=logging.WARNING)
    started = time.time()
    name = "hetero_ranks_quick.json" if args.quick else "hetero_ranks.json"
    dest = (ROOT / QUICK_RESULTS if args.quick else ROOT / "benchmarks" / "results") / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in plan["seeds"]:
        for padding in plan["paddings"]:
            runs.append(
                run_padding(
                    padding,
                    seed,
                    plan,
                    Path(
                        args.out
                        or ROOT / "runs" / ("hetero_ranks_quick" if args.quick else "hetero_ranks")
                    ),
                )
            )
            print(
                f"seed {seed} {padding:12s} final accuracy {100 * runs[-1]['final_accuracy']:.1f}%",
                flush=True,
            )
            summary = summarise(runs)
            record = {
                "client_ranks": plan["ranks"],
                "rounds": plan["rounds"],
                "quick": args.quick,
                "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
                "wall_seconds": round(time.time() - started, 1),
                "summary": summary,
                "runs": runs,
            }
            dest.write_text(json.dumps(record, indent=2) + "\n")  # partial results survive
            if not args.quick:
                plot(summary, plan["ranks"], ROOT / "docs" / "img" / "hetero_ranks.png")
    for padding, s in summary.items():
        print(
            f"{padding:12s} {100 * s['final_accuracy_mean']:.1f} ± {100 * s['final_accuracy_std']:.1f}%"
        )


if __name__ == "__main__":
    main()
