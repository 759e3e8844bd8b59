"""Accuracy vs cumulative upload on the demo task: Fed-SB against FedIT, FFA-LoRA, FedEx-LoRA, FLoRA.

Every method runs the same job (examples/demo.toml: all-MiniLM-L6-v2, chatterbot topics,
Dirichlet α=0.5) with the same rounds, local steps and batch, in process, for each fleet size and
seed. Learning rates are tuned per method first (`--tune`): the same grid for every method, on a
validation split carved from the training data (data.evaluate_on = "validation"), never on the
test set; writes benchmarks/results/accuracy_tuning.json. The full mode then trains each method
with its chosen learning rates and reports test accuracy: benchmarks/results/accuracy_comm.json
and docs/img/accuracy_comm.png. `--quick` is a smoke run with the demo's learning rates.
Usage: python experiments/accuracy_comm.py [--tune | --quick | --replot]
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
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import transformers  # noqa: E402

from fedsb.cli import run_simulation  # noqa: E402
from fedsb.config import load_config  # noqa: E402
from fedsb.report import save_figure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TUNING = RESULTS / "accuracy_tuning.json"
QUICK_RESULTS = Path("runs") / "evidence-quick"  # --quick output: smoke tests, not published
# (label, method, rank): Fed-SB and the LoRA baselines at a common, typical LoRA rank.
ARMS = [
    ("Fed-SB r=16", "fedsb", 16),
    ("FedIT r=8", "fedit", 8),
    ("FFA-LoRA r=8", "ffa", 8),
    ("FedEx-LoRA r=8", "fedex", 8),
    ("FLoRA r=8", "flora", 8),
    ("Fed-SB r=21, frozen head", "fedsb", 21),
]
# Run with `--arms "Fed-SB r=24"`: a higher Fed-SB rank that still uploads >= 10x less than FedIT,
# FedEx-LoRA and FLoRA r=8 (36 R blocks of 24x24 + the head: 115,900 B vs 1,360,380 B).
EXTRA_ARMS = [
    ("Fed-SB r=24", "fedsb", 24),
    ("Fed-SB r=16, frozen head", "fedsb", 16),
    ("FFA-LoRA r=8, frozen head", "ffa", 8),  # the ablation: does the frozen head alone help?
]
# An arm whose label ends so runs with adapter.freeze_head (the init's probe fits the head, then
# it stays fixed): the head leaves the upload, so the budget of 10x less than FFA-LoRA r=8 buys
# Fed-SB rank 21 instead of 16.
FROZEN_HEAD = ", frozen head"
REFERENCES = ("Fed-SB r=21, frozen head", "Fed-SB r=16")  # the arms paired gaps are taken from
ALL_ARMS = ARMS + EXTRA_ARMS
# (seed, clients): seed 0 of both fleets first, so a cut-short run still covers both. Seeds 3
# and 4 were added after the first three could not separate gaps of 2-4 points (`--resume`).
FULL = {
    "plan": [(0, 10), (0, 50), (1, 10), (2, 10), (1, 50), (2, 50)]
    + [(3, 10), (3, 50), (4, 10), (4, 50)],
    "clients_per_round": 5,
    "rounds": 5,
    "arms": ARMS,
}
# The same learning-rate grid for every method (adapter lr × head lr), AdamW. 1e-1 was added
# after a first look: Fed-SB's best setting was at the grid's edge (lr 3e-2).
GRID = {"lr": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], "head_lr": [1e-2, 1e-1]}
TUNE = {
    "plan": [(0, 10)],
    "clients_per_round": FULL["clients_per_round"],
    "rounds": FULL["rounds"],
    "overrides": {"data.evaluate_on": "validation"},
}
SCORED_ROUNDS = 2  # a setting's score: mean validation accuracy of the last 2 rounds (damps noise)
QUICK = {
    "plan": [(0, 4)],
    "clients_per_round": None,
    "rounds": 2,
    "arms": [ARMS[0], ARMS[1], ARMS[5]],
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
        "adapter.freeze_head": head_is_frozen(label),
        **extra,
    }
    job = load_config(ROOT / "examples" / "demo.toml", overrides)
    lrs = f"-lr{job.federation.lr:g}-h{job.federation.head_lr:g}"
    head = "-frozen-head" if job.adapter.freeze_head else ""
    run_dir = out / f"{method}-r{rank}{head}-c{clients}-s{seed}{lrs}"
    summary = run_simulation(job, run_dir, transport="inproc", quiet=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "label": label,
        "method": method,
        "rank": rank,
        "clients": clients,
        "clients_per_round": per_round or clients,
        "seed": seed,
        "lr": job.federation.lr,
        "head_lr": job.federation.head_lr,
        "evaluate_on": job.data.evaluate_on,
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
                "lr": group[0]["lr"],
                "head_lr": group[0]["head_lr"],
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


def paired_gaps(runs: list[dict[str, Any]], references: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per reference arm, fleet and baseline (every arm that is not Fed-SB): the reference minus
    that arm, seed by seed (same partition, same client draws), so the seed-to-seed swing that
    both share cancels out."""
    final = {(r["label"], r["clients"], r["seed"]): r["final_accuracy"] for r in runs}
    labels = dict.fromkeys(r["label"] for r in runs)
    baselines = [label for label in labels if not label.startswith("Fed-SB")]
    return [
        row
        for reference in references
        for clients in sorted({r["clients"] for r in runs})
        for row in gaps_against(final, reference, clients, baselines)
    ]


