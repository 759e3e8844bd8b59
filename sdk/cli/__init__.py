"""The `fedsb` command line, and the one place that wires clients, aggregator and transport.

`simulate` runs a whole fleet in one process; `commands` holds the subcommands' handlers.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from ..errors import FedsbError
from ..mqtt import DEFAULT_MAX_PACKET
from .commands import (
    aggregator_command,
    broker_command,
    client_command,
    export_executorch_command,
    export_onnx_command,
    export_peft_command,
    simulate_command,
)
from .output import console
from .simulate import Simulation, guarded, run_light_simulation, run_simulation, select_clients

__all__ = [
    "Simulation",
    "aggregator_command",
    "build_parser",
    "guarded",
    "main",
    "run_light_simulation",
    "run_simulation",
    "select_clients",
]


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


def add_broker_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--broker",
        required=required,
        default=None,
        help="mqtt[s]://user:pass@host:port" + ("" if required else " (default: embedded broker)"),
    )
    parser.add_argument("--ca-file", default=None, help="CA certificate for mqtts:// brokers")


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
