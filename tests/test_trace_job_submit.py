"""`ray start --head` on 127.0.0.1, then `ray job submit --working-dir . -- python jobs/trace.py`.

A module of its own: no Ray runtime of the test process may be alive next to the head it starts.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from moram_platform.registry import Registry
from fixtures.paths import PROJECT_ROOT
from test_trace_job import SHORT, SMOKE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ray_job_submit_to_a_running_cluster(tmp_path, s3_server, mlflow_server):
    """`ray start --head` on 127.0.0.1, then `ray job submit --working-dir . -- python jobs/trace.py`."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    dashboard = free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = Path("/tmp") / f"ray-e2e-{uuid.uuid4().hex[:6]}"   # socket paths must stay short
    start = [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
             "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    # --block keeps `ray start` in the foreground: stopping it stops this head only, never the
    # other Ray runtimes on the machine (which `ray stop` would kill too).
    head = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for_dashboard(dashboard, head)
        run_name = f"submit-{uuid.uuid4().hex[:6]}"
        submit = (
            [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dashboard}", f"--working-dir={PROJECT_ROOT}",
             "--", sys.executable, "jobs/trace.py", "--config", str(SMOKE.relative_to(PROJECT_ROOT)), "--run-name", run_name,
             "--quiet", *[f"--set={o}" for o in SHORT], "--set=data.tasks=[FOMC]", "--set=scaling.num_workers=1",
             "--set=data.max_train_examples=4", "--set=eval.baseline=false",
             f"--set=registry.uri=s3://moram-tests/{run_name}", f"--set=mlflow.tracking_uri={mlflow_server.uri}",
             f"--set=run.output_dir={tmp_path}"])
        for _ in range(36):  # the head's job agent registers a while after its dashboard answers (3 min max)
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=1200)
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(5)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout.lower() + job.stderr.lower()
        assert f"== {run_name} ==" in job.stdout
        assert Registry(f"s3://moram-tests/{run_name}").versions(run_name) == [1]
        client = MlflowClient(mlflow_server.uri)
        runs = client.search_runs([client.get_experiment_by_name("trace").experiment_id],
                                  filter_string=f"tags.`moram.run_id` = '{run_name}'")
        assert sorted(r.info.run_name for r in runs) == [run_name, "task-0-FOMC"]
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_dashboard(port: int, head: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited early"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError("the Ray dashboard did not come up")
