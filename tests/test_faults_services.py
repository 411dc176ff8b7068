"""Services lost under a running job, and an X-TAIL driver killed mid-domain: the job stops
cleanly (or is killed), the same command again finishes the run with nothing lost and nothing
done twice.

Real processes throughout: jobs/trace.py and jobs/xtail.py as subprocesses with their embedded
Ray, the SeaweedFS S3 server stopped under a job, a real tmpfs that fills under MLflow's SQLite
store. Every fault waits (bounded) for a state it can see in storage, never for a guessed time.
"""
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from moram_platform.registry import Registry, manifest_key
from fixtures.paths import PROJECT_ROOT
from fixtures.tiny_lm import tiny_trace_job
from fixtures.disk import fill, small_tmpfs

pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.timeout(2400)]
TASKS = ["C-STANCE", "FOMC"]
XTAIL_SMOKE = PROJECT_ROOT / "jobs" / "configs" / "xtail" / "tiny-vit_moram_cpu-smoke.yaml"


def trace_config(folder: Path, tiny_lm_dir, trace_root, tracking_uri: str, registry_uri: str, **eval_keys) -> Path:
    config = tiny_trace_job(folder / "runs", tiny_lm_dir, trace_root, TASKS, tracking_uri, f"faults-{folder.name}")
    config["eval"].update(eval_keys)
    config["registry"] = {"uri": registry_uri}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def job(script: str, config: Path, run: str, *overrides: str) -> list[str]:
    return [sys.executable, str(PROJECT_ROOT / "jobs" / script), "--config", str(config), "--run-name", run,
            "--quiet", *[f"--set={o}" for o in overrides]]


def start(command, log: Path, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "ab") as handle:   # its own session: a kill takes the embedded Ray with it
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=cwd, env=env)


def finish(command, log: Path, cwd: Path, timeout: float = 1200) -> None:
    with open(log, "ab") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd, timeout=timeout)
    assert done.returncode == 0, log.read_text()[-4000:]


def wait_for(process: subprocess.Popen, condition, what: str, log: Path, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the job exited ({process.returncode}) before {what}:\n" + log.read_text()[-4000:])
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def exit_of(process: subprocess.Popen, timeout: float = 900) -> int:
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def tracked_runs(tracking_uri: str, experiment: str, run: str) -> list[tuple[str, str]]:
    client = MlflowClient(tracking_uri)
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=100,
                               filter_string=f"tags.`moram.run_id` = '{run}'")
    return sorted((r.info.run_name, r.info.status) for r in found)


def evaluation_records(registry: Registry, run: str) -> dict[str, bytes]:
    """Every task's evaluation record of the run: {key: bytes} (create-only, the first wins)."""
    records = {}
    for version in registry.storage.children(f"{run}/evaluations"):
        prefix = f"{run}/evaluations/{version}"
        for task in registry.storage.children(prefix):
            records[f"{prefix}/{task}"] = registry.storage.read(f"{prefix}/{task}")
    return records


