"""Ray Tune sweeps of a MoRAM job config: τ, k (and lr) by training, then δ by evaluation only.

    space = load_space("tune_spaces/trace.yaml")
    result = run_sweep(space, "trace-tau-k", best_config_out="best.yaml")   # the same name resumes

Training stage: each trial runs a (shortened) continual-learning sequence with its
hyperparameters (``run_sequence``) and reports the objective over the tasks trained so far
after every task, so ASHA stops weak trials after a task or two. A trial's run id is
``<sweep>-<trial id>``, stable across a resumed sweep, so a restarted trial continues its
sequence from the registry instead of retraining it.

δ stage: δ acts only at inference, so the final version of each of the best finished trials is
evaluated under each δ (a view applied at load time). Nothing is trained and nothing is written
to the registry. The best (trial, δ) becomes a ready-to-use job config.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..cluster import cluster_resources, start_ray
from ..config import JobConfig, config_from_dict, get_path
from ..tracking import flatten
from .resources import TrialShare, evaluation_trial_share, training_trial_share
from .runner import SweepError, check_name, sequence_rows, trial_concurrency, tune_resources, tuner
from .space import Objective, Param, SpaceError, SweepSpace, with_params
from .tracking import SweepTracker

log = logging.getLogger(__name__)

OBJECTIVE = "objective"
SEQUENCE_TAG = "moram.sequence"        # on a training trial's run: the run id of its sequence


# -- what the stages produce -----------------------------------------------------------------------
@dataclass(frozen=True)
class TrialOutcome:
    stage: str                       # "train" or "delta"
    trial_id: str
    params: dict[str, Any]           # the hyperparameters it ran with (δ trials: the source's and δ)
    scores: dict[str, float]         # op, bwt, forgetting, forgetting_magnitude, objective
    status: str                      # finished | stopped (by the scheduler) | failed
    run_id: str | None = None        # the sequence it trained or evaluated
    tasks_done: int = 0
    source_trial: str | None = None  # δ trials: the training trial whose final version was evaluated
    error: str | None = None

    @property
    def objective(self) -> float | None:
        return self.scores.get(OBJECTIVE)


@dataclass
class SweepResult:
    name: str
    best: TrialOutcome
    best_params: dict[str, Any]
    best_config: dict[str, Any]
    best_config_path: Path | None
    trials: list[TrialOutcome]
    delta_trials: list[TrialOutcome]
    mlflow_run_id: str
    mlflow_url: str
    storage_path: str
    resumed: bool = False
    artifacts: list[str] = field(default_factory=list)

    def table(self) -> str:
        names = sorted({k for t in self.trials + self.delta_trials for k in t.params})
        lines = ["stage  trial            status    " + "".join(f"{n[:10]:>11}" for n in names) + f"{'objective':>11}"]
        for t in self.trials + self.delta_trials:
            values = "".join(f"{_short(t.params.get(n)):>11}" for n in names)
            objective = f"{t.objective:11.3f}" if t.objective is not None else f"{'-':>11}"
            lines.append(f"{t.stage:<7}{t.trial_id:<17}{t.status:<10}{values}{objective}")
        return "\n".join(lines)


# -- trials (run in Tune's trial actors) -------------------------------------------------------------
@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs, shipped once to the trial actors (tune.with_parameters)."""

    sweep: str
    trial_raw: dict[str, Any]        # the shortened base job config, absolute paths
    params: dict[str, Param]
    objective: Objective
    tracking_uri: str
    experiment: str
    sweep_run_id: str
    sources: dict[str, TrialOutcome] = field(default_factory=dict)   # δ stage: finished training trials

    def config(self, values: dict[str, Any], run_id: str) -> JobConfig:
        raw = with_params(self.trial_raw, self.params, {k: v for k, v in values.items() if k in self.params})
        raw.setdefault("run", {})["name"] = run_id
        return config_from_dict(raw)

    def tracker(self) -> SweepTracker:
        return SweepTracker(self.tracking_uri, self.experiment, self.sweep)


