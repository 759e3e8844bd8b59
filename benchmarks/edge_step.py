"""One local training step of the demo model in every edge backend: time, peak memory, file sizes.

The model is the demo's: all-MiniLM-L6-v2 with LoRA-SB rank 16 on all 36 linear layers and a
21-class head (`modules_to_save`), Fed-SB init on real chatterbot data; batches of 8 real
utterances of 32 tokens; plain SGD without dropout (what every edge backend trains with).

The parent process builds the model once, saves the adapter folder, exports the ONNX Runtime
artifacts (`fedsb.export.to_onnx_training`) and the ExecuTorch programs (portable and XNNPACK,
`fedsb.export.to_executorch`), and saves the tokenised data. Each backend is then measured in
its own fresh subprocess, so that its peak RSS (VmHWM) is its own: the torch worker loads the model
from the adapter folder (as a Jetson would), the ORT and ExecuTorch workers load only their
artifacts. A worker runs `--warmup` steps, then `--steps` steps timed one by one through the
backend's `train`, and reports the median, its peak RSS and its RSS after imports.

Run:  .venv/bin/python benchmarks/edge_step.py [--steps 20] [--threads 2]
Output: a table on stdout and benchmarks/results/edge_step.json (ratios are to eager torch of
the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).parent / "results" / "edge_step.json"
BACKENDS = ("torch", "onnxruntime", "executorch-portable", "executorch-xnnpack")
BATCH, MAX_LEN, RANK, LR = 8, 32, 16, 1e-2


def rss_mb() -> float:
    """Peak RSS of this process (VmHWM; ru_maxrss would include the parent's, kept across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def folder_bytes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}


def prepare(work: Path) -> dict[str, Any]:
    """Model, adapter folder, exports and data; returns export times and artifact sizes."""
    import torch

    import fedsb
    from fedsb.config import parse_config
    from fedsb.data import load_dataset
    from fedsb.export import to_executorch, to_onnx_training
    from fedsb.models import load_classifier
    from fedsb.report import adapter_description, save_adapter
    from fedsb.training import encode_texts

    split = load_dataset("chatterbot-topics", seed=0)
    labels = split.train.label_names
    model, tokenizer = load_classifier("all-MiniLM-L6-v2", len(labels), seed=0)
    data = encode_texts(tokenizer, split.train.texts, split.train.labels, MAX_LEN)
    config = fedsb.LoraSBConfig(rank=RANK, modules_to_save=["classifier"], init_samples=64)
    fedsb.apply_lora_sb(model, config)
    fedsb.init_lora_sb(model, [data.batch(torch.arange(64))], config)
    model.eval()
    job = parse_config({"adapter": {"rank": RANK}})
    save_adapter(
        work / "adapter",
        fedsb.adapter_state(model, ["classifier"]),
        adapter_description(job, labels),
    )
    torch.save(
        {"input_ids": data.input_ids, "attention_mask": data.attention_mask, "labels": data.labels},
        work / "data.pt",
    )
    exports: dict[str, Any] = {}
    limits = {"max_batch": BATCH, "max_seq_len": MAX_LEN}
    for name, export in (
        ("onnxruntime", lambda out: to_onnx_training(model, out, optimizer="sgd")),
        ("executorch-portable", lambda out: to_executorch(model, out, **limits)),
        ("executorch-xnnpack", lambda out: to_executorch(model, out, xnnpack=True, **limits)),
    ):
        started = time.perf_counter()
        export(work / name)
        exports[name] = {
            "export_s": round(time.perf_counter() - started, 1),
            "files": folder_bytes(work / name),
        }
        print(f"exported {name} in {exports[name]['export_s']} s", file=sys.stderr, flush=True)
    exports["torch"] = {"files": folder_bytes(work / "adapter")}
    return exports


def make_backend(name: str, work: Path) -> Any:
    """The backend to measure, built from what a device would have for it."""
    if name == "torch":
        from fedsb.edge_client.backends.torch_backend import TorchBackend
        from fedsb.export.adapter_dir import load_adapted_model

        return TorchBackend(load_adapted_model(work / "adapter").model)
    if name == "onnxruntime":
        from fedsb.edge_client.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(work / name)
    from fedsb.edge_client.backends.executorch_backend import ExecuTorchBackend

    return ExecuTorchBackend(work / name)


def worker(name: str, work: Path, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    """Time `steps` single training steps of backend `name` (runs in its own process)."""
    import torch

    torch.set_num_threads(threads)
    from fedsb.edge_client.backends import TrainRequest
    from fedsb.training import Encoded

    after_imports = rss_mb()
    raw = torch.load(work / "data.pt")
    data = Encoded(raw["input_ids"], raw["attention_mask"], raw["labels"])
    started = time.perf_counter()
    backend = make_backend(name, work)
    load_s = time.perf_counter() - started
    times = []
    for i in range(warmup + steps):
        request = TrainRequest(steps=1, batch_size=BATCH, lr=LR, head_lr=10 * LR, seed=i)
        started = time.perf_counter()
        backend.train(data, request)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return {
        "step_ms_median": round(1000 * statistics.median(times), 2),
        "step_ms_min": round(1000 * min(times), 2),
        "step_ms_mean": round(1000 * statistics.mean(times), 2),
        "load_s": round(load_s, 2),
        "peak_rss_mb": round(rss_mb(), 1),
        "rss_after_imports_mb": round(after_imports, 1),
    }


def run_worker(name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", name, "--work", str(work)]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch/ORT intra-op threads")
    parser.add_argument("--keep", type=Path, help="write the artifacts here and keep them")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.work, args.steps, args.warmup, args.threads)))
        return
    with tempfile.TemporaryDirectory(prefix="fedsb-edge-step-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        exports = prepare(work)
        measured = {name: run_worker(name, work, args) | exports[name] for name in BACKENDS}
    base = measured["torch"].get("step_ms_median")
    for row in measured.values():
        if base and "step_ms_median" in row:
            row["ratio_to_torch"] = round(row["step_ms_median"] / base, 2)
    report = {
        "benchmark": "edge_step",
        "model": f"all-MiniLM-L6-v2, LoRA-SB rank {RANK} on 36 layers, 21-class head",
        "batch_size": BATCH,
        "max_length": MAX_LEN,
        "optimizer": "sgd, no dropout",
        "steps_timed": args.steps,
        "threads": args.threads,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_at_end": os.getloadavg(),
        },
        "backends": measured,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'backend':22} {'step ms':>9} {'× torch':>8} {'peak RSS MB':>12} {'files MB':>9}")
    for name, row in measured.items():
        size = sum(row.get("files", {}).values()) / 1e6
        print(
            f"{name:22} {row.get('step_ms_median', float('nan')):9.1f} "
            f"{row.get('ratio_to_torch', float('nan')):8.2f} "
            f"{row.get('peak_rss_mb', float('nan')):12.1f} {size:9.1f}  {row.get('error', '')}"
        )
    print(f"results in {RESULTS}")


if __name__ == "__main__":
    main()
