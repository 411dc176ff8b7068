"""A real sweep on 2 CPU cores: Ray Tune over Ray Train, a tiny random LLaMA with the real SmolLM2
tokenizer, two short TRACE tasks, the MLflow tracking server.

The sweep runs once per module: the training stage alone (2 trials at once, Optuna, ASHA),
then the same sweep again, which restores the finished training stage and adds the δ stage.
"""
import hashlib
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from moram_platform.config import load_config
from moram_platform.registry import Registry
from moram_platform.sequence import run_sequence
from moram_platform.tune import load_space, run_sweep
from fixtures.tiny_lm import tiny_trace_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
TASKS = ["C-STANCE", "Py150"]    # Py150 (edit similarity) gives even a random model a score that varies
DELTAS = [0.0, 0.3]
TRIALS = 2       # both at once: each trial is a whole Ray Train sequence (~25 s a task on 2 cores)


def tiny_space(base_config: Path) -> dict:
    return {
        "base_config": str(base_config),
        "trial_overrides": {"data.max_train_examples": 4},     # trials are shorter than the base
        "params": {"tau": {"space": "loguniform", "low": 0.01, "high": 0.5},
                   "k": {"space": "choice", "values": [2, 4]},
                   "delta": {"space": "grid", "values": DELTAS}},
        "search": {"algorithm": "optuna", "num_samples": TRIALS, "max_concurrent": 2, "seed": 0},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "objective": {"metric": "op", "mode": "max", "forgetting_weight": 0.5},
        "delta_stage": {"top_trials": 1},
        "resources": {"trial_cpu": 0.1},
    }


def registry_files(root: Path) -> dict[str, str]:
    """Every object of a local registry and its sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_lm_dir, trace_root, mlflow_server):
    folder = tmp_path_factory.mktemp("sweep")
    experiment = f"tune-{uuid.uuid4().hex[:8]}"
    base = folder / "tiny-llama_moram.yaml"
    base.write_text(yaml.safe_dump(tiny_trace_job(folder / "runs", tiny_lm_dir, trace_root, TASKS, mlflow_server.uri,
                                                  experiment)))
    space_file = folder / "space.yaml"
    space_file.write_text(yaml.safe_dump(tiny_space(base)))
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False)    # 2 x (0.1 trial + 0.9 worker): exactly 2 concurrent trials
    try:
        space = load_space(space_file)
        trained = run_sweep(space, "sweep-test", train_only=True, verbose=False)
        registry_root = folder / "runs" / "registry"
        before = registry_files(registry_root)
        versions_before = {run: Registry(registry_root).versions(run) for run in Registry(registry_root).runs()}
        full = run_sweep(space, "sweep-test", best_config_out=folder / "best.yaml", verbose=False)
        yield SimpleNamespace(
            folder=folder, trained=trained, full=full, experiment=experiment, registry_root=registry_root,
            files_before=before, files_after=registry_files(registry_root), versions_before=versions_before,
            versions_after={run: Registry(registry_root).versions(run) for run in Registry(registry_root).runs()},
            client=MlflowClient(mlflow_server.uri))
    finally:
        ray.shutdown()


def test_two_trials_at_once_then_delta_trials(sweep):
    trials = sweep.full.trials
    assert len(trials) == TRIALS
    assert {t.status for t in trials} <= {"finished", "stopped"}             # ASHA may stop some after task 1
    finished = [t for t in trials if t.status == "finished"]
    assert finished and all(t.tasks_done == len(TASKS) for t in finished)
    for t in trials:
        assert 0.01 <= t.params["tau"] <= 0.5 and t.params["k"] in (2, 4)
        assert t.run_id == f"sweep-test-{t.trial_id}"
    # the δ stage: every δ of the grid on the best finished trial's final version
    source = sweep.full.delta_trials[0].source_trial
    assert sorted(t.params["delta"] for t in sweep.full.delta_trials) == DELTAS
    assert all(t.source_trial == source and t.status == "finished" for t in sweep.full.delta_trials)
    assert source == min(finished, key=lambda t: (-t.objective, t.trial_id)).trial_id
    best = max(t.objective for t in finished + sweep.full.delta_trials)
    assert sweep.full.best.objective == best
    # the resumed call found the finished training stage and reran nothing of it
    assert sweep.full.resumed and not sweep.trained.resumed and sweep.trained.delta_trials == []
    assert sorted((t.trial_id, t.objective) for t in sweep.trained.trials) == \
        sorted((t.trial_id, t.objective) for t in trials)


def test_the_delta_stage_adds_no_atom_and_writes_nothing_to_the_registry(sweep):
    assert sweep.versions_after == sweep.versions_before
    assert sweep.files_after == sweep.files_before          # no shard, no manifest, no evaluation record
    finished = {t.run_id for t in sweep.full.trials if t.status == "finished"}
    assert finished and all(sweep.versions_after[run] == [1, 2] for run in finished)


def test_trials_are_mlflow_children_of_the_sweep_and_parents_of_their_sequences(sweep):
    client = sweep.client
    experiment = client.get_experiment_by_name(sweep.experiment).experiment_id
    runs = client.search_runs([experiment], max_results=1000)
    sweeps = [r for r in runs if r.data.tags.get("moram.kind") == "sweep"]
    assert len(sweeps) == 1 and sweeps[0].info.run_id == sweep.full.mlflow_run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweeps[0].info.run_id]
    stages = sorted(r.data.tags["moram.stage"] for r in children)
    assert stages == ["delta"] * len(DELTAS) + ["train"] * TRIALS                 # resuming made no duplicates
    for trial in (r for r in children if r.data.tags["moram.stage"] == "train"):
        assert {"tau", "k"} <= set(trial.data.params) and "objective" in trial.data.metrics
        sequence = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == trial.info.run_id]
        assert [r.data.tags["moram.kind"] for r in sequence] == ["sequence"]
        assert sequence[0].info.run_name == trial.data.tags["moram.sequence"]
    for trial in (r for r in children if r.data.tags["moram.stage"] == "delta"):
        assert float(trial.data.params["delta"]) in DELTAS and "objective" in trial.data.metrics
    status = {t.trial_id: t.status for t in sweep.full.trials}
    for trial in (r for r in children if r.data.tags["moram.stage"] == "train"):
        expected = "KILLED" if status[trial.data.tags["moram.trial_id"]] == "stopped" else "FINISHED"
        assert trial.info.status == expected
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    artifacts = {a.path for a in client.list_artifacts(sweep.full.mlflow_run_id)}
    assert {"best_config.yaml", "objective.png", "trials.csv"} <= artifacts


def test_the_best_config_is_a_job_config_that_runs(sweep):
    best = sweep.full.best_config_path
    assert best == sweep.folder / "best.yaml"
    config = load_config(best, [f"run.name=best-{uuid.uuid4().hex[:8]}"])
    values = sweep.full.best_params
    assert (config.moram["tau"], config.moram["k"], config.moram["delta"]) == (values["tau"], values["k"],
                                                                               values["delta"])
    assert config.data.max_train_examples == 8                     # the base config's, not the trials' 4
    result = run_sequence(config, stop_after=1, progress=False)   # one short task with the best values
    assert result.trained == [TASKS[0]]
    assert Registry(config.registry_uri()).versions(config.run.name) == [1]
