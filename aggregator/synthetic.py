"""An aggregator for a synthetic Fed-SB job (no model): for scale runs and fault injection.

`python -m fedsb.aggregator.synthetic --job job.json --broker URL --state-dir DIR` serves the
job's rounds with the real `AggregatorService` (checkpoints, resume, validation) and writes a
JSON report (rounds, clients per round, rejections, peak memory) next to its checkpoints.
Errors end with one line on stderr and exit code 2, as `fedsb aggregator` does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from fedsb.config import JobConfig, parse_config
from fedsb.errors import FedsbError
from fedsb.methods import get_method
from fedsb.mqtt import parse_broker_url
from fedsb.synthetic import initial_global

from .server import FederatedServer, RoundResult
from .service import AggregatorService
from .workers import WorkerAggregator

REPORT_FILE = "report.json"


def synthetic_server(job: JobConfig) -> FederatedServer:
    """A server holding only the R blocks of a synthetic job (no adapter tensors to publish)."""
    broadcast = initial_global(job.adapter.rank)
    shapes = {k: tuple(v.shape) for k, v in broadcast.items()}
    return FederatedServer(job, get_method("fedsb"), {}, broadcast, shapes)


def rss_kb(field: str = "VmHWM") -> int:
    """This process's peak (VmHWM) or current (VmRSS) resident memory, in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def serve(
    job: JobConfig, url: str, state_dir: Path, *, mqtt5: bool = False, workers: int = 1
) -> dict[str, Any]:
    """Run the job to its end (`workers` > 1: scaled out, MQTT 5); return and write the report."""
    server = synthetic_server(job)
    start_rss_kb = rss_kb("VmRSS")
    rounds: list[dict[str, Any]] = []

    def on_round_closed(result: RoundResult, payload: bytes) -> None:
        rounds.append(
            {"round": result.round, "clients": len(result.clients), "closed_at": time.time()}
        )
        print(f"round {result.round + 1} closed: {len(result.clients)} updates", flush=True)

    address = parse_broker_url(url)
    if workers > 1:
        service: AggregatorService = WorkerAggregator(
            job, server, address, state_dir, workers=workers, on_round_closed=on_round_closed
        )
    else:
        service = AggregatorService(
            job, server, address, state_dir, on_round_closed=on_round_closed, mqtt5=mqtt5
        )
    service.run(max_seconds=3600)
    report = {
        "rounds": rounds,
        "rejections": dict(server.rejections),
        "start_rss_kb": start_rss_kb,
        "peak_rss_kb": rss_kb("VmHWM"),
    }
    if isinstance(service, WorkerAggregator):
        report["worker_accepted"] = service.pool.accepted
        report["duplicates_across_workers"] = service.duplicates_merged
    (Path(state_dir) / REPORT_FILE).write_text(json.dumps(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedsb.aggregator.synthetic")
    parser.add_argument("--job", required=True, help="JSON file of the job dict")
    parser.add_argument("--broker", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--mqtt5", action="store_true")
    parser.add_argument("--workers", type=int, default=1, help="> 1: scaled out (MQTT 5)")
    args = parser.parse_args(argv)
    try:
        job = parse_config(json.loads(Path(args.job).read_text()))
        serve(job, args.broker, Path(args.state_dir), mqtt5=args.mqtt5, workers=args.workers)
    except (FedsbError, OSError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
