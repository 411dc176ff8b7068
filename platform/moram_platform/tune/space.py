"""Sweep space files (``tune_spaces/*.yaml``): what to search, how, and for which job config.

    base_config: jobs/configs/trace/smollm2-135m_moram.yaml   # the job config the sweep tunes
    trial_overrides:                                          # shorten training trials (not the best config)
      data.max_train_examples: 64
    params:
      tau:   {space: loguniform, low: 0.005, high: 0.5}
      k:     {space: choice, values: [4, 8, 16]}
      delta: {space: grid, values: [0.0, 0.1, 0.2, 0.3]}      # inference only: swept without retraining
    search:    {algorithm: optuna, num_samples: 16, max_concurrent: 2, seed: 0}
    scheduler: {name: asha, grace_period: 1, reduction_factor: 2}
    objective: {metric: op, mode: max, forgetting_weight: 0.5}
    delta_stage: {top_trials: 2, num_samples: 4}
    resources: {trial_cpu: 0.1}

Everything is checked when the file is read; a bad value is an error that names its key
(``params.tau.low: must be > 0, got 0``). Hyperparameter values are also checked against the
base job config (``space.job_config()``), so a sweep never starts with a value a trial rejects.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, JobConfig, apply_override, config_from_dict, read_yaml_mapping

SPACES = ("loguniform", "uniform", "choice", "randint", "grid")
ALGORITHMS = ("optuna", "random")
SCHEDULERS = ("asha", "fifo")
METRICS = ("op", "bwt", "forgetting", "forgetting_magnitude")
MODES = ("max", "min")

# Short names for the knobs a MoRAM sweep usually tunes; any other parameter names its `key`.
KNOWN_KEYS = {"tau": "moram.tau", "k": "moram.k", "delta": "moram.delta", "lr": "train.lr", "r": "moram.r"}
# Knobs that act at inference only: swept by evaluating finished trials, never by training.
INFERENCE_KEYS = frozenset({"moram.delta"})


class SpaceError(ValueError):
    """A sweep space file is invalid; the message starts with the key at fault."""


# -- the parts of a space ------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One hyperparameter: the job-config key it sets and the space its values come from.

    ``randint`` includes both ends (``low: 2, high: 16`` can give 16)."""

    name: str
    key: str
    space: str
    low: float | int | None = None
    high: float | int | None = None
    values: tuple = ()

    @property
    def inference_only(self) -> bool:
        return self.key in INFERENCE_KEYS

    @property
    def candidates(self) -> list[tuple[str, Any]]:
        """(field, value) pairs that bound every value the space can give: checked up front."""
        if self.space in ("choice", "grid"):
            return [(f"values[{i}]", v) for i, v in enumerate(self.values)]
        return [("low", self.low), ("high", self.high)]

    def domain(self):
        """The Ray Tune search-space object."""
        from ray import tune

        if self.space == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.space == "uniform":
            return tune.uniform(self.low, self.high)
        if self.space == "randint":
            return tune.randint(self.low, self.high + 1)  # Tune's upper bound is exclusive
        if self.space == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))


@dataclass(frozen=True)
class Search:
    algorithm: str = "optuna"
    num_samples: int = 8        # training trials (a grid is repeated num_samples times)
    max_concurrent: int = 2     # upper bound; the cluster's resources may allow fewer
    seed: int = 0


@dataclass(frozen=True)
class Scheduler:
    name: str = "asha"
    grace_period: int = 1       # tasks every trial trains before it may be stopped
    reduction_factor: float = 2.0