def training_trial(values: dict[str, Any], context: TrialContext) -> None:
    """One training trial: a continual-learning sequence, reported to Tune after every task."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    run_id = f"{context.sweep}-{trial_id}"
    config = context.config(values, run_id)
    tracker = context.tracker()
    trial_run = tracker.trial_run(context.sweep_run_id, "train", trial_id, values, {SEQUENCE_TAG: run_id})

    def scores_after(index: int, matrix: list[list[float]]) -> dict[str, Any]:
        scores = context.objective.scores(matrix)
        tracker.log_metrics(trial_run, scores, step=index + 1)
        return {**scores, "tasks_done": index + 1, "run_id": run_id}

    # Each row is reported as soon as the next one exists, the last once the sequence has ended:
    # a trial reaching ASHA's max_t is stopped (killed) right after its report, so everything
    # it still has to do must be done by then.
    last = None
    try:
        for index, matrix in sequence_rows(config, trial_run):
            if last is not None:
                tune.report(last)
            last = scores_after(index, matrix)
    except Exception:
        tracker.finish(trial_run, status="FAILED")
        raise
    tracker.finish(trial_run)
    if last is not None:
        tune.report(last)


def delta_trial(values: dict[str, Any], context: TrialContext) -> None:
    """One evaluation-only trial: a finished training trial's final version under one δ."""
    from ray import tune

    from ..evaluation import evaluate_version_task

    source = context.sources[values["trial"]]
    name = next(n for n, p in context.params.items() if p.inference_only)
    delta = float(values[name])
    config = context.config(source.params, source.run_id)
    tasks, registry_uri, config_dict = config.data.tasks, config.registry_uri(), config.to_dict()

    def scores_of(version: int, on: list[str]) -> list[float]:
        found = evaluate_version_task(config_dict, registry_uri, source.run_id, version, on, delta=delta)
        return [float(found[task]["score"]) for task in on]

    final = scores_of(len(tasks), tasks)
    diagonal = list(final)
    if context.objective.needs_diagonal:   # R[j][j] under this δ: version j+1 on task j
        for j in range(len(tasks) - 1):
            diagonal[j] = scores_of(j + 1, [tasks[j]])[0]
    scores = context.objective.scores_from(final, diagonal)

    trial_id = tune.get_context().get_trial_id()
    tracker = context.tracker()
    trial_run = tracker.trial_run(context.sweep_run_id, "delta", trial_id, {**source.params, name: delta},
                                  {SEQUENCE_TAG: source.run_id, "moram.source_trial": source.trial_id})
    tracker.log_metrics(trial_run, {**scores, **{f"eval/{t}": s for t, s in zip(tasks, final)}})
    tracker.finish(trial_run)
    tune.report({**scores, "run_id": source.run_id})


# -- the driver ----------------------------------------------------------------------------------
def run_sweep(space: SweepSpace, name: str | None = None, *, job_overrides: list[str] | None = None,
              storage_path: str | None = None, best_config_out: str | Path | None = None,
              train_only: bool = False, verbose: bool = True) -> SweepResult:
    """Run (or resume, given the same ``name``) the sweep ``space`` describes.

    ``job_overrides`` (``key=value``) edit the base job config (and so the best config);
    ``storage_path`` holds Tune's state (default ``<run.output_dir>/tune/<name>``; shared storage
    such as ``s3://`` on a multi-node cluster); ``train_only`` stops after the training stage
    (a later call with the same name adds the δ stage).
    """
    from ..benchmark import get_benchmark
    from ..preflight import check_model_structure
    name = check_name("sweep", name or _default_name(space))
    base = space.job_config(job_overrides)
    base_raw = space.base_raw(job_overrides)
    trial_config = config_from_dict(_with_schedule(space.trial_raw(base_raw))).with_absolute_paths()
    check_model_structure(trial_config)                              # targets, dtype, r: on the meta device
    get_benchmark(trial_config.benchmark).validate(trial_config)     # data and model, before any trial starts

    start_ray()
    cluster = cluster_resources()
    train_share = training_trial_share(trial_config, space.resources.trial_cpu)
    concurrency = trial_concurrency(train_share, cluster, space.search.max_concurrent, "training trial")
    if concurrency < space.search.max_concurrent:
        log.warning("sweep %s: %d concurrent training trials (not %d): each holds %s at its peak, the cluster has %s",
                    name, concurrency, space.search.max_concurrent, train_share.total, cluster)

    experiment = base.mlflow.experiment or base.benchmark
    tracker = SweepTracker(trial_config.tracking_uri(), experiment, name)
    sweep_run, resumed = tracker.sweep_run(_sweep_params(space), _sweep_tags(space, base), _digest(space, base_raw))
    root = storage_path or str(Path(trial_config.run.output_dir) / "tune" / name)
    context = TrialContext(name, trial_config.to_dict(), {p.name: p for p in space.params}, space.objective,
                           trial_config.tracking_uri(), experiment, sweep_run)
    log.info("sweep %s: %s; Tune state in %s; MLflow run %s", name, "resuming" if resumed else "starting", root,
             sweep_run)
    try:
        trials = _training_stage(space, context, train_share, concurrency, root, verbose)
        _close_runs(tracker, trials)
        delta_trials = []
        if space.inference_params and not train_only:
            delta_trials = _delta_stage(space, context, trials, trial_config, cluster, root, verbose)
        best = _best(space.objective, trials, delta_trials)
        result = _finish(space, name, base_raw, trial_config, best, trials, delta_trials, tracker, sweep_run,
                         best_config_out, root, resumed)
    except BaseException:
        tracker.finish(sweep_run, status="FAILED")
        raise
    tracker.finish(sweep_run)
    return result


