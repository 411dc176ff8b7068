"""eval.schedule, per-task evaluation records and the long-lived evaluator actor.

Golden cells and metrics are hand-computed; the swapped-in model is checked against a freshly
built one bit for bit, and the actor path against the one-shot Ray task path on the same run.
"""
import json
import os
import signal
import time
import uuid

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from moram.metrics import summarize
from moram_platform.config import ConfigError, config_from_dict
from moram_platform.evaluation import VersionEvaluator, evaluator_actor
from moram_platform.registry import Registry
from moram_platform.registry.evaluations import (evaluation_key, read_evaluation, record_evaluation,
                                                 record_task_evaluation)
from moram_platform.schedule import baseline_wanted, cheapest_for, check_gives, tasks_after
from moram_platform.sequence import run_sequence
from fixtures.tiny_lm import tiny_trace_job

TASKS = ["SST-2", "agnews", "dbpedia"]


# -- which cells -----------------------------------------------------------------------------
@pytest.mark.parametrize("schedule, cells", [
    ("full", [TASKS, TASKS, TASKS]),
    ("seen", [["SST-2"], ["SST-2", "agnews"], TASKS]),     # the official runner: range(round + 1)
    ("final", [["SST-2"], ["agnews"], TASKS]),              # the diagonal, then the last row
])
def test_each_schedule_scores_its_cells(schedule, cells):
    assert [tasks_after(schedule, TASKS, i) for i in range(3)] == cells


def test_the_zero_shot_row_only_where_fwt_can_be_computed_unless_asked():
    assert baseline_wanted("full", None) and not baseline_wanted("seen", None) and not baseline_wanted("final", None)
    assert baseline_wanted("final", True) and not baseline_wanted("full", False)


def test_the_cheapest_schedule_for_the_metrics_asked():
    assert cheapest_for(["OP", "BWT_eq10", "own_routing"]) == "final"
    assert cheapest_for(["OP", "FWT"]) == "full"
    with pytest.raises(ValueError, match=r"^eval.schedule: 'final' cannot compute FWT, needed by the study's metrics"):
        check_gives("final", ["OP", "FWT"], "the study's metrics")


def test_metrics_a_schedule_cannot_compute_are_absent_not_zero():
    # final schedule, 3 tasks: R[0][0]=80, R[1][1]=60, last row 70, 50, 40
    R = [[80.0, None, None], [None, 60.0, None], [70.0, 50.0, 40.0]]
    summary = summarize(R, baseline=[10.0, 20.0, 30.0])
    assert summary["OP"] == pytest.approx((70 + 50 + 40) / 3)
    assert summary["BWT_eq10"] == pytest.approx(((80 - 70) + (60 - 50)) / 2)
    assert summary["BWT_signed"] == pytest.approx(-10.0)
    assert summary["reference_forgetting_magnitude"] == pytest.approx((10 + 10 + 0) / 3)
    for absent in ("FWT", "xtail_transfer", "xtail_average"):   # they read the upper triangle
        assert absent not in summary


def test_an_unknown_schedule_is_an_error_naming_the_key(trace_root):
    with pytest.raises(ConfigError, match=r"^eval.schedule: must be 'full', 'seen' or 'final', got 'diag'"):
        config_from_dict({"data": {"root": str(trace_root), "tasks": ["SST-2"]}, "eval": {"schedule": "diag"}})


# -- records -----------------------------------------------------------------------------------
def test_task_records_first_wins_and_an_older_whole_record_still_reads(tmp_path):
    registry = Registry(str(tmp_path))
    older = {"run_id": "r", "version": 1, "profile": "olora", "created_at": "2026-01-01T00:00:00",
             "scores": {"SST-2": {"metric": "accuracy", "score": 50.0, "n": 2}}}
    registry.storage.write(evaluation_key("r", 1, "olora"), json.dumps(older).encode())   # written before per-task records
    first = record_task_evaluation(registry, "r", 1, "olora", "agnews", {"metric": "accuracy", "score": 25.0, "n": 4})
    again = record_task_evaluation(registry, "r", 1, "olora", "agnews", {"metric": "accuracy", "score": 99.0, "n": 4})
    assert first == again == {"metric": "accuracy", "score": 25.0, "n": 4}
    record = read_evaluation(registry, "r", 1, "olora")
    assert {task: result["score"] for task, result in record["scores"].items()} == {"SST-2": 50.0, "agnews": 25.0}
    assert read_evaluation(registry, "r", 2, "olora") is None
    assert read_evaluation(registry, "r", 1, "trace") is None
    record_evaluation(registry, "r", 2, "olora", {"dbpedia": {"score": 10.0}})
    assert read_evaluation(registry, "r", 2, "olora")["scores"] == {"dbpedia": {"score": 10.0}}


