"""Studies: grid files (checked before anything runs, errors name the key), stable run ids per
grid point, and a 2-method x 2-seed study of 2 short TRACE tasks on the real SmolLM2-135M, run
end to end on Ray Tune with MLflow, resumed without retraining, and reported: the report's
numbers are recomputed by hand from the accuracy matrices the runs recorded."""
import csv
import io
import json
import statistics
import subprocess
import sys
import uuid
from dataclasses import asdict

import pytest
import yaml
from mlflow.tracking import MlflowClient

from fixtures.paths import PROJECT_ROOT
from moram_platform.registry import Registry, manifest_key
from moram_platform.tune.study import StudyError, point_run_id, study_from_dict, study_points

TASKS = ["C-STANCE", "FOMC"]


def smoke_job(tmp_path, trace_root, tracking_uri="sqlite:///unused.db", experiment="study-test") -> dict:
    return {
        "benchmark": "trace",
        "run": {"output_dir": str(tmp_path / "runs"), "seed": 0},
        "model": {"source": "smollm2", "dtype": "float32"},
        "moram": {"method": "moram", "target_modules": ["q_proj", "v_proj"], "r": 2, "k": 2, "tau": 0.03,
                  "delta": 0.0, "dropout": 0.0, "prune_mass": None},
        "data": {"root": str(trace_root), "tasks": TASKS, "max_train_examples": 2, "max_eval_examples": 2},
        "trace": {"max_prompt_tokens": 48, "max_answer_tokens": 4},
        "train": {"epochs": 1, "lr": 2.0e-3, "global_batch_size": 2, "micro_batch_size": 2, "precision": "fp32",
                  "engine": "torch"},
        "eval": {"max_new_tokens": 2, "batch_size": 2, "baseline": False},   # FWT: tests/test_report.py
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.9},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": experiment},
    }


def grid_file(tmp_path, job: dict, grid: dict, **extra) -> dict:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(job))
    return {"base_config": str(base), "grid": grid, **extra}


# -- the grid file ---------------------------------------------------------------------------------
def test_every_combination_is_a_point_with_a_stable_run_id(tmp_path, trace_root):
    raw = grid_file(tmp_path, smoke_job(tmp_path, trace_root), {
        "moram.method": ["moram", "moelora"], "run.seed": [0, 1],
        "data.tasks": {"ab": ["C-STANCE", "FOMC"], "ba": ["FOMC", "C-STANCE"]}})
    points = study_points(study_from_dict(raw), "s1")
    assert len(points) == 8
    assert points[0].run_id == "s1--method-moram--seed-0--tasks-ab"
    assert points[-1].run_id == "s1--method-moelora--seed-1--tasks-ba"
    assert points[-1].config["data"]["tasks"] == ["FOMC", "C-STANCE"]
    assert points[-1].config["moram"]["method"] == "moelora" and points[-1].config["run"]["seed"] == 1
    assert points[-1].config["run"]["name"] == points[-1].run_id
    assert [p.run_id for p in study_points(study_from_dict(raw), "s1")] == [p.run_id for p in points]
    long = point_run_id("s" * 120, {"run.seed": "0", "moram.method": "moram"})
    assert len(long) == 128 and long == point_run_id("s" * 120, {"run.seed": "0", "moram.method": "moram"})


@pytest.mark.parametrize("grid, extra, message", [
    ({"moram.method": ["moram", "nope"]}, {}, "grid.moram.method: 'nope' is not a valid moram.method"),
    ({"run.seed": []}, {}, "grid.run.seed: must be a non-empty list"),
    ({"run.seed": 3}, {}, "grid.run.seed: must be a non-empty list"),
    ({}, {}, "grid: must map at least one job-config key"),
    ({"train.lr": [0.1, -1.0]}, {}, "grid.train.lr: -1.0 is not a valid train.lr"),
    ({"data.tasks": {"bad label": ["FOMC"]}}, {}, "grid.data.tasks: label 'bad label' must be 1-128 letters, digits and "),
    ({"run.seed": [0]}, {"resources": {"trial_cpu": 0}}, "resources.trial_cpu: must be > 0"),
    ({"run.seed": [0]}, {"extra": 1}, "extra:"),
])
def test_a_bad_grid_names_its_key(tmp_path, trace_root, grid, extra, message):
    raw = grid_file(tmp_path, smoke_job(tmp_path, trace_root), grid, **extra)
    with pytest.raises(StudyError, match=message.replace(".", r"\.").replace("(", r"\(")):
        study_points(study_from_dict(raw), "s1")


