"""The `fedsb` command line, and the one place that wires clients, aggregator and transport."""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedsb.aggregator.broker import start_embedded_broker
from fedsb.aggregator.folded import FoldedModel, adapter_with_folds
from fedsb.aggregator.init_phase import InitPhase
from fedsb.aggregator.server import FederatedServer, RoundResult
from fedsb.aggregator.service import AggregatorService
from fedsb.aggregator.workers import WorkerAggregator
from fedsb.edge_client.client import FederatedClient
from fedsb.edge_client.service import ClientService

from .adapter import lora_layers
from .config import JobConfig, config_to_dict, load_config
from .errors import ConfigError, FedsbError
from .init_federated import FEDERATED_INITS
from .mqtt import DEFAULT_MAX_PACKET, parse_broker_url
from .report import RunRecorder, adapter_description, save_adapter, summarise
from .selection import sample_clients
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


def client_backend(job: JobConfig, index: int) -> str:
    """Training backend of simulated client `index`: simulation.backends cycled, else torch."""
    backends = job.simulation.backends
    return backends[index % len(backends)] if backends else "torch"


def select_clients(
    job: JobConfig, clients: list[FederatedClient], round_no: int
) -> list[FederatedClient]:
    """The clients that train this round: a seeded sample of clients_per_round, less dropouts."""
    by_id = {c.client_id: c for c in clients}
    picked = [by_id[i] for i in sample_clients(job, list(by_id), round_no)]
    dropped = dropped_clients(job, list(by_id), round_no)
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
        federated_init = job.adapter.init in FEDERATED_INITS
        self.init_phase = InitPhase(job, model) if federated_init else None
        self.init_traffic: dict[str, Any] = {}
        self.clients = [
            FederatedClient(
                f"client-{i:04d}",
                copy.deepcopy(self.fleet.base_model),
                self.fleet.train.select(shard),
                job,
                rank=job.client_rank(i),
                backend=client_backend(job, i),
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
        self.recorder = RunRecorder(self.out, config_to_dict(job))
        self.cumulative = 0
        if self.init_phase is None:
            self.start_rounds()

    def start_rounds(self, init_traffic: dict[str, Any] | None = None) -> None:
        """After initialisation: the adapter, and round 0's metrics (with the init's traffic)."""
        self.init_traffic = init_traffic or {}
        self.adapter = self.server.adapter_payload()
        self.evaluator.receive_adapter(self.adapter)
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
                "upload_bytes_per_client": upload // max(len(result.clients), 1) if result else 0,
                "download_bytes_per_client": download,
                "adapter_download_bytes": len(self.adapter),
                "cumulative_upload_bytes": self.cumulative,
            }
            | (self.init_traffic if result is None else {})
            | privacy_metrics(self.job, result)
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
        if self.init_phase is not None:
            self.run_init_inproc(self.init_phase)
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

    def run_init_inproc(self, phase: InitPhase) -> None:
        """The federated init's passes by function calls, then round 0 as usual."""
        with self.progress() as progress:
            task = progress.add_task(f"{phase.mode} init replies", total=None)
            while not phase.done:
                for client in self.clients:
                    phase.submit(client.client_id, client.init_reply(phase.request))
                    progress.advance(task)
                phase.close_pass()
        self.server.set_initial_model(phase.model)
        self.start_rounds(phase.traffic() | {"init_rejections": dict(phase.rejections)})

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

            def on_init_done(traffic: dict[str, Any]) -> None:
                with lock:
                    self.start_rounds(traffic)

            aggregator = AggregatorService(
                self.job,
                self.server,
                address,
                state_dir,
                on_round_closed=on_round_closed,
                init_phase=self.init_phase,
                on_init_done=on_init_done,
                roster=[c.client_id for c in self.clients],
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
        """Simulated dropout of a selected client (the aggregator's round message selects)."""

        ids = [c.client_id for c in self.clients]

        def skip(round_no: int) -> bool:
            trained = {c.client_id for c in select_clients(self.job, self.clients, round_no)}
            return client_id in sample_clients(self.job, ids, round_no) and client_id not in trained

        return skip

    def finish(self) -> dict[str, Any]:
        """Plots, final adapter, table; the run's summary (with the final global state)."""
        job = self.job
        self.recorder.plot(f"{job.name}: {job.federation.method}, {job.federation.clients} clients")
        base = self.fleet.base_model  # W0 before any fold: FedEx and FLoRA save their change
        start = {
            name: base.get_submodule(name).weight for name in lora_layers(self.evaluator.model)
        }
        save_adapter(
            self.out / "adapter",
            adapter_with_folds(self.evaluator.model, start, job.adapter.modules_to_save),
            adapter_description(job, self.fleet.split.train.label_names),
        )
        if not self.quiet:
            self.recorder.print_table(Console())
        summary = summarise(self.recorder.rows) | {
            "accuracy_frozen": self.frozen["accuracy"],
            "seconds": round(time.perf_counter() - self.started, 1),
            "final_state": self.server.broadcast,
            "rejections": dict(self.server.rejections),
            "init_traffic": self.init_traffic,
        }
        if "epsilon" in self.recorder.rows[-1]:  # private jobs: the ε reached
            summary["epsilon"] = self.recorder.rows[-1]["epsilon"]
        return summary


def privacy_metrics(job: JobConfig, result: RoundResult | None) -> dict[str, Any]:
    """The ε columns of a private job's metrics row: user-level ε, or the largest client ε."""
    if job.privacy.mode == "user-dp":
        return {"epsilon": result.epsilon if result else 0.0}
    if job.privacy.mode == "dp-sgd":
        return {
            "epsilon": result.client_epsilon if result else 0.0,
            "clients_budget_spent": len(result.budget_spent) if result else 0,
        }
    return {}


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


def run_light_simulation(
    job: JobConfig,
    out_dir: str | Path,
    *,
    broker_url: str | None = None,
    ca_file: str | None = None,
    connections: int = 8,
) -> dict[str, Any]:
    """The aggregator and `federation.clients` lightweight clients through a broker, no model.

    Each client sends a seeded, pre-computed Fed-SB update (rank `adapter.rank`, 48 BERT-base
    R blocks) when a round opens: a scale run of the transport and the aggregator.
    """
    from fedsb.aggregator.synthetic import synthetic_server
    from fedsb.edge_client.light import LightFleet
    from fedsb.synthetic import update_payload

    if job.federation.method != "fedsb":
        raise FedsbError("--light simulates Fed-SB updates only (federation.method = 'fedsb')")
    fed = job.federation
    payloads = [[update_payload(job, r, i) for i in range(fed.clients)] for r in range(fed.rounds)]
    broker = start_embedded_broker() if broker_url is None else None
    address = parse_broker_url(broker.url if broker else str(broker_url), ca_file=ca_file)
    state_dir = Path(out_dir) / "aggregator"
    shutil.rmtree(state_dir, ignore_errors=True)  # a simulation starts fresh
    closed: list[tuple[float, int]] = []
    aggregator = AggregatorService(
        job,
        synthetic_server(job),
        address,
        state_dir,
        on_round_closed=lambda result, _: closed.append((time.time(), len(result.clients))),
    )
    errors: list[BaseException] = []
    thread = threading.Thread(target=guarded(aggregator.run, errors), name="aggregator")
    try:
        thread.start()
        fleet = LightFleet(address, job.name, connections=connections)
        try:
            opened = fleet.run(lambda r, i: payloads[r][i], fed.clients, fed.rounds)
        finally:
            fleet.close()
        thread.join()
    finally:
        if broker:
            broker.stop()
    if errors:
        raise errors[0]
    rounds = [
        {"round": r, "clients": n, "seconds": round(t - opened[r], 3)}
        for r, (t, n) in enumerate(closed)
    ]
    summary = {
        "clients": fed.clients,
        "rounds": rounds,
        "rejections": dict(aggregator.server.rejections),
    }
    Path(out_dir, "light.json").write_text(json.dumps(summary, indent=2))
    return summary


# ---- commands -------------------------------------------------------------------------------


def simulate_command(args: argparse.Namespace) -> int:
    overrides = {
        k: v
        for k, v in {
            "federation.rounds": args.rounds,
            "federation.clients": args.clients,
            "federation.method": args.method,
            "adapter.init": args.init,
            "seed": args.seed,
            "simulation.backends": args.backends.split(",") if args.backends else None,
        }.items()
        if v is not None
    }
    job = load_config(args.config, overrides)
    out = Path(args.out or Path("runs") / job.name)
    if args.light:
        light = run_light_simulation(job, out, broker_url=args.broker, ca_file=args.ca_file)
        for r in light["rounds"]:
            console.print(
                f"round {r['round'] + 1}: {r['clients']} updates in {r['seconds']:.2f} s "
                f"({r['clients'] / max(r['seconds'], 1e-9):.0f} updates/s)"
            )
        console.print(f"rejected {light['rejections']}; outputs in {out}/")
        return 0
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
    if summary["init_traffic"]:
        console.print(init_line(summary["init_traffic"]))
    if "epsilon" in summary:
        console.print(
            f"privacy ({job.privacy.mode}): ε = {summary['epsilon']} at δ = {job.privacy.delta}"
        )
    return 0


def init_line(traffic: dict[str, Any]) -> str:
    """One line on a federated init's communication."""
    return (
        f"{traffic['init']} init: {traffic['init_passes']} passes over {traffic['init_clients']} "
        f"clients, {traffic['init_upload_bytes_per_client']:,} B up and "
        f"{traffic['init_download_bytes_per_client']:,} B down per client"
    )


def aggregator_command(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    job = load_config(args.config)
    fleet = prepare_fleet(job)
    model, method = initial_server_model(job, fleet)
    server = FederatedServer.from_model(job, model, method)
    address = parse_broker_url(args.broker, ca_file=args.ca_file)
    # Other methods than Fed-SB change more than the broadcast holds (FedEx, FLoRA fold into
    # W0): replay every round on the server's model, as a client does, for the final adapter.
    folded = None if method.name == "fedsb" else FoldedModel(job, model, method, args.state_dir)

    def report(result: RoundResult, payload: bytes) -> None:
        if folded is not None:
            folded.apply(payload)
        console.print(
            f"round {result.round + 1} closed: {len(result.clients)} updates, "
            f"train loss {result.mean_loss:.3f}, rejected so far {dict(server.rejections)}"
            + "".join(f", {k} {v}" for k, v in privacy_metrics(job, result).items())
        )

    options: dict[str, Any] = dict(
        on_round_closed=report,
        init_phase=InitPhase(job, model) if job.adapter.init in FEDERATED_INITS else None,
        on_init_done=lambda traffic: console.print(init_line(traffic)),
    )
    service = (
        WorkerAggregator(job, server, address, args.state_dir, workers=args.workers, **options)
        if args.workers > 1
        else AggregatorService(job, server, address, args.state_dir, mqtt5=args.mqtt5, **options)
    )
    committed = service.checkpoint.load()
    if folded is not None and committed is not None:
        folded.catch_up(committed[0], committed[1])
    state_dir = service.run()
    save_adapter(  # Fed-SB: frozen B, A from the adapter, final R and head from the global
        Path(state_dir) / "adapter",
        server.adapter | server.broadcast if folded is None else folded.adapter(),
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
        backend=args.backend,
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
            Path(args.dir),
            port=args.port or 1883,
            users=users,
            tls=args.tls,
            max_packet_size=args.max_packet_size,
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


def export_onnx_command(args: argparse.Namespace) -> int:
    from fedsb.export import to_onnx_training

    job = load_config(args.config)
    with console.status("exporting the ONNX Runtime training artifacts"):
        artifacts = to_onnx_training(args.adapter, args.out, job=job, optimizer=args.optimizer)
    console.print(f"ONNX Runtime training artifacts in {artifacts.out_dir}/")
    return 0


def export_executorch_command(args: argparse.Namespace) -> int:
    from fedsb.export import to_executorch

    job = load_config(args.config)
    with console.status("exporting ExecuTorch programs (minutes for a real model)"):
        artifacts = to_executorch(
            args.adapter,
            args.out,
            job=job,
            xnnpack=args.xnnpack,
            external_weights=args.external_weights,
            max_batch=args.max_batch or max(2, job.federation.batch_size),
            max_seq_len=args.max_seq_len or job.model.max_length,
        )
    console.print(f"ExecuTorch programs in {artifacts.out_dir}/")
    return 0


def export_peft_command(args: argparse.Namespace) -> int:
    from fedsb.export import to_peft

    with console.status("writing the PEFT export"):
        out = to_peft(args.adapter, args.out, merged=args.merged)
    console.print(f"{'merged model' if args.merged else 'PEFT LoRA adapter'} in {out}/")
    return 0


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
    sim.add_argument("--init", help="override adapter.init (e.g. lora-sb-federated)")
    sim.add_argument("--seed", type=int, help="override seed")
    sim.add_argument(
        "--backends",
        help="comma-separated client backends cycled over clients, e.g. torch,onnxruntime "
        "(overrides simulation.backends)",
    )
    sim.add_argument("--quiet", action="store_true", help="no progress bars or table")
    sim.add_argument(
        "--light",
        action="store_true",
        help="lightweight clients: seeded pre-computed Fed-SB updates, no model (scale runs)",
    )
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
    agg.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes taking updates behind an MQTT 5 shared subscription "
        "(needs mosquitto; implies --mqtt5); their exact partial sums merge at round close",
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
    cli.add_argument(
        "--backend",
        choices=["torch", "onnxruntime", "executorch"],
        default="torch",
        help="training runtime (non-torch: federation.optimizer = 'sgd', dropout = false)",
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
    brk.add_argument(
        "--max-packet-size",
        type=int,
        default=DEFAULT_MAX_PACKET,
        help="largest MQTT packet mosquitto accepts, in bytes: at least a job's "
        "federation.max_update_bytes + 64 KiB",
    )
    brk.set_defaults(handler=broker_command)

    add_export_commands(sub, fmt)
    return parser


def add_export_paths(parser: argparse.ArgumentParser, *, with_config: bool) -> None:
    """The arguments every export format takes: the adapter folder, the output folder."""
    if with_config:
        parser.add_argument(
            "--config", required=True, help="the job file the adapter was trained with"
        )
    parser.add_argument("--adapter", required=True, help="adapter folder (runs/<job>/adapter)")
    parser.add_argument("--out", required=True, help="output folder")


def add_export_commands(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """`fedsb export onnx|peft|…`: artifacts for edge runtimes and standard adapters."""
    exp = sub.add_parser("export", help="export a trained adapter for edge runtimes or PEFT")
    formats = exp.add_subparsers(dest="format", required=True)

    onnx = formats.add_parser(
        "onnx",
        help="ONNX Runtime training artifacts (only R and the head train)",
        formatter_class=fmt,
    )
    add_export_paths(onnx, with_config=True)
    onnx.add_argument(
        "--optimizer",
        choices=["sgd", "adamw"],
        default="sgd",
        help="optimizer model (ORT's AdamW is the Hugging Face variant)",
    )
    onnx.set_defaults(handler=export_onnx_command)

    et = formats.add_parser(
        "executorch",
        help="ExecuTorch training and inference programs (only R and the head train)",
        formatter_class=fmt,
    )
    add_export_paths(et, with_config=True)
    et.add_argument("--xnnpack", action="store_true", help="lower to the XNNPACK delegate")
    et.add_argument(
        "--external-weights",
        action="store_true",
        help="frozen weights in fedsb_weights.ptd instead of inside the .pte files",
    )
    et.add_argument(
        "--max-batch", type=int, default=None, help="largest batch (default: federation.batch_size)"
    )
    et.add_argument(
        "--max-seq-len", type=int, default=None, help="longest sequence (default: model.max_length)"
    )
    et.set_defaults(handler=export_executorch_command)

    peft = formats.add_parser(
        "peft",
        help="a PEFT LoRA adapter (B' = s·B·R, A' = A) or a merged model",
        formatter_class=fmt,
    )
    add_export_paths(peft, with_config=False)
    peft.add_argument(
        "--merged", action="store_true", help="a full transformers model with W0 + s·B·R·A"
    )
    peft.set_defaults(handler=export_peft_command)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedsb` command; user mistakes end with one line and exit code 2."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # torchao (an executorch dependency) warns on import about CUDA kernels
        for noisy in ("torchao", "torch.utils._pytree"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
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