# -- sequences on Ray --------------------------------------------------------------------------
def _job(tmp_path, tiny_lm_dir, trace_root, mlflow_server, tasks, **eval_keys):
    raw = tiny_trace_job(tmp_path / "runs", tiny_lm_dir, trace_root, tasks, mlflow_server.uri,
                         f"schedule-{uuid.uuid4().hex[:6]}")
    raw["eval"].update(eval_keys)
    raw["run"]["name"] = f"schedule-{uuid.uuid4().hex[:8]}"
    return config_from_dict(raw)


def _records(config, run_id):
    registry = Registry(config.registry_uri())
    found = {}
    for version in range(len(config.data.tasks) + 1):
        record = read_evaluation(registry, run_id, version, "moram-repo")
        if record is not None:
            found[version] = {task: {k: v for k, v in result.items()} for task, result in record["scores"].items()}
    return found


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_final_schedule_scores_the_diagonal_and_the_last_row_only(tmp_path, tiny_lm_dir, trace_root, mlflow_server,
                                                                  ray_cluster):
    config = _job(tmp_path, tiny_lm_dir, trace_root, mlflow_server, TASKS, schedule="final")
    result = run_sequence(config, progress=False)
    assert result.baseline is None                                 # the zero-shot row serves only FWT
    filled = [[cell is not None for cell in row] for row in result.matrix]
    assert filled == [[True, False, False], [False, True, False], [True, True, True]]
    assert {v: sorted(r) for v, r in _records(config, result.run_id).items()} == {
        1: ["SST-2"], 2: ["agnews"], 3: sorted(TASKS)}            # 2T - 1 task evaluations
    assert "OP" in result.summary and "BWT_eq10" in result.summary and "FWT" not in result.summary
    logged = MlflowClient(mlflow_server.uri).get_run(result.mlflow_run_id).data.metrics
    assert "OP" in logged and "FWT" not in logged and "xtail_average" not in logged
    assert "-" in result.table().splitlines()[1]                   # a skipped cell shows as missing


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_evaluator_actor_records_what_a_fresh_process_per_version_records(tmp_path, tiny_lm_dir, trace_root,
                                                                            mlflow_server, ray_cluster):
    """The same 1-task run (same seed: the same shard) evaluated by one-shot Ray tasks and by the
    actor, which swaps version 1 into the model that scored version 0: identical records, routing
    rows included. (A leftover atom on swapping back is test_a_swapped_in_version_...'s, which
    swaps 2 -> 1 -> 0 -> 2 without Ray; one task keeps this sequence pair to ~50 s on 2 cores.)"""
    tasks = TASKS[:1]
    old = _job(tmp_path / "task", tiny_lm_dir, trace_root, mlflow_server, tasks, evaluator="task", schedule="full")
    new = _job(tmp_path / "actor", tiny_lm_dir, trace_root, mlflow_server, tasks, evaluator="actor", schedule="full")
    first, second = run_sequence(old, progress=False), run_sequence(new, progress=False)
    assert Registry(old.registry_uri()).read_shards(first.run_id, 1) == Registry(new.registry_uri()).read_shards(second.run_id, 1)
    assert first.matrix == second.matrix and first.baseline == second.baseline
    assert _records(old, first.run_id) == _records(new, second.run_id)
    assert len(_records(new, second.run_id)) == 2                  # zero-shot, version 1
    assert first.baseline is not None and first.matrix[0][0] is not None


@pytest.mark.slow
def test_a_swapped_in_version_is_the_freshly_built_model_bit_for_bit(tmp_path, tiny_lm_dir, trace_root):
    """Versions loaded 2 -> 1 -> 0 -> 2 into one model give the logits of a model built for each."""
    from moram_platform.benchmark import get_benchmark
    from moram_platform.training import train_task

    raw = tiny_trace_job(tmp_path, tiny_lm_dir, trace_root, TASKS[:2], "sqlite:///unused.db", "unused")
    raw["train"]["engine"] = "torch"
    config = config_from_dict(raw)
    benchmark = get_benchmark("trace")
    one = train_task(config, benchmark, 0, [], progress_bar=False).shard
    two = train_task(config, benchmark, 1, [one], progress_bar=False).shard
    versions = {0: [], 1: [one], 2: [one, two]}
    tokens = torch.tensor([[1, 50, 400, 7, 99, 3]])

    def logits(evaluator):
        with torch.no_grad():
            return evaluator.model(input_ids=tokens).logits

    fresh = {}
    for version, shards in versions.items():
        evaluator = VersionEvaluator(config)
        evaluator.load(shards)
        fresh[version] = logits(evaluator)
    assert not torch.equal(fresh[1], fresh[2]) and not torch.equal(fresh[0], fresh[1])
    swapped = VersionEvaluator(config)
    for version in (2, 1, 0, 2):
        swapped.load(versions[version])
        assert torch.equal(logits(swapped), fresh[version]), f"version {version}"


