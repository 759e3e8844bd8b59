"""Job configuration: a TOML file validated by pydantic, with one-line errors naming the key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .adapter import LoraSBConfig
from .errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(Section):
    name: str = Field(
        "all-MiniLM-L6-v2", description="packaged model name, local directory or Hub id"
    )
    max_length: int = Field(32, ge=4, le=4096, description="tokens per example")


class DataSection(Section):
    dataset: str = Field("chatterbot-topics", description="built-in dataset name or 'file'")
    path: str | None = Field(None, description="CSV/JSONL file for dataset = 'file'")
    text_column: str = "text"
    label_column: str = "label"
    group_column: str | None = None
    test_fraction: float = Field(0.2, gt=0, lt=1)
    max_train_examples: int | None = Field(None, ge=1)
    partition: Literal["iid", "dirichlet", "column"] = "dirichlet"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller = more skewed)")

    @model_validator(mode="after")
    def _file_needs_path(self) -> DataSection:
        if self.dataset == "file" and not self.path:
            raise ValueError("dataset = 'file' needs data.path")
        return self


class AdapterSection(Section):
    rank: int = Field(16, ge=1, le=4096)
    alpha: float | None = Field(None, gt=0)
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] = Field(default_factory=lambda: ["classifier"])
    init: Literal["lora-sb", "svd", "random"] = "lora-sb"
    init_samples: int = Field(64, ge=1)
    init_lr: float = Field(1e-3, gt=0)


class FederationSection(Section):
    method: Literal["fedsb", "fedit", "ffa", "fedex", "flora"] = "fedsb"
    clients: int = Field(10, ge=1, le=100_000)
    rounds: int = Field(10, ge=1)
    clients_per_round: int | None = Field(None, ge=1)
    local_steps: int = Field(5, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-2, gt=0, description="learning rate of the LoRA factors")
    head_lr: float = Field(1e-1, gt=0, description="learning rate of modules_to_save")
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="local optimizer; every edge backend supports 'sgd'"
    )
    dropout: bool = Field(
        True, description="dropout during local training (exported edge graphs train without it)"
    )
    weighting: Literal["examples", "uniform"] = "examples"
    padding: Literal["replication", "zero", "hetlora"] = "replication"
    client_ranks: list[int] | None = Field(None, description="rank of each client (heterogeneous)")
    min_clients: int | None = Field(
        None, ge=1, description="quorum that closes a round (default: every selected client)"
    )
    round_timeout_s: float = Field(600.0, gt=0, description="a round closes at this deadline")
    rank_mode: Literal["truncate", "fold"] = Field(
        "truncate",
        description="truncate: a rank-k client computes with the k×k block; fold: full R, block trains",
    )

    @model_validator(mode="after")
    def _check_counts(self) -> FederationSection:
        if self.clients_per_round is not None and self.clients_per_round > self.clients:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) exceeds clients ({self.clients})"
            )
        if self.client_ranks is not None:
            if len(self.client_ranks) != self.clients:
                raise ValueError(
                    f"client_ranks has {len(self.client_ranks)} entries for {self.clients} clients"
                )
            if any(r < 1 for r in self.client_ranks):
                raise ValueError("client_ranks must be positive")
        return self


class SimulationSection(Section):
    """How `fedsb simulate` plays the fleet (not used by real clients)."""

    transport: Literal["mqtt", "inproc"] = "mqtt"
    dropout: float = Field(0.0, ge=0, lt=1, description="chance that a client skips a round")
    slow_fraction: float = Field(0.0, ge=0, le=1, description="share of clients that are slow")
    slow_delay_s: float = Field(
        0.0, ge=0, description="extra seconds a slow client takes per round"
    )


class JobConfig(Section):
    """A whole federated job: model, data, adapter, federation."""

    name: str = Field("fedsb-job", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    seed: int = Field(0, ge=0)
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    adapter: AdapterSection = AdapterSection()
    federation: FederationSection = FederationSection()
    simulation: SimulationSection = SimulationSection()

    @model_validator(mode="after")
    def _ranks_fit(self) -> JobConfig:
        ranks = self.federation.client_ranks or []
        if any(r > self.adapter.rank for r in ranks):
            raise ValueError(
                f"federation.client_ranks may not exceed adapter.rank ({self.adapter.rank})"
            )
        if ranks and self.federation.method != "fedsb":
            raise ValueError("heterogeneous client_ranks are supported by method = 'fedsb' only")
        return self

    def lora_config(self) -> LoraSBConfig:
        """The adapter part of the job as the `LoraSBConfig` that `apply_lora_sb` takes."""
        a = self.adapter
        return LoraSBConfig(
            rank=a.rank,
            alpha=a.alpha,
            target_modules=a.target_modules,
            modules_to_save=tuple(a.modules_to_save),
            init=a.init,
            init_samples=a.init_samples,
            init_lr=a.init_lr,
            seed=self.seed,
        )

    def client_rank(self, index: int) -> int:
        """Rank of client `index` (the adapter rank unless client_ranks says otherwise)."""
        ranks = self.federation.client_ranks
        return ranks[index] if ranks else self.adapter.rank


def format_validation_error(err: ValidationError) -> str:
    """The first problem as one line: `key.path: message (got value)`."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    got = (
        "" if first["type"] in ("missing", "extra_forbidden") else f" (got {first.get('input')!r})"
    )
    return f"{key}: {msg}{got}"


def parse_config(raw: dict[str, Any]) -> JobConfig:
    """Validate a config dict; raise ConfigError naming the offending key."""
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Read and validate a TOML job file; `overrides` maps dotted keys to values (CLI flags)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return parse_config(raw)


def config_to_dict(config: JobConfig) -> dict[str, Any]:
    """The resolved config as plain data (written next to every run)."""
    return config.model_dump(mode="json")
