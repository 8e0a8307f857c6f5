"""The run configuration: one pydantic model validating pyproject defaults + overrides.

Flower hands the ServerApp and ClientApp a flat ``run_config`` dict with kebab-case keys
(``num-rounds``); :func:`parse_run_config` turns it into a :class:`RunConfig` or raises
:class:`ConfigError` with one message naming every bad key, its value and the valid choices.
It is called before anything trains: by ``run.sh`` (preflight), by the ServerApp at start-up
and by the ClientApp.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.dataspec import DATASET_NAMES, DataSpec
from common.devices import DEVICE_PROFILES, parse_list
from common.pace import PACE_METRICS, PaceConfig
from common.partition import PARTITION_SCHEMES
from common.selector import SelectorConfig
from common.zoo import FEDLL_LAYERS, MODEL_BLOCKS, MODEL_NAMES

STRATEGY_NAMES: tuple[str, ...] = (
    "fedavg",
    "smartfreeze",
    "exclusivefl",
    "allsmall",
    "tifl",
    "oort",
    "heterofl",
    "depthfl",
    "profl",
    "fedll",
)
PROGRESSIVE_STRATEGIES: tuple[str, ...] = ("smartfreeze", "profl")

StrategyName = Literal[STRATEGY_NAMES]  # type: ignore[valid-type]
ModelName = Literal[MODEL_NAMES]  # type: ignore[valid-type]
DatasetName = Literal[DATASET_NAMES]  # type: ignore[valid-type]
PartitionName = Literal[PARTITION_SCHEMES]  # type: ignore[valid-type]
PaceMetric = Literal[PACE_METRICS]  # type: ignore[valid-type]
DEVICE_CHOICES: tuple[str, ...] = (*DEVICE_PROFILES, "measured")
DeviceProfile = Literal[DEVICE_CHOICES]  # type: ignore[valid-type]
SELECTORS: tuple[str, ...] = ("rlcd", "random")
FAULT_MODES: tuple[str, ...] = ("raise", "nan", "huge", "keys", "shape", "examples", "mixed")
FaultMode = Literal[FAULT_MODES]  # type: ignore[valid-type]
SelectorName = Literal[SELECTORS]  # type: ignore[valid-type]


class ConfigError(ValueError):
    """A run-config value is invalid; the message names the key, the value and the choices."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class RunConfig(BaseModel):
    """Validated run configuration (keys are the kebab-case names used in pyproject.toml)."""

    model_config = ConfigDict(extra="forbid", alias_generator=_kebab, populate_by_name=True, frozen=True)

    strategy: StrategyName = "fedavg"
    model: ModelName = "resnet10"
    width: float = Field(0.25, gt=0, le=4, description="channel width multiplier")
    dataset: DatasetName = "synthetic"
    data_path: str = Field("", description="path of a local .npz dataset (dataset='npz')")
    data_dir: str = Field("", description="torchvision data directory (cifar10/cifar100)")
    download: bool = False
    synthetic_train_size: int = Field(6000, ge=10)
    synthetic_test_size: int = Field(1000, ge=10)
    num_classes: int = Field(
        0, ge=0, description="classes of the dataset; 0 = the labels 0..C-1 found in the data, without gaps"
    )
    partition: PartitionName = "iid"
    dirichlet_alpha: float = Field(0.5, gt=0)
    min_partition_size: int = Field(10, ge=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    num_rounds: int = Field(5, gt=0)
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(0.5, ge=0, le=1)
    min_train_nodes: int = Field(2, ge=1)
    min_available_nodes: int = Field(2, ge=1)
    node_wait_seconds: float = Field(120.0, gt=0, description="how long to wait for min-available-nodes (s)")
    round_timeout: float = Field(3600.0, gt=0, description="reply timeout per round (s)")
    poll_interval: float = Field(
        0.1, gt=0, le=30, description="deployment: seconds between pulls of replies from the SuperLink (Flower's: 3)"
    )
    overlap_server_work: Literal["auto", "on", "off"] = Field(
        "auto",
        description="push the next round's training before the server evaluates, records and checkpoints the "
        "last one (the nodes train meanwhile); auto = on in deployment, off in simulation",
    )
    evaluate_every: int = Field(
        0,
        ge=0,
        description="federated evaluation every N rounds and in the last; 0 = every round in simulation, "
        "only after the last round in deployment (other rounds: the training replies evaluate the model received)",
    )
    local_epochs: int = Field(1, gt=0)
    batch_size: int = Field(32, gt=0)
    eval_batch_size: int = Field(256, gt=0)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    seed: int = 0
    run_name: str = Field("", description="output folder name; empty = <strategy>-<model>-<timestamp>")
    output_dir: str = Field("", description="absolute results root; empty = $PROGFL_OUTPUT_DIR or ./outputs")
    client_threads: int = Field(1, ge=1, description="torch threads per client process")
    server_threads: int = Field(0, ge=0, description="torch threads of the ServerApp (0 = torch's default: all cores)")
    device_profile: DeviceProfile = Field("none", description="simulated memory/speed profile, or 'measured'")
    device_min_fraction: float = Field(0.3, gt=0, le=1, description="smallest budget, share of full-model memory")
    device_memory_mb: str = Field("", description="device-profile='list': comma-separated budgets in MB")
    selector: SelectorName = Field("rlcd", description="smartfreeze participant selection")
    stage_monitor: Literal["auto", "query", "with-round"] = Field(
        "auto",
        description="smartfreeze at a new stage: 'query' = a monitor query exchange before selection (paper); "
        "'with-round' = the query goes to the eligible nodes not selected, in the round's own exchange; "
        "auto = query in simulation, with-round in deployment",
    )
    selector_alpha: float = Field(2.0, ge=0, description="Oort straggler penalty exponent (0 = off)")
    selector_deadline_percentile: float = Field(80.0, ge=0, le=100)
    min_replies: int = Field(1, ge=1, description="valid training replies needed to aggregate a round")
    round_retries: int = Field(1, ge=0, description="times a round with too few valid replies is retried")
    fault_rate: float = Field(0.0, ge=0, le=1, description="testing: share of training replies made faulty")
    fault_mode: FaultMode = Field("raise", description="testing: how a faulty reply fails")
    reject_norm_factor: float = Field(10.0, ge=0, description="reject updates with norm > factor x median (0 = off)")
    tifl_tiers: int = Field(5, ge=1, description="TiFL: number of tiers by round time")
    monitor_steps: int = Field(5, ge=1, description="SGD steps on the output layer for the Eq. 8 gradient")
    min_stage_rounds: int = Field(2, ge=1, description="progressive: fewest rounds per stage")
    max_stage_rounds: int = Field(0, ge=0, description="progressive: most rounds per stage (0 = no cap)")
    outmod_warm_start: bool = Field(True, description="progressive: start each output module from the previous one")
    pace_metric: PaceMetric = "perturbation"
    pace_window: int = Field(5, ge=1, description="W: rounds of updates summed per scalar")
    pace_smooth: int = Field(3, ge=1, description="S: moving-average window of the block metric")
    pace_regress: int = Field(5, ge=2, description="R: smoothed values in the least-squares fit")
    pace_tau: float = Field(0.05, gt=0, description="threshold on |relative slope| per round")
    pace_consecutive: int = Field(3, ge=1, description="C: rounds in a row under tau to freeze")
    pace_eps: float = Field(1e-3, gt=0, description="eps added to |w| in the effective update")
    profl_shrinking: bool = Field(True, description="ProFL: run the shrinking phase (false: growing only, ablation)")
    profl_movement_threshold: float = Field(
        0.6, gt=0, le=1, description="ProFL: freeze only once the smoothed effective movement is <= this"
    )
    depthfl_ramp_share: float = Field(
        0.3, ge=0, le=1, description="DepthFL: share of the rounds over which distillation ramps up (0 = no ramp)"
    )
    fedll_rounds_per_layer: int = Field(
        0, ge=0, description="FedLL: rounds per layer, the last runs the rest (0 = num-rounds split evenly)"
    )
    fedll_dropout: float = Field(
        0.2, ge=0, lt=1, description="FedLL: depth dropout, probability of skipping a shape-preserving frozen layer"
    )
    fedll_objective: Literal["supervised", "ssl"] = Field(
        "supervised", description="FedLL: train on labels, or self-supervised on two augmented views (common.ssl)"
    )
    fedll_layerwise: bool = Field(
        True, description="FedLL: one layer per stage; false = the end-to-end reference (every layer every round)"
    )
    ssl_method: Literal["simclr", "simsiam"] = Field("simclr", description="fedll-objective='ssl': the objective")
    ssl_temperature: float = Field(0.5, gt=0, le=10, description="SimCLR's NT-Xent temperature")
    ssl_proj_dim: int = Field(64, ge=2, le=4096, description="output dim of the SSL projection head")
    ssl_eval_every: int = Field(
        5, ge=0, description="SSL: linear probe and k-NN every N rounds and after the last (0 = only after the last)"
    )
    ssl_probe_fraction: float = Field(
        0.2, gt=0, le=1, description="SSL: seeded share of the training split the server labels for the probe"
    )
    ssl_knn_k: int = Field(20, ge=1, description="SSL: neighbours of the k-NN accuracy")
    verbose: bool = False
    resume: bool = Field(False, description="continue run-name from its last checkpoint (same config)")
    overwrite: bool = Field(False, description="replace the results of an earlier run in the same folder")
    stop_after_round: int = Field(0, ge=0, description="testing: fail the ServerApp after this round (0 = never)")

    @model_validator(mode="after")
    def _check_data(self) -> RunConfig:
        if self.dataset == "npz":
            if not self.data_path:
                raise ValueError(
                    "data-path is required when dataset='npz' (path of an .npz with x_train, y_train, x_test, y_test)"
                )
            if not Path(self.data_path).expanduser().is_file():
                raise ValueError(f"data-path {self.data_path!r}: no such file")
        if self.device_profile == "list":
            parse_list(self.device_memory_mb, "device-memory-mb")
        if self.strategy in PROGRESSIVE_STRATEGIES:
            blocks = MODEL_BLOCKS[self.model]
            if self.max_stage_rounds and self.max_stage_rounds < self.min_stage_rounds:
                raise ValueError(
                    f"max-stage-rounds={self.max_stage_rounds} is below min-stage-rounds={self.min_stage_rounds}"
                )
            phases = 2 if self.strategy == "profl" and self.profl_shrinking else 1
            if self.num_rounds < phases * blocks * self.min_stage_rounds:
                per_phase = " x 2 phases (profl-shrinking=true)" if phases == 2 else ""
                raise ValueError(
                    f"num-rounds={self.num_rounds} is too few for strategy {self.strategy!r}: model {self.model!r} "
                    f"has {blocks} blocks{per_phase} x min-stage-rounds={self.min_stage_rounds}; "
                    f"use num-rounds >= {phases * blocks * self.min_stage_rounds}"
                )
        if self.strategy == "fedll" and self.fedll_layerwise:
            layers = FEDLL_LAYERS[self.model]
            if self.num_rounds < layers:
                raise ValueError(
                    f"num-rounds={self.num_rounds} is too few for strategy 'fedll': model {self.model!r} has "
                    f"{layers} layers, each trained for at least one round; use num-rounds >= {layers} "
                    f"(>= {layers * self.fedll_layer_rounds()} to give every layer "
                    f"fedll-rounds-per-layer={self.fedll_layer_rounds()})"
                )
        for key, value, default in (
            ("fedll-objective", self.fedll_objective, "supervised"),
            ("fedll-layerwise", self.fedll_layerwise, True),
        ):
            if value != default and self.strategy != "fedll":
                raise ValueError(f"{key}={value!r} applies to strategy 'fedll' only, not {self.strategy!r}")
        if self.resume and not self.run_name:
            raise ValueError("resume=true needs run-name (the folder of the run to continue, under output-dir)")
        if self.min_train_nodes > self.min_available_nodes:
            raise ValueError(
                f"min-train-nodes={self.min_train_nodes} exceeds min-available-nodes={self.min_available_nodes}"
            )
        return self

    def data_spec(self) -> DataSpec:
        """The part of the config that determines data and partitions (a hashable cache key)."""
        return DataSpec(
            dataset=self.dataset,
            data_path=str(Path(self.data_path).expanduser()) if self.data_path else "",
            data_dir=self.data_dir,
            download=self.download,
            seed=self.seed,
            synthetic_train_size=self.synthetic_train_size,
            synthetic_test_size=self.synthetic_test_size,
            partition=self.partition,
            dirichlet_alpha=self.dirichlet_alpha,
            min_partition_size=self.min_partition_size,
            val_fraction=self.val_fraction,
            num_classes=self.num_classes,
        )

    @property
    def self_supervised(self) -> bool:
        """True for FedLL's self-supervised mode (``fedll-objective='ssl'``)."""
        return self.strategy == "fedll" and self.fedll_objective == "ssl"

    def fedll_layer_rounds(self) -> int:
        """FedLL's rounds per layer: ``fedll-rounds-per-layer``, or with 0 ``num-rounds // layers`` (at least 1)."""
        if self.fedll_rounds_per_layer:
            return self.fedll_rounds_per_layer
        return max(1, self.num_rounds // FEDLL_LAYERS[self.model])

    def pace_config(self) -> PaceConfig:
        """The pace controller's settings (pace-* keys)."""
        return PaceConfig(
            metric=self.pace_metric,
            window=self.pace_window,
            smooth=self.pace_smooth,
            regress=self.pace_regress,
            tau=self.pace_tau,
            consecutive=self.pace_consecutive,
            eps=self.pace_eps,
        )

    def profl_pace_config(self) -> PaceConfig:
        """ProFL's freezing rule: the pace controller on effective movement (see ``common/profl.py``).

        Same window, smoothing, regression, tau and streak as SmartFreeze (pace-* keys), with the
        metric ``effective-movement``, ``eps`` 1e-8 (added to the sum of |updates|; pace-eps is
        SmartFreeze's, added to |w|) and the level profl-movement-threshold.
        """
        return PaceConfig(
            metric="effective-movement",
            window=self.pace_window,
            smooth=self.pace_smooth,
            regress=self.pace_regress,
            tau=self.pace_tau,
            consecutive=self.pace_consecutive,
            eps=1e-8,
            level=self.profl_movement_threshold,
        )

    def selector_config(self) -> SelectorConfig:
        """The participant selector's settings (selector-* keys and the run seed)."""
        return SelectorConfig(
            alpha=self.selector_alpha, deadline_percentile=self.selector_deadline_percentile, seed=self.seed
        )

    def to_flat(self) -> dict[str, Any]:
        """The resolved config as a flat kebab-case dict (what is written to config.json)."""
        return self.model_dump(by_alias=True)


def valid_keys() -> list[str]:
    """All run-config keys, kebab-case."""
    return [_kebab(k) for k in RunConfig.model_fields]


def _describe(err: Mapping[str, Any], raw: Mapping[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()))
    key = _kebab(loc) if loc else ""
    etype = err.get("type", "")
    if etype == "extra_forbidden":
        close = difflib.get_close_matches(key, valid_keys(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key {key!r}{hint}; valid keys: {', '.join(valid_keys())}"
    if not key:
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        return msg
    value = raw.get(key, err.get("input"))
    field = RunConfig.model_fields[loc.replace("-", "_")]
    choices = get_args(field.annotation)
    if etype == "literal_error" and choices:
        return f"{key}={value!r} is not valid; valid choices: {', '.join(map(str, choices))}"
    return f"{key}={value!r} is not valid: {err.get('msg', '')}"


def parse_run_config(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a flat kebab-case run config; raise :class:`ConfigError` on any bad value."""
    try:
        return RunConfig.model_validate(dict(raw))
    except ValidationError as exc:
        problems = [_describe(e, raw) for e in exc.errors()]
        raise ConfigError("invalid run config: " + "; ".join(problems)) from None
