"""The job's driver (jobs/trace.py with its embedded Ray) killed with SIGKILL at the worst moments;
the same command again must finish the run with nothing lost and nothing done twice.

Real processes throughout: the tiny LLaMA with the SmolLM2 tokenizer on real TRACE-500 rows,
Ray Train workers, the registry on the SeaweedFS S3 server, MLflow on a real tracking server.
Every kill waits (bounded) for a state it can see in storage, never for a guessed time.
"""
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from moram import read_shard
from moram_platform.registry import Registry, manifest_key
from moram_platform.registry.lease import latest_lease
from fixtures.disk import fill, small_tmpfs
from fixtures.paths import PROJECT_ROOT
from fixtures.tiny_lm import tiny_trace_job

pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.timeout(2400)]
TASKS = ["C-STANCE", "FOMC"]
STEPS = 12   # 48 examples / batch 4, a checkpoint after every step: a wide window to kill in
setup_started = [time.time()]   # when this module's first job started (Ray sessions after it are ours)


def recorded(registry, run: str, name: str) -> dict[str, bytes]:
    """The bytes of every task record of one version's evaluation (<version>-<profile>/<task>.json)."""
    prefix = f"{run}/evaluations/{name}"
    return {task: registry.storage.read(f"{prefix}/{task}") for task in registry.storage.children(prefix)}


def write_config(folder: Path, tiny_lm_dir, trace_root, mlflow_server, name: str) -> Path:
    config = tiny_trace_job(folder, tiny_lm_dir, trace_root, TASKS, mlflow_server.uri, f"faults-{name}")
    config["data"]["max_train_examples"] = 4 * STEPS
    config["train"]["checkpoint_every_steps"] = 1
    config["eval"]["baseline"] = False
    config["registry"] = {"uri": f"s3://moram-tests/faults-{name}"}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def job(config: Path, run: str) -> list[str]:
    return [sys.executable, str(PROJECT_ROOT / "jobs" / "trace.py"), "--config", str(config), "--run-name", run,
            "--quiet"]


def start(command, log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "ab") as handle:   # its own session: the kill takes the embedded Ray with it
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def with_fault(spec: str) -> dict:
    """The environment of a job that injects a fault inside a commit (moram_platform.registry.faults)."""
    return {**os.environ, "MORAM_FAULT_IN_COMMIT": spec}


def killed_in_commit(command, log: Path, spec: str, timeout: float = 1200) -> None:
    """Run the job until the fault hook SIGKILLs it (driver and embedded Ray) at ``spec``."""
    process = start(command, log, with_fault(spec))
    try:
        returncode = process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert returncode == -signal.SIGKILL, f"{spec}: exit {returncode}, not the injected kill:\n" + \
        log.read_text()[-4000:]


def finish(command, log: Path, timeout: float = 1200) -> None:
    with open(log, "ab") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout)
    assert done.returncode == 0, log.read_text()[-4000:]


