"""What a sequence shows in MLflow (docs/mlflow.md), on a real MLflow store (SQLite in a temp
folder) without Ray: the params that matter, the credential filter, the learning/forgetting
curves on the parent (each point once, also after a resume), its description, the system tags
and a task run's loss curve and top-level plots. The full sequence's runs are checked in
tests/test_trace_job.py."""
import pytest
import torch
from mlflow.tracking import MlflowClient

from fixtures.models import tiny_llama
from fixtures.paths import PROJECT_ROOT
from moram import MoRAMConfig, get_moram_model
from moram_platform.benchmark import get_benchmark
from moram_platform.config import load_config
from moram_platform.ray_train import LOSS_CURVE
from moram_platform.registry import BaseModelRef, Registry
from moram_platform.sequence import _log_progress, _log_task
from moram_platform.tracking import NOTE_TAG, Tracker, flatten, sequence_params, system_tags

TRACE_SMOKE = PROJECT_ROOT / "jobs" / "configs" / "trace" / "smollm2-135m_moram_cpu-smoke.yaml"
XTAIL_SMOKE = PROJECT_ROOT / "jobs" / "configs" / "xtail" / "tiny-vit_moram_cpu-smoke.yaml"
TASKS = ["C-STANCE", "FOMC"]
TAGS = {"moram.method": "moram", "moram.model": "tiny-llama", "moram.benchmark": "trace",
        "moram.eval_profile": "olora"}


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"   # one store: its schema is built once


@pytest.fixture
def tracker(tracking_uri, request):
    return Tracker(tracking_uri, request.node.name[:60], "seq-1")   # an experiment per test


def test_the_credential_filter_drops_secrets_and_keeps_token_budgets():
    flat = flatten({
        "trace": {"max_prompt_tokens": 96, "max_answer_tokens": 32, "tokenizer": "smollm2"},
        "eval": {"max_new_tokens": 4},
        "storage": {"aws_secret_access_key": "s3cr3t", "AWS_ACCESS_KEY_ID": "AKIA", "token": "t",
                    "hf_token": "t", "session_token": "t", "apiKey": "k", "api_key": "k", "password": "p",
                    "db-passwd": "p", "credentials": {"user": "u"}, "private_key": "k",
                    "uri": "s3://user:pw@host:9000/bucket"},
    })
    assert flat == {"trace.max_prompt_tokens": "96", "trace.max_answer_tokens": "32", "trace.tokenizer": "smollm2",
                    "eval.max_new_tokens": "4", "storage.uri": "s3://***@host:9000/bucket"}


def test_params_are_the_sections_the_benchmark_computes_with():
    trace = flatten(sequence_params(load_config(TRACE_SMOKE)))
    assert not any(key.startswith(("xtail.", "run.output_dir", "registry.", "mlflow.", "scaling.")) for key in trace)
    assert {"benchmark", "run.seed", "trace.max_prompt_tokens", "trace.max_answer_tokens", "eval.max_new_tokens",
            "train.lr", "moram.method", "moram.r", "moram.k", "moram.tau", "moram.delta", "moram.prune_mass"} <= set(trace)
    assert "train.max_steps" not in trace                      # unset (None): not a param
    assert trace["moram.tau"] == "0.03" and len(trace) < 45
    xtail = flatten(sequence_params(load_config(XTAIL_SMOKE)))
    assert "xtail.shots" in xtail and xtail["moram.tau"] == "0.01"   # its own section, its own defaults


def test_the_parent_draws_curves_once_per_task_and_describes_the_matrix(tracker):
    config = load_config(TRACE_SMOKE, [f"data.tasks={TASKS}"])
    benchmark = get_benchmark("trace")
    parent, _ = tracker.start_sequence(sequence_params(config), {**TAGS, **system_tags()})
    matrix, baseline = [[60.0, 10.0], [50.0, 70.0]], [5.0, 8.0]
    for _ in range(2):                                         # the second pass is a resume: nothing new
        for seen in (1, 2):
            _log_progress(tracker, parent, config, benchmark, "seq-1", matrix[:seen], baseline, TAGS)

    client = MlflowClient(tracker.tracking_uri)
    def curve(key):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(parent, key), key=lambda m: m.step)]
    # hand-computed: after task 1 only task 1 is seen; after task 2 (DESIGN.md, Metrics)
    assert curve("eval/C-STANCE") == [(0, 60.0), (1, 50.0)]
    assert curve("eval/FOMC") == [(0, 10.0), (1, 70.0)]
    assert curve("OP") == [(0, 60.0), (1, 60.0)]                    # mean over the tasks seen
    assert curve("BWT_signed") == [(0, 0.0), (1, -10.0)]
    assert curve("BWT_eq10") == [(0, 0.0), (1, 10.0)]
    assert curve("reference_forgetting_magnitude") == [(0, 0.0), (1, 5.0)]
    assert curve("FWT") == [(0, 0.0), (1, 2.0)]                     # R[0][1] - b[1]
    assert "BWT" not in client.get_run(parent).data.metrics         # never a bare BWT

    run = client.get_run(parent)
    note = run.data.tags[NOTE_TAG]
    assert "| after \\ on | C-STANCE | FOMC |" in note and "| zero-shot | 5.00 | 8.00 |" in note
    assert "| C-STANCE | 60.00 | 10.00 |" in note and "| FOMC | 50.00 | 70.00 |" in note
    assert "| BWT_signed | -10.00 |" in note and "Tasks done: 2 of 2" in note
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"]
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40     # the tests run in a git checkout
    # the UI opens the experiment on its runs ("Model training"), not on MLflow 3's GenAI pages
    assert client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning" in tracker.ui_url(parent)


def test_a_task_run_gets_its_loss_curve_params_and_plots_at_the_top_level(tracker, tmp_path):
    config = load_config(TRACE_SMOKE, ["data.tasks=[FOMC]"])
    model = get_moram_model(tiny_llama(), MoRAMConfig(r=2, k=2, dropout=0.0))
    model.begin_task("FOMC")
    tokens = torch.tensor([[1, 5, 9, 17, 33, 65, 3, 7]])
    model.train()
    model(input_ids=tokens, labels=tokens).loss.backward()
    model.end_task()
    registry = Registry(str(tmp_path / "registry"))
    version = registry.commit("seq-1", model.export_shard(), base_model=BaseModelRef("tiny-llama", None),
                              metrics={"atoms_added": 16, LOSS_CURVE: [2.5, None, 1.5]})

    params = sequence_params(config)
    parent, _ = tracker.start_sequence(params, TAGS)
    child, finished = tracker.task_run(0, "FOMC", params, TAGS)
    assert not finished
    _log_task(tracker, child, config, registry, "seq-1", version, [42.0])
    _log_task(tracker, child, config, registry, "seq-1", version, [42.0])   # logged again: no new point

    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(child)
    assert [(m.step, m.value) for m in client.get_metric_history(child, "train_loss")] == [(1, 2.5), (3, 1.5)]
    assert len(client.get_metric_history(child, "task_score")) == 1 and run.data.metrics["task_score"] == 42.0
    assert run.data.params["moram.tau"] == "0.03" and run.data.tags["moram.method"] == "moram"
    assert {a.path for a in client.list_artifacts(child)} == {"activation_map.png", "shard"}
    assert tracker.task_run(0, "FOMC", params, TAGS) == (child, True)
