"""Round overhead and bytes per round: fedsb (in process, embedded MQTT broker) vs Flower's simulation.

The same job (examples/demo.toml, all-MiniLM-L6-v2, Fed-SB r=16) runs three ways with the same
`FederatedClient` and `FederatedServer` code: fedsb's in-process loop, fedsb over its embedded
broker, and Flower 1.42's Ray simulation engine (a NumPyClient carrying the fedsb update message
as one uint8 array; a FedAvg strategy whose aggregation is `FederatedServer.submit`/`close_round`).
Round overhead = round wall time − local training (timed inside `train_with_backend`) − test-set
evaluation (fedsb only; Flower runs none). Bytes per round are the messages each framework
serialises: fedsb's payloads; Flower's `Parameters.tensors` (npy-serialised arrays) — gRPC/MQTT
framing is not counted for either.
Flower needs `flwr[simulation]`, which pins older protobuf/rich/typer/packaging than the fedsb
environment; install it beside the venv: `pip install --target runs/flower-site "flwr[simulation]==1.42.0"`
(the script puts that folder first on sys.path). Writes benchmarks/results/flower_compare.json
(or flower_compare_quick.json) and docs/img/flower_compare.png.
Usage: python benchmarks/flower_compare.py [--quick] [--skip-flower]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QUICK_RESULTS = Path("runs") / "evidence-quick"  # --quick output: smoke tests, not published
FLOWER_SITE = ROOT / "runs" / "flower-site"
FULL = {"federation.clients": 10, "federation.rounds": 5, "federation.local_steps": 2}
QUICK = {
    "federation.clients": 3,
    "federation.rounds": 2,
    "federation.local_steps": 1,
    "data.max_train_examples": 300,
}
TRAIN_SECONDS: list[float] = []  # local-training time of this process, appended by the timer


def load_job(overrides: dict[str, Any]) -> Any:
    from fedsb.config import load_config

    return load_config(ROOT / "examples" / "demo.toml", {"name": "flower-compare", **overrides})


def time_training() -> None:
    """Record every local training's duration (the part a round's overhead excludes)."""
    from fedsb.edge_client.client import FederatedClient

    if getattr(FederatedClient.train_with_backend, "timed", False):
        return
    inner = FederatedClient.train_with_backend

    def timed(self: Any, start: Any, seed: int) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(self, start, seed)
        finally:
            TRAIN_SECONDS.append(time.perf_counter() - t0)

    timed.timed = True  # type: ignore[attr-defined]
    FederatedClient.train_with_backend = timed  # type: ignore[method-assign]


# ---------------------------------------------------------------- fedsb


def run_fedsb(job: Any, transport: str, out: Path) -> dict[str, Any]:
    """One fedsb run; per round: wall time, training, evaluation, overhead, bytes."""
    from fedsb.cli import Simulation

    time_training()
    sim = Simulation(job, out / transport, quiet=True)
    marks: list[tuple[float, float, int]] = []  # (time at round close, eval seconds, training idx)
    inner = sim.evaluate_and_log

    def logged(result: Any, payload: bytes, download: int) -> None:
        t0 = time.perf_counter()
        inner(result, payload, download)
        marks.append((t0, time.perf_counter() - t0, len(TRAIN_SECONDS)))

    sim.evaluate_and_log = logged  # type: ignore[method-assign]
    TRAIN_SECONDS.clear()
    start = time.perf_counter()
    if transport == "inproc":
        sim.run_inproc()
    else:
        sim.run_mqtt(None)
    rows, previous, trained = [], (start, 0.0), 0
    for t, eval_s, n_trained in marks:
        train_s = sum(TRAIN_SECONDS[trained:n_trained])
        wall = t - previous[0] - previous[1]  # from the end of the previous evaluation
        rows.append(
            {"wall_s": wall, "train_s": train_s, "eval_s": eval_s, "overhead_s": wall - train_s}
        )
        previous, trained = (t, eval_s), n_trained
    metrics = sim.recorder.rows
    return summarise_rounds(
        rows,
        metrics[-1]["upload_bytes_per_client"] * metrics[-1]["clients"],
        metrics[-1]["download_bytes_per_client"] * metrics[-1]["clients"],
        metrics[-1]["adapter_download_bytes"],
        metrics[-1]["accuracy"],
    )


def summarise_rounds(
    rows: list[dict[str, float]], up: int, down: int, adapter: int, accuracy: float | None
) -> dict[str, Any]:
    steady = rows[1:] or rows
    return {
        "rounds": rows,
        "first_round_overhead_s": rows[0]["overhead_s"],
        "median_overhead_s_after_first": statistics.median(r["overhead_s"] for r in steady),
        "upload_bytes_per_round": up,
        "download_bytes_per_round": down,
        "adapter_bytes_per_client": adapter,
        "final_accuracy": accuracy,
    }


# ---------------------------------------------------------------- Flower


_CLIENTS: dict[int, Any] = {}


def flower_client_fn(context: Any) -> Any:
    """Runs in a Ray actor: the partition's `FederatedClient` wrapped as a Flower NumPyClient."""
    import numpy as np
    from flwr.client import NumPyClient

    from fedsb.edge_client.client import FederatedClient
    from fedsb.simulation import prepare_fleet

    time_training()
    job = load_job(json.loads(os.environ["FEDSB_FLOWER_JOB"]))
    index = int(context.node_config["partition-id"])
    if index not in _CLIENTS:
        if "fleet" not in _CLIENTS:
            _CLIENTS["fleet"] = prepare_fleet(job)
        fleet = _CLIENTS["fleet"]
        _CLIENTS[index] = FederatedClient(
            f"client-{index:04d}",
            copy.deepcopy(fleet.base_model),
            fleet.train.select(fleet.shards[index]),
            job,
            rank=job.client_rank(index),
        )
    client = _CLIENTS[index]

    class Wrapped(NumPyClient):  # type: ignore[misc]
        def fit(
            self, parameters: list[Any], config: dict[str, Any]
        ) -> tuple[list[Any], int, dict[str, Any]]:
            if "adapter" in config:
                client.receive_adapter(bytes(config["adapter"]))
            client.receive_global(parameters[0].tobytes())
            before = len(TRAIN_SECONDS)
            payload = client.train_round()
            train_s = sum(TRAIN_SECONDS[before:])
            update = np.frombuffer(payload, dtype=np.uint8)
            return [update], len(client.data), {"client": client.client_id, "train_s": train_s}

    return Wrapped().to_client()


