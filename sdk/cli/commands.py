"""The handlers of the `fedsb` subcommands: load the job, wire the parts, print one summary."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from fedsb.aggregator.broker import start_embedded_broker
from fedsb.aggregator.folded import FoldedModel
from fedsb.aggregator.init_phase import InitPhase
from fedsb.aggregator.server import FederatedServer, RoundResult
from fedsb.aggregator.service import AggregatorService
from fedsb.aggregator.workers import WorkerAggregator
from fedsb.edge_client.client import FederatedClient
from fedsb.edge_client.service import ClientService

from ..config import load_config
from ..errors import ConfigError, FedsbError
from ..init_federated import FEDERATED_INITS
from ..mqtt import parse_broker_url
from ..report import adapter_description, save_adapter
from ..simulation import initial_server_model, prepare_fleet
from .output import console
from .simulate import privacy_metrics, run_light_simulation, run_simulation


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
