"""The comparison report of a study (or of any set of sequences in MLflow): per method (more
exactly: per grid point with the seed and the task order left out), mean ± std over seeds and
orders of OP, BWT_eq10, the reference repo's forgetting magnitude, FWT and the own-task routing
share, with the paper's number beside it where the setting matches; the per-method mean
accuracy (and routing) matrices; Markdown, CSV and a bar chart with error bars.

    report = study_report("http://mlflow:5000", "trace", "methods-v1")   # or report_study(run_study(...))
    print(report.markdown())
    report.write("out/")                        # report.md, report.csv, runs.jsonl, bars.png, matrices
    records_report(read_run_records(["out/runs.jsonl"]), "Study methods-v1")   # the same, later, without MLflow

The rows come from ``runs.compare_runs`` (the one reader of sequence summaries, also
behind ``moram compare``); std is the sample standard deviation (n - 1), "-" for one run.
``runs.jsonl`` keeps each finished run's record (metrics, matrix, routing), so a study's numbers
outlive its MLflow store (a machine given back, a fresh clone) and studies run on several
machines can be reported together (``jobs/study.py report --runs``).
"""
from __future__ import annotations

import csv
import io
import json
import statistics
import tempfile
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from .benchmark import paper_setting
from .runs import CompareError, compare_runs
from .tracking import AXES_TAG, KIND_TAG, LABEL_TAG_PREFIX, STUDY_TAG

# (column in the report, the summary metric the sequence driver logs, what it is)
METRICS: tuple[tuple[str, str, str], ...] = (
    ("OP", "OP", "mean accuracy after the last task (O-LoRA's 'average accuracy', AA)"),
    ("BWT_eq10", "BWT_eq10", "paper Eq. 10, forgetting-positive (= -BWT_signed = forgetting); lower is better"),
    ("forgetting_ref", "reference_forgetting_magnitude", "reference repo's (1/T) Σ min(R[T][j]-R[j][j], 0), "
                                                          "as a magnitude"),
    ("FWT", "FWT", "forward transfer against the zero-shot row (needs eval.baseline)"),
    ("own_routing", "routing/own_share_mean", "share of routing mass on the evaluated task's own atoms "
                                              "(final version; MoRAM and MoE-LoRA)"),
)
HEADERS = {"OP": "OP (= AA)"}   # the standard-CL papers call the same number average accuracy (AA)
# Grid keys that a method's mean is taken over, never grouped by.
REPEAT_KEYS = ("run.seed", "data.tasks", "run.name")


class ReportError(CompareError):
    """No study of that name, or nothing finished to report."""


@dataclass
class RunRecord:
    run: str
    group: str
    tasks: list[str]
    metrics: dict[str, float]
    matrix: list[list[float]] | None
    routing: list[list[float]] | None = None
    model: str = ""          # the base model's id (the sequence's moram.model tag)
    benchmark: str | None = None   # the sequence's moram.benchmark tag (None: whichever knows its tasks)


@dataclass
class GroupSummary:
    group: str
    runs: list[str]
    stats: dict[str, tuple[float, float | None, int]]      # column -> (mean, std or None, n)
    mean_matrix: list[list[float]] | None
    matrix_columns: list[str]
    mean_routing: list[list[float]] | None = None
    paper_rows: list[dict[str, str]] = field(default_factory=list)     # the anchor rows behind ``paper``
    # column -> (value, "Table x, row", std or None)
    paper: dict[str, tuple[float, str, float | None]] = field(default_factory=dict)


