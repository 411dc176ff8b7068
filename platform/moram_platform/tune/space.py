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
from pathlib import Path
from typing import Annotated, Any

import pydantic
import yaml
from pydantic import BeforeValidator, ConfigDict, Field, PrivateAttr

from moram.validation import error_lines

from ..config import ConfigError, JobConfig, apply_override, config_from_dict, read_yaml_mapping
from ..config import set_path as _set_path
from ..sections import AtLeastOne, AtLeastZero, Int, NonEmptyStr, Real, Section, Str, first_per_key, one_of, rule

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
    """A sweep space file is invalid; each line of the message starts with the key at fault."""


class _Frozen(Section):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _bound(value: Any) -> Any:
    """A bound as written (an int stays an int: randint needs one); numeric strings are numbers."""
    if isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value)):
        raise ValueError("must be a number")
    return value


def _choices(names: tuple[str, ...]):
    return rule(lambda v: v in names, f"must be one of {list(names)}")


Bound = Annotated[int | float | None, BeforeValidator(_bound)]


# -- the parts of a space ------------------------------------------------------------------------
class Param(_Frozen):
    """One hyperparameter: the job-config key it sets and the space its values come from; its
    name is its key under ``params:``.

    ``randint`` includes both ends (``low: 2, high: 16`` can give 16)."""

    space: Annotated[Str, _choices(SPACES)] = Field(description="loguniform | uniform | choice | randint | grid")
    key: NonEmptyStr | None = Field(None, description="the job-config key it sets (default for tau, k, delta, lr, "
                                                      "r: their moram.* / train.* key)")
    low: Bound = Field(None, description="lower bound (loguniform, uniform, randint)")
    high: Bound = Field(None, description="upper bound, included for randint")
    values: list[Any] | None = Field(None, description="the values (choice, grid)")
    _name: str = PrivateAttr("")

    @property
    def name(self) -> str:
        return self._name

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


class Search(_Frozen):
    algorithm: Annotated[Str, _choices(ALGORITHMS)] = Field("optuna", description="optuna | random")
    num_samples: AtLeastOne = Field(8, description="training trials (a grid is repeated num_samples times)")
    max_concurrent: AtLeastOne = Field(2, description="upper bound on concurrent trials; the cluster's resources "
                                                      "may allow fewer")
    seed: AtLeastZero = Field(0, description="seed of the search algorithm")


class Scheduler(_Frozen):
    name: Annotated[Str, _choices(SCHEDULERS)] = Field("asha", description="asha | fifo")
    grace_period: Annotated[Int, rule(lambda v: v >= 1, "must be >= 1 (tasks)")] = Field(
        1, description="tasks every trial trains before it may be stopped")
    reduction_factor: Annotated[Real, rule(lambda v: v > 1, "must be > 1")] = Field(2.0, description="ASHA's "
                                                                                                   "reduction factor")


class Objective(_Frozen):
    """What a sweep maximises (or minimises): ``metric - forgetting_weight * forgetting``.

    Metrics are over the tasks trained so far: ``op`` (mean final-row score), ``bwt`` (signed,
    standard), ``forgetting`` (= -BWT) and ``forgetting_magnitude`` (the reference repo's)."""

    metric: Annotated[Str, _choices(METRICS)] = Field("op", description="op | bwt | forgetting | "
                                                                        "forgetting_magnitude")
    mode: Annotated[Str, one_of(*MODES)] = Field("max", description="max | min")
    forgetting_weight: Annotated[Real, rule(lambda v: v >= 0, "must be >= 0")] = Field(
        0.0, description="weight of the forgetting penalty (needs mode: max)")

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


class DeltaStage(_Frozen):
    top_trials: AtLeastOne = Field(1, description="best finished training trials whose final versions get the "
                                                  "δ sweep")
    num_samples: AtLeastOne = Field(4, description="δ values per trial when δ's space is not a grid")


class Resources(_Frozen):
    trial_cpu: Annotated[Real, rule(lambda v: v > 0, "must be > 0")] = Field(
        0.1, description="a training trial's own CPU share (its Ray Train workers come on top)")


def _base_config(value: Any) -> Any:
    if not (isinstance(value, str) and value.strip()):
        raise ValueError("must name a job config file")
    return value


def _dotted_keys(overrides: dict[str, Any]) -> dict[str, Any]:
    for key in overrides:
        if not all(key.split(".")):
            raise ValueError(f"{key!r} is not a dotted job-config key")
    return overrides


