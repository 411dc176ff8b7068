"""Every config error names its field and the allowed range."""
import pytest

from moram import MoRAMConfig, MoRAMConfigError


@pytest.mark.parametrize("changes, message", [
    ({"k": 0}, "k: must be an integer >= 1"),
    ({"r": 0}, "r: must be an integer >= 1"),
    ({"r": 2.5}, "r: must be an integer >= 1"),
    ({"tau": 0}, "tau: must be > 0"),
    ({"tau": -0.1}, "tau: must be > 0"),
    ({"delta": 1.5}, r"delta: must be in \[0, 1\]"),
    ({"delta": -0.01}, r"delta: must be in \[0, 1\]"),
    ({"prune_mass": 0.0}, r"prune_mass: must be in \(0, 1\]"),
    ({"prune_mass": 1.01}, r"prune_mass: must be in \(0, 1\]"),
    ({"method": "lora"}, r"method: unknown method 'lora'; choose one of \['moram', 'seqlora', 'inclora', 'moelora', 'olora'\]"),
    ({"dropout": 1.0}, r"dropout: must be in \[0, 1\)"),
    ({"alpha": 0}, "alpha: must be > 0"),
    ({"target_modules": []}, "target_modules: must be a non-empty list"),
])
def test_invalid_values_are_named(changes, message):
    with pytest.raises(MoRAMConfigError, match=message):
        MoRAMConfig(**changes)


def test_unknown_key_is_named():
    with pytest.raises(MoRAMConfigError, match="temperature: unknown MoRAM config key"):
        MoRAMConfig.from_dict({"temperature": 0.1})


def test_defaults_are_the_reference_trace_settings_and_round_trip():
    config = MoRAMConfig()
    assert (config.r, config.k, config.tau, config.delta, config.dropout) == (8, 8, 0.03, 0.2, 0.1)
    assert config.alpha == 16 and config.scale == 2.0 and config.prune_mass is None
    assert MoRAMConfig.from_dict(config.to_dict()) == config


# -- job configs (moram_platform.config) --------------------------------------------------------

import torch  # noqa: E402
from torch import nn  # noqa: E402

from moram import get_moram_model  # noqa: E402
from moram_platform.benchmark import BENCHMARKS  # noqa: E402
from moram_platform.config import ConfigError, config_from_dict, load_config  # noqa: E402
from moram_platform.config_reference import COMMAND, reference  # noqa: E402
from fixtures.paths import PROJECT_ROOT  # noqa: E402

TWO_TASKS = {"data": {"tasks": ["C-STANCE", "FOMC"]}, "train": {"epochs": [1, 2]}}

