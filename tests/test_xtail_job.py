"""jobs/xtail.py end to end on a mini X-TAIL (Fashion-MNIST, MNIST, CIFAR-10 as image folders)
with a tiny random-initialised open_clip ViT: Ray Train workers with DeepSpeed on gloo, the
registry on the SeaweedFS S3 server, MLflow on a real tracking server; and bad input stopping
``python jobs/xtail.py`` before anything is written."""
import csv
import io
import statistics
import subprocess
import sys
import uuid
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fixtures.images import copy_domain
from fixtures.paths import PROJECT_ROOT
from mlflow.tracking import MlflowClient

from moram import get_moram_model, read_shard
from moram.metrics import xtail_average, xtail_last, xtail_transfer
from moram_platform.benchmark import get_benchmark
from moram_platform.config import ConfigError, load_config
from moram_platform.registry import Registry
from moram_platform.registry.evaluations import read_evaluation
from moram_platform.sequence import run_sequence
from moram_platform.xtail import evaluate_domains, load_backbone, load_domain, register_model_config
from moram_platform.xtail.benchmark import capped

SMOKE = PROJECT_ROOT / "jobs" / "configs" / "xtail" / "tiny-vit_moram_cpu-smoke.yaml"
ORDER = ["Fashion-MNIST", "MNIST", "CIFAR-10"]
LAYERS = 4 * 6          # tiny ViT: 2 vision + 2 text blocks, each with q, k, v, out, c_fc, c_proj
TEST_IMAGES = 50 * 10   # per domain (tests/fixtures/images.py)


def smoke_config(domains: dict[str, Path], *overrides):
    root = domains["MNIST"].parent
    assert all(path.parent == root for path in domains.values())
    return load_config(SMOKE, [f"data.root={root}", *overrides])