@dataclass(frozen=True)
class Objective:
    """What a sweep maximises (or minimises): ``metric - forgetting_weight * forgetting``.

    Metrics are over the tasks trained so far: ``op`` (mean final-row score), ``bwt`` (signed,
    standard), ``forgetting`` (= -BWT) and ``forgetting_magnitude`` (the reference repo's)."""

    metric: str = "op"
    mode: str = "max"
    forgetting_weight: float = 0.0

    @property
    def needs_diagonal(self) -> bool:
        """Whether scoring needs R[j][j] (each task right after it was trained), not just the last row."""
        return self.metric != "op" or self.forgetting_weight > 0

    def scores(self, matrix: list[list[float]]) -> dict[str, float]:
        """Every metric and the objective of an accuracy matrix's trained-so-far square.

        Rows may be longer than the number of rows (run_sequence fills every column)."""
        from moram.metrics import average_performance, backward_transfer, reference_forgetting

        seen = len(matrix)
        square = [list(row[:seen]) for row in matrix]
        bwt = backward_transfer(square)
        values = {"op": average_performance(square), "bwt": bwt, "forgetting": -bwt,
                  "forgetting_magnitude": reference_forgetting(square)}
        values["objective"] = values[self.metric] - self.forgetting_weight * values["forgetting"]
        return values

    def scores_from(self, final_row: list[float], diagonal: list[float]) -> dict[str, float]:
        """The same from the last row and the diagonal only (all these metrics read nothing else);
        what an evaluation-only trial measures."""
        T = len(final_row)
        matrix = [[diagonal[i] if j == i else 0.0 for j in range(T)] for i in range(T - 1)] + [list(final_row)]
        return self.scores(matrix)


@dataclass(frozen=True)
class DeltaStage:
    top_trials: int = 1         # best finished training trials whose final versions get the δ sweep
    num_samples: int = 4        # δ values per trial when δ's space is not a grid


@dataclass(frozen=True)
class Resources:
    trial_cpu: float = 0.1      # a training trial's own share (its Ray Train workers come on top)


# -- the space ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepSpace:
    base_config: str
    params: tuple[Param, ...]
    trial_overrides: dict[str, Any] = field(default_factory=dict)
    search: Search = field(default_factory=Search)
    scheduler: Scheduler = field(default_factory=Scheduler)
    objective: Objective = field(default_factory=Objective)
    delta_stage: DeltaStage = field(default_factory=DeltaStage)
    resources: Resources = field(default_factory=Resources)
    source: str | None = None   # the file it was read from

    @property
    def training_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.inference_only)

    @property
    def inference_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.inference_only)

    def to_dict(self) -> dict[str, Any]:
        params = {}
        for p in self.params:
            entry = {"key": p.key, "space": p.space}
            bounds = {"values": list(p.values)} if p.space in ("choice", "grid") else {"low": p.low, "high": p.high}
            entry.update(bounds)
            params[p.name] = entry
        sections = {name: _section_dict(getattr(self, name))
                    for name in ("search", "scheduler", "objective", "delta_stage", "resources")}
        return {"base_config": self.base_config, "trial_overrides": dict(self.trial_overrides),
                "params": params, **sections}

    def digest(self) -> str:
        """Identifies what the sweep searches; a resumed sweep must have the same."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    # -- binding to job configs ----------------------------------------------------------------
    def base_raw(self, overrides: list[str] | None = None) -> dict[str, Any]:
        """The base job config as YAML data, with ``key=value`` overrides applied (not validated)."""
        path = Path(self.base_config).expanduser()
        if not path.is_file():
            raise SpaceError(f"base_config: {self.base_config} not found (relative paths are read from the "
                             f"current directory, {Path.cwd()})")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise SpaceError(f"base_config: {path} is not valid YAML ({error})") from None
        for override in overrides or []:
            apply_override(raw, override)
        return raw

    def job_config(self, overrides: list[str] | None = None) -> JobConfig:
        """The validated base job config; also checks that the trial overrides and every bound
        of every hyperparameter make a valid job config."""
        raw = self.base_raw(overrides)
        base = _validated(raw, "base_config")
        trial_raw = self.trial_raw(raw)
        _validated(trial_raw, "trial_overrides")
        for param in self.params:
            for where, value in param.candidates:
                candidate = copy.deepcopy(trial_raw)
                set_path(candidate, param.key, value)
                try:
                    config_from_dict(candidate)
                except ConfigError as error:
                    raise SpaceError(f"params.{param.name}.{where}: {value!r} is not a valid {param.key} "
                                     f"for {self.base_config} ({error})") from None
        return base

    def trial_raw(self, base_raw: dict[str, Any]) -> dict[str, Any]:
        """A training trial's job config before its hyperparameters: the base, shortened."""
        raw = copy.deepcopy(base_raw)
        for key, value in self.trial_overrides.items():
            set_path(raw, key, value)
        return raw


