"""Bad input everywhere (issue 13, item 7): every key of a job config (TRACE and X-TAIL), of a
sweep space and of a study grid at its boundaries, and every data file a user gives in its
broken forms, through the real entry points (``moram config validate``, ``jobs/trace.py``,
``jobs/xtail.py``, ``jobs/tune.py``, ``jobs/study.py``, ``moram generate --input``).

Each is refused with exit status 2 and a message naming the key (or the file and row), no
traceback, before Ray starts, and nothing is written to the run folder, the registry or MLflow
(their defaults live in run.output_dir). The entry points run in this process (fast: no Ray, no
interpreter start per case); RAY_ADDRESS points at a closed port, so an input that slipped
through would fail at ray.init instead of training. One subprocess per entry point checks the
process-level contract (exit status, stderr) as a user sees it.
"""
from __future__ import annotations

import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fixtures.paths import CIFAR10, PROJECT_ROOT, TRACE_500

pytestmark = pytest.mark.timeout(600)

TRACE_CONFIG = PROJECT_ROOT / "jobs" / "configs" / "trace" / "smollm2-135m_moram_cpu-smoke.yaml"
XTAIL_CONFIG = PROJECT_ROOT / "jobs" / "configs" / "xtail" / "tiny-vit_moram_cpu-smoke.yaml"
TRACE_SPACE = PROJECT_ROOT / "tune_spaces" / "trace.yaml"
STUDY_GRID = PROJECT_ROOT / "studies" / "trace-methods-cpu-smoke.yaml"

# -- the values at the boundaries, by the kind of key (YAML text, as --set takes it) -----------
POSITIVE_INT = ["0", "-1", "1.5", "abc", "[]", "true"]
NON_NEGATIVE_INT = ["-1", "1.5", "abc", "[]", "true"]
POSITIVE_REAL = ["0", "-1", "abc", "[]", ".nan", ".inf"]
NON_NEGATIVE_REAL = ["-1", "abc", "[]", ".nan"]
BOOL = ["abc", "0", "1", "[]", "null"]
NAME = ["''", "[]", "0", "{}"]
CHOICE = ["nope", "0", "[]", "''"]

