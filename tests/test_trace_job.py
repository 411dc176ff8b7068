"""jobs/trace.py end to end: the real SmolLM2-135M, real TRACE-500 data, Ray Train workers with
DeepSpeed on gloo, the registry on the SeaweedFS S3 server, MLflow on a real tracking server."""
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from moram import read_shard
from moram.metrics import average_performance, backward_transfer, reference_forgetting
from moram_platform.config import load_config
from moram_platform.registry import Registry
from moram_platform.sequence import run_sequence
from fixtures.paths import PROJECT_ROOT, TRACE_500

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
SMOKE = PROJECT_ROOT / "jobs" / "configs" / "trace" / "smollm2-135m_moram_cpu-smoke.yaml"
TASKS = ["C-STANCE", "FOMC"]     # two tasks: a frozen bank, a resume between them, ~2 min on 2 cores
SHORT = [  # small enough for 2 CPU cores, big enough to train every layer's atoms
    f"data.root={TRACE_500}", "data.max_train_examples=8", "data.max_eval_examples=2",
    "trace.max_prompt_tokens=96", "train.global_batch_size=4", "train.micro_batch_size=2",
    "eval.max_new_tokens=4", "eval.batch_size=2",
]


def job_config(tmp_path, mlflow_server, *overrides):
    run_name = f"e2e-{uuid.uuid4().hex[:8]}"
    return load_config(SMOKE, [*SHORT, f"run.name={run_name}", f"run.output_dir={tmp_path}",
                               f"registry.uri=s3://moram-tests/{run_name}", f"mlflow.tracking_uri={mlflow_server.uri}",
                               f"mlflow.experiment=trace-{run_name}", *overrides])


def test_sequence_on_ray_train_with_s3_registry_and_mlflow_then_resume(tmp_path, s3_server, mlflow_server, ray_cluster):
    config = job_config(tmp_path, mlflow_server, f"data.tasks={TASKS}", "scaling.num_workers=2")

    first = run_sequence(config, stop_after=1, progress=False)      # "stopped" after task 1's commit
    assert first.trained == TASKS[:1] and len(first.matrix) == 1
    resumed = run_sequence(config, progress=False)                  # the same run id continues at task 2
    assert resumed.trained == ["FOMC"]
    assert resumed.mlflow_run_id == first.mlflow_run_id

    # -- registry: 2 versions, one shard per task, atom counts as pruned ---------------------
    registry = Registry(config.registry_uri())
    assert registry.versions(first.run_id) == [1, 2]
    shards = registry.read_shards(first.run_id, 2)
    assert len(shards) == 2
    for version, data in zip(registry.lineage(first.run_id, 2), shards):
        shard = read_shard(data)
        assert version.task == shard.metadata["task"]
        added = shard.metadata["added"]
        assert set(added.values()) == {8} and len(added) == 30 * 4    # r atoms per q,k,v,o layer
        assert sum(shard.atom_counts.values()) == version.metrics["atoms_kept"] <= 30 * 4 * 8
        assert version.metrics["atoms_added"] == 30 * 4 * 8
    # frozen atoms unchanged: task 1's shard in version 2 is byte-identical to version 1's
    assert registry.read_shards(first.run_id, 1)[0] == shards[0]
    registry.verify(first.run_id, 2)

    # -- the matrix and the summary ----------------------------------------------------------
    matrix = resumed.matrix
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert all(0 <= v <= 100 for row in matrix for v in row)
    assert resumed.summary["OP"] == pytest.approx(average_performance(matrix))
    assert resumed.summary["BWT_signed"] == pytest.approx(backward_transfer(matrix))
    assert resumed.summary["reference_forgetting_magnitude"] == pytest.approx(reference_forgetting(matrix))

    # -- MLflow: a parent and exactly 2 children (no duplicates from the resume) -------------
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
    # learning/forgetting curves: a point per task at step = task index, none doubled by the resume
    for key in ("OP", "BWT_signed", "BWT_eq10", *(f"eval/{t}" for t in TASKS)):
        assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, key)) == [0, 1], key
    assert [m.value for m in client.get_metric_history(parent.info.run_id, "eval/FOMC")
            if m.step == 1] == [pytest.approx(matrix[1][1])]
    assert "BWT" not in parent.data.metrics
    note = parent.data.tags["mlflow.note.content"]               # the description: matrix and summary
    assert "| after \\ on | " + " | ".join(TASKS) + " |" in note and "Tasks done: 2 of 2" in note
    assert "| FOMC | " + " | ".join(f"{v:.2f}" for v in matrix[1]) + " |" in note
    assert f"| OP | {resumed.summary['OP']:.2f} |" in note
    assert parent.data.tags["mlflow.user"] and parent.data.tags["mlflow.source.name"]
    assert len(parent.data.tags["mlflow.source.git.commit"]) == 40
    params = parent.data.params                                   # what shapes the result, nothing else
    assert not any(k.startswith(("xtail.", "registry.", "mlflow.", "scaling.")) for k in params)
    assert (params["trace.max_prompt_tokens"], params["eval.max_new_tokens"]) == ("96", "4")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"accuracy_matrix.csv", "accuracy_matrix.png", "resolved_config.yaml"} <= artifacts
    for index, child in enumerate(children):
        assert child.data.metrics["task_score"] == pytest.approx(matrix[index][index])
        assert child.data.metrics["atoms_added"] == 30 * 4 * 8
        assert len(client.get_metric_history(child.info.run_id, "train_loss")) == 2   # 8 examples / batch 4
        assert {a.path for a in client.list_artifacts(child.info.run_id)} == {"activation_map.png", "shard"}
        assert child.data.params == params and child.data.tags["moram.method"] == "moram"
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


# long (make test-long): the lost-worker drill above keeps a Ray Train restart in CI's 30 minutes
@pytest.mark.long
def test_worker_lost_after_its_commit_does_not_retrain_the_task(tmp_path, s3_server, mlflow_server, ray_cluster,
                                                               monkeypatch):
    # The chief commits version 1, then dies before reporting; Ray Train restarts the group, which
    # finds the task committed and reports it instead of training it again (a second commit of
    # the retrained task would conflict with the first: other wall time, resumed_from_step).
    config = job_config(tmp_path, mlflow_server, "data.tasks=[FOMC]", "data.max_train_examples=8",
                        "scaling.num_workers=1", "eval.baseline=false")
    monkeypatch.setenv("MORAM_FAULT_AT_STEP", "commit")
    result = run_sequence(config, progress=False)
    version = Registry(config.registry_uri()).version(result.run_id, 1)
    assert result.versions == [1] and "resumed_from_step" not in version.metrics
