"""MLflow layout: one experiment per benchmark, a parent run per sequence (named by the run id),
a child run per task (``task-<i>-<name>``). Runs are found again by tags, so a resumed sequence
continues its own runs instead of creating duplicates."""
from __future__ import annotations

import csv
import io
import json
import re
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

RUN_ID_TAG, KIND_TAG, TASK_TAG = "moram.run_id", "moram.kind", "moram.task_index"
_SECRET_KEYS = re.compile(r"(secret|password|token|credential|access_key)", re.IGNORECASE)


def redact(value: Any) -> Any:
    """Drop credentials from URIs (``scheme://user:pass@host`` -> ``scheme://***@host``)."""
    if not isinstance(value, str) or "://" not in value:
        return value
    parts = urlsplit(value)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return value


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> MLflow params (``train.lr`` -> ``5e-4``); secret-looking keys are dropped."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if _SECRET_KEYS.search(key):
            continue
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{path}."))
        else:
            text = json.dumps(redact(value)) if isinstance(value, (list, dict)) else str(redact(value))
            flat[path] = text[:6000]
    return flat


class Tracker:
    """The MLflow side of one continual-learning sequence."""

    def __init__(self, tracking_uri: str, experiment: str, run_id: str, *, parent_run_id: str | None = None):
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.experiment_id = self._experiment(experiment)
        self.parent_run_id = parent_run_id  # e.g. a sweep trial the sequence belongs to
        self.sequence_run_id: str | None = None

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=local_artifact_location(self.tracking_uri))
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

    def task_run(self, task_index: int, task: str) -> tuple[str, bool]:
        """(MLflow run id of the task's child run, whether it had already finished)."""
        existing = self._find(f"tags.`{RUN_ID_TAG}` = '{self.run_id}' and tags.`{KIND_TAG}` = 'task' "
                              f"and tags.`{TASK_TAG}` = '{task_index}'", with_status=True)
        if existing is not None:
            run_id, status = existing
            return run_id, status == "FINISHED"
        run = self.client.create_run(self.experiment_id, run_name=f"task-{task_index}-{task}", tags={
            RUN_ID_TAG: self.run_id, KIND_TAG: "task", TASK_TAG: str(task_index), "moram.task": task,
            "mlflow.parentRunId": self.sequence_run_id,
        })
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
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start:start + 1000])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(redact(v))) for k, v in tags.items()])

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
        runs_view = f"#/experiments/{self.experiment_id}/runs?workflowType=machine_learning"
        if uri.startswith(("http://", "https://")):
            return f"{uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
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