JOB_KEYS = {
    # run
    "run.name": ["''", "a/b", "..", "[]", "0"], "run.seed": NON_NEGATIVE_INT,
    "run.output_dir": ["''", "s3://bucket/runs", "[]", "0"], "run.storage_path": NAME,
    # model
    "model.source": NAME + ["null"], "model.id": NAME, "model.dtype": CHOICE + ["float16"], "model.cache_dir": NAME,
    # data
    "data.root": NAME + ["null"], "data.tasks": ["[]", "FOMC", "[FOMC, FOMC]", "[1]", "['']", "null"],
    "data.max_train_examples": POSITIVE_INT, "data.max_eval_examples": POSITIVE_INT,
    "data.eval_split": CHOICE + ["train"],
    # trace (the benchmark's own section; the same keys under data: are refused as moved)
    "trace.max_prompt_tokens": POSITIVE_INT + ["null"],
    "trace.long_prompt_tasks": ["[1]", "{FOMC: 0}", "{FOMC: -1}", "{FOMC: abc}", "abc", "{MeetingBnk: 4096}"],
    "trace.max_answer_tokens": POSITIVE_INT,
    # train
    "train.epochs": ["0", "-1", "1.5", "abc", "[]", "[1, 0, 1]", "[1, 2]", "true"],
    "train.max_steps": POSITIVE_INT, "train.lr": POSITIVE_REAL + ["null"], "train.lr_schedule": CHOICE,
    "train.warmup_steps": NON_NEGATIVE_INT, "train.betas": ["[]", "[0.9]", "[0.9, 1.0]", "[-0.1, 0.9]", "abc",
                                                            "[0.9, 0.9, 0.9]"],
    "train.weight_decay": NON_NEGATIVE_REAL, "train.grad_clip": NON_NEGATIVE_REAL,
    "train.global_batch_size": POSITIVE_INT, "train.micro_batch_size": POSITIVE_INT,
    "train.precision": CHOICE + ["fp16"], "train.engine": CHOICE, "train.zero_stage": ["3", "4", "-1", "abc"],
    "train.checkpoint_every_steps": POSITIVE_INT,
    # eval
    "eval.profile": CHOICE, "eval.max_new_tokens": POSITIVE_INT, "eval.batch_size": POSITIVE_INT,
    "eval.baseline": [v for v in BOOL if v != "null"],   # null: the schedule decides (only full has FWT)
    "eval.schedule": CHOICE + ["diagonal"], "eval.evaluator": CHOICE, "eval.share_prefix": BOOL,
    # scaling
    "scaling.num_workers": POSITIVE_INT, "scaling.use_gpu": BOOL, "scaling.cpus_per_worker": POSITIVE_REAL,
    "scaling.gpus_per_worker": NON_NEGATIVE_REAL, "scaling.max_failures": ["-2", "1.5", "abc", "[]"],
    # where things go
    "registry.uri": NAME + ["ftp://host/x", "s3://", "s3://key@bucket/x", "file://host/x"],
    "mlflow.tracking_uri": NAME, "mlflow.experiment": NAME,
    # the method (moram.MoRAMConfig)
    "moram.r": POSITIVE_INT, "moram.k": POSITIVE_INT, "moram.tau": POSITIVE_REAL,
    "moram.delta": ["-0.1", "1.5", "abc", "[]"], "moram.target_modules": ["[]", "''", "0", "[1]"],
    "moram.alpha": ["abc", "[]"], "moram.dropout": ["-0.1", "1", "abc"], "moram.method": CHOICE,
    "moram.prune_mass": ["0", "-0.5", "1.5", "abc"], "moram.collect_stats": ["abc", "[]"],
    "moram.eps": ["0", "-1", "abc"], "moram.seed": NON_NEGATIVE_INT, "moram.moe_top_k": ["0", "-1", "abc"],
    "moram.moe_tau": ["0", "-1", "abc"], "moram.frozen_scale": CHOICE, "moram.route_untrained": ["abc", "[]"],
    "moram.fast_path": CHOICE, "moram.olora_lambda1": ["-1", "abc"], "moram.olora_lambda2": ["-1", "abc"],
    # the top level and whole sections
    "benchmark": CHOICE, "train": ["1", "[]", "abc"], "moram": ["1", "[]"],
}
XTAIL_KEYS = {
    "xtail.pretrained": NAME, "xtail.allow_random_init": BOOL, "xtail.model_config": ["[1]", "abc", "1"],
    "xtail.shots": POSITIVE_INT, "xtail.split_seed": NON_NEGATIVE_INT, "xtail.split_dir": NAME,
    "xtail.domain_sources": ["[]", "{MNIST: ''}", "{NoSuchDomain: /data}", "abc"],
    "xtail.templates": ["[]", "{MNIST: []}", "{MNIST: ['no placeholder']}", "{MNIST: ['{} and {}']}",
                        "{NoSuchDomain: ['a {}']}", "{MNIST: abc}"],
    "xtail.cache_dir": NAME,
    "train.max_steps": ["0", "-1", "abc"], "train.epochs": ["0", "[1]", "abc"],
}
UNKNOWN_KEYS = ["nope", "run.nope", "model.nope", "data.nope", "train.nope", "eval.nope", "scaling.nope",
                "registry.nope", "mlflow.nope", "moram.nope"]

# Keys that are fine alone and refused together: (config, overrides, the key named).
CONFLICTS = [
    (TRACE_CONFIG, ["train.epochs=[1, 1]"], "train.epochs"),                                 # 2 values, 3 tasks
    (TRACE_CONFIG, ["train.epochs=null", "train.max_steps=null"], "train.epochs"),
    (TRACE_CONFIG, ["train.global_batch_size=6"], "train.global_batch_size"),                # 2 x 2 workers
    (TRACE_CONFIG, ["data.max_train_examples=1"], "data.max_train_examples"),                # < 2 workers
    (TRACE_CONFIG, ["train.engine=deepspeed", "train.zero_stage=3"], "train.zero_stage"),
    (TRACE_CONFIG, ["scaling.use_gpu=true", "scaling.gpus_per_worker=0"], "scaling.gpus_per_worker"),
    (TRACE_CONFIG, ["xtail.shots=4"], "xtail"),                                                # another benchmark's
    (XTAIL_CONFIG, ["data.max_train_examples=8"], "data.max_train_examples"),
    (XTAIL_CONFIG, ["model.dtype=bfloat16"], "model.dtype"),
    (XTAIL_CONFIG, ["train.epochs=[1, 1, 1, 1]", "data.tasks=[MNIST, Fashion-MNIST, CIFAR-10, MNIST]"],
     "data.tasks"),
]