def test_the_command_says_what_is_wrong_in_one_line(tmp_path, trace_root):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid_file(tmp_path, smoke_job(tmp_path, trace_root), {"run.seed": "x"})))
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "jobs" / "study.py"), str(path), "--name", "s"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: grid.run.seed: must be a non-empty list")
    assert "Traceback" not in done.stderr


# -- a whole study ---------------------------------------------------------------------------------
def hand_summary(matrix: list[list[float]]) -> dict[str, float]:
    """DESIGN.md, Metrics, for T = 2: OP = mean of the last row; BWT_eq10 = R[0][0] - R[1][0];
    the reference repo's magnitude = -(1/2) * min(R[1][0] - R[0][0], 0) (the last task adds 0)."""
    (first, _), last = matrix[0], matrix[1]
    return {"OP": (last[0] + last[1]) / 2, "BWT_eq10": first - last[0],
            "forgetting_ref": -min(last[0] - first, 0.0) / 2}


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(1800)
def test_a_study_runs_resumes_and_reports_the_runs_numbers(tmp_path, trace_root, mlflow_server, ray_cluster):
    from moram_platform.cli import main as moram_main
    from moram_platform.report import read_run_records, records_report, report_study, study_report
    from moram_platform.tune.study import run_study

    experiment = f"study-{uuid.uuid4().hex[:8]}"
    job = smoke_job(tmp_path, trace_root, mlflow_server.uri, experiment)
    grid = study_from_dict(grid_file(tmp_path, job, {"moram.method": ["moram", "moelora"], "run.seed": [0, 1]},
                                     resources={"trial_cpu": 0.1, "max_concurrent": 2}))
    result = run_study(grid, "e2e", verbose=False)
    assert result.failed == {} and result.skipped == []
    report_study(result)
    runs = [p.run_id for p in result.points]
    registry = Registry(tmp_path / "runs" / "registry")
    assert sorted(registry.runs()) == sorted(runs)
    assert all(registry.versions(run) == [1, 2] for run in runs)

    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    members = client.search_runs([experiment_id], filter_string="tags.`moram.kind` = 'sequence'")
    assert {r.data.tags["mlflow.parentRunId"] for r in members} == {result.mlflow_run_id}
    recorded = {}
    for run in members:
        local = client.download_artifacts(run.info.run_id, "accuracy_matrix.csv", str(tmp_path))
        rows = [line.split(",") for line in open(local).read().split("\n")[1:] if line]
        # "": a cell the study's schedule (final: diagonal + last row) did not evaluate
        recorded[run.data.tags["moram.run_id"]] = ([[float(v) if v else None for v in row[1:]] for row in rows],
                                                   run.data.metrics, run.data.tags["moram.method"])
        # routing diagnostics: logged per version; a 2 x 2 who-routes-to-whom with rows summing to 1
        own = run.data.metrics["routing/own_share_mean"]
        assert 0.0 <= own <= 1.0
        local = client.download_artifacts(run.info.run_id, "routing/final_all.csv", str(tmp_path))
        routing = [[float(v) for v in line.split(",")[1:]] for line in open(local).read().split("\n")[1:] if line]
        assert [sum(row) for row in routing] == pytest.approx([1.0, 1.0], abs=1e-4)
        assert own == pytest.approx((routing[0][0] + routing[1][1]) / 2, abs=1e-4)

    report = study_report(mlflow_server.uri, experiment, "e2e")
    assert sorted(g.group for g in report.groups) == ["moelora", "moram"]   # in the order they first ran
    for group in report.groups:
        matrices = [recorded[run][0] for run in group.runs]
        assert len(matrices) == 2 and all(recorded[run][2] == group.group for run in group.runs)
        for column in ("OP", "BWT_eq10", "forgetting_ref"):
            values = [hand_summary(m)[column] for m in matrices]
            mean, std, n = group.stats[column]
            assert n == 2
            assert mean == pytest.approx(statistics.fmean(values), abs=1e-3)
            assert std == pytest.approx(statistics.stdev(values), abs=1e-3)
        owns = [recorded[run][1]["routing/own_share_mean"] for run in group.runs]
        assert group.stats["own_routing"][0] == pytest.approx(statistics.fmean(owns))
        assert "FWT" not in group.stats         # no zero-shot row (eval.baseline: false)
        assert matrices[0][0][1] is None and group.mean_matrix[0][1] is None     # R[0][1]: not evaluated
        expected = [[None if a is None else (a + b) / 2 for a, b in zip(ra, rb)] for ra, rb in zip(*matrices)]
        assert [v for row in group.mean_matrix for v in row if v is not None] == pytest.approx(
            [v for r in expected for v in r if v is not None], abs=1e-3)
    text = report.markdown()
    assert (tmp_path / "report" / "report.md") in report.write(tmp_path / "report")
    assert "| moram | 2 |" in text and "| moelora | 2 |" in text and "BWT_eq10" in text
    # the records kept in runs.jsonl report the same numbers without MLflow; with it, kept runs join
    kept = read_run_records([tmp_path / "report" / "runs.jsonl"])
    assert sorted(r.run for r in kept) == sorted(runs)
    assert [g.stats for g in records_report(kept, "t").groups] == [g.stats for g in report.groups]
    other = tmp_path / "other.jsonl"          # a run of another machine, kept as a file
    other.write_text(json.dumps({**asdict(kept[0]), "run": "elsewhere", "metrics": {**kept[0].metrics, "OP": 1.0}}))
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "jobs" / "study.py"), "report", "e2e", "--tracking-uri",
                           mlflow_server.uri, "--experiment", experiment, "--runs", str(other), "--format", "csv"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    merged = next(r for r in rows if r["method"] == kept[0].group and r["metric"] == "OP")
    assert merged["n"] == "3" and "elsewhere" in merged["runs"].split()
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id, "report")}
    assert {"report/report.md", "report/report.csv", "report/metrics.png", "report/matrix_moram.png",
            "report/routing_moram.png"} <= artifacts

    # again: every point is finished, nothing is trained, the registry is unchanged
    manifests = {run: registry.storage.read(manifest_key(run, 2)) for run in runs}
    again = run_study(grid, "e2e", verbose=False)
    assert sorted(again.skipped) == sorted(runs)
    assert {run: registry.storage.read(manifest_key(run, 2)) for run in runs} == manifests
    assert len(client.search_runs([experiment_id], filter_string="tags.`moram.kind` = 'study'")) == 1

    # a grown grid whose new points were kept from elsewhere (runs.jsonl): nothing runs for them
    grown = study_from_dict(grid_file(tmp_path, job, {"moram.method": ["moram", "moelora"], "run.seed": [0, 1, 2]},
                                      resources={"trial_cpu": 0.1, "max_concurrent": 2}))
    elsewhere = {p.run_id for p in study_points(grown, "e2e")} - set(runs)
    assert len(elsewhere) == 2
    kept = run_study(grown, "e2e", verbose=False, kept_runs=elsewhere)
    assert sorted(kept.skipped) == sorted(set(runs) | elsewhere) and kept.failed == {}
    assert sorted(registry.runs()) == sorted(runs)

    # the same report from the shell: moram compare --study
    assert moram_main(["compare", "--tracking-uri", mlflow_server.uri, "--experiment", experiment,
                       "--study", "e2e", "--format", "csv"]) == 0


def test_a_trial_reports_op_so_far_only_from_a_whole_row():
    # eval.schedule: final leaves a version's row unscored before the last task (None cells):
    # a partial mean would be a wrong number, and summing None crashed the trial
    from moram_platform.tune.study import op_so_far

    assert op_so_far([80.0, 60.0]) == {"op_so_far": 70.0}
    assert op_so_far([None, 60.0]) == {}
    assert op_so_far([]) == {}
