"""`fedsb simulate`: a whole fleet (clients, aggregator, broker) in one process, in process or over MQTT."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedsb.aggregator.broker import start_embedded_broker
from fedsb.aggregator.folded import adapter_with_folds
from fedsb.aggregator.init_phase import InitPhase
from fedsb.aggregator.server import FederatedServer, RoundResult
from fedsb.aggregator.service import AggregatorService
from fedsb.edge_client.client import FederatedClient
from fedsb.edge_client.service import ClientService

from ..adapter import lora_layers
from ..config import JobConfig, config_to_dict
from ..errors import FedsbError
from ..init_federated import FEDERATED_INITS
from ..mqtt import parse_broker_url
from ..report import RunRecorder, adapter_description, save_adapter, summarise
from ..selection import sample_clients
from ..simulation import initial_server_model, prepare_fleet
from .output import console


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
        self.recorder.plot(
            f"{job.name}: {job.federation.method}, {job.federation.clients} clients",
            job.data.evaluate_on,
        )
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
