"""Studies: a grid of whole continual-learning sequences (methods x seeds x task orders, or any
job-config key), run as Ray Tune trials under one MLflow parent, then compared in one report.

    study = load_study("studies/trace-methods.yaml")
    result = run_study(study, "methods-v1")        # the same name again resumes; finished points are skipped
    report = report_study(result)                  # moram_platform.report: the comparison, logged on the study's run

A grid file is a base job config, fixed overrides and a grid (every combination is one point):

    base_config: jobs/configs/trace/smollm2-135m_moram.yaml
    overrides: {data.max_train_examples: 64}       # every point
    grid:
      moram.method: [moram, moelora, olora]        # a list of values ...
      run.seed: [0, 1, 2]
      data.tasks:                                  # ... or label -> value (labels name the runs)
        order1: [dbpedia, amazon, yahoo, agnews]
        order2: [dbpedia, amazon, agnews, yahoo]
    resources: {trial_cpu: 0.1, max_concurrent: 4}

A point's run id is ``<study>--<key>-<label>--...`` (last key part: ``method-moram``), so a rerun
finds its sequence again: a finished one (MLflow status FINISHED) is not started at all, an
interrupted one resumes from the registry (run_sequence), and recorded evaluations are reused.
Each trial runs its sequence as the sweep's training trials do (``runner.sequence_rows``): the sequence runs
outside the trial's placement group, with the trial's own share small (tune/resources.py).
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pydantic
from pydantic import BeforeValidator, ConfigDict, Field, PrivateAttr

from moram.validation import error_lines

from ..config import ConfigError, JobConfig, apply_override, config_from_dict, read_yaml_mapping
from ..names import name_problem
from ..sections import AtLeastOne, Real, Section, Str, first_per_key, rule
from ..tracking import AXES_TAG, LABEL_TAG_PREFIX, STUDY_TAG
from ..schedule import KNOWN_METRICS, check_gives, cheapest_for
from .resources import training_trial_share
from .space import set_path
from .runner import check_name, sequence_rows, trial_concurrency, tune_resources
from .tracking import SweepTracker

log = logging.getLogger(__name__)

_MAX_RUN_ID = 128


class StudyError(ValueError):
    """A grid file is invalid; each line of the message starts with the key at fault."""


# -- the grid file -------------------------------------------------------------------------------
class StudyResources(Section):
    model_config = ConfigDict(extra="forbid", frozen=True)
    trial_cpu: Annotated[Real, rule(lambda v: v > 0, "must be > 0")] = Field(
        0.1, description="a trial's own CPU share (its Ray Train workers come on top)")
    max_concurrent: AtLeastOne = Field(4, description="upper bound on concurrent sequences; the cluster's "
                                                      "resources may allow fewer")


# The report's columns (report.METRICS) but FWT, which needs every cell and the zero-shot row.
DEFAULT_METRICS = ("OP", "BWT_eq10", "forgetting_ref", "own_routing")


def _axis(value: Any) -> Any:
    """A grid axis: a non-empty list of values, or a non-empty mapping label -> value."""
    if isinstance(value, dict):
        if not value:
            raise ValueError("must map at least one label to a value")
        return {str(label): v for label, v in value.items()}
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of values (or a mapping label -> value)")
    return value


def _base_config(value: Any) -> Any:
    if not (isinstance(value, str) and value.strip()):
        raise ValueError("must name a job config file")
    return value


class StudyGrid(Section):
    model_config = ConfigDict(extra="forbid", frozen=True)
    base_config: Annotated[str, BeforeValidator(_base_config)] = Field(
        None, validate_default=True, description="required: the job config every point starts from")
    overrides: dict[Str, Any] = Field(default_factory=dict, description="job-config key -> value for every point")
    grid: Annotated[dict[Str, Annotated[Any, BeforeValidator(_axis)]],
                    rule(bool, "must map at least one job-config key to its values")] = Field(
        description="job-config key -> values (a list, or label -> value); every combination is one sequence")
    resources: StudyResources = Field(default_factory=StudyResources, description="a trial's resources")
    metrics: Annotated[list[Annotated[Str, rule(lambda v: v in KNOWN_METRICS, f"must be one of {sorted(KNOWN_METRICS)}")]],
                       rule(bool, "must name at least one report column")] = Field(
        default_factory=lambda: list(DEFAULT_METRICS),
        description="the report's columns the study is for; a base config without eval.schedule gets the "
                    "cheapest schedule that computes them (moram_platform.schedule), one with it is checked")
    _source: str | None = PrivateAttr(None)

    @property
    def source(self) -> str | None:
        """The file it was read from."""
        return self._source

    def axes(self) -> dict[str, dict[str, Any]]:
        """key -> {label: value}, labels as run ids show them."""
        return {key: (dict(values) if isinstance(values, dict) else {_label(v): v for v in values})
                for key, values in self.grid.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"base_config": self.base_config, "overrides": dict(self.overrides), "grid": dict(self.grid),
                "resources": self.resources.model_dump(), "metrics": list(self.metrics)}


@dataclass(frozen=True)
class StudyPoint:
    """One sequence of the study: its labels per grid key, run id and validated job config."""

    labels: dict[str, str]
    run_id: str
    config: dict[str, Any] = field(repr=False)


def load_study(path: str | Path) -> StudyGrid:
    raw = read_yaml_mapping(path, "grid file", StudyError)
    return study_from_dict(raw, source=str(path))


def study_from_dict(raw: dict[str, Any], source: str | None = None) -> StudyGrid:
    try:
        grid = StudyGrid.model_validate(raw)
    except pydantic.ValidationError as error:
        raise StudyError("\n".join(first_per_key(error_lines(error)))) from None
    problems = [f"grid.{key}: {key!r} is not a dotted job-config key" for key in grid.grid if not all(key.split("."))]
    for key, labels in grid.axes().items():
        if len(labels) != len(grid.grid[key]):
            problems.append(f"grid.{key}: two values give the same label; name them (label: value)")
        problems += [f"grid.{key}: label {label!r} {name_problem(label)} (it names runs)"
                     for label in labels if name_problem(label) is not None]
    if problems:
        raise StudyError("\n".join(problems))
    grid._source = source
    return grid


def _label(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", str(value)).strip("-")
    return text or "none"


def base_raw(grid: StudyGrid, job_overrides: list[str] | None = None) -> dict[str, Any]:
    """The base job config with the grid file's overrides and the command line's ``key=value``."""
    path = Path(grid.base_config).expanduser()
    raw = read_yaml_mapping(path, "base_config", StudyError)
    for key, value in grid.overrides.items():
        set_path(raw, key, copy.deepcopy(value))
    for override in job_overrides or []:
        apply_override(raw, override)
    eval_section = raw.setdefault("eval", {})
    if isinstance(eval_section, dict):
        if "schedule" not in eval_section and "eval.schedule" not in grid.grid:
            eval_section["schedule"] = cheapest_for(grid.metrics)
        elif "schedule" in eval_section:
            try:
                check_gives(eval_section["schedule"], grid.metrics, "the study's metrics")
            except ValueError as error:
                raise StudyError(str(error)) from None
    return raw


def study_points(grid: StudyGrid, name: str, job_overrides: list[str] | None = None) -> list[StudyPoint]:
    """Every combination of the grid, each checked as a job config; a bad value names its grid key."""
    raw = base_raw(grid, job_overrides)
    try:
        config_from_dict(raw)
    except ConfigError as error:
        raise StudyError(f"base_config/overrides: {error}") from None
    axes = grid.axes()
    for key, labels in axes.items():      # each value on its own first: the error names the grid key
        for label, value in labels.items():
            candidate = copy.deepcopy(raw)
            set_path(candidate, key, copy.deepcopy(value))
            try:
                config_from_dict(candidate)
            except ConfigError as error:
                raise StudyError(f"grid.{key}: {label if isinstance(grid.grid[key], dict) else repr(value)} "
                                 f"is not a valid {key} for {grid.base_config} ({error})") from None
    points = []
    for combination in itertools.product(*[list(labels.items()) for labels in axes.values()]):
        candidate = copy.deepcopy(raw)
        labels = {}
        for key, (label, value) in zip(axes, combination):
            set_path(candidate, key, copy.deepcopy(value))
            labels[key] = label
        run_id = point_run_id(name, labels)
        candidate.setdefault("run", {})["name"] = run_id
        try:
            config = config_from_dict(candidate).with_absolute_paths()
        except ConfigError as error:
            where = ", ".join(f"{k}={v}" for k, v in labels.items())
            raise StudyError(f"grid point {where}: {error}") from None
        points.append(StudyPoint(labels, run_id, config.to_dict()))
    return points


def point_run_id(study: str, labels: dict[str, str]) -> str:
    """``<study>--method-moram--seed-0``: stable across reruns; hashed when it would be too long."""
    parts = [f"{key.rsplit('.', 1)[-1]}-{label}" for key, label in labels.items()]
    run_id = "--".join([study, *parts])
    if len(run_id) > _MAX_RUN_ID:
        digest = hashlib.sha256(run_id.encode()).hexdigest()[:10]
        run_id = f"{run_id[:_MAX_RUN_ID - 12]}--{digest}"
    return run_id


# -- trials (in Tune's trial actors) --------------------------------------------------------------
@dataclass(frozen=True)
class StudyContext:
    study: str
    study_run: str
    tracking_uri: str
    experiment: str
    points: dict[str, StudyPoint]


def study_trial(values: dict[str, Any], context: StudyContext) -> None:
    """One grid point: its whole sequence (resumed if it was interrupted), reported after each task."""
    from ray import tune

    point = context.points[values["point"]]
    config = config_from_dict(point.config)
    for index, matrix in sequence_rows(config, context.study_run):
        tune.report({"tasks_done": index + 1, **op_so_far(matrix[-1][: index + 1]), "run_id": point.run_id})
    label_point(context, point)


def op_so_far(row: list[float | None]) -> dict[str, float]:
    """The mean of the latest row's seen cells, when the schedule scored them all (``eval.schedule:
    final`` scores only the diagonal before the last task: then nothing, never a partial mean)."""
    return {"op_so_far": sum(row) / len(row)} if row and None not in row else {}


def label_point(context: StudyContext, point: StudyPoint, only_if_missing: bool = False) -> None:
    """Tag a finished point's sequence run with its grid labels and log its routing diagnostics
    (also done by the driver for a point finished by an interrupted call that could not)."""
    from ..routing_diagnostics import log_sequence_routing
    from ..tracking import KIND_TAG, RUN_ID_TAG, Tracker

    tracker = Tracker(context.tracking_uri, context.experiment, point.run_id)
    found = tracker.client.search_runs([tracker.experiment_id], max_results=1, order_by=["attributes.start_time ASC"],
                                       filter_string=f"tags.`{RUN_ID_TAG}` = '{point.run_id}' and "
                                                     f"tags.`{KIND_TAG}` = 'sequence'")
    if not found or (only_if_missing and STUDY_TAG in found[0].data.tags):
        return
    run = found[0].info.run_id
    tracker.set_tags(run, {STUDY_TAG: context.study, **{LABEL_TAG_PREFIX + k: v for k, v in point.labels.items()}})
    log_sequence_routing(config_from_dict(point.config), tracker, run)


# -- the driver ----------------------------------------------------------------------------------
@dataclass
class StudyResult:
    name: str
    points: list[StudyPoint]
    skipped: list[str]                   # finished before this call: not started again
    failed: dict[str, str]               # run id -> error
    mlflow_run_id: str
    mlflow_url: str
    storage_path: str
    tracking_uri: str                    # where its runs are: moram_platform.report.report_study reads them
    experiment: str


def run_study(grid: StudyGrid, name: str, *, job_overrides: list[str] | None = None,
              storage_path: str | None = None, verbose: bool = True,
              kept_runs: set[str] | frozenset[str] = frozenset()) -> StudyResult:
    """Run (or resume, given the same ``name``) every point of ``grid``; the comparison report
    is ``moram_platform.report.report_study(result)``. ``kept_runs``: run ids finished elsewhere
    (their records kept in a ``runs.jsonl``, ``moram_platform.report.read_run_records``): skipped
    like the points MLflow has finished."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from ..benchmark import get_benchmark
    from ..runs import compare_runs
    from ..preflight import check_model_structure
    from ..cluster import cluster_resources, start_ray

    name = check_name("study", name)
    points = study_points(grid, name, job_overrides)
    configs = [config_from_dict(p.config) for p in points]
    tracking_uri, experiment = _one_tracking(configs)
    checked, shapes = set(), set()
    for config in configs:            # data and model of every distinct order, before anything starts
        shape = (config.benchmark, config.model.source, config.model.dtype, repr(config.moram_config))
        if shape not in shapes:       # targets, dtype, r on the meta device (moram_platform.preflight)
            check_model_structure(config)
            shapes.add(shape)
        key = (config.benchmark, tuple(config.data.tasks), config.model.source)
        if key not in checked:
            get_benchmark(config.benchmark).validate(config)
            checked.add(key)

    start_ray()
    tracker = SweepTracker(tracking_uri, experiment, name)
    study_run, resumed = tracker.sweep_run(
        {"grid_file": grid.source or "", "base_config": grid.base_config, "points": len(points)},
        {AXES_TAG: json.dumps(list(grid.grid)), STUDY_TAG: name, "moram.benchmark": configs[0].benchmark},
        _digest(grid, job_overrides), kind="study")
    tracker.log_text(study_run, json.dumps(grid.to_dict(), indent=1, default=str), "grid.json")
    in_mlflow = {row["run"] for row in compare_runs(tracking_uri, experiment) if row["status"] == "FINISHED"}
    finished = in_mlflow | set(kept_runs)
    pending = [p for p in points if p.run_id not in finished]
    root = storage_path or str(Path(configs[0].run.output_dir) / "study" / name)
    log.info("study %s: %d points, %d finished before, MLflow run %s", name, len(points), len(points) - len(pending),
             study_run)
    failed: dict[str, str] = {}
    try:
        if pending:
            share = max((training_trial_share(config_from_dict(p.config), grid.resources.trial_cpu) for p in pending),
                        key=lambda s: tuple(sorted(s.total.items())))
            concurrency = trial_concurrency(share, cluster_resources(), grid.resources.max_concurrent, "study sequence")
            context = StudyContext(name, study_run, tracking_uri, experiment, {p.run_id: p for p in pending})
            trainable = tune.with_resources(tune.with_parameters(study_trial, context=context),
                                            tune_resources(share.trial))
            # A fresh Tune experiment on every call, never Tuner.restore: the study's own records
            # (MLflow's finished runs, the registry's versions) already resume each point, and a
            # restored experiment restarts all its errored trials at once, past the generator's
            # max_concurrent (their sequences run outside Tune's resource accounting: two
            # sequences' workers then wait for each other's CPUs and neither starts).
            tune_name = _call_name([p.run_id for p in pending])
            results = tune.Tuner(trainable, param_space={"point": tune.grid_search([p.run_id for p in pending])},
                                 tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(
                                     max_concurrent=concurrency)),
                                 run_config=tune.RunConfig(name=tune_name, storage_path=root,
                                                           verbose=1 if verbose else 0,
                                                           failure_config=tune.FailureConfig(max_failures=1))).fit()
            failed = {r.config["point"]: str(r.error).splitlines()[0] for r in results if r.error and r.config}
        context = StudyContext(name, study_run, tracking_uri, experiment, {p.run_id: p for p in points})
        for point in points:
            if point.run_id in in_mlflow:
                label_point(context, point, only_if_missing=True)
    except BaseException:
        tracker.finish(study_run, status="FAILED")
        raise
    tracker.finish(study_run, status="FAILED" if failed else "FINISHED")
    return StudyResult(name, points, sorted(finished & {p.run_id for p in points}), failed, study_run,
                       tracker.ui_url(study_run), root, tracking_uri, experiment)


def _call_name(run_ids: list[str]) -> str:
    """This call's Tune experiment: the pending points' digest and the UTC time (a new one each call)."""
    digest = hashlib.sha256(json.dumps(sorted(run_ids)).encode()).hexdigest()[:10]
    return f"grid-{digest}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"


def _one_tracking(configs: list[JobConfig]) -> tuple[str, str]:
    found = {(c.tracking_uri(), c.mlflow.experiment or c.benchmark) for c in configs}
    if len(found) != 1:
        raise StudyError("grid: every point must log to one MLflow store and experiment (do not vary mlflow.* "
                         "or benchmark)")
    return found.pop()


def _digest(grid: StudyGrid, job_overrides: list[str] | None) -> str:
    """What makes two calls the same study: the base config and fixed overrides (the grid itself
    may grow: new points are run, finished ones are skipped)."""
    text = json.dumps([grid.base_config, grid.overrides, sorted(job_overrides or [])], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
