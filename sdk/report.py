"""Run outputs: resolved config, metrics.jsonl, the accuracy plots, the final adapter, a table."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from .config import JobConfig, config_to_dict

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class RunRecorder:
    """Writes one run folder: config.json, metrics.jsonl (one JSON object per round), plots."""

    def __init__(self, out_dir: str | Path, config: Mapping[str, Any]) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        self.metrics_path = self.out / "metrics.jsonl"
        self.metrics_path.write_text("")
        self.rows: list[dict[str, Any]] = []

    def log(self, row: Mapping[str, Any]) -> None:
        """Append one round's metrics (flushed at once, so a crashed run keeps its history)."""
        self.rows.append(dict(row))
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self, title: str, evaluated_on: str = "test") -> Path:
        """accuracy.png: accuracy (on the test or validation set) vs round and vs upload bytes."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in self.rows]
        acc = [100 * r["accuracy"] for r in self.rows]
        mbytes = [r["cumulative_upload_bytes"] / 1e6 for r in self.rows]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ax1.plot(rounds, acc, marker="o")
        ylabel = f"{evaluated_on} accuracy (%)"
        ax1.set(xlabel="round", ylabel=ylabel, title="accuracy vs round")
        ax2.plot(mbytes, acc, marker="o")
        ax2.set(
            xlabel="cumulative upload, all clients (MB)",
            ylabel=ylabel,
            title="accuracy vs communication",
        )
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
        fig.suptitle(title)
        path = self.out / "accuracy.png"
        save_figure(fig, path)
        return path

    def table(self) -> Table:
        """The per-round summary printed at the end of a run."""
        table = Table(title="federated fine-tuning")
        for col in ("round", "accuracy", "loss", "up B/client", "down B/client", "clients"):
            table.add_column(col, justify="right")
        for r in self.rows:
            table.add_row(
                "before" if r["round"] == 0 else str(r["round"]),
                f"{100 * r['accuracy']:.1f}%",
                f"{r['loss']:.3f}",
                f"{r['upload_bytes_per_client']:,}",
                f"{r['download_bytes_per_client']:,}",
                str(r["clients"]),
            )
        return table

    def print_table(self, console: Console | None = None) -> None:
        (console or Console()).print(self.table())


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write (creating the folder) and close a matplotlib figure: one PNG per plot."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_adapter(
    out_dir: str | Path, state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> Path:
    """Write a trained adapter: tensors as safetensors plus a JSON description."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / ADAPTER_WEIGHTS))
    (out / ADAPTER_CONFIG).write_text(json.dumps(dict(config), indent=2) + "\n")
    return out


def adapter_description(job: JobConfig, label_names: Sequence[str]) -> dict[str, Any]:
    """adapter_config.json: what an exporter needs to rebuild the model around the tensors."""
    return {
        "format": "fedsb-adapter/1",
        "base_model": job.model.name,
        "num_labels": len(label_names),
        "label_names": list(label_names),
        "method": job.federation.method,
        "adapter": config_to_dict(job)["adapter"],
    }


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy before and after, and total upload, of a finished run."""
    return {
        "accuracy_before": rows[0]["accuracy"],
        "accuracy_after": rows[-1]["accuracy"],
        "rounds": rows[-1]["round"],
        "total_upload_bytes": rows[-1]["cumulative_upload_bytes"],
    }