def _with_schedule(trial_raw: dict[str, Any]) -> dict[str, Any]:
    """Trials report the objective after every task (schedulers stop weak ones early), which
    reads every trained-so-far cell: ``seen`` unless the config asks for ``full``."""
    section = trial_raw.setdefault("eval", {})
    schedule = section.get("schedule") if isinstance(section, dict) else None
    if schedule is None and isinstance(section, dict):
        section["schedule"] = "seen"
    elif schedule == "final":
        raise SpaceError("eval.schedule: 'final' gives no objective after each task, which a sweep reports to "
                         "Tune's scheduler; use 'seen' (or 'full')")
    return trial_raw


def _training_stage(space: SweepSpace, context: TrialContext, share: TrialShare, concurrency: int, root: str,
                    verbose: bool) -> list[TrialOutcome]:
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(training_trial, context=context),
                                    tune_resources(share.trial))
    tasks = len(context.trial_raw["data"]["tasks"])
    param_space = {p.name: p.domain() for p in space.training_params}
    tune_config = tune.TuneConfig(
        metric=OBJECTIVE, mode=space.objective.mode, search_alg=_searcher(space, concurrency),
        scheduler=_scheduler(space, tasks), num_samples=space.search.num_samples if param_space else 1,
        max_concurrent_trials=concurrency if space.search.algorithm == "optuna" else None)
    # A trial that fails is restarted once: it resumes its sequence from the registry.
    run_config = tune.RunConfig(name="train", storage_path=root, failure_config=tune.FailureConfig(max_failures=1),
                                verbose=1 if verbose else 0)
    grid = tuner(f"{root}/train", trainable, param_space, tune_config, run_config).fit()
    return [_training_outcome(result, tasks, list(param_space)) for result in grid]


def _delta_stage(space: SweepSpace, context: TrialContext, trials: list[TrialOutcome], trial_config: JobConfig,
                 cluster: dict[str, float], root: str, verbose: bool) -> list[TrialOutcome]:
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    sources = _top_trials(trials, space.objective, space.delta_stage.top_trials)
    param, = space.inference_params
    share = evaluation_trial_share(trial_config)
    concurrency = trial_concurrency(share, cluster, space.search.max_concurrent, "δ (evaluation) trial")
    # Every finished trial can be looked up (a restored δ experiment names the sources it started with).
    finished = {t.trial_id: t for t in trials if _scored(t)}
    context = dataclasses.replace(context, sources=finished)
    trainable = tune.with_resources(tune.with_parameters(delta_trial, context=context), tune_resources(share.trial))
    param_space = {"trial": tune.grid_search([t.trial_id for t in sources]), param.name: param.domain()}
    tune_config = tune.TuneConfig(
        metric=OBJECTIVE, mode=space.objective.mode,
        search_alg=BasicVariantGenerator(max_concurrent=concurrency, random_state=space.search.seed),
        num_samples=1 if param.space == "grid" else space.delta_stage.num_samples)
    run_config = tune.RunConfig(name="delta", storage_path=root, verbose=1 if verbose else 0)
    grid = tuner(f"{root}/delta", trainable, param_space, tune_config, run_config).fit()
    return [_delta_outcome(result, finished, param.name) for result in grid]


