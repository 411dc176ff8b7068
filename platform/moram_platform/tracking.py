"""MLflow layout: one experiment per benchmark, a parent run per sequence (named by the run id),
a child run per task (``task-<i>-<name>``). Runs are found again by tags, so a resumed sequence
continues its own runs instead of creating duplicates, and a metric is logged once per
(key, step), so a resume never doubles a point of a curve. docs/mlflow.md: what a run shows."""
from __future__ import annotations

import csv
import io
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from .credentials import is_secret_key, redact

RUN_ID_TAG, KIND_TAG, TASK_TAG = "moram.run_id", "moram.kind", "moram.task_index"
# A study (tune/study.py): its parent run carries its name and grid keys; each point's sequence
# run its name and, per grid key, its label (moram.grid.<key> = <label>); the report reads them.
STUDY_TAG, AXES_TAG, LABEL_TAG_PREFIX = "moram.study", "moram.study_axes", "moram.grid."
NOTE_TAG = "mlflow.note.content"   # the run's description in the MLflow UI (Markdown)
# MLflow 3's UI opens an experiment of unknown kind on its GenAI pages (traces, evaluations);
# this kind opens it on runs and their charts.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
_MODEL_TRAINING_VIEW = "workflowType=machine_learning"   # a link's query: the UI's "Model training" mode
# The sections that say where a job runs and writes, not what it computes: not params (their
# values are in resolved_config.yaml); run.seed is the one result-shaping key among them.
_PLACEMENT_SECTIONS = ("run", "scaling", "registry", "mlflow")
# The method's knobs (the paper's), always params even when left at their defaults: what a
# compare view plots runs against.
_METHOD_KNOBS = ("method", "r", "k", "tau", "delta", "prune_mass")


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> MLflow params (``train.lr`` -> ``5e-4``); secret keys are dropped."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if is_secret_key(key):
            continue
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{path}."))
        else:
            text = json.dumps(redact(value)) if isinstance(value, (list, dict)) else str(redact(value))
            flat[path] = text[:6000]
    return flat


def sequence_params(config) -> dict[str, Any]:
    """The params of a sequence's runs: the keys that decide what it computes -- the benchmark,
    every section but the placement ones (so a benchmark's own section, e.g. ``xtail``, only
    where the job has it), ``moram.*`` as chosen (the config's over the benchmark's defaults,
    plus the method's knobs as resolved) and ``run.seed``. Unset options (None) are left out;
    the whole config is the run's resolved_config.yaml."""
    values = config.to_dict()
    params = {key: value for key, value in values.items() if key not in _PLACEMENT_SECTIONS}
    resolved = config.moram_config.to_dict()
    params["moram"] = {**{key: resolved[key] for key in _METHOD_KNOBS},
                       **config.benchmark_moram_defaults, **values.get("moram", {})}
    params["run"] = {"seed": config.run.seed}
    return _without_none(params)


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    kept = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = _without_none(value)
            if value:
                kept[key] = value
        elif value is not None:
            kept[key] = value
    return kept