def kill_when(process: subprocess.Popen, condition, what: str, log: Path, timeout: float = 900) -> None:
    """SIGKILL the driver's whole process group as soon as ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    try:
        while not condition():
            if process.poll() is not None:
                raise AssertionError(f"the job exited ({process.returncode}) before {what}:\n"
                                     + log.read_text()[-4000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def atoms(registry: Registry, run: str, version: int) -> dict[str, torch.Tensor]:
    shard = read_shard(registry.read_shards(run, version)[-1])
    return {f"{layer}.{name}": tensor for layer in shard.layer_names for name, tensor in shard.layer(layer).items()}


def assert_same_atoms(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=1e-4, atol=1e-6, msg=name)


def finished_runs(run: str) -> list[tuple[str, str]]:
    """One parent and one child per task, all finished: what MLflow must hold, whatever happened."""
    return sorted((name, "FINISHED") for name in [run, "task-0-C-STANCE", "task-1-FOMC"])


def mlflow_runs(mlflow_server, experiment: str, run: str):
    client = MlflowClient(mlflow_server.uri)
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=100,
                               filter_string=f"tags.`moram.run_id` = '{run}'")
    return sorted((r.info.run_name, r.info.status) for r in found)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_lm_dir, trace_root, mlflow_server):
    folder = tmp_path_factory.mktemp("faults")
    setup_started[0] = time.time()
    name = uuid.uuid4().hex[:8]
    config = write_config(folder, tiny_lm_dir, trace_root, mlflow_server, name)
    registry = Registry(f"s3://moram-tests/faults-{name}")
    reference = "uninterrupted"
    finish(job(config, reference), folder / "reference.log")
    assert registry.versions(reference) == [1, 2]
    return folder, config, registry, f"faults-{name}", reference


def test_a_second_driver_is_refused_and_a_killed_driver_resumes_its_task_from_the_checkpoint(setup, mlflow_server):
    folder, config, registry, experiment, reference = setup
    run, log = "killed-in-training", folder / "killed-in-training.log"
    first = start(job(config, run), log)

    # -- a second driver of the same run, while the first holds it: refused at once -------------
    kill_deadline = time.monotonic() + 600
    while latest_lease(registry.storage, run) is None:
        assert first.poll() is None and time.monotonic() < kill_deadline, log.read_text()[-4000:]
        time.sleep(0.1)
    started = time.monotonic()
    second = subprocess.run(job(config, run), capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"error: run {run} is in use by another driver (held by pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    refused_in = time.monotonic() - started

    # -- the first is killed during task 2's training, after some of its checkpoints -------------
    snapshot = folder / "ray_train" / f"{run}-task-1" / "checkpoint_manager_snapshot.json"
    kill_when(first, snapshot.exists, "a checkpoint of task 2", log)
    assert registry.versions(run) == [1]                       # no partial version 2
    registry.verify(run, 1)
    manifest_1 = registry.storage.read(manifest_key(run, 1))
    records = registry.storage.children(f"{run}/evaluations")
    assert len(records) == 1                                  # version 1 was evaluated before task 2 began
    record_1 = recorded(registry, run, records[0])

    finish(job(config, run), log)                             # the same command again

    assert registry.versions(run) == [1, 2]
    registry.verify(run, 2)
    assert registry.storage.read(manifest_key(run, 1)) == manifest_1                    # task 1 not retrained
    assert recorded(registry, run, records[0]) == record_1          # nor re-evaluated
    version_2 = registry.version(run, 2)
    assert 1 <= version_2.metrics["resumed_from_step"] < STEPS     # task 2 went on from its checkpoint
    assert version_2.metrics["train_steps"] == STEPS
    assert_same_atoms(atoms(registry, run, 1), atoms(registry, reference, 1))
    assert_same_atoms(atoms(registry, run, 2), atoms(registry, reference, 2))
    assert mlflow_runs(mlflow_server, experiment, run) == finished_runs(run)
    assert latest_lease(registry.storage, run)[1].released
    print(f"second driver refused in {refused_in:.1f}s; task 2 resumed from step "
          f"{version_2.metrics['resumed_from_step']} of {STEPS}")


def test_a_driver_killed_during_evaluation_resumes_without_retraining(setup, mlflow_server):
    folder, config, registry, experiment, reference = setup
    run, log = "killed-in-evaluation", folder / "killed-in-evaluation.log"
    first = start(job(config, run), log)
    # version 1 committed, its evaluation not yet recorded: the driver is evaluating
    kill_when(first, lambda: registry.versions(run) == [1], "the commit of task 1", log)
    manifest_1 = registry.storage.read(manifest_key(run, 1))
    assert registry.storage.children(f"{run}/evaluations") == []       # killed while evaluating version 1

    finish(job(config, run), log)

    assert registry.versions(run) == [1, 2]
    assert registry.storage.read(manifest_key(run, 1)) == manifest_1
    assert "resumed_from_step" not in registry.version(run, 1).metrics
    assert len(registry.storage.children(f"{run}/evaluations")) == 2
    assert_same_atoms(atoms(registry, run, 2), atoms(registry, reference, 2))
    assert mlflow_runs(mlflow_server, experiment, run) == finished_runs(run)


def test_a_driver_killed_inside_a_commit_leaves_no_partial_version_and_the_rerun_completes(setup, mlflow_server):
    """Killed exactly between the shard write and the manifest create, then (on the rerun) exactly
    after the manifest create: neither kill leaves a partial or duplicate version, and the final
    rerun neither retrains, nor re-evaluates what was recorded, nor opens a second MLflow run."""
    folder, config, registry, experiment, reference = setup
    run, log = "killed-in-commit", folder / "killed-in-commit.log"

    # -- 1: version 2's shard is written and read back, its manifest not created ------------------
    killed_in_commit(job(config, run), log, "kill-before-manifest@2")
    assert registry.versions(run) == [1]                              # no partial version 2
    registry.verify(run, 1)
    assert len(registry.storage.children(f"{run}/shards")) == 2        # the kill landed after the shard write
    manifest_1 = registry.storage.read(manifest_key(run, 1))
    records = registry.storage.children(f"{run}/evaluations")
    assert len(records) == 1
    record_1 = recorded(registry, run, records[0])

    # -- 2: the rerun resumes task 2 from its checkpoint, creates the manifest and is killed -------
    killed_in_commit(job(config, run), log, "kill-after-manifest@2")
    assert registry.versions(run) == [1, 2]
    registry.verify(run, 2)
    manifest_2 = registry.storage.read(manifest_key(run, 2))
    assert registry.storage.children(f"{run}/evaluations") == records   # version 2 not evaluated yet

    # -- 3: the same command completes ------------------------------------------------------------
    finish(job(config, run), log)

    assert registry.versions(run) == [1, 2]                            # no duplicate version
    assert registry.storage.read(manifest_key(run, 1)) == manifest_1
    assert registry.storage.read(manifest_key(run, 2)) == manifest_2   # not committed again
    assert recorded(registry, run, records[0]) == record_1   # not recomputed
    assert len(registry.storage.children(f"{run}/evaluations")) == 2
    assert 1 <= registry.version(run, 2).metrics["resumed_from_step"] <= STEPS
    assert_same_atoms(atoms(registry, run, 1), atoms(registry, reference, 1))
    assert_same_atoms(atoms(registry, run, 2), atoms(registry, reference, 2))
    assert mlflow_runs(mlflow_server, experiment, run) == finished_runs(run)
    assert latest_lease(registry.storage, run)[1].released
    print(f"shards stored: {len(registry.storage.children(f'{run}/shards'))}; version 2 resumed from step "
          f"{registry.version(run, 2).metrics['resumed_from_step']} of {STEPS}")


def test_the_s3_server_dies_during_a_manifest_create_and_a_rerun_completes(setup, restartable_s3, mlflow_server):
    """The commit of version 2 pauses after its shard write (fault hook); the server is SIGKILLed
    there, so the manifest create meets a dead server."""
    folder, config, registry, experiment, reference = setup
    run, log = "s3-outage-in-manifest", folder / "s3-outage-in-manifest.log"
    marker = folder / "before-manifest-2"
    first = start(job(config, run), log, with_fault(f"pause-before-manifest@2={marker}"))
    deadline = time.monotonic() + 900
    while not marker.exists():
        assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.1)
    restartable_s3.stop()                          # SIGKILL, like a crashed storage node
    marker.write_text("go")                        # the commit goes on: the manifest create
    try:
        returncode = first.wait(timeout=1200)
    finally:
        restartable_s3.start()
    output = log.read_text()
    run_log = (folder / "logs" / f"{run}.log").read_text()
    assert returncode == 1, output[-4000:]
    assert f"error: s3://moram-tests/{experiment}/{run}/" in output or f"error: run {run}: commit" in output, \
        output[-4000:]
    assert "nothing partial was committed" in output and "rerun the same command to resume" in output
    assert "Traceback" not in output.split("error: ", 1)[1]
    assert f"s3://moram-tests/{experiment}/{run}/versions/00000002.json: create failed" in output + run_log
    assert registry.versions(run) == [1]           # no partial version 2
    registry.verify(run, 1)

    finish(job(config, run), log)

    assert registry.versions(run) == [1, 2]
    registry.verify(run, 2)
    assert_same_atoms(atoms(registry, run, 2), atoms(registry, reference, 2))
    assert mlflow_runs(mlflow_server, experiment, run) == finished_runs(run)


def test_the_s3_server_dies_mid_job_and_a_rerun_once_it_is_back_completes(setup, restartable_s3, mlflow_server):
    folder, config, registry, experiment, reference = setup
    run, log = "s3-outage", folder / "s3-outage.log"
    first = start(job(config, run), log)
    snapshot = folder / "ray_train" / f"{run}-task-1" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 900
    while not snapshot.exists():                   # task 2 is training: its commit will meet a dead server
        assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.1)
    restartable_s3.stop()                          # SIGKILL, like a crashed storage node
    try:
        returncode = first.wait(timeout=1200)
    finally:
        restartable_s3.start()
    output = log.read_text()
    assert returncode == 1, output[-4000:]
    assert f"error: s3://moram-tests/{experiment}/{run}/" in output, output[-4000:]
    assert "nothing partial was committed" in output and "rerun the same command to resume" in output
    assert registry.versions(run) == [1]           # no partial version 2
    registry.verify(run, 1)

    finish(job(config, run), log)

    assert registry.versions(run) == [1, 2]
    registry.verify(run, 2)
    assert_same_atoms(atoms(registry, run, 2), atoms(registry, reference, 2))
    assert mlflow_runs(mlflow_server, experiment, run) == finished_runs(run)


def test_a_full_run_folder_stops_the_job_cleanly_and_a_rerun_after_freeing_space_completes(setup, mlflow_server,
                                                                                          tmp_path):
    """run.output_dir (Ray Train checkpoints, the job's log) on a real 64 MB tmpfs, filled up
    once version 1 is committed: task 2 cannot checkpoint. The registry is on S3."""
    folder, config, registry, experiment, reference = setup
    with small_tmpfs(tmp_path / "disk", "64m") as disk:
        raw = yaml.safe_load(config.read_text())
        raw["run"]["output_dir"] = str(disk / "run")
        small = tmp_path / "full-disk.yaml"
        small.write_text(yaml.safe_dump(raw))
        run, log = "disk-full", tmp_path / "disk-full.log"   # the test's own log is not on the small disk
        first = start(job(small, run), log)
        deadline = time.monotonic() + 900
        while registry.versions(run) != [1]:
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)
        fill(disk)
        returncode = first.wait(timeout=1200)
        output = log.read_text()
        assert returncode == 1, output[-4000:]
        assert "No space left on device" in output and "free space" in output, output[-4000:]
        assert "Traceback" not in output, output[-4000:]
        assert registry.versions(run) == [1]                         # no partial version 2
        registry.verify(run, 1)

        (disk / "filler").unlink()
        finish(job(small, run), log)

        assert registry.versions(run) == [1, 2]
        registry.verify(run, 2)
        assert_same_atoms(atoms(registry, run, 2), atoms(registry, reference, 2))
        assert mlflow_runs(mlflow_server, experiment, run) == finished_runs(run)


def test_mlflow_down_from_the_start_stops_the_job_before_any_work(setup, tmp_path):
    """Never reachable: the job stops at its first MLflow call, before any training, with one
    line; nothing is committed and the run is free for the rerun."""
    import socket

    folder, config, registry, experiment, reference = setup
    with socket.socket() as probe:         # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run, log = "mlflow-never-up", tmp_path / "mlflow-never-up.log"
    impatient = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    with open(log, "ab") as handle:
        done = subprocess.run([*job(config, run), "--set", f"mlflow.tracking_uri=http://127.0.0.1:{port}"],
                              stdout=handle, stderr=subprocess.STDOUT, env=impatient, timeout=600)
    output = log.read_text()
    assert done.returncode == 1, output[-4000:]
    assert f"error: MLflow at http://127.0.0.1:{port} failed" in output and "rerun the same command" in output
    assert registry.versions(run) == []                              # stopped before any training
    assert not (folder / "ray_train" / f"{run}-task-0").exists()
    assert latest_lease(registry.storage, run)[1].released           # the rerun may start at once


def test_no_credential_in_anything_the_runs_wrote(setup, s3_server, mlflow_server, tmp_path):
    """After the jobs above (credentials in the environment, registry and MLflow artifacts on
    S3): no S3 key, no MLflow password and no Ray token appears in the run folder (job
    stdout/stderr, run logs, Ray Train checkpoints), the registry objects, MLflow
    params/tags/metrics/artifacts or Ray's logs."""
    from fixtures.auth import session_ray_token

    folder, config, registry, experiment, reference = setup
    secrets = {"access key": s3_server.access_key.encode(), "secret key": s3_server.secret_key.encode(),
               "MLflow password": os.environ["MLFLOW_TRACKING_PASSWORD"].encode(),
               "Ray token": session_ray_token().encode()}
    scanned = {"files": 0, "objects": 0, "runs": 0}

    def scan(where: str, data: bytes) -> None:
        for what, secret in secrets.items():
            assert secret not in data, f"the {what} leaked into {where}"

    def scan_tree(root: Path) -> None:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                scan(str(path), path.read_bytes())
                scanned["files"] += 1

    scan_tree(folder)                                             # job output, run logs, Ray Train storage
    for session in Path("/tmp/ray").glob("session_2*"):        # the embedded Ray runtimes of these jobs
        if session.stat().st_mtime >= setup_started[0] and (session / "logs").is_dir():
            scan_tree(session / "logs")
    pages = registry.storage.client.get_paginator("list_objects_v2").paginate(
        Bucket="moram-tests", Prefix=f"{experiment}/")
    for page in pages:
        for item in page.get("Contents", []):
            scan(item["Key"], registry.storage.client.get_object(Bucket="moram-tests", Key=item["Key"])["Body"].read())
            scanned["objects"] += 1
    client = MlflowClient(mlflow_server.uri)
    for run in client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=100):
        scan(f"MLflow run {run.info.run_name}", repr((run.data.params, run.data.tags, run.data.metrics)).encode())
        downloaded = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id)))
        scan_tree(downloaded)
        scanned["runs"] += 1
    assert scanned["objects"] > 0 and scanned["runs"] >= 3 and scanned["files"] > 0
    print(f"no credential in {scanned}")