def job_cases():
    cases = [(TRACE_CONFIG, key, value) for key, values in JOB_KEYS.items() for value in values]
    cases += [(XTAIL_CONFIG, key, value) for key, values in XTAIL_KEYS.items() for value in values]
    cases += [(TRACE_CONFIG, key, "1") for key in UNKNOWN_KEYS]
    return cases


@pytest.fixture
def no_ray(monkeypatch, tmp_path):
    """A clean folder to work in, and a Ray address nothing listens on (a leak fails fast)."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_refused(code, err: str, named: str, folder: Path, keep: tuple[str, ...] = (), first_line=True) -> None:
    """Exit 2, ``named`` in the message (its first line: the key), no traceback, nothing written."""
    assert code == 2, f"exit {code}: {err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.strip().splitlines() if line.strip()]
    shown = lines[:1] if first_line else lines
    assert any(named in line for line in shown), f"the message does not name {named!r}: {err[-2000:]}"
    left = sorted(p.name for p in folder.iterdir() if p.name not in keep)
    assert left == [], f"written despite the refusal: {left}"
    import ray
    assert not ray.is_initialized()


def moram_cli(*argv: str) -> int:
    from moram_platform.cli import main

    return main(list(argv))


def job_entry(script: str, *argv: str) -> int:
    """``python jobs/<script> ARGV``, in this process."""
    path = PROJECT_ROOT / "jobs" / script
    saved = sys.argv
    sys.argv = [str(path), *argv]
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 1
    finally:
        sys.argv = saved
    return 0


# -- job configs: every key at its boundaries -------------------------------------------------
@pytest.mark.parametrize("config, key, value", job_cases(),
                         ids=[f"{c.parent.name}:{k}={v}" for c, k, v in job_cases()])
def test_every_job_config_key_at_its_boundaries_is_refused_naming_it(no_ray, capsys, config, key, value):
    code = moram_cli("config", "validate", str(config), "--set", f"run.output_dir={no_ray / 'out'}",
                     "--set", f"{key}={value}")
    assert_refused(code, capsys.readouterr().err, f"moram: error: {key}", no_ray)


@pytest.mark.parametrize("config, overrides, key", CONFLICTS, ids=[" ".join(o) for _, o, _ in CONFLICTS])
def test_conflicting_keys_are_refused_naming_one_of_them(no_ray, capsys, config, overrides, key):
    argv = [arg for override in overrides for arg in ("--set", override)]
    code = moram_cli("config", "validate", str(config), "--set", f"run.output_dir={no_ray / 'out'}", *argv)
    assert_refused(code, capsys.readouterr().err, f"moram: error: {key}", no_ray)


def test_a_broken_config_file_is_named(no_ray, capsys):
    for text, message in [("train: [1, 2\n", "not valid YAML"), ("- 1\n- 2\n", "top level must be a mapping")]:
        bad = no_ray / "bad.yaml"
        bad.write_text(text)
        code = moram_cli("config", "validate", str(bad))
        err = capsys.readouterr().err
        assert_refused(code, err, f"config file {bad}", no_ray, keep=("bad.yaml",))
        assert message in err


# -- the job entry points: the same refusal before Ray, as a user sees it ----------------------
@pytest.mark.parametrize("script, config, override, key", [
    ("trace.py", TRACE_CONFIG, "train.global_batch_size=0", "train.global_batch_size"),
    ("trace.py", TRACE_CONFIG, "train.epochs=[1, 1]", "train.epochs"),
    ("xtail.py", XTAIL_CONFIG, "xtail.shots=0", "xtail.shots"),
    ("xtail.py", XTAIL_CONFIG, "xtail.templates={MNIST: ['no placeholder']}", "xtail.templates.MNIST"),
])
def test_the_job_scripts_refuse_before_ray(no_ray, capsys, script, config, override, key):
    code = job_entry(script, "--config", str(config), "--quiet", "--set", f"run.output_dir={no_ray / 'out'}",
                     "--set", override)
    assert_refused(code, capsys.readouterr().err, key, no_ray)


# -- sweep spaces ------------------------------------------------------------------------------
SPACE_CASES = [
    ("params.tau.low=0", "params.tau.low"), ("params.tau.low=-1", "params.tau.low"),
    ("params.tau.low=abc", "params.tau.low"), ("params.tau.high=0.001", "params.tau.high"),
    ("params.tau.space=nope", "params.tau.space"), ("params.tau.values=[1]", "params.tau.values"),
    ("params.k.values=[]", "params.k.values"), ("params.k.values=[2, 2]", "params.k.values"),
    ("params.k.values=[0]", "params.k.values"), ("params.k.values=abc", "params.k.values"),
    ("params.k.low=1", "params.k.low"), ("params.lr.high=.inf", "params.lr.high"),
    ("params.mystery={space: choice, values: [1]}", "params.mystery.key"),
    ("params.tau.key=moram.nope", "params.tau"), ("params.k.key=moram.tau", "params.k.key"),
    ("params={}", "params"), ("params=[]", "params"),
    ("search.algorithm=nope", "search.algorithm"), ("search.num_samples=0", "search.num_samples"),
    ("search.num_samples=-1", "search.num_samples"), ("search.max_concurrent=0", "search.max_concurrent"),
    ("search.seed=-1", "search.seed"), ("search.seed=abc", "search.seed"),
    ("scheduler.name=nope", "scheduler.name"), ("scheduler.grace_period=0", "scheduler.grace_period"),
    ("scheduler.reduction_factor=1", "scheduler.reduction_factor"),
    ("objective.metric=nope", "objective.metric"), ("objective.mode=nope", "objective.mode"),
    ("objective.forgetting_weight=-1", "objective.forgetting_weight"),
    ("objective.mode=min", "objective.forgetting_weight"),
    ("delta_stage.top_trials=0", "delta_stage.top_trials"), ("delta_stage.num_samples=0", "delta_stage.num_samples"),
    ("resources.trial_cpu=0", "resources.trial_cpu"), ("resources.trial_cpu=abc", "resources.trial_cpu"),
    ("trial_overrides={train.lr: -1}", "trial_overrides"),
    ("trial_overrides={moram.tau: 0.1}", "trial_overrides.moram.tau"),
    ("trial_overrides=[]", "trial_overrides"), ("base_config=/no/such.yaml", "base_config"),
    ("nope=1", "nope"), ("search.nope=1", "search.nope"), ("params.tau.nope=1", "params.tau.nope"),
    ("params.k.space=grid", "params.k.space"),
]


@pytest.mark.parametrize("override, key", SPACE_CASES, ids=[o for o, _ in SPACE_CASES])
def test_every_sweep_space_key_at_its_boundaries_is_refused_naming_it(no_ray, capsys, override, key):
    space = no_ray / "space.yaml"
    raw = yaml.safe_load(TRACE_SPACE.read_text())
    raw["base_config"] = str(PROJECT_ROOT / raw["base_config"])
    space.write_text(yaml.safe_dump(raw))
    code = job_entry("tune.py", str(space), "--name", "bad", "--quiet", "--space-set", override,
                     "--set", f"run.output_dir={no_ray / 'out'}", "--set", f"data.root={TRACE_500}")
    assert_refused(code, capsys.readouterr().err, f"error: {key}", no_ray, keep=("space.yaml",))


# -- study grids -------------------------------------------------------------------------------
STUDY_CASES = [
    ({"grid": {}}, "grid"), ({"grid": []}, "grid"), ({"grid": {"moram.method": []}}, "grid.moram.method"),
    ({"grid": {"moram.method": ["nope"]}}, "grid"), ({"grid": {"train.lr": [0.001, -1]}}, "grid"),
    ({"grid": {"train.nope": [1, 2]}}, "grid"), ({"grid": {"run.seed": [0, 0]}}, "grid.run.seed"),
    ({"overrides": {"train.lr": 0}}, "base_config/overrides"), ({"overrides": []}, "overrides"),
    ({"resources": {"trial_cpu": 0}}, "resources.trial_cpu"),
    ({"resources": {"max_concurrent": 0}}, "resources.max_concurrent"),
    ({"resources": {"nope": 1}}, "resources.nope"), ({"nope": 1}, "nope"),
    ({"base_config": "/no/such.yaml"}, "base_config"),
    ({"grid": {"train.epochs": [[1, 1], [1, 1, 1]]}, "overrides": {"data.tasks": ["C-STANCE", "FOMC", "ScienceQA"]}},
     "grid"),
]


@pytest.mark.parametrize("change, key", STUDY_CASES, ids=[json.dumps(c) for c, _ in STUDY_CASES])
def test_every_study_grid_key_at_its_boundaries_is_refused_naming_it(no_ray, capsys, change, key):
    raw = yaml.safe_load(STUDY_GRID.read_text())
    raw["base_config"] = str(PROJECT_ROOT / raw["base_config"])
    raw.update(change)
    grid = no_ray / "grid.yaml"
    grid.write_text(yaml.safe_dump(raw))
    code = job_entry("study.py", str(grid), "--name", "bad", "--quiet", "--set", f"run.output_dir={no_ray / 'out'}",
                     "--set", f"data.root={TRACE_500}")
    assert_refused(code, capsys.readouterr().err, f"error: {key}", no_ray, keep=("grid.yaml",))


# -- data files: TRACE JSON, X-TAIL folders and split files, prompt files ---------------------
GOOD_ROW = {"prompt": "Q:", "answer": "A"}
TRACE_FILES = [
    ("[{\"prompt\": \"Q:\", \"answer\": \"A\"},", "not valid JSON"),
    (json.dumps({"prompt": "Q:", "answer": "A"}), "expected a JSON list"),
    ("[]", "contains no examples"),
    (json.dumps([GOOD_ROW, {"answer": "B"}]), 'row 1: missing "prompt"'),
    (json.dumps([GOOD_ROW, GOOD_ROW, {"prompt": "Q:", "answer": 7}]), 'row 2: "answer" must be a string'),
    (json.dumps([GOOD_ROW, "text"]), "row 1: expected an object"),
]


@pytest.mark.parametrize("content, message", TRACE_FILES, ids=[m for _, m in TRACE_FILES])
def test_a_broken_trace_file_is_named_with_its_row(no_ray, capsys, content, message):
    data = no_ray / "data"
    for task in ("C-STANCE", "FOMC"):
        shutil.copytree(TRACE_500 / task, data / task)
    (data / "FOMC" / "train.json").write_text(content)
    code = job_entry("trace.py", "--config", str(TRACE_CONFIG), "--quiet", "--set", f"run.output_dir={no_ray / 'out'}",
                     "--set", f"data.root={data}", "--set", "data.tasks=[C-STANCE, FOMC]")
    err = capsys.readouterr().err
    assert_refused(code, err, f"{data / 'FOMC' / 'train.json'}: ", no_ray, keep=("data",), first_line=False)
    assert message in err, err


def tiny_domain(root: Path) -> Path:
    """Two CIFAR-10 classes, 4 training and 2 test images each."""
    for split, count in (("train", 4), ("test", 2)):
        for name in ("airplane", "cat"):
            target = root / split / name
            target.mkdir(parents=True)
            for image in sorted((CIFAR10 / split / name).glob("*.jpg"))[:count]:
                shutil.copyfile(image, target / image.name)
    return root


def break_split_file(text: str):
    def damage(root: Path, split_file: Path) -> None:
        split_file.write_text(text)
    return damage


def remove_listed_image(root: Path, split_file: Path) -> None:
    listed = json.loads(split_file.read_text())["classes"]["cat"][0]
    (root / listed).unlink()


def corrupt_image(root: Path, split_file: Path) -> None:
    next((root / "test" / "cat").glob("*.jpg")).write_bytes(b"not a jpeg")


def empty_class(root: Path, split_file: Path) -> None:
    split_file.unlink()
    for image in (root / "train" / "cat").iterdir():
        image.unlink()


def no_test_folder(root: Path, split_file: Path) -> None:
    shutil.rmtree(root / "test")


XTAIL_DAMAGE = [
    (break_split_file("{not json"), "not a split file"),
    (break_split_file('{"classes": {"airplane": 5, "cat": 6}}'), "not a split file"),
    (break_split_file('{"classes": ["airplane", "cat"]}'), "not a split file"),
    (break_split_file('{"classes": {"airplane": []}}'), "its classes do not match"),
    (remove_listed_image, "which no longer exists"),
    (corrupt_image, "cat"),
    (empty_class, "cat"),
    (no_test_folder, "test"),
]


@pytest.mark.parametrize("damage, message", XTAIL_DAMAGE, ids=[m for _, m in XTAIL_DAMAGE])
def test_a_broken_xtail_folder_or_split_file_is_named(no_ray, capsys, damage, message):
    from moram_platform.xtail import load_domain

    data, splits = no_ray / "data", no_ray / "splits"
    root = tiny_domain(data / "CIFAR-10")
    split_file = load_domain("CIFAR-10", root, shots=2, seed=0, split_dir=splits).split_file   # a good split first
    damage(root, split_file)
    code = job_entry("xtail.py", "--config", str(XTAIL_CONFIG), "--quiet", "--set", f"run.output_dir={no_ray / 'out'}",
                     "--set", f"data.root={data}", "--set", "data.tasks=[CIFAR-10]", "--set", "xtail.shots=2",
                     "--set", f"xtail.split_dir={splits}")
    err = capsys.readouterr().err
    assert_refused(code, err, "error: ", no_ray, keep=("data", "splits"))
    assert message in err and ("CIFAR-10" in err or str(split_file) in err), err[-2000:]


PROMPT_FILES = [
    ('{"prompt": "a"}\n{"prompt": \n', ":2: not valid JSON"),
    ('{"prompt": "a"}\n{"text": "b"}\n', ":2: expected a JSON object with a non-empty string 'prompt'"),
    ('{"prompt": ""}\n', ":1: expected a JSON object"),
    ('["a"]\n', ":1: expected a JSON object"),
    ('{"prompt": 7}\n', ":1: expected a JSON object"),
    ("", ": no prompts"),
]


@pytest.mark.parametrize("content, message", PROMPT_FILES, ids=[m for _, m in PROMPT_FILES])
def test_a_broken_prompt_file_is_named_with_its_line(no_ray, capsys, content, message):
    prompts = no_ray / "prompts.jsonl"
    prompts.write_text(content)
    code = moram_cli("generate", "--registry", str(no_ray / "registry"), "--run", "r", "--input", str(prompts),
                     "--output", str(no_ray / "answers.jsonl"))
    err = capsys.readouterr().err
    assert_refused(code, err, f"moram: error: {prompts}{message}", no_ray, keep=("prompts.jsonl",))


# -- as a user sees it: one process per entry point -------------------------------------------
# (jobs/trace.py: tests/test_trace_job_errors.py; moram generate: tests/test_cli.py)
@pytest.mark.parametrize("argv, named", [
    (["jobs/xtail.py", "--config", str(XTAIL_CONFIG), "--set", "xtail.shots=-1"], "xtail.shots"),
    (["jobs/tune.py", str(TRACE_SPACE), "--space-set", "search.num_samples=0"], "search.num_samples"),
], ids=["xtail", "tune"])
def test_a_refusal_is_exit_2_and_one_message_without_traceback(tmp_path, argv, named):
    argv = [str(PROJECT_ROOT / a) if a.startswith("jobs/") else a for a in argv]
    done = subprocess.run([sys.executable, *argv, "--set", f"run.output_dir={tmp_path / 'out'}"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "RAY_ADDRESS": "127.0.0.1:9"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert named in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
