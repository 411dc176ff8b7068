"""Sweep space files, the sweep objective and the resource arithmetic: no Ray runtime needed."""
import copy
import subprocess
import sys

import pytest
import yaml

from moram.metrics import average_performance, backward_transfer, reference_forgetting
from moram_platform.config import config_from_dict, load_config
from moram_platform.tune import (Objective, ResourceError, SpaceError, best_job_config, concurrent_trials,
                                 evaluation_trial_share, load_space, space_from_dict, training_trial_share)
from fixtures.paths import PROJECT_ROOT

TRACE_BASE = str(PROJECT_ROOT / "jobs" / "configs" / "trace" / "smollm2-135m_moram.yaml")
VALID = {
    "base_config": TRACE_BASE,
    "trial_overrides": {"data.tasks": ["C-STANCE", "FOMC"], "data.max_train_examples": 16},
    "params": {
        "tau": {"space": "loguniform", "low": 0.005, "high": 0.5},
        "k": {"space": "choice", "values": [2, 4, 8]},
        "lr": {"space": "loguniform", "low": "1e-4", "high": 2.0e-3},
        "delta": {"space": "grid", "values": [0.0, 0.1, 0.2]},
    },
    "search": {"algorithm": "optuna", "num_samples": 4, "max_concurrent": 2, "seed": 0},
    "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
    "objective": {"metric": "op", "mode": "max", "forgetting_weight": 0.5},
    "delta_stage": {"top_trials": 2},
    "resources": {"trial_cpu": 0.1},
}


def edited(*edits):
    """VALID with ``(dotted.key, value)`` edits; value None deletes the key. (trial_overrides
    keys are themselves dotted: replace that section whole.)"""
    raw = copy.deepcopy(VALID)
    for key, value in edits:
        *parents, last = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return raw


# -- the shipped space files ---------------------------------------------------------------------
@pytest.mark.parametrize("name, benchmark", [("trace", "trace"), ("xtail", "xtail")])
def test_shipped_space_files_are_valid_against_their_base_configs(name, benchmark, monkeypatch):
    monkeypatch.chdir(PROJECT_ROOT)    # base_config paths are relative to where jobs run from
    space = load_space(PROJECT_ROOT / "tune_spaces" / f"{name}.yaml")
    assert [p.name for p in space.training_params] == ["tau", "k", "lr"]
    assert [p.name for p in space.inference_params] == ["delta"]
    assert space.job_config().benchmark == benchmark


def test_a_valid_space_reads_back_with_keys_and_inclusive_randint():
    space = space_from_dict(edited(("params.r", {"space": "randint", "low": 2, "high": 4})))
    params = {p.name: p for p in space.params}
    assert {n: p.key for n, p in params.items()} == {"tau": "moram.tau", "k": "moram.k", "lr": "train.lr",
                                                    "delta": "moram.delta", "r": "moram.r"}
    assert params["lr"].low == 1e-4                      # YAML 1.1 reads 1e-4 as a string; taken as a number
    assert params["delta"].inference_only and not params["tau"].inference_only
    assert {params["r"].domain().sample() for _ in range(200)} == {2, 3, 4}   # both ends included
    samples = [params["tau"].domain().sample() for _ in range(200)]
    assert all(0.005 <= s <= 0.5 for s in samples)
    space.job_config()