# -- the sequence on the platform spine (slow) -------------------------------------------------
@pytest.fixture(scope="module")
def xtail_run(xtail_image_domains, tmp_path_factory, s3_server, mlflow_server, ray_cluster):
    out = tmp_path_factory.mktemp("xtail-job")
    run_name = f"xtail-e2e-{uuid.uuid4().hex[:8]}"
    config = smoke_config(xtail_image_domains, f"xtail.split_dir={out / 'splits'}", f"run.name={run_name}",
                          f"run.output_dir={out}", f"registry.uri=s3://moram-tests/{run_name}",
                          f"mlflow.tracking_uri={mlflow_server.uri}", f"mlflow.experiment=xtail-{run_name}")
    result = run_sequence(config, progress=False)
    print(f"\n{result.table()}")
    splits = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in (out / "splits").iterdir()}
    return {"config": config, "result": result, "out": out, "splits": splits, "mlflow": MlflowClient(mlflow_server.uri)}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_sequence_runs_through_ray_train_and_the_registry(xtail_run, xtail_image_domains):
    config, result = xtail_run["config"], xtail_run["result"]
    assert result.trained == ORDER and result.tasks == ORDER
    assert len(result.matrix) == 3 and all(len(row) == 3 for row in result.matrix)

    registry = Registry(config.registry_uri())
    assert registry.versions(result.run_id) == [1, 2, 3] and result.versions == [1, 2, 3]
    for version, data in zip(registry.lineage(result.run_id, 3), registry.read_shards(result.run_id, 3)):
        shard = read_shard(data)
        assert version.task == shard.metadata["task"]
        assert len(shard.metadata["added"]) == LAYERS and set(shard.metadata["added"].values()) == {16}
        assert version.metrics["atoms_added"] == LAYERS * 16
        assert version.metrics["train_steps"] == 100 and version.metrics["train_samples"] == 100 * 32
        assert version.base_model.id == "open_clip:xtail-smoke-vit (random init, seed 42)"
        assert version.base_model.revision
        assert version.config["target_modules"] == ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"]
    registry.verify(result.run_id, 3)

    # Every row is what the building blocks score for base + that version's shards, over the
    # union of all 30 classes: the platform's evaluation is X-TAIL's, on the registry's atoms.
    register_model_config("xtail-smoke-vit", config.xtail.model_config)
    domains = [load_domain(name, xtail_image_domains[name], split_dir=xtail_run["out"] / "splits") for name in ORDER]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random init, on purpose
        backbone = load_backbone("xtail-smoke-vit", allow_random_init=True, init_seed=config.run.seed)
    model = get_moram_model(backbone.model, config.moram_config)
    for version, row in enumerate([result.baseline, *result.matrix]):
        model.load_shards(registry.read_shards(result.run_id, version) if version else [])
        scores = evaluate_domains(model, domains, tokenizer=backbone.tokenizer, transform=backbone.eval_transform)
        assert [scores[name] for name in ORDER] == row, version
        assert model.task_names == ORDER[:version]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_matrix_and_metrics_are_those_of_the_logged_results(xtail_run):
    config, result, client = xtail_run["config"], xtail_run["result"], xtail_run["mlflow"]
    registry = Registry(config.registry_uri())

    # the registry's evaluation records: the zero-shot row (version 0) and one row per task
    records = [read_evaluation(registry, result.run_id, version, "xtail-union") for version in range(4)]
    for record in records:
        for name in ORDER:
            score = record["scores"][name]
            assert (score["metric"], score["profile"], score["n"], score["classes"]) == \
                ("accuracy", "xtail-union", TEST_IMAGES, 30)
            assert score["score"] == pytest.approx(100 * score["correct"] / TEST_IMAGES)
    rows = [[record["scores"][name]["score"] for name in ORDER] for record in records]
    assert rows[0] == result.baseline and rows[1:] == result.matrix

    # MLflow: the matrix and zero-shot row as artifacts, the heatmap, the metrics
    experiment = client.get_experiment_by_name(config.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_id == result.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == result.run_id
    assert parent.data.tags["moram.benchmark"] == "xtail" and parent.data.tags["moram.eval_profile"] == "xtail-union"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"accuracy_matrix.csv", "accuracy_matrix.png", "zero_shot_row.csv", "resolved_config.yaml"} <= artifacts
    logged = read_csv(client, parent.info.run_id, "accuracy_matrix.csv", xtail_run["out"] / "download")
    assert logged[0] == ["after_task", *ORDER]
    matrix = [[float(v) for v in row[1:]] for row in logged[1:]]
    assert matrix == [[pytest.approx(v, abs=1e-4) for v in row] for row in rows[1:]]
    zero_shot = read_csv(client, parent.info.run_id, "zero_shot_row.csv", xtail_run["out"] / "download")
    assert [float(v) for v in zero_shot[1][1:]] == pytest.approx(rows[0], abs=1e-4)

    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in children] == [f"task-{i}-{name}" for i, name in enumerate(ORDER)]
    for i, child in enumerate(children):
        assert child.data.metrics["task_score"] == rows[i + 1][i]
        assert [child.data.metrics[f"eval/{name}"] for name in ORDER] == rows[i + 1]
        assert len(client.get_metric_history(child.info.run_id, "train_loss")) == 100

    # Transfer / Average / Last (moram.metrics on the logged matrix), overall and per domain
    metrics = parent.data.metrics
    R = rows[1:]
    assert metrics["transfer"] == pytest.approx(xtail_transfer(R))
    assert metrics["average"] == pytest.approx(xtail_average(R))
    assert metrics["last"] == pytest.approx(xtail_last(R))
    for j, name in enumerate(ORDER):
        column = [row[j] for row in R]
        assert metrics[f"average/{name}"] == pytest.approx(statistics.mean(column))
        assert metrics[f"last/{name}"] == pytest.approx(column[-1])
        if j:
            assert metrics[f"transfer/{name}"] == pytest.approx(statistics.mean(column[:j]))
    assert "transfer/Fashion-MNIST" not in metrics  # nothing comes before the first domain
    assert statistics.mean(metrics[f"transfer/{n}"] for n in ORDER[1:]) == pytest.approx(metrics["transfer"])
    assert statistics.mean(metrics[f"average/{n}"] for n in ORDER) == pytest.approx(metrics["average"])
    assert statistics.mean(metrics[f"last/{n}"] for n in ORDER) == pytest.approx(metrics["last"])
    assert {k: pytest.approx(v) for k, v in result.summary.items()} == {k: metrics[k] for k in result.summary}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_a_domain_lifts_it_clearly_above_zero_shot(xtail_run):
    result = xtail_run["result"]
    zero_shot, after_fashion = result.baseline[0], result.matrix[0][0]
    assert after_fashion >= zero_shot + 25, (zero_shot, after_fashion)  # measured: 0.0 -> 53.2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_rerun_reuses_the_split_files_and_retrains_nothing(xtail_run):
    config, first = xtail_run["config"], xtail_run["result"]
    assert sorted(xtail_run["splits"]) == [f"{name}_16shot_seed0.json" for name in sorted(ORDER)]
    again = run_sequence(config, progress=False)
    assert again.trained == [] and again.matrix == first.matrix and again.baseline == first.baseline
    assert again.mlflow_run_id == first.mlflow_run_id
    splits = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in (xtail_run["out"] / "splits").iterdir()}
    assert splits == xtail_run["splits"]  # the same files, untouched


