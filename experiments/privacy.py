"""Private federated fine-tuning: accuracy at ε ∈ {1, 3, ∞} for Fed-SB, FFA-LoRA, FedIT, FedEx-LoRA.

Every method trains with the same DP-SGD (Opacus, per-example clipping, Poisson sampling,
RDP accounting, δ = 1e-5) on the demo model and data split over 3 and 10 clients; Fed-SB
also runs with the federated LoRA-SB initialisation (no pooled data). Writes
benchmarks/results/privacy.json and docs/img/privacy.png.
Usage: python experiments/privacy.py [--quick] [--model DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from fedsb.adapter import apply_lora_sb  # noqa: E402
from fedsb.aggregator.server import RoundResult  # noqa: E402
from fedsb.cli import Simulation  # noqa: E402
from fedsb.config import JobConfig, load_config  # noqa: E402
from fedsb.methods import get_method  # noqa: E402
from fedsb.privacy import DPSGDSettings, train_private  # noqa: E402
from fedsb.report import save_figure  # noqa: E402
from fedsb.simulation import prepare_fleet  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EPSILONS = [1.0, 3.0, math.inf]
VARIANTS = {  # label: (method, init)
    "Fed-SB": ("fedsb", "lora-sb"),
    "Fed-SB, federated init": ("fedsb", "lora-sb-federated"),
    "FFA-LoRA": ("ffa", "lora-sb"),
    "FedIT": ("fedit", "lora-sb"),
    "FedEx-LoRA": ("fedex", "lora-sb"),
}
FULL = {"clients": [3, 10], "rounds": 4, "local_steps": 3, "per_round": 3, "max_length": 20}
QUICK = {"clients": [3], "rounds": 1, "local_steps": 1, "per_round": 3, "max_length": 16}
QUICK_EPSILONS = [1.0]


def job_for(
    settings: dict[str, Any], clients: int, variant: str, epsilon: float, model: str | None
) -> JobConfig:
    """The demo job with this experiment's schedule, method, init and privacy."""
    method, init = VARIANTS[variant]
    rounds, per_round = settings["rounds"], min(settings["per_round"], clients)
    overrides: dict[str, Any] = {
        "name": f"privacy-{method}-{clients}",
        "federation.clients": clients,
        "federation.clients_per_round": per_round,
        "federation.rounds": rounds,
        "federation.local_steps": settings["local_steps"],
        "federation.method": method,
        "adapter.init": init,
        "model.max_length": settings["max_length"],
        "simulation.transport": "inproc",
    }
    if model:
        overrides |= {"model.name": model, "adapter.rank": 4, "data.max_train_examples": 120}
    if math.isfinite(epsilon):
        overrides |= {
            "privacy.mode": "dp-sgd",
            "privacy.epsilon": epsilon,
            "privacy.accountant": "rdp",
            # ε is spread over the rounds a client expects to be sampled for
            "privacy.budget_rounds": math.ceil(rounds * per_round / clients),
        }
    return load_config(ROOT / "examples" / "demo.toml", overrides)


class FinalRoundSimulation(Simulation):
    """Evaluates the test set after the last round only: on 2 shared cores a test pass costs
    as much as several rounds of training, and the experiment reports final accuracy."""

    def evaluate_and_log(self, result: RoundResult | None, payload: bytes, download: int) -> None:
        final = result is not None and result.round + 1 == self.job.federation.rounds
        if final:
            self.evaluator.__dict__.pop("evaluate", None)  # the real evaluation
        else:
            self.evaluator.evaluate = lambda data=None: {"accuracy": math.nan, "loss": math.nan}  # type: ignore[method-assign]
        super().evaluate_and_log(result, payload, download)


def run(job: JobConfig, out: Path) -> dict[str, Any]:
    """One in-process job, evaluated at the end; its summary."""
    sim = FinalRoundSimulation(job, out, quiet=True)
    sim.run_inproc()
    return sim.finish()