# -- errors name the key -------------------------------------------------------------------------
@pytest.mark.parametrize("edits, message", [
    ([("params.tau.low", 0)], r"^params\.tau\.low: must be > 0, got 0"),
    ([("params.tau.high", 0.001)], r"^params\.tau\.high: must be > low \(0\.005\)"),
    ([("params.k.space", "normal")], r"^params\.k\.space: must be one of \['loguniform', 'uniform', 'choice', "
                                     r"'randint', 'grid'\], got 'normal'"),
    ([("params.k.values", [])], r"^params\.k\.values: must be a non-empty list"),
    ([("params.k.values", [2, 2])], r"^params\.k\.values: lists a value twice"),
    ([("params.k.low", 1)], r"^params\.k\.low: does not apply to a choice space"),
    ([("params.tau.values", [0.1])], r"^params\.tau\.values: does not apply to a loguniform space"),
    ([("params.tau.low", "small")], r"^params\.tau\.low: must be a number, got 'small'"),
    ([("params.tau.temperature", 1)], r"^params\.tau\.temperature: unknown key"),
    ([("params.warmup", {"space": "choice", "values": [0, 10]})],
     r"^params\.warmup\.key: must name the job-config key"),
    ([("params.temp", {"space": "uniform", "low": 0.1, "high": 0.2, "key": "moram.tau"})],
     r"^params\.(tau|temp)\.key: is set by two hyperparameters"),
    ([("params", {})], r"^params: must map at least one hyperparameter"),
    ([("params.k.space", "grid")], r"^params\.k\.space: grid needs search\.algorithm: random"),
    ([("serach", {})], r"^serach: unknown key"),
    ([("base_config", None)], r"^base_config: must name a job config file"),
    ([("search.algorithm", "bayes")], r"^search\.algorithm: must be one of \['optuna', 'random'\]"),
    ([("search.num_samples", 0)], r"^search\.num_samples: must be >= 1, got 0"),
    ([("search.max_concurrent", 1.5)], r"^search\.max_concurrent: must be an integer, got 1\.5"),
    ([("scheduler.name", "pbt")], r"^scheduler\.name: must be one of \['asha', 'fifo'\]"),
    ([("scheduler.reduction_factor", 1)], r"^scheduler\.reduction_factor: must be > 1"),
    ([("objective.metric", "accuracy")], r"^objective\.metric: must be one of"),
    ([("objective.mode", "maximize")], r"^objective\.mode: must be 'max' or 'min'"),
    ([("objective.mode", "min")], r"^objective\.forgetting_weight: penalises forgetting, so it needs mode: max"),
    ([("delta_stage.top_trials", 0)], r"^delta_stage\.top_trials: must be >= 1"),
    ([("resources.trial_cpu", 0)], r"^resources\.trial_cpu: must be > 0"),
    ([("trial_overrides", {"moram.tau": 0.1})], r"^trial_overrides\.moram\.tau: is swept by params\.tau"),
])
def test_invalid_spaces_name_the_key(edits, message):
    with pytest.raises(SpaceError, match=message):
        space_from_dict(edited(*edits))


@pytest.mark.parametrize("edits, message", [
    ([("base_config", "jobs/configs/trace/nope.yaml")], r"^base_config: jobs/configs/trace/nope\.yaml not found"),
    ([("params.tau", {"space": "uniform", "low": 0, "high": 0.5})],
     r"^params\.tau\.low: 0\.0 is not a valid moram\.tau .*must be > 0"),
    ([("params.k", {"space": "loguniform", "low": 2, "high": 16})],
     r"^params\.k\.low: 2\.0 is not a valid moram\.k .*integer"),
    ([("params.delta.values", [0.0, 1.5])], r"^params\.delta\.values\[1\]: 1\.5 is not a valid moram\.delta"),
    ([("params.warmup", {"space": "choice", "values": [0, 10], "key": "train.warmup"})],
     r"^params\.warmup\.values\[0\]: 0 is not a valid train\.warmup .*unknown key"),
    ([("trial_overrides", {"data.max_train_examples": 0})],
     r"^trial_overrides: data\.max_train_examples: must be >= 1 or null"),
    ([("trial_overrides", {"data.shuffle": True})], r"^trial_overrides: data\.shuffle: unknown key"),
])
def test_values_a_trial_would_reject_are_named_before_the_sweep_starts(edits, message):
    space = space_from_dict(edited(*edits))
    with pytest.raises(SpaceError, match=message):
        space.job_config()