def run_flower(job: Any, out: Path) -> dict[str, Any]:
    """The same job in Flower's Ray simulation; per-round timings from the strategy."""
    import numpy as np
    from flwr.client import ClientApp
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fedsb.aggregator.server import FederatedServer
    from fedsb.simulation import initial_server_model, prepare_fleet

    fleet = prepare_fleet(job)
    server = FederatedServer.from_model(job, *initial_server_model(job, fleet))
    adapter = server.adapter_payload()
    clients = job.federation.clients
    rows: list[dict[str, float]] = []
    sizes = {"up": 0, "down": 0}

    def as_parameters(payload: bytes) -> Any:
        return ndarrays_to_parameters([np.frombuffer(payload, dtype=np.uint8)])

    class FedsbStrategy(FedAvg):  # type: ignore[misc]
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            self.started = time.perf_counter()
            pairs = super().configure_fit(server_round, parameters, client_manager)
            sizes["down"] = sum(len(t) for t in parameters.tensors) * len(pairs)
            if server_round == 1:
                for _, fit_ins in pairs:
                    fit_ins.config["adapter"] = adapter
            return pairs

        def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> Any:
            if failures:
                raise RuntimeError(f"Flower round {server_round} failed: {failures[:1]}")
            sizes["up"] = sum(len(t) for _, res in results for t in res.parameters.tensors)
            for _, res in results:
                payload = parameters_to_ndarrays(res.parameters)[0].tobytes()
                reason = server.submit(str(res.metrics["client"]), payload)
                if reason is not None:
                    raise RuntimeError(f"fedsb rejected a Flower update: {reason}")
            server.close_round()
            wall = time.perf_counter() - self.started
            train_s = sum(float(res.metrics["train_s"]) for _, res in results)
            rows.append(
                {"wall_s": wall, "train_s": train_s, "eval_s": 0.0, "overhead_s": wall - train_s}
            )
            return as_parameters(server.global_payload()), {}

    strategy = FedsbStrategy(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=clients,
        min_evaluate_clients=0,
        min_available_clients=clients,
        initial_parameters=as_parameters(server.global_payload()),
    )
    server_app = ServerApp(
        server_fn=lambda context: ServerAppComponents(
            strategy=strategy, config=ServerConfig(num_rounds=job.federation.rounds)
        )
    )
    client_app = ClientApp(client_fn=flower_client_fn)
    ray_dir = out / "ray"
    ray_dir.mkdir(parents=True, exist_ok=True)
    os.environ["FEDSB_FLOWER_JOB"] = json.dumps(FLOWER_OVERRIDES)
    backend = {
        "client_resources": {"num_cpus": 2, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": 2,
            "include_dashboard": False,
            "_temp_dir": str(ray_dir),
            "object_store_memory": 100 * 2**20,
            "log_to_driver": False,
        },
    }
    started = time.perf_counter()
    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=clients, backend_config=backend
    )
    if len(rows) != job.federation.rounds:
        raise RuntimeError(f"Flower finished {len(rows)} of {job.federation.rounds} rounds")
    result = summarise_rounds(rows, sizes["up"], sizes["down"], len(adapter), None)
    result["total_seconds_with_ray_start"] = time.perf_counter() - started
    return result