# -- the S3 server lost during an evaluation ------------------------------------------------------
def test_s3_lost_during_an_evaluation_keeps_the_recorded_scores_and_the_rerun_finishes(
        restartable_s3, mlflow_server, tiny_lm_dir, trace_root, tmp_path):
    """The registry (and MLflow's artifacts) on the SeaweedFS server, which is SIGKILLed as soon
    as a score of version 1 is seen recorded (the tiny model scores fast: by then version 1's
    second score may be recorded too; the run prints how many were). The job stops with the storage message; once the
    server is back the same command finishes: task 1 is not retrained, the scores recorded before
    the loss are the ones kept (create-only records, byte for byte), no MLflow run is doubled."""
    name = uuid.uuid4().hex[:8]
    registry_uri = f"s3://moram-tests/faults-s3-{name}"
    config = trace_config(tmp_path, tiny_lm_dir, trace_root, mlflow_server.uri, registry_uri,
                          baseline=False, schedule="full")
    registry, run, log = Registry(registry_uri), "s3-lost", tmp_path / "s3-lost.log"
    impatient = {**os.environ, "AWS_MAX_ATTEMPTS": "2", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    first = start(job("trace.py", config, run), log, tmp_path, impatient)

    def a_score_of_version_1() -> bool:
        return any("/00000001-" in key for key in evaluation_records(registry, run))

    wait_for(first, a_score_of_version_1, "the first score of version 1", log)
    restartable_s3.stop()                                         # lost mid-evaluation
    returncode = exit_of(first)
    output = log.read_text()
    restartable_s3.start()
    assert returncode == 1, output[-4000:]
    assert "nothing partial was committed" in output and "rerun the same command" in output, output[-4000:]
    assert registry.versions(run) == [1]                            # no version 2, nothing partial
    kept = evaluation_records(registry, run)
    manifest_1 = registry.storage.read(manifest_key(run, 1))

    finish(job("trace.py", config, run), log, tmp_path)

    assert registry.versions(run) == [1, 2]
    registry.verify(run, 2)
    assert registry.storage.read(manifest_key(run, 1)) == manifest_1            # task 1 not retrained
    after = evaluation_records(registry, run)
    assert {key: after[key] for key in kept} == kept                             # the recorded scores kept
    assert len(after) == 2 * len(TASKS) > len(kept) > 0                          # and the rest filled in
    assert tracked_runs(mlflow_server.uri, f"faults-{tmp_path.name}", run) == sorted(
        (n, "FINISHED") for n in [run, "task-0-C-STANCE", "task-1-FOMC"])
    print(f"S3 lost with {len(kept)} of {len(after)} scores recorded; all kept")


# -- a full disk under the local SQLite MLflow store ----------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path / "disk", "64m") as mount:
        yield mount


def test_a_full_disk_under_the_sqlite_mlflow_store_stops_the_job_and_the_rerun_fills_in(
        small_disk, tiny_lm_dir, trace_root, tmp_path):
    """MLflow's SQLite file on a 64 MB tmpfs that fills up once task 1 is committed (the local
    registry is elsewhere): the job stops with the MLflow message, exit 1; with space freed the
    same command finishes, task 1 not retrained, the MLflow runs complete and not doubled."""
    tracking_uri = f"sqlite:///{small_disk / 'mlflow.db'}"
    registry_uri = str(tmp_path / "registry")
    config = trace_config(tmp_path, tiny_lm_dir, trace_root, tracking_uri, registry_uri, baseline=False)
    registry, run, log = Registry(registry_uri), "mlflow-disk-full", tmp_path / "mlflow-disk-full.log"
    first = start(job("trace.py", config, run), log, tmp_path)
    wait_for(first, lambda: registry.versions(run) == [1], "the commit of task 1", log)
    filler = fill(small_disk)
    returncode = exit_of(first)
    output = log.read_text()
    assert returncode == 1, output[-4000:]
    assert f"error: MLflow at {tracking_uri} failed" in output and "fills in what MLflow missed" in output, \
        output[-4000:]
    assert registry.versions(run) == [1]
    manifest_1 = registry.storage.read(manifest_key(run, 1))

    filler.unlink()
    finish(job("trace.py", config, run), log, tmp_path)

    assert registry.versions(run) == [1, 2]
    assert registry.storage.read(manifest_key(run, 1)) == manifest_1
    assert tracked_runs(tracking_uri, f"faults-{tmp_path.name}", run) == sorted(
        (n, "FINISHED") for n in [run, "task-0-C-STANCE", "task-1-FOMC"])


# -- an X-TAIL driver killed mid-domain ------------------------------------------------------------
def test_an_xtail_driver_killed_mid_domain_resumes_from_its_checkpoint(
        xtail_image_domains, mlflow_server, s3_server, tmp_path):
    """jobs/xtail.py (tiny ViT, Ray Train with DeepSpeed) SIGKILLed with its embedded Ray during
    the first domain's training, after some of its checkpoints: the same command again goes on
    from the checkpoint, and ends with the atoms of an uninterrupted run (nothing lost, nothing
    trained twice), every domain scored once, each MLflow run once."""
    import torch

    from moram import read_shard

    root = xtail_image_domains["MNIST"].parent
    steps = 24
    common = [f"data.root={root}", "data.tasks=[MNIST, Fashion-MNIST]", f"train.max_steps={steps}",
              "train.checkpoint_every_steps=1", "scaling.num_workers=1", "data.max_eval_examples=100",
              "eval.baseline=false", f"mlflow.tracking_uri={mlflow_server.uri}",
              f"mlflow.experiment=faults-xtail-{tmp_path.name}", f"xtail.split_dir={tmp_path / 'splits'}",
              f"run.output_dir={tmp_path / 'runs'}", f"registry.uri=s3://moram-tests/faults-xtail-{tmp_path.name}"]
    registry = Registry(f"s3://moram-tests/faults-xtail-{tmp_path.name}")
    log = tmp_path / "xtail.log"
    finish(job("xtail.py", XTAIL_SMOKE, "uninterrupted", *common), log, tmp_path)

    run = "killed-mid-domain"
    first = start(job("xtail.py", XTAIL_SMOKE, run, *common), log, tmp_path)
    snapshot = tmp_path / "runs" / "ray_train" / f"{run}-task-0" / "checkpoint_manager_snapshot.json"
    wait_for(first, snapshot.exists, "a checkpoint of the first domain", log)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert registry.versions(run) == []                          # killed mid-domain: nothing committed

    finish(job("xtail.py", XTAIL_SMOKE, run, *common), log, tmp_path)

    assert registry.versions(run) == [1, 2]
    registry.verify(run, 2)
    version_1 = registry.version(run, 1)
    assert 1 <= version_1.metrics["resumed_from_step"] < steps and version_1.metrics["train_steps"] == steps
    for version in (1, 2):
        mine, theirs = (read_shard(registry.read_shards(r, version)[-1]) for r in (run, "uninterrupted"))
        assert mine.layer_names == theirs.layer_names
        for layer in mine.layer_names:
            for field, tensor in mine.layer(layer).items():
                torch.testing.assert_close(tensor, theirs.layer(layer)[field], rtol=1e-4, atol=1e-6,
                                           msg=f"v{version} {layer}.{field}")
    assert len(evaluation_records(registry, run)) == 2 * 2       # each domain scored after each version, once
    assert tracked_runs(mlflow_server.uri, f"faults-xtail-{tmp_path.name}", run) == sorted(
        (n, "FINISHED") for n in [run, "task-0-MNIST", "task-1-Fashion-MNIST"])
    print(f"X-TAIL domain 1 resumed from step {version_1.metrics['resumed_from_step']} of {steps}")