@dataclass
class StudyReport:
    title: str
    groups: list[GroupSummary]
    incomplete: list[str]
    records: list[RunRecord] = field(default_factory=list)     # the finished runs behind the groups

    # -- text ----------------------------------------------------------------------------
    def columns(self) -> list[str]:
        return [name for name, _, _ in METRICS if any(name in g.stats for g in self.groups)]

    def markdown(self) -> str:
        columns = self.columns()
        lines = [f"# {self.title}", "",
                 "mean ± std over seeds and orders (sample std; n runs per row); paper numbers in brackets "
                 "where the setting matches (`moram_platform/data/paper_anchors.csv`).", "",
                 "| method | n | " + " | ".join(HEADERS.get(c, c) for c in columns) + " |",
                 "|---|---|" + "---|" * len(columns)]
        for g in self.groups:
            n = max((s[2] for s in g.stats.values()), default=0)
            cells = [_cell(g.stats.get(c), g.paper.get(c)) for c in columns]
            lines.append(f"| {g.group} | {n} | " + " | ".join(cells) + " |")
        lines += ["", *[f"- **{name}**: {what}" for name, _, what in METRICS if name in columns]]
        if any(row.get("metric") == "BWT" for g in self.groups for row in g.paper_rows):
            lines.append(f"- a paper BWT in brackets under both BWT columns: {BWT_UNKNOWN}")
        if self.incomplete:
            lines += ["", f"Not finished (left out): {', '.join(self.incomplete)}"]
        for g in self.groups:
            if g.mean_matrix is None:
                continue
            lines += ["", f"## {g.group}: mean accuracy matrix R[i][j] over {len(g.runs)} runs", "",
                      "| after \\ on | " + " | ".join(g.matrix_columns) + " |",
                      "|---|" + "---|" * len(g.matrix_columns)]
            for label, row in zip(g.matrix_columns, g.mean_matrix):
                lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in row) + " |")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["method", "metric", "mean", "std", "n", "paper", "paper_std", "paper_source", "runs"])
        for g in self.groups:
            for column in self.columns():
                if column in g.stats:
                    mean, std, n = g.stats[column]
                    paper, source, paper_std = g.paper.get(column, (None, "", None))
                    writer.writerow([g.group, column, f"{mean:.4f}", "" if std is None else f"{std:.4f}", n,
                                     "" if paper is None else paper, "" if paper_std is None else paper_std,
                                     source, " ".join(g.runs)])
        return out.getvalue()

    def runs_jsonl(self) -> str:
        """One JSON object per finished run: its RunRecord (read back by ``read_run_records``)."""
        return "".join(json.dumps(asdict(r), sort_keys=True) + "\n" for r in self.records)

    # -- files ---------------------------------------------------------------------------
    def write(self, folder: str | Path) -> list[Path]:
        from .plots import accuracy_heatmap, metric_bars, routing_heatmap

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / "report.md", folder / "report.csv"]
        paths[0].write_text(self.markdown())
        paths[1].write_text(self.csv())
        if self.records:
            paths.append(folder / "runs.jsonl")
            paths[-1].write_text(self.runs_jsonl())
        bars = {g.group: {c: g.stats[c][:2] for c in ("OP", "BWT_eq10", "FWT") if c in g.stats} for g in self.groups}
        paths.append(metric_bars(bars, folder / "metrics.png", title=self.title))
        for g in self.groups:
            slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in g.group)
            if g.mean_matrix is not None:
                paths.append(accuracy_heatmap(g.mean_matrix, g.matrix_columns, folder / f"matrix_{slug}.png",
                                              title=f"{g.group}: mean R[i][j] over {len(g.runs)} runs"))
            if g.mean_routing is not None:
                paths.append(routing_heatmap(g.mean_routing, g.matrix_columns, folder / f"routing_{slug}.png",
                                             title=f"{g.group}: who routes to whom (final version, mean)"))
        return paths


def _cell(stat: tuple[float, float | None, int] | None, paper: tuple[float, str] | None) -> str:
    if stat is None:
        return "-"
    mean, std, _ = stat
    text = f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f} ± -"
    if not paper:
        return text
    return text + (f" [{paper[0]:g}]" if paper[2] is None else f" [{paper[0]:g} ± {paper[2]:g}]")


