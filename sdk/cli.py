"""The `fedsb` command line, and the one place that wires clients, aggregator and transport."""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedsb.aggregator.server import FederatedServer
from fedsb.edge_client.client import FederatedClient, lora_config_of

from .adapter import adapter_state
from .config import JobConfig, config_to_dict, load_config
from .errors import FedsbError
from .report import RunRecorder, save_adapter, summarise
from .simulation import FleetSetup, initial_server_model, prepare_fleet

log = logging.getLogger("fedsb")
console = Console(stderr=True)


def make_clients(job: JobConfig, fleet: FleetSetup) -> list[FederatedClient]:
    """One client per shard, each with its own copy of the base model."""
    return [
        FederatedClient(
            f"client-{i:04d}",
            copy.deepcopy(fleet.base_model),
            fleet.train.select(shard),
            job,
            rank=job.client_rank(i),
        )
        for i, shard in enumerate(fleet.shards)
    ]


def select_clients(
    job: JobConfig, clients: list[FederatedClient], round_no: int
) -> list[FederatedClient]:
    """The clients that train this round (all, or a seeded sample of clients_per_round)."""
    k = job.federation.clients_per_round
    if k is None or k >= len(clients):
        return clients
    generator = torch.Generator().manual_seed(job.seed * 7919 + round_no)
    picked = torch.randperm(len(clients), generator=generator)[:k]
    return [clients[i] for i in sorted(picked.tolist())]


def run_simulation(
    job: JobConfig, out_dir: str | Path, *, transport: str = "inproc", quiet: bool = False
) -> dict[str, Any]:
    """Run a whole federated job in this process and write the run folder; return a summary."""
    if transport != "inproc":
        raise FedsbError(f"transport {transport!r} is not available yet; use --transport inproc")
    started = time.perf_counter()
    fleet = prepare_fleet(job)
    server_model, method = initial_server_model(job, fleet, lora_config_of(job))
    server = FederatedServer(job, server_model, method)
    clients = make_clients(job, fleet)
    evaluator = FederatedClient(
        "evaluator", copy.deepcopy(fleet.base_model), fleet.test, job, rank=job.adapter.rank
    )
    frozen = evaluator.evaluate()  # ΔW = 0: the pretrained model with the initial head
    adapter = server.adapter_payload()
    for participant in [*clients, evaluator]:
        participant.receive_adapter(adapter)
    recorder = RunRecorder(out_dir, config_to_dict(job))
    cumulative = 0
    payload = server.global_payload()
    evaluator.receive_global(payload)
    recorder.log(round_row(0, evaluator.evaluate(), 0, 0, len(adapter), 0, 0.0))
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    ) as progress:
        rounds = progress.add_task(f"{job.federation.method} rounds", total=job.federation.rounds)
        for round_no in range(job.federation.rounds):
            payload = server.global_payload()
            selected = select_clients(job, clients, round_no)
            step = progress.add_task(f"  round {round_no + 1} clients", total=len(selected))
            for client in clients:
                client.receive_global(payload)
            for client in selected:
                server.submit(client.client_id, client.train_round())
                progress.advance(step)
            result = server.close_round()
            progress.remove_task(step)
            upload = sum(result.upload_bytes.values())
            cumulative += upload
            evaluator.receive_global(server.global_payload())
            metrics = evaluator.evaluate()
            recorder.log(
                round_row(
                    round_no + 1,
                    metrics,
                    upload // len(result.clients),
                    len(payload),
                    len(adapter),
                    cumulative,
                    result.mean_loss,
                    len(result.clients),
                )
            )
            progress.advance(rounds)
    recorder.plot(f"{job.name}: {job.federation.method}, {job.federation.clients} clients")
    save_adapter(
        Path(out_dir) / "adapter",
        adapter_state(evaluator.model, job.adapter.modules_to_save),
        adapter_description(job, fleet),
    )
    if not quiet:
        recorder.print_table(Console())
    summary = summarise(recorder.rows) | {
        "accuracy_frozen": frozen["accuracy"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    summary["final_state"] = server.broadcast
    return summary


def round_row(
    round_no: int,
    metrics: dict[str, float],
    upload: int,
    download: int,
    adapter: int,
    cumulative: int,
    train_loss: float,
    clients: int = 0,
) -> dict[str, Any]:
    """One line of metrics.jsonl."""
    return {
        "round": round_no,
        "accuracy": metrics["accuracy"],
        "loss": metrics["loss"],
        "train_loss": train_loss,
        "clients": clients,
        "upload_bytes_per_client": upload,
        "download_bytes_per_client": download,
        "adapter_download_bytes": adapter,
        "cumulative_upload_bytes": cumulative,
    }


def adapter_description(job: JobConfig, fleet: FleetSetup) -> dict[str, Any]:
    """adapter_config.json: what an exporter needs to rebuild the model around the tensors."""
    return {
        "format": "fedsb-adapter/1",
        "base_model": job.model.name,
        "num_labels": len(fleet.split.train.label_names),
        "label_names": fleet.split.train.label_names,
        "method": job.federation.method,
        "adapter": config_to_dict(job)["adapter"],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsb", description="Federated fine-tuning with Fed-SB.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser(
        "simulate",
        help="run a whole federated job on this machine",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sim.add_argument("--config", required=True, help="job file (TOML), see examples/")
    sim.add_argument("--out", default=None, help="run folder (default: runs/<job name>)")
    sim.add_argument(
        "--transport", choices=["inproc"], default="inproc", help="how messages travel"
    )
    sim.add_argument("--rounds", type=int, help="override federation.rounds")
    sim.add_argument("--clients", type=int, help="override federation.clients")
    sim.add_argument("--method", help="override federation.method")
    sim.add_argument("--seed", type=int, help="override seed")
    sim.add_argument("--quiet", action="store_true", help="no progress bars or table")
    return parser


def simulate_command(args: argparse.Namespace) -> int:
    overrides = {
        k: v
        for k, v in {
            "federation.rounds": args.rounds,
            "federation.clients": args.clients,
            "federation.method": args.method,
            "seed": args.seed,
        }.items()
        if v is not None
    }
    job = load_config(args.config, overrides)
    out = Path(args.out or Path("runs") / job.name)
    summary = run_simulation(job, out, transport=args.transport, quiet=args.quiet)
    console.print(
        f"accuracy: frozen model {100 * summary['accuracy_frozen']:.1f}%, after init "
        f"{100 * summary['accuracy_before']:.1f}% → {100 * summary['accuracy_after']:.1f}% "
        f"in {summary['rounds']} rounds, {summary['seconds']} s; outputs in {out}/"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedsb` command; user mistakes end with one line and exit code 2."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        return simulate_command(args)
    except FedsbError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