def system_tags() -> dict[str, str]:
    """MLflow's own system tags (user, source name and type, git commit), as ``mlflow.start_run``
    would set them; the git commit is that of this code's checkout when the entry point is
    outside one (a console script, a Ray worker)."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.git_utils import get_git_commit

    tags = {key: value for key, value in resolve_tags().items() if key.startswith("mlflow.")}
    if "mlflow.source.git.commit" not in tags:
        commit = get_git_commit(str(Path(__file__).resolve().parent))
        if commit:
            tags["mlflow.source.git.commit"] = commit
    return tags


def sequence_note(run_id: str, tasks: list[str], matrix: list[list[float | None]], baseline: list[float] | None,
                  summary: dict[str, float], facts: dict[str, str]) -> str:
    """The parent run's description (Markdown): what ran, the accuracy matrix so far, the summary."""
    done = len(matrix)
    lines = [f"**{run_id}**: " + ", ".join(f"{k} `{v}`" for k, v in facts.items()),
             "", f"Tasks done: {done} of {len(tasks)} ({' → '.join(tasks)}).", "",
             "Accuracy matrix (row: after training that task; column: the task scored):", "",
             "| after \\ on | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    rows = ([("zero-shot", baseline)] if baseline is not None else []) + list(zip(tasks, matrix))
    lines += [f"| {name} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in row) + " |" for name, row in rows]
    if summary:
        lines += ["", f"Summary over the {done} task{'s' if done > 1 else ''} seen:", "", "| metric | value |",
                  "|---|---|"] + [f"| {key} | {value:.2f} |" for key, value in summary.items()]
    return "\n".join(lines)


class Tracker:
    """The MLflow side of one continual-learning sequence."""

    def __init__(self, tracking_uri: str, experiment: str, run_id: str, *, parent_run_id: str | None = None):
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.experiment_id = self._experiment(experiment)
        self.parent_run_id = parent_run_id  # e.g. a sweep trial the sequence belongs to
        self.sequence_run_id: str | None = None
        self._logged: dict[str, set[tuple[str, int]]] = {}   # per run: (key, step) already in MLflow

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if EXPERIMENT_KIND_TAG not in found.tags:  # an experiment made before the tag was set
                self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=local_artifact_location(self.tracking_uri),
                                                 tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        except mlflow.exceptions.MlflowException:  # created concurrently
            return self.client.get_experiment_by_name(name).experiment_id

    # -- runs ------------------------------------------------------------------------------
    def start_sequence(self, params: dict[str, Any], tags: dict[str, str]) -> tuple[str, bool]:
        """(MLflow run id of the sequence's parent run, whether it already existed)."""
        existing = self._find(f"tags.`{RUN_ID_TAG}` = '{self.run_id}' and tags.`{KIND_TAG}` = 'sequence'")
        if existing is not None:
            self.sequence_run_id = existing
            self.client.update_run(existing, status="RUNNING")
            return existing, True
        run_tags = {RUN_ID_TAG: self.run_id, KIND_TAG: "sequence", **tags}
        if self.parent_run_id:
            run_tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=self.run_id, tags=run_tags)
        self.sequence_run_id = run.info.run_id
        self.log_params(self.sequence_run_id, params)
        return self.sequence_run_id, False

    def task_run(self, task_index: int, task: str, params: dict[str, Any] | None = None,
                 tags: dict[str, str] | None = None) -> tuple[str, bool]:
        """(MLflow run id of the task's child run, whether it had already finished); a new run
        gets ``params`` and ``tags`` (the sequence's, so the compare view can plot task runs)."""
        existing = self._find(f"tags.`{RUN_ID_TAG}` = '{self.run_id}' and tags.`{KIND_TAG}` = 'task' "
                              f"and tags.`{TASK_TAG}` = '{task_index}'", with_status=True)
        if existing is not None:
            run_id, status = existing
            return run_id, status == "FINISHED"
        run = self.client.create_run(self.experiment_id, run_name=f"task-{task_index}-{task}", tags={
            **(tags or {}), RUN_ID_TAG: self.run_id, KIND_TAG: "task", TASK_TAG: str(task_index),
            "moram.task": task, "mlflow.parentRunId": self.sequence_run_id,
        })
        self.log_params(run.info.run_id, params or {})
        return run.info.run_id, False

    def _find(self, query: str, with_status: bool = False):
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1,
                                       order_by=["attributes.start_time ASC"])
        if not runs:
            return None
        return (runs[0].info.run_id, runs[0].info.status) if with_status else runs[0].info.run_id

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    # -- values ----------------------------------------------------------------------------
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, v) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        now = int(time.time() * 1000)
        items = [Metric(_metric_key(k), float(v), now, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        self._log_metric_items(run_id, items)

    def log_new_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """log_metrics, leaving out every (key, step) the run already has: a resumed sequence
        walks its finished tasks again without doubling their points."""
        logged = self._logged_points(run_id)
        self.log_metrics(run_id, {k: v for k, v in metrics.items() if (_metric_key(k), step) not in logged}, step)

    def log_new_series(self, run_id: str, key: str, values: dict[int, float]) -> None:
        """One metric over steps (``{step: value}``, e.g. the training loss per optimizer step),
        the steps the run already has left out; non-finite values are skipped."""
        import math
        import time

        logged = self._logged_points(run_id)
        now = int(time.time() * 1000)
        items = [Metric(_metric_key(key), float(v), now, step) for step, v in sorted(values.items())
                 if (_metric_key(key), step) not in logged and v is not None and math.isfinite(v)]
        self._log_metric_items(run_id, items)

    def _logged_points(self, run_id: str) -> set[tuple[str, int]]:
        if run_id not in self._logged:  # once per run: the history of every metric it has
            keys = self.client.get_run(run_id).data.metrics
            self._logged[run_id] = {(key, m.step) for key in keys for m in self.client.get_metric_history(run_id, key)}
        return self._logged[run_id]

    def _log_metric_items(self, run_id: str, items: list[Metric]) -> None:
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start:start + 1000])
        if run_id in self._logged:
            self._logged[run_id].update((m.key, m.step) for m in items)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(redact(v))) for k, v in tags.items()])

    def set_note(self, run_id: str, markdown: str) -> None:
        """The run's description, shown on its page in the MLflow UI."""
        self.client.set_tag(run_id, NOTE_TAG, markdown)

    def log_file(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, name: str, artifact_path: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / name
            path.write_text(text)
            self.log_file(run_id, path, artifact_path)

    def ui_url(self, run_id: str) -> str:
        """Where to look at the run: its page on a tracking server, or, for a local store, the
        command that serves it (runnable from a fresh shell) and the page that lists its runs."""
        uri = redact(self.tracking_uri)
        runs_view = f"#/experiments/{self.experiment_id}/runs?{_MODEL_TRAINING_VIEW}"
        if uri.startswith(("http://", "https://")):
            return f"{uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}?{_MODEL_TRAINING_VIEW}"
        return (f"{mlflow_command()} ui --backend-store-uri {uri}\n"
                f"          then open http://127.0.0.1:5000/{runs_view}  (run {run_id})")


def local_artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a local SQLite store live beside it (``<folder>/mlartifacts``), not in the
    working directory's ``./mlruns`` where MLflow would put them; a server decides for itself."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


def mlflow_command() -> str:
    """``mlflow`` as a fresh shell finds it: the one next to this interpreter (a venv's bin/)."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / "mlflow"
    if beside.is_file() and shutil.which("mlflow") != str(beside):
        return str(beside)
    return "mlflow"


def matrix_csv(matrix: list[list[float | None]], tasks: list[str], row_names: list[str] | None = None) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["after_task"] + tasks)
    for name, row in zip(row_names or tasks, matrix):
        writer.writerow([name] + ["" if v is None else f"{v:.4f}" for v in row])
    return out.getvalue()


def _metric_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key)