# (raw config, the key the first error line names): every key at its boundaries
XTAIL_ROOT = {"root": "/data/xtail"}
BAD_JOB_CONFIGS = [
    ({"benchmark": "glue"}, "benchmark"),
    ({"benchmark": None}, "benchmark"),
    ({"run": {"name": "a/b"}}, "run.name"),
    ({"run": {"name": ""}}, "run.name"),
    ({"run": {"seed": -1}}, "run.seed"),
    ({"run": {"seed": 1.5}}, "run.seed"),
    ({"run": {"output_dir": "s3://bucket/runs"}}, "run.output_dir"),
    ({"run": {"colour": "red"}}, "run.colour"),
    ({"run": "fast"}, "run"),
    ({"model": {"dtype": "float16"}}, "model.dtype"),
    ({"model": {"source": ""}}, "model.source"),
    ({"data": {"tasks": []}}, "data.tasks"),
    ({"data": {"tasks": ["FOMC", "FOMC"]}, "train": {"epochs": 1}}, "data.tasks"),
    ({"data": {"tasks": "FOMC"}}, "data.tasks"),
    ({"data": {"max_train_examples": 0}}, "data.max_train_examples"),
    ({"data": {"max_train_examples": 1}, "scaling": {"num_workers": 2}, "train": {"global_batch_size": 8}},
     "data.max_train_examples"),                                         # a worker with no examples
    ({"data": {"max_eval_examples": 0}}, "data.max_eval_examples"),
    ({"data": {"max_eval_examples": -3}}, "data.max_eval_examples"),
    ({"data": {"eval_split": "train"}}, "data.eval_split"),
    ({"trace": {"max_prompt_tokens": 0}}, "trace.max_prompt_tokens"),
    ({"trace": {"max_answer_tokens": 0}}, "trace.max_answer_tokens"),
    ({"trace": {"long_prompt_tasks": {"MeetingBank": 0}}}, "trace.long_prompt_tasks.MeetingBank"),
    ({**TWO_TASKS, "train": {"epochs": [1]}}, "train.epochs"),            # shorter than data.tasks
    ({"train": {"epochs": 0}}, "train.epochs"),
    ({"train": {"epochs": []}}, "train.epochs"),
    ({"train": {"epochs": None}}, "train.epochs"),                       # null needs max_steps
    ({"train": {"epochs": "two"}}, "train.epochs"),
    ({"train": {"max_steps": 0}}, "train.max_steps"),
    ({"train": {"lr": 0}}, "train.lr"),
    ({"train": {"lr": -1e-3}}, "train.lr"),
    ({"train": {"lr": ".nan"}}, "train.lr"),
    ({"train": {"lr": True}}, "train.lr"),
    ({"train": {"lr_schedule": "linear"}}, "train.lr_schedule"),
    ({"train": {"warmup_steps": -1}}, "train.warmup_steps"),
    ({"train": {"betas": [0.9]}}, "train.betas"),
    ({"train": {"betas": [0.9, 1.0]}}, "train.betas"),
    ({"train": {"weight_decay": -0.1}}, "train.weight_decay"),
    ({"train": {"grad_clip": -1}}, "train.grad_clip"),
    ({"train": {"global_batch_size": 0}}, "train.global_batch_size"),   # was a ZeroDivisionError in training
    ({"train": {"global_batch_size": 30}}, "train.global_batch_size"),  # not a multiple of 4 x 1
    ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size"),
    ({"train": {"precision": "fp16"}}, "train.precision"),
    ({"train": {"engine": "fsdp"}}, "train.engine"),
    ({"train": {"zero_stage": 4}}, "train.zero_stage"),
    ({"train": {"zero_stage": 3}}, "train.zero_stage"),                   # ZeRO-3 with deepspeed
    ({"train": {"checkpoint_every_steps": 0}}, "train.checkpoint_every_steps"),
    ({"train": {"optimizer": "sgd"}}, "train.optimizer"),
    ({"eval": {"profile": "no-such-profile"}}, "eval.profile"),
    ({"eval": {"max_new_tokens": 0}}, "eval.max_new_tokens"),
    ({"eval": {"batch_size": 0}}, "eval.batch_size"),
    ({"eval": {"baseline": "yes"}}, "eval.baseline"),
    ({"scaling": {"num_workers": 0}}, "scaling.num_workers"),
    ({"scaling": {"num_workers": "many"}}, "scaling.num_workers"),
    ({"scaling": {"cpus_per_worker": 0}}, "scaling.cpus_per_worker"),
    ({"scaling": {"gpus_per_worker": -1}}, "scaling.gpus_per_worker"),
    ({"scaling": {"use_gpu": True, "gpus_per_worker": 0}}, "scaling.gpus_per_worker"),
    ({"scaling": {"max_failures": -2}}, "scaling.max_failures"),
    ({"registry": {"uri": ""}}, "registry.uri"),
    ({"mlflow": {"experiment": ""}}, "mlflow.experiment"),
    ({"moram": {"tau": 0}}, "moram.tau"),
    ({"moram": {"k": 0}}, "moram.k"),
    ({"moram": {"temperature": 1}}, "moram.temperature"),
    ({"xtail": {"shots": 4}}, "xtail"),                                   # another benchmark's section
    ({"benchmark": "xtail", "data": XTAIL_ROOT, "xtail": {"shots": 0}}, "xtail.shots"),
    ({"benchmark": "xtail", "data": XTAIL_ROOT, "xtail": {"split_seed": -1}}, "xtail.split_seed"),
    ({"benchmark": "xtail", "data": XTAIL_ROOT, "xtail": {"templates": {"nope": ["a {}"]}}}, "xtail.templates"),
    ({"benchmark": "xtail", "data": XTAIL_ROOT, "xtail": {"dpi": 3}}, "xtail.dpi"),
    ({"benchmark": "xtail"}, "data.root"),                                # X-TAIL has no default image folder
]


def test_keys_left_out_take_the_benchmarks_defaults():
    # TRACE: the paper's 8 tasks and the official runner's epochs; X-TAIL: its 10 domains in the
    # official order (XTAIL/runner_moram.sh), 500 steps each -- never TRACE's tasks.
    trace = config_from_dict({})
    assert trace.data.tasks[:2] == ["C-STANCE", "FOMC"] and len(trace.data.tasks) == 8
    assert trace.train.epochs == [2, 1, 3, 2, 1, 2, 2, 3]
    xtail = config_from_dict({"benchmark": "xtail", "data": XTAIL_ROOT})
    assert xtail.data.tasks == ["Aircraft", "Caltech101", "DTD", "EuroSAT", "Flowers", "Food", "MNIST", "OxfordPet",
                                "Cars", "SUN397"]
    assert (xtail.train.epochs, xtail.train.max_steps) == (None, 500)
    mine = config_from_dict({"benchmark": "xtail", "data": {**XTAIL_ROOT, "tasks": ["DTD"]}, "train": {"epochs": 2}})
    assert (mine.data.tasks, mine.train.epochs, mine.train.max_steps) == (["DTD"], 2, 500)