def test_mlflow_dies_mid_run_the_job_stops_cleanly_and_the_rerun_fills_in(tmp_path, s3_server, tiny_lm_dir,
                                                                          trace_root):
    """The choice: MLflow down stops the job (a run tracked with holes would look complete); the
    registry keeps what was committed, and the rerun logs what MLflow missed, in the same runs."""
    from moram_platform.stack.mlflow_server import MlflowServer

    bucket = s3_server.create_bucket("mlflow-faults")
    server = MlflowServer(tmp_path / "mlflow", artifacts=f"s3://{bucket}/artifacts")
    environment = {**s3_server.env(), "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url}
    server.start(env=environment)
    try:
        name = uuid.uuid4().hex[:8]
        config = write_config(tmp_path, tiny_lm_dir, trace_root, server, name)
        registry = Registry(f"s3://moram-tests/faults-{name}")
        run, log = "mlflow-outage", tmp_path / "mlflow-outage.log"
        impatient = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
        with open(log, "ab") as handle:
            first = subprocess.Popen(job(config, run), stdout=handle, stderr=subprocess.STDOUT, env=impatient,
                                     start_new_session=True)
        deadline = time.monotonic() + 900
        while registry.versions(run) != [1]:     # task 1 committed; its MLflow logging comes after evaluation
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)
        server.stop()
        returncode = first.wait(timeout=900)
        output = log.read_text()
        assert returncode == 1, output[-4000:]
        assert f"error: MLflow at {server.uri} failed" in output and "fills in what MLflow missed" in output
        assert registry.versions(run) == [1]
        manifest_1 = registry.storage.read(manifest_key(run, 1))

        server.start(env=environment)           # same port, same database
        with open(log, "ab") as handle:
            done = subprocess.run(job(config, run), stdout=handle, stderr=subprocess.STDOUT, timeout=1200)
        assert done.returncode == 0, log.read_text()[-4000:]
        assert registry.versions(run) == [1, 2]
        assert registry.storage.read(manifest_key(run, 1)) == manifest_1               # task 1 not retrained
        assert mlflow_runs(server, f"faults-{name}", run) == finished_runs(run)         # the same runs, no duplicates
        client = MlflowClient(server.uri)
        for found in client.search_runs([client.get_experiment_by_name(f"faults-{name}").experiment_id]):
            if found.info.run_name == "task-0-C-STANCE":                                # what MLflow missed
                assert "task_score" in found.data.metrics and "eval/FOMC" in found.data.metrics
                assert {a.path for a in client.list_artifacts(found.info.run_id)} == {"activation_map.png", "shard"}
            if found.info.run_name == run:
                assert "OP" in found.data.metrics
                assert {"accuracy_matrix.csv", "resolved_config.yaml"} <= {
                    a.path for a in client.list_artifacts(found.info.run_id)}
    finally:
        server.stop()