# -- the space ---------------------------------------------------------------------------------
class SweepSpace(_Frozen):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    base_config: Annotated[str, BeforeValidator(_base_config)] = Field(
        None, validate_default=True, description="required: the job config the sweep tunes (a path from the "
                                                 "working directory)")
    trial_overrides: Annotated[dict[Str, Any], pydantic.AfterValidator(_dotted_keys)] = Field(
        default_factory=dict, description="job-config key -> value for training trials only (shorter trials); "
                                          "not in the best config")
    param_specs: Annotated[dict[Str, Param], rule(bool, "must map at least one hyperparameter to its space")] = Field(
        alias="params", description="name -> its space")
    search: Search = Field(default_factory=Search, description="the search algorithm")
    scheduler: Scheduler = Field(default_factory=Scheduler, description="early stopping of weak trials")
    objective: Objective = Field(default_factory=Objective, description="what the sweep optimises")
    delta_stage: DeltaStage = Field(default_factory=DeltaStage, description="δ swept by evaluation only")
    resources: Resources = Field(default_factory=Resources, description="a trial's own resources")
    _source: str | None = PrivateAttr(None)

    @property
    def source(self) -> str | None:
        """The file it was read from."""
        return self._source

    @property
    def params(self) -> tuple[Param, ...]:
        return tuple(self.param_specs.values())

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
        sections = {name: getattr(self, name).model_dump()
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
    """``config.set_path`` with a space file's error."""
    _set_path(raw, key, value, SpaceError)


def _plain(value: Any) -> Any:
    """numpy scalars (from samplers) as plain Python numbers, so YAML and MLflow read them."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def _validated(raw: dict[str, Any], where: str) -> JobConfig:
    try:
        return config_from_dict(raw)
    except ConfigError as error:
        raise SpaceError(f"{where}: {error}") from None


# -- reading -------------------------------------------------------------------------------------
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
    """Check a space: every key's type and range (all reported at once), then the rules between
    keys; a hyperparameter's name, default key and bounds are filled in."""
    try:
        space = SweepSpace.model_validate(raw)
    except pydantic.ValidationError as error:
        raise SpaceError("\n".join(first_per_key(error_lines(error)))) from None
    for name, param in space.param_specs.items():
        _name(param, name)
    problems = [line for name, param in space.param_specs.items() for line in _param_problems(name, param)]
    problems += _space_problems(space) if not problems else []
    if problems:
        raise SpaceError("\n".join(problems))
    for param in space.params:
        _normalise(param)
    space._source = source
    return space


# A Param is frozen once handed out; these fill in what only the space knows, before that.
def _name(param: Param, name: str) -> None:
    """The name (its key under params:) and the default job-config key of a known name."""
    param._name = name
    if param.key is None and name in KNOWN_KEYS:
        object.__setattr__(param, "key", KNOWN_KEYS[name])
    object.__setattr__(param, "values", tuple(param.values) if param.values is not None else ())


def _normalise(param: Param) -> None:
    """Float bounds for the continuous spaces (randint keeps its ints)."""
    if param.space in ("loguniform", "uniform"):
        for bound in ("low", "high"):
            if isinstance(getattr(param, bound), int):
                object.__setattr__(param, bound, float(getattr(param, bound)))


def _param_problems(name: str, param: Param) -> list[str]:
    where, space = f"params.{name}", param.space
    rules = [(f"{where}.key", param.key is not None,
              f"must name the job-config key it sets (known names: {sorted(KNOWN_KEYS)})", param.key)]
    if space in ("choice", "grid"):
        rules += [(f"{where}.values", bool(param.values), "must be a non-empty list", list(param.values)),
                  (f"{where}.values", len({json.dumps(v, sort_keys=True) for v in param.values}) == len(param.values),
                   "lists a value twice", list(param.values))]
        rules += [(f"{where}.{bound}", getattr(param, bound) is None,
                   f"does not apply to a {space} space (it takes values)", getattr(param, bound))
                  for bound in ("low", "high")]
    else:
        low, high = param.low, param.high
        rules += [(f"{where}.values", not param.values, f"does not apply to a {space} space (it takes low and high)",
                   list(param.values))]
        rules += [(f"{where}.{bound}", value is not None, "must be a number", value)
                  for bound, value in (("low", low), ("high", high))]
        if space == "randint":
            rules += [(f"{where}.{bound}", value is None or (isinstance(value, int) and not isinstance(value, bool)),
                       "must be an integer", value) for bound, value in (("low", low), ("high", high))]
        numbers = low is not None and high is not None
        if space == "loguniform":
            rules.append((f"{where}.low", low is None or low > 0, "must be > 0", low))
        rules.append((f"{where}.high", not numbers or (high > low if space != "randint" else high >= low),
                      f"must be {'>' if space != 'randint' else '>='} low ({low})", high))
    return _broken(rules)


def _space_problems(space: SweepSpace) -> list[str]:
    search, objective = space.search, space.objective
    rules = [("objective.forgetting_weight", objective.forgetting_weight == 0 or objective.mode == "max",
              "penalises forgetting, so it needs mode: max", objective.forgetting_weight)]
    keys = [p.key for p in space.params]
    for param in space.params:
        rules += [
            (f"params.{param.name}.key", keys.count(param.key) == 1, "is set by two hyperparameters", param.key),
            (f"params.{param.name}.space", not (param.space == "grid" and search.algorithm == "optuna"
                                                and not param.inference_only),
             "grid needs search.algorithm: random (Optuna samples a space, it does not enumerate one); use choice",
             param.space),
            (f"trial_overrides.{param.key}", param.key not in space.trial_overrides,
             f"is swept by params.{param.name}; it cannot also be fixed", space.trial_overrides.get(param.key)),
        ]
    return _broken(rules)


def _broken(rules: list[tuple[str, Any, str, Any]]) -> list[str]:
    """``key: rule, got value`` for each rule that does not hold; one line per key."""
    return first_per_key([f"{key}: {rule_text}, got {value!r}" for key, ok, rule_text, value in rules if not ok])