def gaps_against(
    final: dict[tuple[str, int, int], float], reference: str, clients: int, baselines: list[str]
) -> list[dict[str, Any]]:
    """`reference` minus each baseline at one fleet size, over the seeds both ran."""
    rows = []
    for label in baselines:
        seeds = sorted(
            seed
            for (arm, fleet, seed) in final
            if (arm, fleet) == (label, clients) and (reference, clients, seed) in final
        )
        if not seeds:
            continue
        gaps = [final[reference, clients, s] - final[label, clients, s] for s in seeds]
        rows.append(
            {
                "clients": clients,
                "reference": reference,
                "against": label,
                "seeds": seeds,
                "gap_per_seed": gaps,
                "gap_mean": statistics.mean(gaps),
                "gap_std": statistics.stdev(gaps) if len(gaps) > 1 else 0.0,
                "reference_ahead_or_level": sum(g >= 0 for g in gaps),
            }
        )
    return rows


def mean_curve(group: list[dict[str, Any]], key: str) -> list[float]:
    """The per-round mean over seeds of a run list's `key` curve."""
    return [statistics.mean(values) for values in zip(*(g[key] for g in group), strict=True)]


def plot(summary: list[dict[str, Any]], path: Path, runs: list[dict[str, Any]]) -> None:
    """Pareto view: final accuracy (mean ± std) against cumulative upload, one panel per fleet,
    with each arm's path there (mean accuracy after each round against the upload so far)."""
    fleets = sorted({s["clients"] for s in summary})
    fig, axes = plt.subplots(1, len(fleets), figsize=(6 * len(fleets), 4.5), squeeze=False)
    for ax, clients in zip(axes[0], fleets, strict=True):
        for s in (s for s in summary if s["clients"] == clients):
            marker = "*" if s["label"].startswith("Fed-SB") else "o"
            group = [r for r in runs if (r["label"], r["clients"]) == (s["label"], clients)]
            path_line = ax.plot(
                [b / 1e6 for b in mean_curve(group, "cumulative_upload_bytes")[1:]],
                [100 * a for a in mean_curve(group, "accuracy_per_round")[1:]],
                "-",
                alpha=0.35,
                linewidth=1,
            )
            ax.errorbar(
                s["cumulative_upload_bytes"] / 1e6,
                100 * s["accuracy_mean"],
                yerr=100 * s["accuracy_std"],
                fmt=marker,
                color=path_line[0].get_color(),
                markersize=12 if marker == "*" else 7,
                capsize=3,
                label=s["label"],
            )
        ax.set(
            xscale="log",
            xlabel="cumulative upload, all clients (MB, log)",
            ylabel="test accuracy (%)",
            title=f"{clients} non-IID clients (lines: mean after rounds 1-5)",
        )
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def score(run: dict[str, Any]) -> float:
    """A tuning run's score: mean validation accuracy of its last SCORED_ROUNDS rounds."""
    return statistics.mean(run["accuracy_per_round"][-SCORED_ROUNDS:])