def test_space_file_errors_name_the_file(tmp_path):
    with pytest.raises(SpaceError, match="not found"):
        load_space(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("params: [unclosed\n")
    with pytest.raises(SpaceError, match=f"space file {broken}: not valid YAML"):
        load_space(broken)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(VALID))
    with pytest.raises(SpaceError, match=r"^search\.num_samples: must be >= 1"):
        load_space(good, ["search.num_samples=0"])
    assert load_space(good, ["search.num_samples=12"]).search.num_samples == 12


def test_the_cli_reports_an_invalid_space_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(edited(("params.tau.low", 0))))
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "jobs" / "tune.py"), str(bad), "--name", "x"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error: params.tau.low: must be > 0, got 0"


# -- the objective -------------------------------------------------------------------------------
MATRIX = [[60.0, 10.0, 5.0],
          [50.0, 70.0, 8.0],
          [40.0, 65.0, 80.0]]


def test_objective_scores_are_the_metrics_of_the_trained_square():
    objective = Objective(metric="op", mode="max", forgetting_weight=0.5)
    scores = objective.scores(MATRIX)
    assert scores["op"] == pytest.approx(average_performance(MATRIX)) == pytest.approx(185 / 3)
    assert scores["bwt"] == pytest.approx(backward_transfer(MATRIX)) == pytest.approx(((40 - 60) + (65 - 70)) / 2)
    assert scores["forgetting"] == pytest.approx(12.5)
    assert scores["forgetting_magnitude"] == pytest.approx(reference_forgetting(MATRIX))
    assert scores["objective"] == pytest.approx(185 / 3 - 0.5 * 12.5)
    # after two tasks (run_sequence's rows are full width): only the trained 2x2 square counts
    assert objective.scores(MATRIX[:2])["op"] == pytest.approx(60.0)
    assert objective.scores(MATRIX[:2])["forgetting"] == pytest.approx(10.0)


def test_objective_from_last_row_and_diagonal_equals_the_full_matrix():
    for objective in (Objective(), Objective(metric="forgetting_magnitude", mode="min"),
                      Objective(metric="bwt", mode="max", forgetting_weight=1.0)):
        diagonal = [MATRIX[i][i] for i in range(3)]
        assert objective.scores_from(MATRIX[-1], diagonal) == pytest.approx(objective.scores(MATRIX))
    assert not Objective().needs_diagonal and Objective(forgetting_weight=0.1).needs_diagonal


# -- resources -----------------------------------------------------------------------------------
def job(**scaling):
    return config_from_dict({"scaling": scaling})


@pytest.mark.parametrize("scaling, cluster, wanted, fits", [
    ({"num_workers": 1, "cpus_per_worker": 0.9}, {"CPU": 2.0}, 2, 2),    # 2 x (0.1 + 0.9) = 2.0 exactly
    ({"num_workers": 1, "cpus_per_worker": 0.9}, {"CPU": 2.0}, 4, 2),
    ({"num_workers": 2, "cpus_per_worker": 0.9}, {"CPU": 2.0}, 2, 1),    # 1.9 each
    ({"num_workers": 1, "cpus_per_worker": 1.0}, {"CPU": 2.0}, 2, 1),    # 1.1 each: two would need 2.2
    ({"num_workers": 2, "use_gpu": True, "cpus_per_worker": 4, "gpus_per_worker": 1}, {"CPU": 64, "GPU": 8}, 8, 4),
    ({"num_workers": 1, "use_gpu": True, "cpus_per_worker": 2, "gpus_per_worker": 0.5}, {"CPU": 16, "GPU": 1}, 4, 2),
])
def test_concurrent_training_trials_fit_the_cluster_at_their_peak(scaling, cluster, wanted, fits):
    share = training_trial_share(job(**scaling), trial_cpu=0.1)
    assert share.trial == {"CPU": 0.1}
    assert concurrent_trials(share, cluster, wanted, "training trial") == fits