@pytest.mark.parametrize("raw, key", BAD_JOB_CONFIGS, ids=[key for _, key in BAD_JOB_CONFIGS])
def test_bad_job_config_values_name_their_key(raw, key):
    with pytest.raises(ConfigError) as error:
        config_from_dict(raw)
    first = str(error.value).splitlines()[0]
    assert first.startswith(f"{key}:"), str(error.value)


def test_every_bad_key_is_reported_at_once_one_line_each():
    with pytest.raises(ConfigError) as error:
        config_from_dict({"train": {"lr": 0, "micro_batch_size": 0}, "eval": {"batch_size": 0}})
    lines = str(error.value).splitlines()
    assert [line.split(":")[0] for line in lines] == ["train.lr", "train.micro_batch_size", "eval.batch_size"]
    assert lines[0] == "train.lr: must be > 0, got 0"


def test_trace_token_budgets_live_in_the_trace_section_and_the_old_keys_are_refused():
    # TRACE's prompt/answer budgets are TRACE's: `trace:` (an X-TAIL config has no such keys);
    # the old data.* names fail with one line per key naming the new place, never a silent default.
    config = config_from_dict({"trace": {"max_prompt_tokens": 96, "long_prompt_tasks": {"FOMC": 128}}})
    assert (config.trace.max_prompt_tokens, config.trace.max_answer_tokens) == (96, 512)
    assert config.trace.long_prompt_tasks == {"FOMC": 128}
    with pytest.raises(ConfigError) as error:
        config_from_dict({"data": {"max_prompt_tokens": 96, "max_answer_tokens": 8}})
    assert str(error.value).splitlines() == [
        "data.max_prompt_tokens: moved to trace.max_prompt_tokens; write it as trace: max_prompt_tokens (its own "
        "section)",
        "data.max_answer_tokens: moved to trace.max_answer_tokens; write it as trace: max_answer_tokens (its own "
        "section)"]
    with pytest.raises(ConfigError, match=r"^data\.long_prompt_tasks: moved to trace\.long_prompt_tasks"):
        load_config(None, ["data.long_prompt_tasks={MeetingBank: 4096}"])
    with pytest.raises(ConfigError, match=r"^data: unknown key max_prompt_tokens|^data\.max_prompt_tokens"):
        config_from_dict({"benchmark": "xtail", "data": {**XTAIL_ROOT, "max_prompt_tokens": 96}})
    with pytest.raises(ConfigError, match=r"^trace: "):
        config_from_dict({"benchmark": "xtail", "data": XTAIL_ROOT, "trace": {"max_prompt_tokens": 96}})


def test_epochs_list_must_cover_every_task():
    with pytest.raises(ConfigError, match=r"^train\.epochs: lists 2 values for the 3 tasks of data\.tasks"):
        config_from_dict({"data": {"tasks": ["C-STANCE", "FOMC", "Py150"]}, "train": {"epochs": [1, 2]}})
    config = config_from_dict({"data": {"tasks": ["C-STANCE", "FOMC"]}, "train": {"epochs": [3, 1, 2]}})
    assert [config.epochs_for(i) for i in range(2)] == [3, 1]    # a longer list is cut to the tasks
    assert config_from_dict({"train": {"epochs": 2}}).epochs_for(5) == 2


def test_zero3_is_refused_with_deepspeed_only():
    with pytest.raises(ConfigError, match="train.zero_stage: ZeRO-3 is not supported"):
        config_from_dict({"train": {"zero_stage": 3}})
    assert config_from_dict({"train": {"zero_stage": 3, "engine": "torch"}}).train.zero_stage == 3


def test_benchmark_names_come_from_the_one_table():
    with pytest.raises(ConfigError, match=r"^benchmark: must be one of \['trace', 'xtail'\]"):
        config_from_dict({"benchmark": "glue"})
    assert sorted(BENCHMARKS) == ["trace", "xtail"]


def test_shipped_job_configs_are_valid_and_round_trip():
    for path in sorted((PROJECT_ROOT / "jobs" / "configs").glob("*/*.yaml")):
        config = load_config(path)
        assert config.benchmark == path.parent.name or path.parent.name not in BENCHMARKS
        assert config_from_dict(config.to_dict()) == config
        assert config_from_dict(config.with_absolute_paths().to_dict()).benchmark == config.benchmark