# -- building ----------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float | None, int]:
    """(mean, sample std or None for one value, n)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def summarize_runs(records: Sequence[RunRecord], anchors: list[dict[str, str]] | None = None) -> list[GroupSummary]:
    """Group summaries in first-seen order of the groups."""
    anchors = load_anchors() if anchors is None else anchors
    groups: dict[str, list[RunRecord]] = {}
    for record in records:
        groups.setdefault(record.group, []).append(record)
    summaries = []
    for group, members in groups.items():
        stats = {}
        for column, metric, _ in METRICS:
            values = [m.metrics[metric] for m in members if metric in m.metrics]
            if values:
                stats[column] = mean_std(values)
        matrix, columns = _mean_matrix([m.matrix for m in members], [m.tasks for m in members])
        routing, _ = _mean_matrix([m.routing for m in members], [m.tasks for m in members])
        summary = GroupSummary(group, [m.run for m in members], stats, matrix, columns, routing)
        summary.paper, summary.paper_rows = _paper_numbers(anchors, group, members)
        summaries.append(summary)
    return summaries


def _mean_matrix(matrices: list, orders: list[list[str]]) -> tuple[list[list[float]] | None, list[str]]:
    """Element-wise mean; with one task order the columns are its tasks, with several they are
    positions in the order (R[i][j]: after the i-th task, on the j-th)."""
    present = [(m, o) for m, o in zip(matrices, orders) if m]
    if not present or len({(len(m), len(m[0])) for m, _ in present}) != 1:
        return None, []
    size = len(present[0][0][0])
    same_order = len({tuple(o) for _, o in present}) == 1
    columns = list(present[0][1]) if same_order else [f"task {j + 1}" for j in range(size)]
    mean = [[_mean_or_none([m[i][j] for m, _ in present]) for j in range(size)] for i in range(len(present[0][0]))]
    return mean, columns


def _mean_or_none(values: list[float | None]) -> float | None:
    """A cell's mean over runs; None where a run's eval.schedule did not evaluate it."""
    return None if any(v is None for v in values) else statistics.fmean(values)


# -- paper anchors ------------------------------------------------------------------------------
def load_anchors(path: str | Path | None = None) -> list[dict[str, str]]:
    """Rows of the paper-anchor file: setting, model, method, metric, value, table, row, note."""
    if path is None:
        text = resources.files("moram_platform").joinpath("data/paper_anchors.csv").read_text()
    else:
        text = Path(path).read_text()
    return [row for row in csv.DictReader(io.StringIO(text)) if not row["setting"].startswith("#")]


def setting_of(tasks: Sequence[str], benchmark: str | None = None) -> str | None:
    """The paper setting a task list belongs to (its numbers are comparable only there); each
    benchmark says which of its task lists are one (``Benchmark.paper_setting``)."""
    return paper_setting(list(tasks), benchmark)


def same_model(anchor_model: str, run_model: str) -> bool:
    """Whether a run's base model id is the anchor's model: its name inside the id, ignoring case
    and punctuation ("gemma-2b-it" is "google/gemma-2b-it"; "ViT-B-16" is "open_clip:ViT-B-16");
    an anchor without a model matches any."""
    def letters(text: str) -> str:
        return "".join(ch for ch in text.lower() if ch.isalnum())

    return not anchor_model or (bool(run_model) and letters(anchor_model) in letters(run_model))


# An anchor metric "BWT": a backward transfer whose source does not say which variant it is.
BWT_UNKNOWN = ("the source does not say whether it is Eq. 10 or the official code's printed (1/T) Σ min(R[T][j] - "
               "R[j][j], 0) as a magnitude (the MoRAM README's TRACE table), so it stands beside both")
ANCHOR_COLUMNS = {"BWT": ("BWT_eq10", "forgetting_ref")}


def _paper_numbers(anchors: list[dict[str, str]], group: str,
                   members: list[RunRecord]) -> tuple[dict[str, tuple], list[dict[str, str]]]:
    """({report column: (value, "table, row", std or None)}, the anchor rows used)."""
    settings = {setting_of(m.tasks, m.benchmark) for m in members}
    methods = {m.metrics.get("_method") for m in members} | {group}
    if len(settings) != 1 or None in settings:
        return {}, []
    setting = settings.pop()
    found, rows = {}, []
    for row in anchors:
        model = row.get("model") or ""
        if row["setting"] == setting and row["method"] in methods and all(same_model(model, m.model) for m in members):
            std = float(row["std"]) if row.get("std") else None
            for column in ANCHOR_COLUMNS.get(row["metric"], (row["metric"],)):
                found[column] = (float(row["value"]), f"{row['table']}, {row['row']}", std)
            rows.append(row)
    return found, rows


# -- run records kept as files ----------------------------------------------------------------------
RECORD_FIELDS = {f.name for f in fields(RunRecord)}
REQUIRED_RECORD_FIELDS = ("run", "group", "tasks", "metrics")


def read_run_records(paths: Sequence[str | Path]) -> list[RunRecord]:
    """The records of ``runs.jsonl`` files (``StudyReport.write``), in file order; a run id seen
    twice keeps its first record. Bad input is a ReportError naming the file and line."""
    records: dict[str, RunRecord] = {}
    for path in map(Path, paths):
        try:
            lines = path.read_text().splitlines()
        except OSError as error:
            raise ReportError(f"{path}: cannot read the run records ({error.strerror or error})") from None
        for number, line in enumerate(lines, 1):
            if line.strip():
                record = _record_from_line(line, f"{path}:{number}")
                records.setdefault(record.run, record)
    return list(records.values())


def _record_from_line(line: str, where: str) -> RunRecord:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as error:
        raise ReportError(f"{where}: not a JSON object ({error.msg})") from None
    if not isinstance(raw, dict):
        raise ReportError(f"{where}: not a JSON object")
    missing = [key for key in REQUIRED_RECORD_FIELDS if key not in raw]
    unknown = sorted(set(raw) - RECORD_FIELDS)
    if missing or unknown:
        raise ReportError(f"{where}: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(unknown)}"] if unknown else [])))
    metrics = raw["metrics"]
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) or k == "_method"
                                                for k, v in metrics.items()):
        raise ReportError(f"{where}: metrics must map names to numbers")
    return RunRecord(**raw)


def records_report(records: Sequence[RunRecord], title: str, incomplete: Sequence[str] = ()) -> StudyReport:
    """A report over run records from anywhere (MLflow, ``runs.jsonl`` files, both)."""
    if not records:
        raise ReportError(f"{title}: no finished sequence to report")
    return StudyReport(title, summarize_runs(records), list(incomplete), list(records))


def with_kept_runs(report: StudyReport | None, kept: Sequence[RunRecord], title: str) -> StudyReport:
    """``report`` (from MLflow; None where MLflow has none) with the kept runs it lacks added; a
    run in both is taken from ``report``."""
    records = list(report.records) if report else []
    seen = {r.run for r in records}
    kept_runs = {r.run for r in kept}
    incomplete = [run for run in (report.incomplete if report else []) if run not in kept_runs]
    return records_report(records + [r for r in kept if r.run not in seen], report.title if report else title,
                          incomplete)


# -- reading MLflow -------------------------------------------------------------------------------
def study_report(tracking_uri: str, experiment: str, study: str) -> StudyReport:
    """The report of the study ``study`` (its member sequences are nested under its MLflow run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ReportError(f"experiment {experiment!r} does not exist")
    parents = client.search_runs([found.experiment_id], filter_string=(
        f"tags.`{STUDY_TAG}` = '{study}' and tags.`{KIND_TAG}` = 'study'"), max_results=1)
    if not parents:
        raise ReportError(f"experiment {experiment!r} has no study named {study!r}")
    parent = parents[0]
    axes = json.loads(parent.data.tags.get(AXES_TAG, "[]"))
    rows = compare_runs(tracking_uri, experiment, parent=parent.info.run_id)
    return _report(client, rows, [a for a in axes if a not in REPEAT_KEYS], f"Study {study}")


def runs_report(tracking_uri: str, experiment: str, runs: Sequence[str] | None = None) -> StudyReport:
    """The same for any sequences of an experiment, grouped by method."""
    from mlflow.tracking import MlflowClient

    rows = compare_runs(tracking_uri, experiment, runs)
    return _report(MlflowClient(tracking_uri), rows, [], f"Runs of {experiment}")


def _report(client, rows: list[dict[str, Any]], group_keys: list[str], title: str) -> StudyReport:
    records, incomplete = [], []
    for row in rows:
        if row["status"] != "FINISHED" or "OP" not in row:
            incomplete.append(row["run"])
            continue
        tags = client.get_run(row["mlflow_run_id"]).data.tags
        labels = [tags.get(LABEL_TAG_PREFIX + key, "?") for key in group_keys]
        group = "/".join(labels) if group_keys else row["method"]
        metrics = {k: v for k, v in row.items() if isinstance(v, float)}
        metrics.update(_routing_metric(client, row["mlflow_run_id"]))
        metrics["_method"] = row["method"]
        tasks = tags.get("moram.order", "").split(",")
        matrix = _artifact_matrix(client, row["mlflow_run_id"], "accuracy_matrix.csv")
        routing = _artifact_matrix(client, row["mlflow_run_id"], "routing/final_all.csv")
        records.append(RunRecord(row["run"], group, tasks, metrics, matrix, routing, model=row.get("model", ""),
                                 benchmark=tags.get("moram.benchmark")))
    if not records:
        raise ReportError(f"{title}: no finished sequence to report" +
                          (f" (not finished: {', '.join(incomplete)})" if incomplete else ""))
    return StudyReport(title, summarize_runs(records), incomplete, records)


def _routing_metric(client, run_id: str) -> dict[str, float]:
    metric = client.get_run(run_id).data.metrics.get("routing/own_share_mean")
    return {} if metric is None else {"routing/own_share_mean": float(metric)}


def _artifact_matrix(client, run_id: str, path: str) -> list[list[float]] | None:
    """A matrix CSV (``after_task, <task>...``) logged on the run, or None."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            local = client.download_artifacts(run_id, path, folder)
        except Exception:   # noqa: BLE001  (absent: MLflow raises store-specific errors)
            return None
        rows = list(csv.reader(Path(local).read_text().splitlines()))
    return [[float(v) if v != "" else None for v in row[1:]] for row in rows[1:]] or None   # "": not evaluated


def report_study(result) -> StudyReport:
    """The report of a study ``tune.study.run_study`` has just run (``result``, its StudyResult),
    also logged as files of the study's MLflow run (``report/``)."""
    from .tracking import Tracker

    report = study_report(result.tracking_uri, result.experiment, result.name)
    log_study_report(Tracker(result.tracking_uri, result.experiment, result.name), result.mlflow_run_id, report)
    return report


def log_study_report(tracker, run_id: str, report: StudyReport) -> None:
    """Report files (Markdown, CSV, bar chart, mean matrices) as artifacts of the study's run."""
    with tempfile.TemporaryDirectory() as folder:
        for path in report.write(folder):
            tracker.log_file(run_id, path, "report")
    metrics = {f"{g.group}/{column}_mean": stat[0] for g in report.groups for column, stat in g.stats.items()}
    tracker.log_metrics(run_id, metrics)