def choose(grid_runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm, the grid point with the best score (the first one on a tie)."""
    best: dict[str, dict[str, Any]] = {}
    for run in grid_runs:
        label = run["label"]
        if label not in best or run["score"] > best[label]["score"]:
            best[label] = {k: run[k] for k in ("lr", "head_lr", "score", "final_accuracy")}
    return best


def tune(arms: list[tuple[str, str, int]], out: Path, *, redo: bool = False) -> None:
    """Every arm × the whole grid at 10 clients, seed 0, on the validation split; resumable.

    With `redo`, the arms' earlier grid runs are dropped first (after a change to the method).
    """
    done: list[dict[str, Any]] = []
    if TUNING.exists():
        old = json.loads(TUNING.read_text())
        labels = {label for label, _, _ in arms} if redo else set()
        if old["rounds"] == TUNE["rounds"]:  # keep the runs of grid points still in GRID
            done = [
                r
                for r in old["grid_runs"]
                if r["lr"] in GRID["lr"]
                and r["head_lr"] in GRID["head_lr"]
                and r["label"] not in labels
            ]
    started = time.time()
    (seed, clients), per_round = TUNE["plan"][0], TUNE["clients_per_round"]
    for lr in GRID["lr"]:  # grid outside, arms inside: a cut-short run covers every arm alike
        for head_lr in GRID["head_lr"]:
            for label, method, rank in arms:
                key = (label, lr, head_lr)
                if any((r["label"], r["lr"], r["head_lr"]) == key for r in done):
                    continue
                if head_is_frozen(label) and head_lr != GRID["head_lr"][-1]:
                    continue  # the head lr is unused: one grid column is enough
                extra = TUNE["overrides"] | {"federation.lr": lr, "federation.head_lr": head_lr}
                run = run_arm(
                    label, method, rank, clients, per_round, seed, TUNE["rounds"], out, extra
                )
                run["score"] = score(run)
                done.append(run)
                print(
                    f"{label:15s} lr {lr:g} head_lr {head_lr:g}: validation "
                    f"{' '.join(f'{100 * a:.1f}' for a in run['accuracy_per_round'])} "
                    f"score {100 * run['score']:.1f}%  {run['seconds']} s",
                    flush=True,
                )
                record = {
                    "task": "examples/demo.toml (all-MiniLM-L6-v2, chatterbot topics, Dirichlet 0.5)",
                    "protocol": (
                        f"{clients} clients, {per_round} per round, seed {seed}, "
                        f"{TUNE['rounds']} rounds × 5 local steps, AdamW; trained on the train "
                        "split minus a stratified 20% validation split and evaluated on that "
                        "(data.evaluate_on = 'validation'); the test set is never used"
                    ),
                    "selection": (
                        f"per method the grid point with the best mean validation accuracy over "
                        f"the last {SCORED_ROUNDS} rounds"
                    ),
                    "grid": GRID,
                    "rounds": TUNE["rounds"],
                    "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
                    "chosen": choose(done),
                    "grid_runs": done,
                }
                TUNING.write_text(json.dumps(record, indent=2) + "\n")  # resumable
    for label, pick in choose(done).items():
        print(
            f"chosen {label:15s} lr {pick['lr']:g} head_lr {pick['head_lr']:g} "
            f"score {100 * pick['score']:.1f}%"
        )


def head_is_frozen(label: str) -> bool:
    """Does the arm keep the probed head fixed (so its head learning rate is unused)?"""
    return label.endswith(FROZEN_HEAD)


def tuned_learning_rates(arms: list[tuple[str, str, int]]) -> dict[str, dict[str, float]]:
    """The learning rates `--tune` chose for each arm, as config overrides."""
    if not TUNING.exists():
        raise SystemExit(f"{TUNING} is missing: run `python experiments/accuracy_comm.py --tune`")
    chosen = json.loads(TUNING.read_text())["chosen"]
    missing = [label for label, _, _ in arms if label not in chosen]
    if missing:
        raise SystemExit(f"{TUNING.name} has no choice for {', '.join(missing)}: run --tune")
    return {
        label: {
            "federation.lr": chosen[label]["lr"],
            "federation.head_lr": chosen[label]["head_lr"],
        }
        for label, _, _ in arms
    }


def compare(
    quick: bool, chosen: list[tuple[str, str, int]] | None, out: Path, *, resume: bool = False
) -> None:
    """The published comparison (each arm at its tuned lrs) or the quick smoke run.

    With `chosen` arms, runs those only and puts them in place of their earlier runs in the
    published JSON, keeping the other arms' runs. With `resume`, runs already in the JSON at the
    same learning rates are kept and only the plan's missing (arm, seed, fleet) runs are made.
    """
    plan = QUICK if quick else FULL
    arms = chosen or plan["arms"]
    extra = chosen is not None
    arm_lrs = {} if quick else tuned_learning_rates(arms)
    started = time.time()
    result_name = "accuracy_comm_quick.json" if quick else "accuracy_comm.json"
    dest = (ROOT / QUICK_RESULTS if quick else RESULTS) / result_name
    dest.parent.mkdir(parents=True, exist_ok=True)
    labels = {label for label, _, _ in arms}
    fresh: dict[str, Any] = {"runs": [], "wall_seconds": 0.0}
    earlier = json.loads(dest.read_text()) if (extra or resume) and dest.exists() else fresh
    runs = [r for r in earlier["runs"] if resume or r["label"] not in labels]
    record: dict[str, Any] | None = None
    for seed, clients in plan["plan"]:
        for label, method, rank in arms:
            overrides = plan.get("overrides", {}) | arm_lrs.get(label, {})
            if resume and any(already_run(r, label, seed, clients, overrides) for r in runs):
                continue
            run = run_arm(
                label,
                method,
                rank,
                clients,
                plan["clients_per_round"],
                seed,
                plan["rounds"],
                out,
                overrides,
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
                "learning_rates": (
                    "demo.toml's (lr 1e-2, head_lr 1e-1) for every arm"
                    if quick
                    else f"per arm, tuned on a validation split: {TUNING.name}"
                ),
                "quick": quick,
                "started": earlier.get(
                    "started", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
                ),
                "wall_seconds": round(earlier["wall_seconds"] + time.time() - started, 1),
                "summary": summarise(runs),
                "paired_gaps": paired_gaps(runs, REFERENCES),
                "runs": runs,
            }
            dest.write_text(json.dumps(record, indent=2) + "\n")  # partial results survive
            if not quick:
                plot(record["summary"], ROOT / "docs" / "img" / "accuracy_comm.png", runs)
    if record is None:
        print(f"{dest.name} already holds every planned run: nothing to do")
        return
    for s in record["summary"]:
        print(
            f"{s['clients']:3d} clients {s['label']:15s} "
            f"{100 * s['accuracy_mean']:5.1f} ± {100 * s['accuracy_std']:.1f}%  "
            f"cumulative upload {s['cumulative_upload_bytes'] / 1e6:.2f} MB"
        )
    for g in record["paired_gaps"]:
        print(
            f"{g['clients']:3d} clients {g['reference']} - {g['against']:15s} "
            f"{100 * g['gap_mean']:+5.1f} ± {100 * g['gap_std']:.1f} points, "
            f"ahead or level in {g['reference_ahead_or_level']} of {len(g['seeds'])} seeds"
        )


def already_run(
    run: dict[str, Any], label: str, seed: int, clients: int, overrides: dict[str, Any]
) -> bool:
    """Is `run` the planned (arm, seed, fleet) at the learning rates it would run with now?"""
    return (run["label"], run["seed"], run["clients"]) == (label, seed, clients) and (
        run["lr"] == overrides.get("federation.lr", run["lr"])
        and run["head_lr"] == overrides.get("federation.head_lr", run["head_lr"])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    mode.add_argument("--tune", action="store_true", help="learning-rate grid on validation data")
    mode.add_argument(
        "--replot", action="store_true", help="redraw the PNG and the paired gaps from the JSON"
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=[label for label, _, _ in ALL_ARMS],
        help="run only these arms, replacing their earlier results (tuning: their grid runs)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the published runs at the same learning rates; run only the missing ones",
    )
    parser.add_argument("--out", default=None, help="run folders (default: runs/...)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    if args.replot:
        record = json.loads((RESULTS / "accuracy_comm.json").read_text())
        record["paired_gaps"] = paired_gaps(record["runs"], REFERENCES)
        (RESULTS / "accuracy_comm.json").write_text(json.dumps(record, indent=2) + "\n")
        plot(record["summary"], ROOT / "docs" / "img" / "accuracy_comm.png", record["runs"])
        return
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    logging.basicConfig(level=logging.WARNING)
    folder = "accuracy_tuning" if args.tune else "accuracy_comm" + ("_quick" if args.quick else "")
    out = Path(args.out or ROOT / "runs" / folder)
    chosen = [arm for arm in ALL_ARMS if arm[0] in args.arms] if args.arms else None
    if args.tune:
        tune(chosen or ARMS, out, redo=chosen is not None)
    else:
        compare(args.quick, chosen, out, resume=args.resume)


if __name__ == "__main__":
    main()