def _wait_until_gone(name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name)
        except ValueError:
            return
        time.sleep(0.2)
    raise AssertionError(f"actor {name} still alive")


@pytest.mark.long    # a fault drill (docs/registry.md): 90 s
@pytest.mark.timeout(900)
def test_an_evaluator_actor_killed_mid_version_is_restarted_and_scores_only_what_is_missing(
        tmp_path, tiny_lm_dir, trace_root, mlflow_server, ray_cluster):
    """A real SIGKILL of the actor's process after its first task's record: Ray restarts it and
    retries the call; the recorded task is not scored again, the others are, as a clean run."""
    config = _job(tmp_path, tiny_lm_dir, trace_root, mlflow_server, TASKS, schedule="final",
                  max_new_tokens=48)
    raw = config.to_dict()
    raw["data"]["max_eval_examples"] = 64           # a few seconds per task: time to kill in between
    config = config_from_dict(raw)
    result = run_sequence(config, stop_after=1, progress=False)     # version 1 committed and scored on SST-2
    run, registry = result.run_id, Registry(config.registry_uri())
    _wait_until_gone(f"moram-evaluator-{run}")                       # the sequence's own actor, killed at its end
    actor = evaluator_actor(config, run)
    pid = ray.get(actor.pid.remote())
    call = actor.evaluate.remote(1, TASKS)
    deadline = time.monotonic() + 300
    while len((read_evaluation(registry, run, 1, "moram-repo") or {"scores": {}})["scores"]) < 2:
        assert time.monotonic() < deadline, "the actor recorded nothing new"
        time.sleep(0.05)
    before = read_evaluation(registry, run, 1, "moram-repo")["scores"]
    os.kill(pid, signal.SIGKILL)
    scored = ray.get(call, timeout=600)
    after = read_evaluation(registry, run, 1, "moram-repo")["scores"]
    assert ray.get(actor.pid.remote()) != pid                        # a new process
    assert sorted(after) == sorted(TASKS)
    assert all(after[task] == before[task] for task in before)        # kept, not recomputed
    assert set(scored) <= set(TASKS) - set(before)                   # the retry scored only the rest
    ray.kill(actor)

    reference = _job(tmp_path / "clean", tiny_lm_dir, trace_root, mlflow_server, TASKS, schedule="full",
                     max_new_tokens=48)
    raw = reference.to_dict()
    raw["data"]["max_eval_examples"] = 64
    reference = config_from_dict(raw)
    clean = run_sequence(reference, stop_after=1, progress=False)
    assert read_evaluation(Registry(reference.registry_uri()), clean.run_id, 1, "moram-repo")["scores"] == after


def test_a_study_or_sweep_whose_schedule_cannot_give_its_metrics_is_refused_before_ray():
    from fixtures.paths import PROJECT_ROOT
    from moram_platform.tune.space import SpaceError
    from moram_platform.tune.study import StudyError, base_raw, study_from_dict
    from moram_platform.tune.sweep import _with_schedule

    base = str(PROJECT_ROOT / "jobs/configs/standard-cl/smollm2-135m_moram_order1-cpu.yaml")
    cheap = study_from_dict({"base_config": base, "grid": {"run.seed": [0]}})
    assert base_raw(cheap)["eval"]["schedule"] == "final"             # the default metrics need no more
    with_fwt = study_from_dict({"base_config": base, "grid": {"run.seed": [0]}, "metrics": ["OP", "FWT"]})
    assert base_raw(with_fwt)["eval"]["schedule"] == "full"
    contradicting = study_from_dict({"base_config": base, "grid": {"run.seed": [0]}, "metrics": ["FWT"],
                                     "overrides": {"eval.schedule": "seen"}})
    with pytest.raises(StudyError, match=r"^eval.schedule: 'seen' cannot compute FWT, needed by the study's metrics; use 'full'$"):
        base_raw(contradicting)
    assert _with_schedule({"eval": {}})["eval"]["schedule"] == "seen"   # Tune's scheduler needs every row
    with pytest.raises(SpaceError, match=r"^eval.schedule: 'final' gives no objective after each task"):
        _with_schedule({"eval": {"schedule": "final"}})
