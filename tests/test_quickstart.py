"""The quickstart as a new user meets it: ``jobs/trace.py`` on the quickstart config, run as a
subprocess from an empty folder. It must show that every task was learned, stay within the
terminal's line budget, and keep every file (MLflow artifacts included) under its output folder."""
import csv
import subprocess
import sys

import pytest

from fixtures.paths import PROJECT_ROOT, TRACE_500

pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.timeout(1800)]

CONFIG = PROJECT_ROOT / "jobs" / "configs" / "trace" / "smollm2-135m_moram_quickstart.yaml"
LINE_BUDGET = 60
LEARNED_BY = 15.0  # points above zero-shot, on every task's own column right after training it


def read_matrix(path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    tasks = rows[0][1:]
    return tasks, [[float(v) for v in row[1:]] for row in rows[1:]]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("quickstart")
    out = cwd / "out"
    command = [sys.executable, str(PROJECT_ROOT / "jobs" / "trace.py"), "--config", str(CONFIG),
               "--set", f"data.root={TRACE_500}", "--set", f"run.output_dir={out}", "--run-name", "quickstart"]
    job = subprocess.run(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=1700)
    return cwd, out, job


def test_quickstart_finishes_and_says_where_to_look(quickstart):
    _, out, job = quickstart
    assert job.returncode == 0, job.stdout[-4000:]
    assert "mlflow ui --backend-store-uri sqlite:///" in job.stdout, job.stdout[-2000:]
    assert "runs?workflowType=machine_learning" in job.stdout
    assert f"{out}/registry" in job.stdout
    assert "generate --registry file://" in job.stdout and "--run quickstart --version 3" in job.stdout
    assert (out / "logs" / "quickstart.log").is_file()


def test_quickstart_learns_every_task(quickstart):
    _, out, job = quickstart
    assert job.returncode == 0, job.stdout[-4000:]
    [matrix_file] = sorted(out.glob("mlartifacts/**/accuracy_matrix.csv"))
    [zero_file] = sorted(out.glob("mlartifacts/**/zero_shot_row.csv"))
    tasks, matrix = read_matrix(matrix_file)
    _, [zero_shot] = read_matrix(zero_file)
    assert len(matrix) == len(tasks) >= 3
    for i, task in enumerate(tasks):
        assert matrix[i][i] >= zero_shot[i] + LEARNED_BY, (task, matrix[i][i], zero_shot[i], job.stdout[-3000:])


def test_quickstart_is_quiet(quickstart):
    _, _, job = quickstart
    lines = job.stdout.count("\n")   # what a terminal shows: a bar's \r updates redraw one line
    assert lines <= LINE_BUDGET, job.stdout
    assert "PlacementGroupCleaner" not in job.stdout and "DeepSpeed" not in job.stdout


def test_quickstart_writes_only_under_its_output_folder(quickstart):
    cwd, out, job = quickstart
    assert job.returncode == 0
    assert not (cwd / "mlruns").exists()
    assert sorted(p.name for p in cwd.iterdir()) == ["out"]
    assert list(out.glob("mlartifacts/**/accuracy_matrix.png"))
