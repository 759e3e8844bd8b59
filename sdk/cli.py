"""The `fedsb` command line, and the one place that wires clients, aggregator and transport."""

from __future__ import annotations

import argparse
import copy
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedsb.aggregator.broker import start_embedded_broker
from fedsb.aggregator.server import FederatedServer, RoundResult
from fedsb.aggregator.service import AggregatorService
from fedsb.edge_client.client import FederatedClient
from fedsb.edge_client.service import ClientService

from .adapter import adapter_state
from .config import JobConfig, config_to_dict, load_config
from .errors import FedsbError
from .mqtt import parse_broker_url
from .report import RunRecorder, adapter_description, save_adapter, summarise
from .simulation import initial_server_model, prepare_fleet

log = logging.getLogger("fedsb")
console = Console(stderr=True, soft_wrap=True)  # one error, one line


def dropped_clients(job: JobConfig, client_ids: list[str], round_no: int) -> set[str]:
    """Seeded simulated dropout: who skips this round (never everyone)."""
    if job.simulation.dropout == 0:
        return set()

    def draw(client_id: str) -> float:
        digest = hashlib.sha256(f"{job.seed}/{client_id}/{round_no}".encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64

    dropped = {c for c in client_ids if draw(c) < job.simulation.dropout}
    return dropped - {max(client_ids, key=draw)} if dropped == set(client_ids) else dropped


def client_delay(job: JobConfig, index: int) -> float:
    """Extra seconds per round for the first `slow_fraction` of the clients (simulation)."""
    slow = index < round(job.simulation.slow_fraction * job.federation.clients)
    return job.simulation.slow_delay_s if slow else 0.0


def select_clients(
    job: JobConfig, clients: list[FederatedClient], round_no: int
) -> list[FederatedClient]:
    """The clients that train this round: a seeded sample of clients_per_round, less dropouts."""
    k = job.federation.clients_per_round
    picked = clients
    if k is not None and k < len(clients):
        generator = torch.Generator().manual_seed(job.seed * 7919 + round_no)
        picked = [
            clients[i]
            for i in sorted(torch.randperm(len(clients), generator=generator)[:k].tolist())
        ]
    dropped = dropped_clients(job, [c.client_id for c in clients], round_no)
    return [c for c in picked if c.client_id not in dropped] or picked[:1]


class Simulation:
    """A whole federated job on this machine: real model and data, any transport, one run folder."""

    def __init__(self, job: JobConfig, out_dir: str | Path, *, quiet: bool = False) -> None:
        self.job = job
        self.out = Path(out_dir)
        self.quiet = quiet
        self.started = time.perf_counter()
        self.fleet = prepare_fleet(job)
        model, method = initial_server_model(job, self.fleet)
        self.server = FederatedServer.from_model(job, model, method)
        self.clients = [
            FederatedClient(
                f"client-{i:04d}",
                copy.deepcopy(self.fleet.base_model),
                self.fleet.train.select(shard),
                job,
                rank=job.client_rank(i),
            )
            for i, shard in enumerate(self.fleet.shards)
        ]
        self.evaluator = FederatedClient(
            "evaluator",
            copy.deepcopy(self.fleet.base_model),
            self.fleet.test,
            job,
            rank=job.adapter.rank,
        )
        self.frozen = (
            self.evaluator.evaluate()
        )  # ΔW = 0: the pretrained model with the initial head
        self.adapter = self.server.adapter_payload()
        self.evaluator.receive_adapter(self.adapter)
        self.recorder = RunRecorder(self.out, config_to_dict(job))
        self.cumulative = 0
        self.evaluate_and_log(None, self.server.global_payload(), 0)

    def evaluate_and_log(self, result: RoundResult | None, payload: bytes, download: int) -> None:
        """Evaluate the global state in `payload` on the test set and append the round's metrics."""
        self.evaluator.receive_global(payload)
        metrics = self.evaluator.evaluate()
        upload = sum(result.upload_bytes.values()) if result else 0
        self.cumulative += upload
        self.recorder.log(
            {
                "round": result.round + 1 if result else 0,
                "accuracy": metrics["accuracy"],
                "loss": metrics["loss"],
                "train_loss": result.mean_loss if result else 0.0,
                "clients": len(result.clients) if result else 0,
                "upload_bytes_per_client": upload // len(result.clients) if result else 0,
                "download_bytes_per_client": download,
                "adapter_download_bytes": len(self.adapter),
                "cumulative_upload_bytes": self.cumulative,
            }
        )

    def progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=self.quiet,
        )

    def run_inproc(self) -> None:
        """Messages handed over by function calls, clients trained one after another."""
        for client in self.clients:
            client.receive_adapter(self.adapter)
        with self.progress() as progress:
            rounds = progress.add_task(
                f"{self.job.federation.method} rounds", total=self.job.federation.rounds
            )
            for round_no in range(self.job.federation.rounds):
                payload = self.server.global_payload()
                selected = select_clients(self.job, self.clients, round_no)
                step = progress.add_task(f"  round {round_no + 1} clients", total=len(selected))
                for client in self.clients:
                    client.receive_global(payload)
                for client in selected:
                    self.server.submit(client.client_id, client.train_round())
                    progress.advance(step)
                result = self.server.close_round()
                progress.remove_task(step)
                self.evaluate_and_log(result, self.server.global_payload(), len(payload))
                progress.advance(rounds)

    def run_mqtt(self, broker_url: str | None, ca_file: str | None = None) -> None:
        """Aggregator and clients as threads talking only through a broker (embedded by default)."""
        broker = start_embedded_broker() if broker_url is None else None
        address = parse_broker_url(broker.url if broker else str(broker_url), ca_file=ca_file)
        state_dir = self.out / "aggregator"
        shutil.rmtree(
            state_dir, ignore_errors=True
        )  # a simulation starts fresh; `fedsb aggregator` resumes
        lock = threading.Lock()  # 2 cores: train one client at a time, as the in-process run does
        errors: list[BaseException] = []
        with self.progress() as progress:
            rounds = progress.add_task(
                f"{self.job.federation.method} rounds over MQTT", total=self.job.federation.rounds
            )
            download = [len(self.server.global_payload())]

            def on_round_closed(result: RoundResult, payload: bytes) -> None:
                with lock:
                    self.evaluate_and_log(result, payload, download[0])
                download[0] = len(payload)
                progress.advance(rounds)

            aggregator = AggregatorService(
                self.job, self.server, address, state_dir, on_round_closed=on_round_closed
            )
            services = [
                ClientService(
                    c,
                    address,
                    skip_round=self.dropout_rule(c.client_id),
                    delay_s=client_delay(self.job, i),
                    compute_lock=lock,
                )
                for i, c in enumerate(self.clients)
            ]
            threads = [threading.Thread(target=guarded(aggregator.run, errors), name="aggregator")]
            threads += [
                threading.Thread(target=guarded(s.run, errors), name=s.client.client_id)
                for s in services
            ]
            try:
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            finally:
                if broker:
                    broker.stop()
        if errors:
            raise errors[0]

    def dropout_rule(self, client_id: str) -> Callable[[int], bool]:
        ids = [c.client_id for c in self.clients]
        return lambda round_no: client_id in dropped_clients(self.job, ids, round_no)

    def finish(self) -> dict[str, Any]:
        """Plots, final adapter, table; the run's summary (with the final global state)."""
        job = self.job
        self.recorder.plot(f"{job.name}: {job.federation.method}, {job.federation.clients} clients")
        save_adapter(
            self.out / "adapter",
            adapter_state(self.evaluator.model, job.adapter.modules_to_save),
            adapter_description(job, self.fleet.split.train.label_names),
        )
        if not self.quiet:
            self.recorder.print_table(Console())
        return summarise(self.recorder.rows) | {
            "accuracy_frozen": self.frozen["accuracy"],
            "seconds": round(time.perf_counter() - self.started, 1),
            "final_state": self.server.broadcast,
            "rejections": dict(self.server.rejections),
        }


