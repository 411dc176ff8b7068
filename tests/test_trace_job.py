"""jobs/trace.py end to end: the real SmolLM2-135M, real TRACE-500 data, Ray Train workers with
DeepSpeed on gloo, the registry on the SeaweedFS S3 server, MLflow on a real tracking server."""
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
import torch
from mlflow.tracking import MlflowClient

from moram import read_shard
from moram.metrics import average_performance, backward_transfer, reference_forgetting
from moram_platform.config import load_config
from moram_platform.registry import Registry
from moram_platform.sequence import run_sequence
from fixtures.paths import PROJECT_ROOT, TRACE_500

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
SMOKE = PROJECT_ROOT / "jobs" / "configs" / "trace" / "smollm2-135m_moram_cpu-smoke.yaml"
TASKS = ["C-STANCE", "FOMC", "ScienceQA"]
SHORT = [  # small enough for 2 CPU cores, big enough to train every layer's atoms
    f"data.root={TRACE_500}", "data.max_train_examples=8", "data.max_eval_examples=2",
    "data.max_prompt_tokens=96", "train.global_batch_size=4", "train.micro_batch_size=2",
    "eval.max_new_tokens=4", "eval.batch_size=2",
]


def job_config(tmp_path, mlflow_server, *overrides):
    run_name = f"e2e-{uuid.uuid4().hex[:8]}"
    return load_config(SMOKE, [*SHORT, f"run.name={run_name}", f"run.output_dir={tmp_path}",
                               f"registry.uri=s3://moram-tests/{run_name}", f"mlflow.tracking_uri={mlflow_server.uri}",
                               f"mlflow.experiment=trace-{run_name}", *overrides])


def test_sequence_on_ray_train_with_s3_registry_and_mlflow_then_resume(tmp_path, s3_server, mlflow_server, ray_cluster):
    config = job_config(tmp_path, mlflow_server, f"data.tasks={TASKS}", "scaling.num_workers=2")

    first = run_sequence(config, stop_after=2, progress=False)      # "stopped" after task 2's commit
    assert first.trained == TASKS[:2] and len(first.matrix) == 2
    resumed = run_sequence(config, progress=False)                  # the same run id continues at task 3
    assert resumed.trained == ["ScienceQA"]
    assert resumed.mlflow_run_id == first.mlflow_run_id

    # -- registry: 3 versions, one shard per task, atom counts as pruned ---------------------
    registry = Registry(config.registry_uri())
    assert registry.versions(first.run_id) == [1, 2, 3]
    shards = registry.read_shards(first.run_id, 3)
    assert len(shards) == 3
    for version, data in zip(registry.lineage(first.run_id, 3), shards):
        shard = read_shard(data)
        assert version.task == shard.metadata["task"]
        added = shard.metadata["added"]
        assert set(added.values()) == {8} and len(added) == 30 * 4    # r atoms per q,k,v,o layer
        assert sum(shard.atom_counts.values()) == version.metrics["atoms_kept"] <= 30 * 4 * 8
        assert version.metrics["atoms_added"] == 30 * 4 * 8
    # frozen atoms unchanged: task 1's shard in version 3 is byte-identical to version 1's
    assert registry.read_shards(first.run_id, 1)[0] == shards[0]
    registry.verify(first.run_id, 3)

    # -- the matrix and the summary ----------------------------------------------------------
    matrix = resumed.matrix
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
    assert all(0 <= v <= 100 for row in matrix for v in row)
    assert resumed.summary["OP"] == pytest.approx(average_performance(matrix))
    assert resumed.summary["BWT_signed"] == pytest.approx(backward_transfer(matrix))
    assert resumed.summary["reference_forgetting_magnitude"] == pytest.approx(reference_forgetting(matrix))

    # -- MLflow: a parent and exactly 3 children (no duplicates from the resume) -------------
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name(config.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.info.run_id == first.mlflow_run_id][0]
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in children] == [f"task-{i}-{t}" for i, t in enumerate(TASKS)]
    assert parent.info.status == "FINISHED" and parent.info.run_name == first.run_id
    assert parent.data.params["moram.tau"] == "0.03" and parent.data.tags["moram.method"] == "moram"
    assert parent.data.metrics["OP"] == pytest.approx(resumed.summary["OP"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"accuracy_matrix.csv", "accuracy_matrix.png", "resolved_config.yaml"} <= artifacts
    for index, child in enumerate(children):
        assert child.data.metrics["task_score"] == pytest.approx(matrix[index][index])
        assert child.data.metrics["atoms_added"] == 30 * 4 * 8
        assert len(client.get_metric_history(child.info.run_id, "train_loss")) == 2   # 8 examples / batch 4
        assert {a.path for a in client.list_artifacts(child.info.run_id)} == {"plots", "shard"}
    csv = client.download_artifacts(parent.info.run_id, "accuracy_matrix.csv", str(tmp_path))
    assert Path(csv).read_text().splitlines()[0] == "after_task," + ",".join(TASKS)


def test_lost_worker_resumes_from_its_last_checkpoint(tmp_path, s3_server, mlflow_server, ray_cluster, monkeypatch):
    # 12 examples, batch 4: 3 steps; a checkpoint after every step; the worker dies at step 2,
    # before that step's checkpoint, so Ray Train restarts it from the checkpoint of step 1.
    config = job_config(tmp_path, mlflow_server, "data.tasks=[FOMC]", "data.max_train_examples=12",
                        "scaling.num_workers=1", "train.checkpoint_every_steps=1", "eval.baseline=false")
    monkeypatch.setenv("MORAM_FAULT_AT_STEP", "2")
    result = run_sequence(config, progress=False)
    version = Registry(config.registry_uri()).version(result.run_id, 1)
    assert version.metrics["resumed_from_step"] == 1
    assert version.metrics["train_steps"] == 3


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
