"""Bad input stops jobs/trace.py with a clear message before anything is written."""
import json
import shutil
import subprocess
import sys

import pytest
import yaml

from fixtures.paths import PROJECT_ROOT, TRACE_500

pytestmark = pytest.mark.timeout(300)


def run_job(cwd, *overrides):
    command = [sys.executable, str(PROJECT_ROOT / "jobs" / "trace.py"), "--quiet", "--run-name", "bad-input",
               *[f"--set={o}" for o in overrides]]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=240)


def assert_nothing_written(cwd):
    assert not (cwd / "moram_runs").exists()


def test_malformed_data_row_names_file_and_index(tmp_path):
    root = tmp_path / "data"
    for task in ("C-STANCE", "FOMC"):
        shutil.copytree(TRACE_500 / task, root / task)
    rows = json.loads((root / "FOMC" / "train.json").read_text())
    del rows[3]["answer"]
    (root / "FOMC" / "train.json").write_text(json.dumps(rows))
    job = run_job(tmp_path, f"data.root={root}", "data.tasks=[C-STANCE, FOMC]")
    assert job.returncode == 2, job.stderr[-2000:]
    assert "FOMC/train.json" in job.stderr and "3" in job.stderr and "answer" in job.stderr
    assert "Traceback" not in job.stderr
    assert_nothing_written(tmp_path)


def test_unknown_task_lists_the_known_ones(tmp_path):
    job = run_job(tmp_path, f"data.root={TRACE_500}", "data.tasks=[C-STANCE, NoSuchTask]")
    assert job.returncode == 2
    assert "NoSuchTask" in job.stderr and "C-STANCE" in job.stderr and "Traceback" not in job.stderr
    assert_nothing_written(tmp_path)


def test_missing_train_split_is_named(tmp_path):
    job = run_job(tmp_path, f"data.root={TRACE_500}", "data.tasks=[MeetingBank]")
    assert job.returncode == 2
    assert "MeetingBank" in job.stderr and "train" in job.stderr
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("override, message", [
    ("moram.tau=-1", "moram.tau: must be > 0"),
    ("moram.k=0", "moram.k: must be an integer >= 1"),
    ("train.lr=0", "train.lr: must be > 0"),
    ("scaling.num_workers=many", "scaling.num_workers: must be an integer"),
    ("train.optimizer=sgd", "train.optimizer: unknown key"),
])
def test_invalid_hyperparameter_names_the_key(tmp_path, override, message):
    job = run_job(tmp_path, f"data.root={TRACE_500}", override)
    assert job.returncode != 0
    assert message in job.stderr
    assert_nothing_written(tmp_path)


# A bad config file stops the job before Ray starts: exit status 2, the key named, no traceback.
BAD_CONFIG_FILES = [
    ({"train": {"global_batch_size": 0}}, "train.global_batch_size: must be >= 1, got 0"),
    ({"data": {"tasks": ["C-STANCE", "FOMC", "Py150"]}, "train": {"epochs": [1, 2]}},
     "train.epochs: lists 2 values for the 3 tasks of data.tasks"),
    ({"train": {"zero_stage": 3}}, "train.zero_stage: ZeRO-3 is not supported"),
    ({"run": {"output_dir": "s3://bucket/runs"}}, "run.output_dir: must be a local folder"),
    ({"data": {"max_eval_examples": 0}, "scaling": {"num_workers": 0}}, "data.max_eval_examples: must be >= 1"),
    ({"xtail": {"shots": 0}}, "xtail: unknown key"),
]


@pytest.mark.parametrize("raw, message", BAD_CONFIG_FILES, ids=[m.split(":")[0] for _, m in BAD_CONFIG_FILES])
def test_bad_config_file_exits_2_naming_the_key(tmp_path, raw, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    job = subprocess.run([sys.executable, str(PROJECT_ROOT / "jobs" / "trace.py"), "--config", str(bad), "--quiet"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert job.returncode == 2, job.stderr[-2000:]
    assert message in job.stderr and "Traceback" not in job.stderr
    assert_nothing_written(tmp_path)