def ghost_timing(job: JobConfig, steps: int = 3) -> dict[str, dict[str, float]]:
    """Seconds per DP-SGD step of one client with Opacus hooks vs ghost clipping."""
    fleet = prepare_fleet(job)
    data = fleet.train.select(fleet.shards[0])
    timing: dict[str, dict[str, float]] = {}
    for method in ("fedsb", "fedit"):
        model = apply_lora_sb(copy.deepcopy(fleet.base_model), job.lora_config())
        get_method(method).initialise(model, seed=0)
        get_method(method).mark_trainable(model, job.adapter.trained_modules)
        timing[method] = {}
        for mode in ("hooks", "ghost"):
            settings = DPSGDSettings(1.0, 1.0, job.federation.batch_size / len(data), 16, mode)
            start = time.perf_counter()
            train_private(model, data, settings, steps=steps, lr=1e-2, head_lr=1e-1, seed=0)
            timing[method][mode] = round((time.perf_counter() - start) / steps, 3)
    return timing


def plot(results: dict[str, Any], path: Path) -> None:
    panels = sorted(results, key=int)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    labels = ["ε=1", "ε=3", "ε=∞"]
    for ax, clients in zip(axes[0], panels, strict=True):
        for variant, by_eps in results[clients].items():
            keys = [k for k in ("1", "3", "inf") if k in by_eps]
            acc = [100 * by_eps[k]["accuracy"] for k in keys]
            ax.plot(
                [labels[("1", "3", "inf").index(k)] for k in keys], acc, marker="o", label=variant
            )
        ax.set(title=f"{clients} clients (DP-SGD, δ=1e-5)", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    save_figure(fig, path)


def record(
    settings: dict[str, Any], args: argparse.Namespace, results: dict[str, Any], started: float
) -> dict[str, Any]:
    """The JSON written after every run (a cut-short experiment keeps what it measured)."""
    return {
        "setup": settings
        | {
            "model": args.model or "all-MiniLM-L6-v2",
            "dataset": "chatterbot-topics (dirichlet α=0.5)",
            "batch_size": 16,
            "max_grad_norm": 1.0,
            "delta": 1e-5,
            "accountant": "rdp",
            "seed": 0,
        },
        "results": results,
        "seconds": round(time.perf_counter() - started, 1),
    }


def save(data: dict[str, Any], out: Path) -> Path:
    """Results JSON and plot."""
    path = out / "benchmarks" / "results" / "privacy.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    plot(data["results"], out / "docs" / "img" / "privacy.png")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 3 clients (smoke test)")
    parser.add_argument("--model", default=None, help="local model directory (tests: tiny model)")
    parser.add_argument("--out", default=None, help="where results, plot and runs go")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    settings = QUICK if args.quick else FULL
    out = Path(args.out) if args.out else ROOT
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for clients in settings["clients"]:
        results[str(clients)] = {}
        for variant in VARIANTS:
            by_eps = results[str(clients)][variant] = {}
            for epsilon in QUICK_EPSILONS if args.quick else EPSILONS:
                job = job_for(settings, clients, variant, epsilon, args.model)
                run_dir = (
                    out / "runs" / "privacy" / f"{clients}-{variant}-{epsilon}".replace(" ", "")
                )
                summary = run(job, run_dir)
                key = "inf" if math.isinf(epsilon) else str(int(epsilon))
                by_eps[key] = {
                    "accuracy": summary["accuracy_after"],
                    "accuracy_frozen": summary["accuracy_frozen"],
                    "epsilon_spent": summary.get("epsilon"),
                    "seconds": summary["seconds"],
                }
                print(
                    f"{clients:3d} clients  {variant:24s} ε={key:3s} "
                    f"accuracy {100 * summary['accuracy_after']:.1f}% "
                    f"(max client ε spent {summary.get('epsilon')}, {summary['seconds']} s)",
                    flush=True,
                )
                save(record(settings, args, results, started), out)
    final = record(settings, args, results, started)
    if not args.quick:
        final["seconds_per_dp_step"] = ghost_timing(job_for(settings, 3, "Fed-SB", 1.0, None))
    results_path = save(final, out)
    print(f"wrote {results_path}")


if __name__ == "__main__":
    main()