def guarded(target: Callable[[], Any], errors: list[BaseException]) -> Callable[[], None]:
    """Run `target` in a thread and keep its exception for the main thread."""

    def run() -> None:
        try:
            target()
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            errors.append(err)

    return run


def run_simulation(
    job: JobConfig,
    out_dir: str | Path,
    *,
    transport: str | None = None,
    broker_url: str | None = None,
    ca_file: str | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run a whole federated job on this machine and write the run folder; return a summary."""
    sim = Simulation(job, out_dir, quiet=quiet)
    if (transport or job.simulation.transport) == "inproc":
        sim.run_inproc()
    else:
        sim.run_mqtt(broker_url, ca_file)
    return sim.finish()


# ---- commands -------------------------------------------------------------------------------


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
    summary = run_simulation(
        job,
        out,
        transport=args.transport,
        broker_url=args.broker,
        ca_file=args.ca_file,
        quiet=args.quiet,
    )
    console.print(
        f"accuracy: frozen model {100 * summary['accuracy_frozen']:.1f}%, after init "
        f"{100 * summary['accuracy_before']:.1f}% → {100 * summary['accuracy_after']:.1f}% "
        f"in {summary['rounds']} rounds, {summary['seconds']} s; outputs in {out}/"
    )
    return 0


def aggregator_command(args: argparse.Namespace) -> int:
    job = load_config(args.config)
    fleet = prepare_fleet(job)
    model, method = initial_server_model(job, fleet)
    server = FederatedServer.from_model(job, model, method)
    address = parse_broker_url(args.broker, ca_file=args.ca_file)

    def report(result: RoundResult, payload: bytes) -> None:
        console.print(
            f"round {result.round + 1} closed: {len(result.clients)} updates, "
            f"train loss {result.mean_loss:.3f}, rejected so far {dict(server.rejections)}"
        )

    service = AggregatorService(
        job, server, address, args.state_dir, on_round_closed=report, mqtt5=args.mqtt5
    )
    state_dir = service.run()
    save_adapter(  # Fed-SB: frozen B, A from the adapter, final R and head from the global
        Path(state_dir) / "adapter",
        server.adapter | server.broadcast,
        adapter_description(job, fleet.split.train.label_names),
    )
    console.print(f"job {job.name} done; final adapter in {state_dir}/adapter")
    return 0


def client_command(args: argparse.Namespace) -> int:
    job = load_config(args.config)
    fleet = prepare_fleet(job)
    if not 0 <= args.data_shard < len(fleet.shards):
        raise FedsbError(
            f"--data-shard must be in 0..{len(fleet.shards) - 1}, got {args.data_shard}"
        )
    client = FederatedClient(
        args.client_id,
        fleet.base_model,
        fleet.train.select(fleet.shards[args.data_shard]),
        job,
        rank=args.rank or job.client_rank(args.data_shard),
    )
    address = parse_broker_url(args.broker, ca_file=args.ca_file)
    state_file = args.state_file or f".fedsb-client-{job.name}-{args.client_id}.json"
    ClientService(client, address, state_file=state_file).run()
    console.print(f"client {args.client_id}: job {job.name} done")
    return 0


def broker_command(args: argparse.Namespace) -> int:
    from fedsb.aggregator.broker import (
        MosquittoUsers,
        parse_auth_file,
        start_mosquitto,
        write_mosquitto_config,
    )

    if args.mosquitto:
        users: MosquittoUsers | None = (
            parse_auth_file(Path(args.auth_file)) if args.auth_file else None
        )
        config = write_mosquitto_config(
            Path(args.dir), port=args.port or 1883, users=users, tls=args.tls
        )
        handle = start_mosquitto(config)
    else:
        if args.tls or args.auth_file:
            raise FedsbError(
                "--tls and --auth-file need --mosquitto (the embedded broker is for local use)"
            )
        handle = start_embedded_broker(args.port)
    try:
        with handle:
            url = handle.url + (f" (CA: {handle.ca_file})" if handle.ca_file else "")
            console.print(f"{handle.kind} broker listening at {url}; Ctrl-C stops it")
            while True:
                time.sleep(1)
    except KeyboardInterrupt:
        console.print("broker stopped")
    return 0


def add_broker_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--broker",
        required=required,
        default=None,
        help="mqtt[s]://user:pass@host:port" + ("" if required else " (default: embedded broker)"),
    )
    parser.add_argument("--ca-file", default=None, help="CA certificate for mqtts:// brokers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsb", description="Federated fine-tuning with Fed-SB.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    sim = sub.add_parser(
        "simulate", help="run a whole federated job on this machine", formatter_class=fmt
    )
    sim.add_argument("--config", required=True, help="job file (TOML), see examples/")
    sim.add_argument("--out", default=None, help="run folder (default: runs/<job name>)")
    sim.add_argument(
        "--transport",
        choices=["mqtt", "inproc"],
        default=None,
        help="how messages travel (default: simulation.transport, i.e. mqtt)",
    )
    add_broker_options(sim, required=False)
    sim.add_argument("--rounds", type=int, help="override federation.rounds")
    sim.add_argument("--clients", type=int, help="override federation.clients")
    sim.add_argument("--method", help="override federation.method")
    sim.add_argument("--seed", type=int, help="override seed")
    sim.add_argument("--quiet", action="store_true", help="no progress bars or table")
    sim.set_defaults(handler=simulate_command)

    agg = sub.add_parser(
        "aggregator", help="serve a job's rounds over a broker", formatter_class=fmt
    )
    agg.add_argument("--config", required=True)
    add_broker_options(agg, required=True)
    agg.add_argument("--state-dir", required=True, help="checkpoints; an existing one is resumed")
    agg.add_argument(
        "--mqtt5",
        action="store_true",
        help="MQTT 5 with a receive maximum (mosquitto): the broker holds the backlog",
    )
    agg.set_defaults(handler=aggregator_command)

    cli = sub.add_parser(
        "client", help="take part in a job as one edge client", formatter_class=fmt
    )
    cli.add_argument("--config", required=True)
    add_broker_options(cli, required=True)
    cli.add_argument("--client-id", required=True)
    cli.add_argument(
        "--data-shard", type=int, default=0, help="which partition of the job's data is local"
    )
    cli.add_argument(
        "--rank", type=int, default=None, help="this device's rank r_k <= adapter.rank"
    )
    cli.add_argument(
        "--state-file", default=None, help="where the rounds already sent are recorded"
    )
    cli.set_defaults(handler=client_command)

    brk = sub.add_parser(
        "broker",
        help="run an MQTT broker (embedded, or mosquitto with TLS/auth/ACL)",
        formatter_class=fmt,
    )
    brk.add_argument(
        "--port", type=int, default=None, help="listening port (default: a free one / 1883)"
    )
    brk.add_argument(
        "--mosquitto", action="store_true", help="write a mosquitto config and run mosquitto"
    )
    brk.add_argument(
        "--tls", action="store_true", help="TLS with a generated self-signed CA (mosquitto)"
    )
    brk.add_argument(
        "--auth-file", default=None, help="TOML users file: passwords and ACL (mosquitto)"
    )
    brk.add_argument(
        "--dir", default="runs/broker", help="where the mosquitto config and certificates go"
    )
    brk.set_defaults(handler=broker_command)
    return parser


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
    transformers.logging.disable_progress_bar()
    try:
        return int(args.handler(args))
    except FedsbError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        return 2
    except OSError as err:  # unwritable run folder, disk full, unreadable file
        console.print(f"[red]error:[/red] {err}", highlight=False)
        return 1
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