# -- seeds ------------------------------------------------------------------------------------
class TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(16, 16) for _ in range(4))


def fresh_atoms(raw: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # the same base weights every time: only the atoms' seed may differ
    model = get_moram_model(nn.Sequential(TinyAttention()), load_config_dict(raw).moram_config)
    model.begin_task("first")
    return {name: layer.A.detach().clone() for name, layer in model.moram_layers.items()}


def load_config_dict(raw: dict):
    return config_from_dict(raw)


def test_run_seed_drives_atom_initialisation_unless_moram_seed_is_set():
    assert config_from_dict({"run": {"seed": 7}}).moram_config.seed == 7
    assert config_from_dict({"run": {"seed": 7}, "moram": {"seed": 3}}).moram_config.seed == 3
    seven, seven_again, eight = (fresh_atoms({"run": {"seed": s}}) for s in (7, 7, 8))
    assert seven.keys() == eight.keys() and len(seven) == 4
    assert all(torch.equal(seven[name], seven_again[name]) for name in seven)
    assert all(not torch.equal(seven[name], eight[name]) for name in seven)
    pinned = [fresh_atoms({"run": {"seed": s}, "moram": {"seed": 5}}) for s in (7, 8)]
    assert all(torch.equal(pinned[0][name], pinned[1][name]) for name in seven)


# -- the key reference ----------------------------------------------------------------------------
def test_docs_config_md_is_the_generated_reference():
    committed = (PROJECT_ROOT / "docs" / "config.md").read_text()
    assert committed == reference(), f"docs/config.md is out of date: regenerate it with {COMMAND}"


def test_every_key_has_a_description():
    text = reference()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) > 50 and all(not line.rstrip().endswith("|  |") for line in rows)
    for key in ("train.epochs", "run.seed", "xtail.shots", "xtail.model_config", "eval.profile", "moram"):
        assert f"| `{key}` |" in text


# -- what each benchmark reports (hand-computed from a 2-task matrix) ------------------------------
MATRIX_2 = [[60.0, 10.0],    # after task A: A 60, B (not yet trained) 10
            [50.0, 70.0]]    # after task B: A forgot 10, B 70
BASELINE_2 = [5.0, 8.0]


def test_trace_summary_names_each_variant():
    from moram_platform.benchmark import get_benchmark

    summary = get_benchmark("trace").summary(MATRIX_2, BASELINE_2, ["A", "B"])
    assert summary == pytest.approx({"OP": 60.0, "BWT_signed": -10.0, "BWT_eq10": 10.0,
                                     "reference_forgetting_magnitude": 5.0,   # (10 + 0) / 2 tasks
                                     "FWT": 2.0})                             # R[A][B] - b_B = 10 - 8


def test_xtail_summary_has_transfer_average_last_and_per_domain_values():
    from moram_platform.benchmark import get_benchmark

    summary = get_benchmark("xtail").summary(MATRIX_2, BASELINE_2, ["A", "B"])
    assert summary == pytest.approx({"transfer": 10.0, "average": 47.5, "last": 60.0, "OP": 60.0,
                                     "BWT_signed": -10.0, "BWT_eq10": 10.0,
                                     "transfer/B": 10.0, "average/A": 55.0, "average/B": 40.0,
                                     "last/A": 50.0, "last/B": 70.0})


def test_eval_profile_is_the_benchmarks():
    from moram_platform.benchmark import get_benchmark
    from moram_platform.trace.evaluate import PROFILES

    trace = get_benchmark("trace")
    assert trace.eval_profile(config_from_dict({})) == next(iter(PROFILES))
    named = list(PROFILES)[-1]
    assert trace.eval_profile(config_from_dict({"eval": {"profile": named}})) == named
    xtail = config_from_dict({"benchmark": "xtail", "data": XTAIL_ROOT})
    assert get_benchmark("xtail").eval_profile(xtail) == "xtail-union"


def test_cluster_storage_goes_to_run_storage_path_not_output_dir():
    """Ray Train's shared checkpoint storage is its own key; the run folder stays local."""
    config = config_from_dict({"run": {"storage_path": "s3://moram/runs", "output_dir": "out"}}).with_absolute_paths()
    assert config.run.storage_path == "s3://moram/runs"
    assert "://" not in config.run.output_dir
    with pytest.raises(ConfigError, match=r"run.output_dir: must be a local folder.*run.storage_path=s3://"):
        config_from_dict({"run": {"output_dir": "s3://moram/runs"}})
