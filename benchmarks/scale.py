"""Scale: N lightweight clients through mosquitto, 3 rounds, with the real aggregator.

For each fleet size (``--clients``, default 1,000 and 10,000), on a fresh mosquitto on
127.0.0.1 (config from `fedsb.aggregator.broker.write_mosquitto_config`):

* the aggregator is the real `AggregatorService` in its own process
  (`python -m fedsb.aggregator.synthetic --mqtt5`: validation, exact sums, a spooled
  checkpoint per accepted update, one per closed round), quorum = N;
* the clients are `fedsb.edge_client.light.LightFleet`: N client ids over ``--connections``
  persistent paho connections, each publishing a pre-computed update (rank 8, 48 R blocks of
  8×8 float32: query, key, value and attention-output of BERT-base's 12 layers; the paper's
  72 blocks would add the two feed-forward modules) to its own topic when a round opens.

Per round: seconds from the fleet seeing the round open to the aggregator closing it, and
updates/s = N / that. Memory: the aggregator's and mosquitto's peak RSS (VmHWM). The final
global state is checked bit for bit against the same rounds aggregated in process.

Run:  .venv/bin/python benchmarks/scale.py [--clients 1000 10000] [--rounds 3]
Output: a table on stdout and benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fedsb.aggregator.broker import free_port, write_mosquitto_config
from fedsb.aggregator.synthetic import REPORT_FILE, synthetic_server
from fedsb.config import parse_config
from fedsb.edge_client.light import LightFleet
from fedsb.mqtt import parse_broker_url
from fedsb.synthetic import client_id, r_names, synthetic_job_dict, update_payload

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "scale.json"
RANK = 8


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not listen on {port}")


def exact_reference(job: dict[str, Any], rounds: list[list[bytes]]) -> dict[str, torch.Tensor]:
    """The same rounds aggregated in process (no broker, no faults)."""
    server = synthetic_server(parse_config(job))
    for batch in rounds:
        for i, payload in enumerate(batch):
            assert server.submit(client_id(i), payload) is None
        server.close_round()
    return server.broadcast


def run_size(clients: int, rounds: int, connections: int, verify: bool) -> dict[str, Any]:
    """One fleet size on a fresh broker; returns its measurements."""
    job = synthetic_job_dict(f"scale-{clients}", clients, rounds, rank=RANK, round_timeout_s=3600)
    config = parse_config(job)
    started = time.perf_counter()
    pre = [[update_payload(config, r, i) for i in range(clients)] for r in range(rounds)]
    encode_s = time.perf_counter() - started
    work = Path(tempfile.mkdtemp(prefix="fedsb-scale-"))
    work.chmod(0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        port = free_port()
        conf = write_mosquitto_config(work / "broker", port=port)
        broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
        procs.append(broker)
        wait_for_port(port)
        url = f"mqtt://127.0.0.1:{port}"
        (work / "job.json").write_text(json.dumps(job))
        state_dir = work / "aggregator"
        agg = subprocess.Popen(
            [sys.executable, "-m", "fedsb.aggregator.synthetic", "--job", str(work / "job.json")]
            + ["--broker", url, "--state-dir", str(state_dir), "--mqtt5"],
            stdout=subprocess.DEVNULL,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        procs.append(agg)
        fleet = LightFleet(parse_broker_url(url), job["name"], connections=connections)
        try:
            opened = fleet.run(lambda r, i: pre[r][i], clients, rounds, timeout_s=900)
        finally:
            fleet.close()
        if agg.wait(300) != 0:
            raise RuntimeError(f"aggregator exited with {agg.returncode}")
        broker_peak = peak_rss_mb(broker.pid)
        report = json.loads((state_dir / REPORT_FILE).read_text())
        state = json.loads((state_dir / "state.json").read_text())
        final = load_file(str(state_dir / state["global"]))
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    exact = None
    if verify:
        expected = exact_reference(job, pre)
        exact = all(torch.equal(final[k], expected[k]) for k in expected)
    per_round = []
    for r, closed in enumerate(report["rounds"]):
        seconds = closed["closed_at"] - opened[r]
        per_round.append(
            {
                "round": r,
                "accepted": closed["clients"],
                "seconds": round(seconds, 3),
                "updates_per_s": round(clients / seconds, 1),
            }
        )
    return {
        "clients": clients,
        "connections": connections,
        "rounds": per_round,
        "mean_updates_per_s": round(
            clients * len(per_round) / sum(r["seconds"] for r in per_round), 1
        ),
        "aggregator_start_rss_mb": round(report["start_rss_kb"] / 1024, 1),
        "aggregator_peak_rss_mb": round(report["peak_rss_kb"] / 1024, 1),
        "broker_peak_rss_mb": round(broker_peak, 1),
        "rejections": report["rejections"],
        "update_bytes": len(pre[0][0]),
        "encode_seconds": round(encode_s, 1),
        "final_state_exact": exact,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--no-verify", action="store_true", help="skip the in-process check")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    runs = []
    load_before = os.getloadavg()[0]
    for clients in args.clients:
        run = run_size(clients, args.rounds, args.connections, not args.no_verify)
        runs.append(run)
        times = ", ".join(f"{r['seconds']:.2f}" for r in run["rounds"])
        print(
            f"{clients:>6} clients: rounds {times} s, {run['mean_updates_per_s']:.0f} updates/s, "
            f"aggregator peak {run['aggregator_peak_rss_mb']:.0f} MB "
            f"(start {run['aggregator_start_rss_mb']:.0f}), broker peak "
            f"{run['broker_peak_rss_mb']:.0f} MB, exact {run['final_state_exact']}",
            flush=True,
        )
    result = {
        "benchmark": "scale",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "update": f"rank {RANK}, {len(r_names())} R blocks of {RANK}x{RANK} float32",
        "broker": "mosquitto (fedsb config), MQTT 5 aggregator with Receive Maximum 256",
        "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "note": "a shared 2-core machine: the load average (before, after) shows how busy",
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
