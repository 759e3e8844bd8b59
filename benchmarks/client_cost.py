"""Client cost: peak memory and step time of a Fed-SB client vs a FedIT (LoRA) client.

The demo model (all-MiniLM-L6-v2, 36 adapted linear layers, 21-class head), torch backend, one
thread, batch 16 × 32 tokens, AdamW via `fedsb.training.train_local`. Compared at equal rank and
at (about) equal trainable-parameter count. Every configuration runs in its own subprocess, so
its peak RSS (VmHWM) is its own. Writes benchmarks/results/client_cost.json (or
client_cost_quick.json) and docs/img/client_cost.png.
Usage: python benchmarks/client_cost.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QUICK_RESULTS = Path("runs") / "evidence-quick"  # --quick output: smoke tests, not published
MODEL = "all-MiniLM-L6-v2"
LABELS, BATCH, TOKENS = 21, 16, 32
# (comparison, method, rank): FedIT r=4 has 165,888 LoRA values, Fed-SB r=68 has 166,464.
CONFIGS = [
    ("equal rank", "fedsb", 16),
    ("equal rank", "fedit", 16),
    ("equal trainable parameters", "fedsb", 68),
    ("equal trainable parameters", "fedit", 4),
]


def peak_rss_bytes() -> int:
    """VmHWM of this process: its peak resident set."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def run_one(method: str, rank: int, steps: int) -> dict[str, Any]:
    """Build one client, train `steps` steps, report memory and per-step times (in this process)."""
    import torch
    import transformers

    from fedsb.adapter import LoraSBConfig, apply_lora_sb, count_trainable
    from fedsb.init import init_lora_sb
    from fedsb.methods import get_method
    from fedsb.models import load_classifier
    from fedsb.training import Encoded, make_optimizer

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    model, tokenizer = load_classifier(MODEL, LABELS, seed=0)
    config = LoraSBConfig(rank=rank, modules_to_save=["classifier"], init="svd")
    apply_lora_sb(model, config)
    m = get_method(method)
    if method == "fedsb":
        init_lora_sb(model, None, config)  # data-free init: the cost does not depend on it
    else:
        m.initialise(model, seed=0)
    m.mark_trainable(model, ["classifier"])
    generator = torch.Generator().manual_seed(0)
    n = BATCH * 4
    data = Encoded(
        torch.randint(1000, tokenizer.vocab_size, (n, TOKENS), generator=generator),
        torch.ones(n, TOKENS, dtype=torch.long),
        torch.randint(0, LABELS, (n,), generator=generator),
    )
    optimizer = make_optimizer(model, 1e-2, 1e-1)
    rss_before = rss_bytes()
    times = []
    model.train()
    for step in range(steps):
        batch = data.batch(torch.arange(step * BATCH, (step + 1) * BATCH) % n)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    state_bytes = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )
    lora_values = sum(
        p.numel() for n_, p in model.named_parameters() if p.requires_grad and "lora_" in n_
    )
    return {
        "method": method,
        "rank": rank,
        "trainable_parameters": count_trainable(model),
        "trainable_lora_parameters": lora_values,
        "steps": steps,
        "median_step_ms": 1000 * statistics.median(times[1:] if len(times) > 1 else times),
        "first_step_ms": 1000 * times[0],
        "rss_before_training_bytes": rss_before,
        "peak_rss_bytes": peak_rss_bytes(),
        "optimizer_state_bytes": state_bytes,
        "gradient_bytes": sum(
            p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None
        ),
    }


def run_in_subprocess(method: str, rank: int, steps: int) -> dict[str, Any]:
    """`run_one` in a fresh interpreter: a clean peak RSS."""
    out = subprocess.run(
        [sys.executable, __file__, "--one", method, str(rank), str(steps)],
        check=True,
        capture_output=True,
        text=True,
        env=os.environ | {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedsb.report import save_figure

    labels = [f"{'Fed-SB' if r['method'] == 'fedsb' else 'FedIT'} r={r['rank']}" for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.bar(labels, [r["median_step_ms"] for r in rows], color=["C0", "C1", "C0", "C1"])
    a.set(ylabel="median step time (ms)", title="step time, batch 16×32, 1 thread")
    b.bar(labels, [r["peak_rss_bytes"] / 2**20 for r in rows], color=["C0", "C1", "C0", "C1"])
    b.set(ylabel="peak RSS (MiB)", title="peak memory of the client process")
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="equal-rank pair, few steps")
    parser.add_argument(
        "--one", nargs=3, metavar=("METHOD", "RANK", "STEPS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.one:
        method, rank, steps = args.one
        print(json.dumps(run_one(method, int(rank), int(steps))))
        return
    configs = CONFIGS[:2] if args.quick else CONFIGS
    steps = 4 if args.quick else 40
    rows = []
    for comparison, method, rank in configs:
        row = {"comparison": comparison, **run_in_subprocess(method, rank, steps)}
        rows.append(row)
        print(
            f"{comparison:27s} {method:6s} r={rank:3d}: {row['trainable_parameters']:>9,} trainable, "
            f"step {row['median_step_ms']:.1f} ms, peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB, "
            f"optimizer state {row['optimizer_state_bytes']:,} B"
        )
    record = {
        "model": MODEL,
        "batch": BATCH,
        "tokens": TOKENS,
        "threads": 1,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu_count": os.cpu_count(),
        "quick": args.quick,
        "rows": rows,
    }
    name = "client_cost_quick.json" if args.quick else "client_cost.json"
    dest = (ROOT / QUICK_RESULTS if args.quick else ROOT / "benchmarks" / "results") / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(record, indent=2) + "\n")
    if not args.quick:
        plot(rows, ROOT / "docs" / "img" / "client_cost.png")


if __name__ == "__main__":
    main()