def with_params(raw: dict[str, Any], params: dict[str, Param], values: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with each hyperparameter's value written at its job-config key."""
    raw = copy.deepcopy(raw)
    for name, value in values.items():
        set_path(raw, params[name].key, _plain(value))
    return raw


def set_path(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpaceError(f"{key}: {part} is not a section")
    node[parts[-1]] = value


def _plain(value: Any) -> Any:
    """numpy scalars (from samplers) as plain Python numbers, so YAML and MLflow read them."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def _validated(raw: dict[str, Any], where: str) -> JobConfig:
    try:
        return config_from_dict(raw)
    except ConfigError as error:
        raise SpaceError(f"{where}: {error}") from None


def _section_dict(section) -> dict[str, Any]:
    return {f.name: getattr(section, f.name) for f in fields(section)}


# -- reading -------------------------------------------------------------------------------------
TOP_LEVEL = ("base_config", "trial_overrides", "params", "search", "scheduler", "objective", "delta_stage",
             "resources")


def load_space(path: str | os.PathLike, overrides: list[str] | None = None) -> SweepSpace:
    """Read and check a space file; ``overrides`` are ``key.path=value`` edits (``search.num_samples=4``)."""
    raw = read_yaml_mapping(path, "space file", SpaceError)
    for override in overrides or []:
        try:
            apply_override(raw, override)
        except ConfigError as error:
            raise SpaceError(str(error)) from None
    return space_from_dict(raw, source=str(path))


def space_from_dict(raw: dict[str, Any], source: str | None = None) -> SweepSpace:
    _no_unknown(raw, TOP_LEVEL, "")
    base_config = raw.get("base_config")
    _require("base_config", isinstance(base_config, str) and base_config.strip(), "must name a job config file",
             base_config)
    space = SweepSpace(
        base_config=base_config,
        params=_params(raw.get("params")),
        trial_overrides=_overrides(raw.get("trial_overrides")),
        search=_section(Search, raw.get("search"), "search"),
        scheduler=_section(Scheduler, raw.get("scheduler"), "scheduler"),
        objective=_section(Objective, raw.get("objective"), "objective"),
        delta_stage=_section(DeltaStage, raw.get("delta_stage"), "delta_stage"),
        resources=_section(Resources, raw.get("resources"), "resources"),
        source=source,
    )
    _check(space)
    return space


def _params(raw: Any) -> tuple[Param, ...]:
    _require("params", isinstance(raw, dict) and raw, "must map at least one hyperparameter to its space", raw)
    return tuple(_param(name, spec) for name, spec in raw.items())


def _param(name: str, spec: Any) -> Param:
    where = f"params.{name}"
    _require(where, isinstance(spec, dict), "must be a mapping with 'space' and its bounds or values", spec)
    _no_unknown(spec, ("space", "low", "high", "values", "key"), f"{where}.")
    key = spec.get("key", KNOWN_KEYS.get(name))
    _require(f"{where}.key", isinstance(key, str) and key,
             f"must name the job-config key it sets (known names: {sorted(KNOWN_KEYS)})", key)
    space = spec.get("space")
    _require(f"{where}.space", space in SPACES, f"must be one of {list(SPACES)}", space)
    if space in ("choice", "grid"):
        values = spec.get("values")
        _require(f"{where}.values", isinstance(values, list) and values, "must be a non-empty list", values)
        _require(f"{where}.values", len({json.dumps(v, sort_keys=True) for v in values}) == len(values),
                 "lists a value twice", values)
        for bound in ("low", "high"):
            _require(f"{where}.{bound}", bound not in spec, f"does not apply to a {space} space (it takes values)",
                     spec.get(bound))
        return Param(name, key, space, values=tuple(values))
    _require(f"{where}.values", "values" not in spec, f"does not apply to a {space} space (it takes low and high)",
             spec.get("values"))
    low, high = (_number(f"{where}.{bound}", spec.get(bound), integer=space == "randint") for bound in ("low", "high"))
    if space == "loguniform":
        _require(f"{where}.low", low > 0, "must be > 0", spec["low"])
    _require(f"{where}.high", high > low if space != "randint" else high >= low,
             f"must be {'>' if space != 'randint' else '>='} low ({spec['low']})", spec["high"])
    return Param(name, key, space, low=low, high=high)


def _number(key: str, value: Any, integer: bool) -> float | int:
    if isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if integer:
        _require(key, isinstance(value, int) and not isinstance(value, bool), "must be an integer", value)
        return value
    _require(key, isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
             "must be a number", value)
    return float(value)


def _overrides(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    _require("trial_overrides", isinstance(raw, dict), "must map job-config keys (data.max_train_examples) to values",
             raw)
    for key in raw:
        _require(f"trial_overrides.{key}", isinstance(key, str) and all(key.split(".")),
                 "must be a dotted job-config key", key)
    return dict(raw)


def _section(cls, raw: Any, where: str):
    if raw is None:
        return cls()
    _require(where, isinstance(raw, dict), "must be a mapping", raw)
    known = {f.name: f for f in fields(cls)}
    _no_unknown(raw, tuple(known), f"{where}.")
    values = {}
    for name, value in raw.items():
        default = getattr(cls(), name)
        if isinstance(default, float):
            value = _number(f"{where}.{name}", value, integer=False)
        elif isinstance(default, int):
            value = _number(f"{where}.{name}", value, integer=True)
        else:
            _require(f"{where}.{name}", isinstance(value, str), "must be a string", value)
        values[name] = value
    return cls(**values)


def _check(space: SweepSpace) -> None:
    search, scheduler, objective = space.search, space.scheduler, space.objective
    rules = [
        ("search.algorithm", search.algorithm in ALGORITHMS, f"must be one of {list(ALGORITHMS)}", search.algorithm),
        ("search.num_samples", search.num_samples >= 1, "must be >= 1", search.num_samples),
        ("search.max_concurrent", search.max_concurrent >= 1, "must be >= 1", search.max_concurrent),
        ("search.seed", search.seed >= 0, "must be >= 0", search.seed),
        ("scheduler.name", scheduler.name in SCHEDULERS, f"must be one of {list(SCHEDULERS)}", scheduler.name),
        ("scheduler.grace_period", scheduler.grace_period >= 1, "must be >= 1 (tasks)", scheduler.grace_period),
        ("scheduler.reduction_factor", scheduler.reduction_factor > 1, "must be > 1", scheduler.reduction_factor),
        ("objective.metric", objective.metric in METRICS, f"must be one of {list(METRICS)}", objective.metric),
        ("objective.mode", objective.mode in MODES, "must be 'max' or 'min'", objective.mode),
        ("objective.forgetting_weight", objective.forgetting_weight >= 0, "must be >= 0", objective.forgetting_weight),
        ("objective.forgetting_weight", objective.forgetting_weight == 0 or objective.mode == "max",
         "penalises forgetting, so it needs mode: max", objective.forgetting_weight),
        ("delta_stage.top_trials", space.delta_stage.top_trials >= 1, "must be >= 1", space.delta_stage.top_trials),
        ("delta_stage.num_samples", space.delta_stage.num_samples >= 1, "must be >= 1", space.delta_stage.num_samples),
        ("resources.trial_cpu", space.resources.trial_cpu > 0, "must be > 0", space.resources.trial_cpu),
    ]
    for key, ok, rule, value in rules:
        _require(key, ok, rule, value)
    keys = [p.key for p in space.params]
    for param in space.params:
        _require(f"params.{param.name}.key", keys.count(param.key) == 1, "is set by two hyperparameters", param.key)
        _require(f"params.{param.name}.space", not (param.space == "grid" and search.algorithm == "optuna"
                                                    and not param.inference_only),
                 "grid needs search.algorithm: random (Optuna samples a space, it does not enumerate one); "
                 "use choice", param.space)
        _require(f"trial_overrides.{param.key}", param.key not in space.trial_overrides,
                 f"is swept by params.{param.name}; it cannot also be fixed", space.trial_overrides.get(param.key))


def _no_unknown(raw: dict, known: tuple[str, ...], prefix: str) -> None:
    unknown = sorted(set(raw) - set(known), key=str)
    if unknown:
        raise SpaceError(f"{prefix}{unknown[0]}: unknown key; known keys here: {sorted(known)}")


def _require(key: str, ok: Any, rule: str, value: Any) -> None:
    if not ok:
        raise SpaceError(f"{key}: {rule}, got {value!r}")
