"""Continual-learning sequences as MLflow holds them: one row per sequence (its parent run),
the summary metrics the sequence driver logs (OP, BWT_signed, BWT_eq10, FWT, X-TAIL's...).
The one reader of sequence summaries: ``moram compare``, the study report and the study driver
(which points finished) all read them here.

    rows = compare_runs("http://mlflow:5000", "trace", runs=["moram-s0", "inclora-s0"])
    print(format_table(rows))
"""
from __future__ import annotations

import csv
import io
from typing import Any, Sequence

from .benchmark import summary_columns
from .tracking import KIND_TAG, RUN_ID_TAG, redact

ROW_KEYS = ("run", "method", "model", "status", "mlflow_run_id", "benchmark")
SHOWN_KEYS = ROW_KEYS[:4]                  # the table's first columns; the metrics follow


class CompareError(ValueError):
    """An unknown experiment or run."""


def compare_runs(tracking_uri: str, experiment: str, runs: Sequence[str] | None = None,
                 parent: str | None = None) -> list[dict[str, Any]]:
    """One row per sequence of ``experiment`` (all, or ``runs`` in that order): run id, method,
    model, MLflow status, the MLflow run id, and the summary metrics its parent run logged
    (per-domain ones such as ``transfer/<domain>`` aside). ``parent``: only the sequences
    nested under that MLflow run (a study's members; moram_platform.report)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise CompareError(f"experiment {experiment!r} does not exist in the MLflow store {redact(tracking_uri)}")
    query = f"tags.`{KIND_TAG}` = 'sequence'" + (f" and tags.`mlflow.parentRunId` = '{parent}'" if parent else "")
    sequences = client.search_runs([found.experiment_id], filter_string=query,
                                   max_results=5000, order_by=["attributes.start_time ASC"])
    rows = {}
    for run in sequences:
        tags, metrics = run.data.tags, run.data.metrics
        name = tags.get(RUN_ID_TAG, run.info.run_name)
        rows.setdefault(name, {   # the first parent run of a run id is the one the driver resumes
            "run": name, "method": tags.get("moram.method", ""), "model": tags.get("moram.model", ""),
            "status": run.info.status, "mlflow_run_id": run.info.run_id,
            "benchmark": tags.get("moram.benchmark", "trace"),   # older sequences: TRACE's were the only ones
            **{metric: value for metric, value in metrics.items() if "/" not in metric},
        })
    if runs is None:
        return list(rows.values())
    missing = [name for name in runs if name not in rows]
    if missing:
        raise CompareError(f"experiment {experiment!r} has no sequence named {', '.join(missing)}; "
                           f"it has: {', '.join(rows) or '(none)'}")
    return [rows[name] for name in runs]


def metric_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The metrics any row has: the summary columns of the rows' benchmarks in their order first
    (``Benchmark.summary_columns``), then the rest by name."""
    present = {key for row in rows for key in row if key not in ROW_KEYS}
    first = [name for name in summary_columns(dict.fromkeys(row.get("benchmark", "trace") for row in rows))
             if name in present]
    return first + sorted(present - set(first))


def format_table(rows: Sequence[dict[str, Any]], fmt: str = "table") -> str:
    columns = list(SHOWN_KEYS) + metric_columns(rows)
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    if fmt == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([columns, *cells])
        return out.getvalue().rstrip("\n")
    widths = [max(len(text) for text in column) for column in zip(columns, *cells)]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
                     for line in [columns, *cells])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)

