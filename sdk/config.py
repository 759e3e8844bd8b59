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
    evaluate_on: Literal["test", "validation"] = Field(
        "test",
        description="validation: hold out a stratified share (test_fraction) of the train split, "
        "train on the rest and evaluate on it, so tuning never sees the test set",
    )

    @model_validator(mode="after")
    def _file_needs_path(self) -> DataSection:
        if self.dataset == "file" and not self.path:
            raise ValueError("dataset = 'file' needs data.path")
        return self


CENTRAL_PROBE_STEPS = 30  # the head probe of the central lora-sb init (README: Fed-SB accuracy)


class AdapterSection(Section):
    rank: int = Field(16, ge=1, le=4096)
    alpha: float | None = Field(None, gt=0)
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] = Field(default_factory=lambda: ["classifier"])
    init: Literal["lora-sb", "lora-sb-federated", "lora-sb-federated-exact", "svd", "random"] = (
        "lora-sb"
    )
    init_samples: int = Field(
        64, ge=1, description="init examples (federated inits: split over the clients)"
    )
    init_lr: float = Field(1e-3, gt=0)
    init_probe_steps: int | None = Field(
        None,
        ge=0,
        description="lora-sb inits: AdamW steps fitting modules_to_save alone on the init examples "
        "before W0's gradient is taken (restored afterwards; 0 = gradient under the initial head). "
        "Default: 30 for lora-sb, 0 for the federated inits, whose clients would each fit the "
        "head on only their few init examples",
    )
    init_probe_lr: float = Field(1e-2, gt=0, description="learning rate of those probe steps")
    freeze_head: bool = Field(
        False,
        description="keep modules_to_save as the lora-sb init's head probe fitted them and never "
        "train them: they travel once with the adapter, and each round's upload is R alone "
        "(the baselines fit the same head on the same init examples)",
    )
    init_oversample: int = Field(
        8, ge=0, description="lora-sb-federated: sketch columns beyond the rank (r + p)"
    )
    init_sketch_step: Literal["sign-factored", "gradient"] = Field(
        "sign-factored",
        description="lora-sb-federated: first step estimated from the sketched gradient G̃: "
        "−η·sign(G̃) by row/column normalisation (Adafactor-style), or −G̃ scaled to RMS η",
    )
    init_clip_norm: float | None = Field(
        None, gt=0, description="federated inits: each client's reply is clipped to this L2 norm"
    )
    init_noise_multiplier: float = Field(
        0.0, ge=0, description="federated inits: Gaussian noise σ·init_clip_norm on the sums"
    )

    @property
    def probe_steps(self) -> int:
        """`init_probe_steps` as given, else its default for the init (see its description)."""
        if self.init_probe_steps is not None:
            return self.init_probe_steps
        return 0 if self.init.startswith("lora-sb-federated") else CENTRAL_PROBE_STEPS

    @property
    def trained_modules(self) -> list[str]:
        """The modules_to_save that train every round (none when the head is frozen)."""
        return [] if self.freeze_head else list(self.modules_to_save)

    @model_validator(mode="after")
    def _frozen_head_is_probed(self) -> AdapterSection:
        if self.freeze_head and not self.modules_to_save:
            raise ValueError("freeze_head needs a head in modules_to_save")
        if self.freeze_head and (self.init != "lora-sb" or self.probe_steps == 0):
            raise ValueError(
                "freeze_head keeps the head fitted by the init's probe: it needs "
                "init = 'lora-sb' and init_probe_steps > 0"
            )
        return self

    @model_validator(mode="after")
    def _noise_needs_clip(self) -> AdapterSection:
        if self.init_noise_multiplier > 0 and self.init_clip_norm is None:
            raise ValueError("adapter.init_noise_multiplier needs adapter.init_clip_norm")
        return self


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
    norm_bound: float | None = Field(
        None, gt=0, description="largest L2 norm of one client's update (Byzantine defence)"
    )
    norm_bound_action: Literal["clip", "reject"] = Field(
        "clip", description="what the aggregator does with an update above norm_bound"
    )
    aggregation: Literal["exact-mean", "median", "trimmed-mean"] = Field(
        "exact-mean",
        description="exact-mean: bit-exact weighted mean; median / trimmed-mean: coordinate-wise, "
        "unweighted, robust to outliers but not exact",
    )
    trim_fraction: float = Field(
        0.1, ge=0, lt=0.5, description="share of lowest and highest values trimmed-mean drops"
    )
    max_update_bytes: int = Field(
        16 * 2**20,
        ge=2**16,
        le=256 * 2**20,
        description="largest update (and global state) message, in bytes: the aggregator refuses "
        "bigger ones, clients do not send them; the broker's max_packet_size must allow it",
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
    backends: list[Literal["torch", "onnxruntime", "executorch"]] | None = Field(
        None, description="training backend of each client, cycled over clients (default torch)"
    )


class PrivacySection(Section):
    """Differential privacy: DP-SGD on every client, or user-level DP (DP-FedAvg) at the aggregator."""

    mode: Literal["none", "dp-sgd", "user-dp"] = Field(
        "none",
        description="dp-sgd: per-example DP on clients; user-dp: per-client DP at the server",
    )
    epsilon: float | None = Field(None, gt=0, description="target ε (the budget)")
    noise_multiplier: float | None = Field(
        None, ge=0, description="Gaussian noise σ (in units of the clip norm) instead of epsilon"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="target δ")
    accountant: Literal["prv", "rdp"] = Field("prv", description="Opacus privacy accountant")
    max_grad_norm: float = Field(1.0, gt=0, description="dp-sgd: per-example gradient clip norm")
    grad_sample_mode: Literal["hooks", "ghost"] = Field(
        "hooks", description="dp-sgd: per-sample gradients (hooks) or ghost clipping (norms only)"
    )
    budget_rounds: int | None = Field(
        None,
        ge=1,
        description="dp-sgd: local rounds a client's ε is spread over (default: the rounds it "
        "expects to be selected for); a client stops once its budget is spent",
    )
    clip_norm: float = Field(1.0, gt=0, description="user-dp: clip norm C of each client delta")
    client_sampling_rate: float | None = Field(
        None,
        gt=0,
        le=1,
        description="user-dp: chance a client is in a round (default clients_per_round / clients)",
    )

    @model_validator(mode="after")
    def _one_noise_source(self) -> PrivacySection:
        given = [k for k in ("epsilon", "noise_multiplier") if getattr(self, k) is not None]
        if self.mode == "none" and given:
            raise ValueError(f"privacy.{given[0]} is set but privacy.mode is 'none'")
        if self.mode != "none" and len(given) != 1:
            raise ValueError(
                f"privacy.mode = {self.mode!r} needs exactly one of epsilon or noise_multiplier"
            )
        return self


class JobConfig(Section):
    """A whole federated job: model, data, adapter, federation."""

    name: str = Field("fedsb-job", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    seed: int = Field(0, ge=0)
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    adapter: AdapterSection = AdapterSection()
    federation: FederationSection = FederationSection()
    simulation: SimulationSection = SimulationSection()
    privacy: PrivacySection = PrivacySection()

    @model_validator(mode="after")
    def _privacy_fits(self) -> JobConfig:
        mode, fed = self.privacy.mode, self.federation
        if mode == "dp-sgd" and fed.client_ranks and min(fed.client_ranks) < self.adapter.rank:
            raise ValueError("privacy.mode = 'dp-sgd' needs every client at adapter.rank")
        if mode == "user-dp":
            if fed.method in ("fedex", "flora"):
                raise ValueError(
                    f"privacy.mode = 'user-dp' needs a linear aggregate; method {fed.method!r} "
                    "also sends every client's B·A product"
                )
            if fed.weighting != "uniform":
                raise ValueError(
                    "privacy.mode = 'user-dp' needs federation.weighting = 'uniform' "
                    "(example counts would change each client's sensitivity)"
                )
            if fed.aggregation != "exact-mean":
                raise ValueError("privacy.mode = 'user-dp' needs aggregation = 'exact-mean'")
        return self

    @model_validator(mode="after")
    def _ranks_fit(self) -> JobConfig:
        if self.adapter.init.startswith("lora-sb-federated") and self.federation.method != "fedsb":
            raise ValueError(f"adapter.init = {self.adapter.init!r} needs method = 'fedsb'")
        ranks = self.federation.client_ranks or []
        if any(r > self.adapter.rank for r in ranks):
            raise ValueError(
                f"federation.client_ranks may not exceed adapter.rank ({self.adapter.rank})"
            )
        if ranks and self.federation.method != "fedsb":
            raise ValueError("heterogeneous client_ranks are supported by method = 'fedsb' only")
        robust = self.federation.aggregation != "exact-mean"
        if robust and any(r != self.adapter.rank for r in ranks):
            raise ValueError("client_ranks below adapter.rank need aggregation = 'exact-mean'")
        if robust and self.federation.method != "fedsb":
            raise ValueError("robust aggregation is supported by method = 'fedsb' only")
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
            init_probe_steps=a.probe_steps,
            init_probe_lr=a.init_probe_lr,
            freeze_head=a.freeze_head,
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