FLOWER_OVERRIDES: dict[str, Any] = {}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedsb.report import save_figure

    names = list(results)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.bar(names, [1000 * results[n]["median_overhead_s_after_first"] for n in names], color="C0")
    a.set(ylabel="ms per round", title="round overhead (wall − training − eval), median")
    b.bar(
        names,
        [
            (results[n]["upload_bytes_per_round"] + results[n]["download_bytes_per_round"]) / 1e6
            for n in names
        ],
        color="C1",
    )
    b.set(ylabel="MB per round (all clients)", title="bytes per round, up + down")
    for ax in (a, b):
        ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 clients, 2 rounds")
    parser.add_argument("--skip-flower", action="store_true", help="fedsb transports only")
    args = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    FLOWER_OVERRIDES.update(QUICK if args.quick else FULL)
    job = load_job(FLOWER_OVERRIDES)
    out = ROOT / "runs" / ("flower_compare_quick" if args.quick else "flower_compare")
    results: dict[str, Any] = {}
    for transport in ("inproc", "mqtt"):
        results[f"fedsb {transport}"] = run_fedsb(job, transport, out)
    flower_error = None
    if not args.skip_flower:
        try:
            results["Flower (Ray)"] = run_flower(job, out)
        except Exception as err:  # noqa: BLE001 - reported in the JSON, the fedsb rows stand
            flower_error = f"{type(err).__name__}: {err}"
    for name, r in results.items():
        print(
            f"{name:14s} overhead/round {1000 * r['median_overhead_s_after_first']:8.1f} ms "
            f"(first {1000 * r['first_round_overhead_s']:.0f} ms)  up {r['upload_bytes_per_round']:,} B  "
            f"down {r['download_bytes_per_round']:,} B per round"
        )
    if flower_error:
        print(f"Flower: {flower_error}")
    record = {
        "job": FLOWER_OVERRIDES,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu_count": os.cpu_count(),
        "quick": args.quick,
        "results": results,
        "flower_error": flower_error,
    }
    name = "flower_compare_quick.json" if args.quick else "flower_compare.json"
    dest = (ROOT / QUICK_RESULTS if args.quick else ROOT / "benchmarks" / "results") / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(record, indent=2, default=str) + "\n")
    if not args.quick:
        plot(results, ROOT / "docs" / "img" / "flower_compare.png")


if __name__ == "__main__":
    if FLOWER_SITE.is_dir():  # flwr's pinned dependencies, kept out of the fedsb venv
        sys.path.insert(0, str(FLOWER_SITE))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(FLOWER_SITE), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        )
    import flower_compare  # noqa: E402 - the importable copy, so Ray actors share its caches

    flower_compare.main()