def _searcher(space: SweepSpace, concurrency: int):
    """Optuna (Tune caps its concurrency via max_concurrent_trials) or random/grid variants, which
    take the cap themselves (Tune ignores max_concurrent_trials for a ready-made generator)."""
    if space.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=space.search.seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=concurrency, random_state=space.search.seed)


def _scheduler(space: SweepSpace, tasks: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if space.scheduler.name == "fifo" or tasks < 2:
        return FIFOScheduler()
    # One Tune iteration per task: a trial is compared with its peers after the same tasks.
    return ASHAScheduler(time_attr="training_iteration", max_t=tasks,
                         grace_period=min(space.scheduler.grace_period, tasks),
                         reduction_factor=space.scheduler.reduction_factor)


# -- outcomes ------------------------------------------------------------------------------------
def _training_outcome(result, tasks: int, names: list[str]) -> TrialOutcome:
    metrics = result.metrics or {}
    params = {n: result.config[n] for n in names if n in (result.config or {})}
    done = int(metrics.get("tasks_done", 0))
    status = "failed" if result.error else "finished" if done == tasks else "stopped"
    return TrialOutcome("train", str(metrics.get("trial_id") or Path(result.path).name), params, _scores(metrics),
                        status, run_id=metrics.get("run_id"), tasks_done=done,
                        error=str(result.error) if result.error else None)


def _delta_outcome(result, sources: dict[str, TrialOutcome], name: str) -> TrialOutcome:
    metrics = result.metrics or {}
    source = sources[result.config["trial"]]
    return TrialOutcome("delta", str(metrics.get("trial_id") or Path(result.path).name),
                        {**source.params, name: result.config[name]}, _scores(metrics),
                        "failed" if result.error else "finished", run_id=source.run_id,
                        tasks_done=source.tasks_done, source_trial=source.trial_id,
                        error=str(result.error) if result.error else None)


def _scored(trial: TrialOutcome) -> bool:
    return trial.status == "finished" and trial.objective is not None


def _scores(metrics: dict[str, Any]) -> dict[str, float]:
    keys = ("op", "bwt", "forgetting", "forgetting_magnitude", OBJECTIVE)
    return {k: float(metrics[k]) for k in keys if k in metrics}


def _top_trials(trials: list[TrialOutcome], objective: Objective, count: int) -> list[TrialOutcome]:
    finished = [t for t in trials if _scored(t)]
    if not finished:
        errors = "; ".join(f"{t.trial_id}: {t.error}" for t in trials if t.error)[:2000]
        raise SweepError("no training trial finished its sequence" + (f" ({errors})" if errors else ""))
    return sorted(finished, key=lambda t: _rank(t, objective))[:count]


def _best(objective: Objective, trials: list[TrialOutcome], delta_trials: list[TrialOutcome]) -> TrialOutcome:
    """The best finished trial of both stages. A training trial stands for its base δ, measured by
    the same evaluation as the δ trials, so both compete (on a tie the training trial wins)."""
    candidates = _top_trials(trials, objective, len(trials))
    candidates += [t for t in delta_trials if _scored(t)]
    return min(candidates, key=lambda t: _rank(t, objective))


def _rank(trial: TrialOutcome, objective: Objective) -> tuple:
    """Best first; ties go to the training stage, then to the smaller trial id (Tune returns
    results in no fixed order, and a resumed sweep must pick the same trials again)."""
    sign = -1.0 if objective.mode == "max" else 1.0
    return (sign * trial.objective, trial.stage != "train", trial.trial_id)


def _close_runs(tracker: SweepTracker, trials: list[TrialOutcome]) -> None:
    """Trials the scheduler stopped were killed mid-sequence (and a lost trial could not say
    anything): end whatever MLflow runs they left running."""
    status = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
    for trial in trials:
        tracker.close_trial(trial.trial_id, status[trial.status], trial.run_id)


# -- the result: best config, plot, table --------------------------------------------------------
def best_job_config(space: SweepSpace, base_raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The base job config (not shortened) with the best hyperparameters: ready for jobs/<benchmark>.py."""
    raw = with_params(base_raw, {p.name: p for p in space.params}, values)
    if isinstance(raw.get("run"), dict):
        raw["run"].pop("name", None)    # a new run gets its own id
    config_from_dict(raw)
    return raw


def _finish(space, name, base_raw, trial_config, best, trials, delta_trials, tracker, sweep_run, best_config_out,
            root, resumed) -> SweepResult:
    values = dict(best.params)
    for param in space.inference_params:   # a training trial ran with the base δ
        values.setdefault(param.name, get_path(trial_config.to_dict(), param.key))
    config = best_job_config(space, base_raw, values)
    text = _best_config_text(space, name, best, values, config)
    out = Path(best_config_out) if best_config_out else None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    with tempfile.TemporaryDirectory() as folder:
        from ..plots import objective_scatter

        folder = Path(folder)
        (folder / "best_config.yaml").write_text(text)
        (folder / "trials.csv").write_text(_trials_csv(trials + delta_trials))
        inference = {p.name for p in space.inference_params}
        rows = [{**t.params, OBJECTIVE: t.objective} for t in trials if _scored(t)]
        # a δ trial's point belongs on the δ panel only: its other values are its source trial's
        rows += [{**{k: v for k, v in t.params.items() if k in inference}, OBJECTIVE: t.objective}
                 for t in delta_trials if _scored(t)]
        objective_scatter(rows, [p.name for p in space.params], OBJECTIVE, folder / "objective.png")
        for artifact in ("best_config.yaml", "trials.csv", "objective.png"):
            tracker.log_file(sweep_run, folder / artifact)
    tracker.log_metrics(sweep_run, {f"best/{k}": v for k, v in best.scores.items()})
    # tags, not params: a resumed sweep may find a better trial and MLflow params never change
    tracker.set_tags(sweep_run, {f"best.{k}": _plain_text(v) for k, v in values.items()}
                     | {"best.trial": best.trial_id, "best.stage": best.stage})
    return SweepResult(name, best, values, config, out, trials, delta_trials, sweep_run, tracker.ui_url(sweep_run),
                       root, resumed, ["best_config.yaml", "trials.csv", "objective.png"])


def _best_config_text(space, name, best, values, config) -> str:
    what = ", ".join(f"{k}={_short(v)}" for k, v in values.items())
    header = [
        f"# Best configuration of sweep {name} ({space.source or 'space'}, base {space.base_config}):",
        f"#   {what}",
        f"#   objective {best.objective:.4f} ({space.objective.metric}"
        + (f" - {space.objective.forgetting_weight:g} x forgetting" if space.objective.forgetting_weight else "")
        + f", {best.stage} trial {best.trial_id}, run {best.run_id}).",
        "# Trials ran a shortened sequence (trial_overrides); this is the full base config with those values.",
        f"# Run it: python jobs/{config.get('benchmark', 'trace')}.py --config <this file>",
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(config, sort_keys=False)


def _trials_csv(trials: list[TrialOutcome]) -> str:
    names = sorted({k for t in trials for k in t.params})
    scores = ("op", "bwt", "forgetting", "forgetting_magnitude", OBJECTIVE)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["stage", "trial_id", "status", "tasks_done", "run_id", "source_trial", *names, *scores])
    for t in trials:
        writer.writerow([t.stage, t.trial_id, t.status, t.tasks_done, t.run_id or "", t.source_trial or "",
                         *[t.params.get(n, "") for n in names], *[t.scores.get(s, "") for s in scores]])
    return out.getvalue()


# -- small helpers -------------------------------------------------------------------------------
def _default_name(space: SweepSpace) -> str:
    stem = Path(space.source).stem if space.source else "sweep"
    return f"{stem}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def _digest(space: SweepSpace, base_raw: dict[str, Any]) -> str:
    text = json.dumps([space.to_dict(), base_raw], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sweep_params(space: SweepSpace) -> dict[str, str]:
    return flatten(space.to_dict())


def _sweep_tags(space: SweepSpace, base: JobConfig) -> dict[str, str]:
    return {"moram.benchmark": base.benchmark, "moram.method": base.moram_config.method,
            "moram.base_config": space.base_config, "moram.space": space.source or ""}


def _plain_text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