def read_csv(client, run_id: str, name: str, folder: Path) -> list[list[str]]:
    folder.mkdir(exist_ok=True)
    return list(csv.reader(io.StringIO(Path(client.download_artifacts(run_id, name, str(folder))).read_text())))


# -- the benchmark's pieces, in this process ---------------------------------------------------
@pytest.fixture
def benchmark_and_config(xtail_image_domains, tmp_path):
    config = smoke_config(xtail_image_domains, f"xtail.split_dir={tmp_path / 'splits'}").with_absolute_paths()
    benchmark = get_benchmark("xtail")
    benchmark.validate(config)
    return benchmark, config


def test_evaluate_is_the_union_label_space_accuracy_and_caches_per_model_state(benchmark_and_config):
    benchmark, config = benchmark_and_config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        base, processor = benchmark.load_model(config)
    model = get_moram_model(base, config.moram_config).eval()
    config.data.max_eval_examples = 100  # the same 100 test images of each domain on both sides
    domains = [replace(benchmark.domain(config, name), test=tuple(capped(benchmark.domain(config, name).test, 100)))
               for name in ORDER]
    expected = evaluate_domains(model, domains, tokenizer=processor.tokenizer, transform=processor.eval_transform)
    scores = {name: benchmark.evaluate(config, model, processor, name)["score"] for name in ORDER}
    assert scores == expected

    # a trained step changes the model: the cached text features must not survive it
    model.begin_task("Fashion-MNIST")
    batch = benchmark.collate(config, processor, "MNIST", benchmark.train_examples(config, "MNIST")[:32])
    assert batch["num_seen"] == 10 and batch["tokens"].shape == (10, 16) and batch["images"].shape == (32, 3, 32, 32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(5):
        benchmark.loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    moved = evaluate_domains(model, domains, tokenizer=processor.tokenizer, transform=processor.eval_transform)
    assert moved != expected  # the test has teeth: stale text features would score differently
    assert {name: benchmark.evaluate(config, model, processor, name)["score"] for name in ORDER} == moved
    model.set_routing(delta=1.0)  # gates (nearly) every atom off: back to (nearly) the base model
    gated = evaluate_domains(model, domains, tokenizer=processor.tokenizer, transform=processor.eval_transform)
    assert gated != moved
    assert {name: benchmark.evaluate(config, model, processor, name)["score"] for name in ORDER} == gated


def test_max_eval_examples_takes_an_even_spread_of_every_class(benchmark_and_config):
    benchmark, config = benchmark_and_config
    config.data.max_eval_examples = 40
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        base, processor = benchmark.load_model(config)
    model = get_moram_model(base, config.moram_config)
    first = benchmark.evaluate(config, model, processor, "MNIST")
    assert first["n"] == 40 and benchmark.evaluate(config, model, processor, "MNIST") == first
    chosen = capped(benchmark.domain(config, "MNIST").test, 40)
    assert sorted({label for _, label in chosen}) == list(range(10))
    assert all(sum(label == c for _, label in chosen) == 4 for c in range(10))


@pytest.mark.parametrize("overrides, message", [
    (["data.max_train_examples=8"], "data.max_train_examples: not used by X-TAIL"),
    (["xtail.templates={SVHN: ['a photo of {}']}"], "xtail.templates: names domains that are not in data.tasks: ['SVHN']"),
    (["model.source=NoSuchNet", "xtail.model_config=null"], "model.source: 'NoSuchNet' is not an open_clip model"),
    (["xtail.model_config={embed_dim: 64}"], "xtail.model_config: model config 'xtail-smoke-vit': missing key 'vision_cfg'"),
    (["model.dtype=bfloat16"], "model.dtype: X-TAIL loads open_clip weights in float32"),
])
def test_config_errors_name_the_key(xtail_image_domains, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as error:  # the config's own rules fail while it loads, the rest in validate
        config = smoke_config(xtail_image_domains, f"xtail.split_dir={tmp_path}", *overrides).with_absolute_paths()
        get_benchmark("xtail").validate(config)
    assert message in str(error.value)
    assert not any(tmp_path.iterdir())


def test_model_ref_names_the_weights(xtail_image_domains, tmp_path):
    benchmark = get_benchmark("xtail")
    random_init = benchmark.model_ref(smoke_config(xtail_image_domains))
    other_seed = benchmark.model_ref(smoke_config(xtail_image_domains, "run.seed=1"))
    assert random_init[0] == "open_clip:xtail-smoke-vit (random init, seed 42)"
    assert random_init[1] != other_seed[1]   # other weights, another revision
    checkpoint = tmp_path / "tiny.pt"
    checkpoint.write_bytes(b"weights")
    ref = benchmark.model_ref(smoke_config(xtail_image_domains, f"xtail.pretrained={checkpoint}"))
    assert ref[0] == "open_clip:xtail-smoke-vit (tiny.pt)" and len(ref[1]) == 16


# -- bad input: python jobs/xtail.py stops before writing anything ------------------------------
def run_job(cwd: Path, root: Path, *overrides):
    command = [sys.executable, str(PROJECT_ROOT / "jobs" / "xtail.py"), "--config", str(SMOKE), "--quiet",
               "--run-name", "bad-input", f"--set=data.root={root}", f"--set=xtail.split_dir={cwd / 'splits'}",
               "--set=data.tasks=[MNIST, Fashion-MNIST]", *[f"--set={o}" for o in overrides]]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=240)


def assert_failed_cleanly(job, cwd: Path, message: str):
    assert job.returncode == 2, job.stderr[-3000:]
    assert message in job.stderr and "Traceback" not in job.stderr, job.stderr[-3000:]
    assert not (cwd / "moram_runs").exists() and not (cwd / "splits").exists()


@pytest.fixture
def mini_copy(xtail_image_domains, tmp_path):
    root = tmp_path / "data"
    for name in ("MNIST", "Fashion-MNIST"):
        copy_domain(xtail_image_domains[name], root / name, classes=3)
    return root


@pytest.mark.timeout(300)
def test_a_corrupt_image_is_named(mini_copy, tmp_path):
    victim = sorted((mini_copy / "Fashion-MNIST" / "test" / "bag").iterdir())[7]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 20)
    job = run_job(tmp_path, mini_copy)
    assert_failed_cleanly(job, tmp_path, f"{victim}: not a readable image")


@pytest.mark.timeout(300)
def test_an_empty_class_folder_is_named(mini_copy, tmp_path):
    empty = mini_copy / "MNIST" / "train" / "7"
    empty.mkdir()
    (empty / "README.txt").write_text("images go here")
    job = run_job(tmp_path, mini_copy)
    assert_failed_cleanly(job, tmp_path, f"{empty}: empty class folder")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("override, message", [
    ("xtail.allow_random_init=false", "xtail.pretrained: no pretrained weights for 'xtail-smoke-vit'"),
    ("xtail.pretrained=/no/such/checkpoint.pt", "xtail.pretrained: pretrained='/no/such/checkpoint.pt': neither a local checkpoint file nor a pretrained tag"),
])
def test_missing_weights_are_named(mini_copy, tmp_path, override, message):
    job = run_job(tmp_path, mini_copy, override)
    assert_failed_cleanly(job, tmp_path, message)
