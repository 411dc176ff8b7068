"""An interrupted sweep resumes: jobs/tune.py is killed (SIGKILL, with its embedded Ray) right after a
trial committed its first task; the same command again finishes the sweep, and the interrupted
trial continues its own sequence from the registry instead of retraining it."""
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from mlflow.tracking import MlflowClient

from moram_platform.registry import Registry, manifest_key
from fixtures.paths import PROJECT_ROOT
from fixtures.tiny_lm import tiny_trace_job

pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.timeout(1200)]
TASKS = ["C-STANCE", "FOMC"]


def tune_command(space, name):
    return [sys.executable, str(PROJECT_ROOT / "jobs" / "tune.py"), str(space), "--name", name, "--quiet"]


def wait_for(condition, timeout: float, what: str, process=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the sweep exited ({process.returncode}) before {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_sweep_resumes_where_it_stopped(tmp_path, tiny_lm_dir, trace_root, mlflow_server):
    experiment = f"tune-resume-{uuid.uuid4().hex[:8]}"
    base = tmp_path / "tiny.yaml"
    base.write_text(yaml.safe_dump(tiny_trace_job(tmp_path / "runs", tiny_lm_dir, trace_root, TASKS,
                                                  mlflow_server.uri, experiment)))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "base_config": str(base),
        "params": {"tau": {"space": "grid", "values": [0.03, 0.1]}},
        "search": {"algorithm": "random", "num_samples": 1, "max_concurrent": 1},   # one trial at a time
        "scheduler": {"name": "fifo"},
    }))
    registry = Registry(tmp_path / "runs" / "registry")
    tune_state = tmp_path / "runs" / "tune" / "resume" / "train"

    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(tune_command(space, "resume"), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            wait_for(lambda: any(registry.versions(run) for run in registry.runs())
                     and any(tune_state.glob("experiment_state-*.json")), 600, "a committed task", first)
        finally:
            os.killpg(first.pid, signal.SIGKILL)     # the driver, its embedded Ray and every trial with it
            first.wait()
    interrupted, = registry.runs()
    assert registry.versions(interrupted) == [1]
    manifest = registry.storage.read(manifest_key(interrupted, 1))

    done = subprocess.run(tune_command(space, "resume"), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    assert len(registry.runs()) == 2 and interrupted in registry.runs()       # the same trial, not a new one
    assert all(registry.versions(run) == [1, 2] for run in registry.runs())
    assert registry.storage.read(manifest_key(interrupted, 1)) == manifest   # its task 1 was not trained again
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=100)
    kinds = sorted(r.data.tags.get("moram.kind") for r in runs)
    assert kinds.count("sweep") == 1 and kinds.count("trial") == 2 and kinds.count("sequence") == 2
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