def test_a_trial_that_cannot_fit_is_a_clear_error():
    share = training_trial_share(job(num_workers=4, cpus_per_worker=0.9), trial_cpu=0.1)
    with pytest.raises(ResourceError, match=r"^scaling: one training trial needs 0\.1 CPU \(resources\.trial_cpu\) "
                                            r"\+ 4 x 0\.9 CPU \(scaling\.num_workers x scaling\.cpus_per_worker\) = "
                                            r"3\.7 CPU, but the Ray cluster has 2 CPU"):
        concurrent_trials(share, {"CPU": 2.0}, 2, "training trial")
    gpu = training_trial_share(job(num_workers=1, use_gpu=True, cpus_per_worker=1), trial_cpu=0.1)
    with pytest.raises(ResourceError, match=r"1 x 1 GPU \(scaling\.gpus_per_worker\) = 1\.1 CPU and 1 GPU, "
                                            r"but the Ray cluster has 8 CPU, 0 GPU"):
        concurrent_trials(gpu, {"CPU": 8.0}, 2, "training trial")


def test_an_evaluation_trial_holds_one_workers_share():
    share = evaluation_trial_share(job(num_workers=4, use_gpu=True, cpus_per_worker=2, gpus_per_worker=1))
    assert share.total == {"CPU": 2, "GPU": 1}
    assert concurrent_trials(share, {"CPU": 16, "GPU": 2}, 8, "δ trial") == 2


# -- the best config ---------------------------------------------------------------------------------
def test_best_config_is_the_full_base_config_with_the_best_values(tmp_path):
    space = space_from_dict(VALID)
    base_raw = space.base_raw(["run.name=old-run"])
    raw = best_job_config(space, base_raw, {"tau": 0.0712, "k": 4, "lr": 3e-4, "delta": 0.1})
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    assert (config.moram["tau"], config.moram["k"], config.train.lr, config.moram["delta"]) == (0.0712, 4, 3e-4, 0.1)
    assert config.run.name is None                                        # a new run gets its own id
    assert config.data.tasks == load_config(TRACE_BASE).data.tasks        # not the trials' shortened order
    assert config.data.max_train_examples is None


# Every key of a space file at its boundaries: the first line of the error names it.
BAD_SPACE_VALUES = [
    ("search.seed", -1), ("search.num_samples", -1), ("search.max_concurrent", 0), ("search.algorithm", 3),
    ("scheduler.grace_period", 0), ("scheduler.reduction_factor", "x"), ("scheduler.reduction_factor", 0.5),
    ("delta_stage.num_samples", 0), ("delta_stage.top_trials", -1), ("resources.trial_cpu", -1),
    ("objective.forgetting_weight", -1), ("objective.metric", ""), ("params.tau.low", True),
    ("params.tau.high", ".inf"), ("params.tau.high", 0.005), ("params.k.key", ""), ("params.k.values", "4, 8"),
    ("search", "x"), ("params.tau", 5), ("base_config", ""), ("trial_overrides", [1]), ("resources.gpus", 1),
]


@pytest.mark.parametrize("key, value", BAD_SPACE_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_SPACE_VALUES])
def test_bad_space_values_name_their_key(key, value):
    with pytest.raises(SpaceError) as error:
        space_from_dict(edited((key, value)))
    assert str(error.value).splitlines()[0].startswith(f"{key}:"), str(error.value)


def test_randint_bounds_must_be_integers_and_space_errors_come_all_at_once():
    with pytest.raises(SpaceError, match=r"^params\.r\.low: must be an integer, got 2\.5"):
        space_from_dict(edited(("params.r", {"space": "randint", "low": 2.5, "high": 4})))
    with pytest.raises(SpaceError) as error:
        space_from_dict(edited(("search.num_samples", 0), ("resources.trial_cpu", 0)))
    assert [line.split(":")[0] for line in str(error.value).splitlines()] == ["search.num_samples",
                                                                               "resources.trial_cpu"]
