"""Job configs: YAML data, validated whole before any work starts.

A config is nested sections of typed fields (pydantic models; unknown keys are errors). Every
error names the key at fault with its full path (``train.lr: must be > 0, got -1``), one line
per bad key. CLI overrides use the same paths:
``--set train.lr=1e-3 --set data.tasks='[C-STANCE, FOMC]'`` (values are parsed as YAML).

The sections are the platform's own (below) plus one per benchmark that declares one
(``moram_platform.benchmark.BENCHMARKS``). docs/config.md lists every key; it is generated
from these models (``moram_platform.config_reference``).
"""
from __future__ import annotations

import copy
import os
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import pydantic
import yaml
from pydantic import Field

from moram import MoRAMConfig, MoRAMConfigError
from moram.validation import error_lines

from .benchmark import BENCHMARKS, benchmark_class, section_model
from .names import name_problem
from .sections import (AtLeastOne, AtLeastZero, Bool, Int, NonEmptyStr, OneOrNone, Real, Section, Str, absolute,
                       first_per_key, one_of, rule)


class ConfigError(ValueError):
    """A job config is invalid; each line of the message starts with the key path at fault."""


def _run_name(name: str) -> str:
    problem = name_problem(name)
    if problem is not None:
        raise ValueError(f"{problem} (it names storage paths)")
    return name


# -- sections --------------------------------------------------------------------------------
class RunSection(Section):
    name: Annotated[NonEmptyStr, pydantic.AfterValidator(_run_name)] | None = Field(
        None, description="the run id: registry namespace, Ray storage name, MLflow parent run; rerunning with "
                          "the same name resumes (default: <benchmark>-<model>-<method>-<UTC time>)")
    seed: AtLeastZero = Field(42, description="seeds data order, model initialisation and each task's fresh atoms "
                                              "(moram.seed, unless set explicitly)")
    output_dir: Annotated[NonEmptyStr, rule(lambda v: "://" not in v,
                                            "must be a local folder (the embedded registry, MLflow database and logs "
                                            "live there); for shared storage set run.storage_path=s3://..., "
                                            "registry.uri=s3://... and mlflow.tracking_uri")] = Field(
        "moram_runs", description="local folder of the embedded defaults (registry, MLflow database, logs, Ray "
                                  "storage unless run.storage_path is set)")
    storage_path: NonEmptyStr | None = Field(
        None, description="Ray Train's checkpoint storage, reachable from every node on a cluster: s3://bucket/prefix "
                          "or a shared folder (default <run.output_dir>/ray_train)")


class ModelSection(Section):
    source: NonEmptyStr = Field("smollm2", description="the base model: 'smollm2' (the packaged SmolLM2-135M), a "
                                                       "model folder, a .gguf file or a Hugging Face hub id org/name[@revision] (read from the "
                                                       "local HF cache); X-TAIL: an open_clip model name "
                                                       "or local-dir:<folder>")
    id: NonEmptyStr | None = Field(None, description="name recorded in the registry (default: derived from "
                                                     "model.source)")
    dtype: Annotated[Str, one_of("float32", "bfloat16")] = Field("float32", description="weights of the base "
                                                                                        "model: float32 | bfloat16")
    cache_dir: NonEmptyStr | None = Field(None, description="where GGUF models are dequantised once (default "
                                                            "~/.cache/moram)")


def _unique(values: list) -> bool:
    return len(set(values)) == len(values)


class DataSection(Section):
    # root and tasks left out take the benchmark's `config_defaults` (config_from_dict fills them in).
    root: NonEmptyStr = Field(description="local folder or s3://bucket/prefix holding one folder per task "
                                          "(default: the benchmark's; TRACE: ../shared/datasets/TRACE-500)")
    tasks: Annotated[list[NonEmptyStr], rule(bool, "must list at least one task"),
                     rule(_unique, "lists a task twice")] = Field(
        description="the tasks, in training order (default: the benchmark's: TRACE's 8 tasks, X-TAIL's 10 domains)")
    max_train_examples: OneOrNone | None = Field(None, description="cap on each task's training examples (null: "
                                                                   "all)")
    max_eval_examples: OneOrNone | None = Field(None, description="cap on each task's evaluation examples (null: "
                                                                  "all)")
    eval_split: Annotated[Str, one_of("eval", "test")] = Field("test", description="the split tasks are scored "
                                                                                   "on: eval | test")


def _epochs_value(value: Any) -> Any:
    """One clear message for the union list[int] | int | None."""
    values = value if isinstance(value, list) else [value]
    if value is None:
        return value
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError("must be an integer >= 1 or a non-empty list of them, one per task (or null with "
                         "train.max_steps set)")
    return value


def _betas_ok(betas: list[float]) -> bool:
    return len(betas) == 2 and all(0 <= b < 1 for b in betas)


class TrainSection(Section):
    epochs: Annotated[list[Int] | Int | None, pydantic.BeforeValidator(_epochs_value)] = Field(
        1, description="epochs per task (default: the benchmark's; TRACE: the official runner's per-task "
                       "epochs): one integer for every task, or a list with one per task of data.tasks "
                    "(a longer list is cut to data.tasks, e.g. after --set data.tasks=[first two]; a shorter one "
                    "is an error); null: exactly train.max_steps steps")
    max_steps: OneOrNone | None = Field(None, description="cap on optimizer steps per task; with epochs: null, "
                                                          "exactly this many (X-TAIL: 500)")
    lr: Annotated[Real, rule(lambda v: v > 0, "must be > 0")] = Field(5e-4, description="learning rate (AdamW)")
    lr_schedule: Annotated[Str, one_of("constant", "cosine")] = Field(
        "constant", description="constant | cosine (decays to 0 over the task's steps)")
    warmup_steps: AtLeastZero = Field(0, description="linear warm-up steps at the start of each task")
    betas: Annotated[list[Real], rule(_betas_ok, "must be two numbers in [0, 1)")] = Field(
        default_factory=lambda: [0.9, 0.95], description="AdamW betas")
    weight_decay: Annotated[Real, rule(lambda v: v >= 0, "must be >= 0")] = Field(0.0, description="AdamW weight "
                                                                                                   "decay")
    grad_clip: Annotated[Real, rule(lambda v: v >= 0, "must be >= 0 (0 disables clipping)")] = Field(
        1.0, description="gradient-norm clipping (0 disables it)")
    global_batch_size: AtLeastOne = Field(32, description="examples per optimizer step over all workers; a "
                                                          "multiple of micro_batch_size x scaling.num_workers")
    micro_batch_size: AtLeastOne = Field(4, description="examples per worker and forward pass; gradient "
                                                        "accumulation makes up the global batch")
    precision: Annotated[Str, one_of("bf16", "fp32")] = Field("bf16", description="bf16 | fp32 (bf16 on CPU works "
                                                                                  "but is slow)")
    engine: Annotated[Str, one_of("deepspeed", "torch")] = Field(
        "deepspeed", description="deepspeed | torch (plain PyTorch DDP, e.g. a lone GPU box)")
    zero_stage: Annotated[Int, one_of(0, 1, 2, 3)] = Field(
        2, description="DeepSpeed ZeRO stage: 0, 1 or 2 (ZeRO-3 is refused with the deepspeed engine: it "
                       "partitions the atoms, which a task's export needs whole)")
    checkpoint_every_steps: AtLeastOne = Field(50, description="Ray Train checkpoint interval (optimizer steps)")
    optimizer_across_tasks: Annotated[Str, one_of("fresh", "carry")] = Field(
        "fresh", description="fresh: a new optimizer and schedule per task; carry: continue the previous task's "
                             "Adam moments, step count and schedule, and let its trained master values overwrite "
                             "the fresh atoms at the first step, as the official TRACE code does under ZeRO-2 "
                             "(docs/parity.md M2; needs train.lr_schedule: constant and run.output_dir on a "
                             "filesystem every worker shares)")


class EvalSection(Section):
    profile: NonEmptyStr | None = Field(None, description="the evaluation profile, one the benchmark defines (TRACE: "
                                                          "moram_platform.trace.evaluate.PROFILES); null: the "
                                                          "benchmark's default")
    max_new_tokens: AtLeastOne = Field(512, description="generation budget per answer (the official runners' "
                                                         "--max_ans_len; a batch stops once every row has "
                                                         "produced EOS)")
    batch_size: AtLeastOne = Field(8, description="evaluation batch size (prompts are batched in order of length)")
    schedule: Annotated[Str, one_of("full", "seen", "final")] = Field(
        "full", description="which cells of the accuracy matrix are evaluated: full (every version on every "
                            "task, FWT included), seen (the tasks trained so far, as the official TRACE "
                            "runner), final (the diagonal and the last row: OP and BWT); "
                            "moram_platform.schedule")
    baseline: Bool | None = Field(None, description="also evaluate the base model (version 0): the zero-shot "
                                                    "row, for FWT; null: only with eval.schedule full")
    share_prefix: Bool = Field(True, description="generation runs a batch's common prompt start once and shares its "
                                                 "KV cache (the same answers; not under profiles that ban "
                                                 "repeated n-grams); false: plain left padding")
    evaluator: Annotated[Str, one_of("auto", "actor", "task")] = Field(
        "auto", description="actor: one long-lived Ray actor per sequence loads the base model once and swaps "
                            "each version's atoms in; task: a fresh Ray task (process and model load) per "
                            "evaluated version, holding the workers' GPU share; auto: actor on CPU, task "
                            "with scaling.use_gpu")


class ScalingSection(Section):
    num_workers: AtLeastOne = Field(1, description="Ray Train workers (data parallel)")
    use_gpu: Bool = Field(False, description="one GPU share per worker")
    cpus_per_worker: Annotated[Real, rule(lambda v: v > 0, "must be > 0")] = Field(1.0, description="CPUs each "
                                                                                                    "worker holds")
    gpus_per_worker: Annotated[Real, rule(lambda v: v >= 0, "must be >= 0")] = Field(
        1.0, description="GPUs each worker holds with use_gpu (fractions share a GPU)")
    max_failures: Annotated[Int, rule(lambda v: v >= -1, "must be >= -1 (-1: retry forever)")] = Field(
        2, description="a lost worker restarts from the last Ray Train checkpoint this many times")


def _registry_uri(uri: str) -> str:
    from .registry.storage import check_uri   # imports boto3: only when a URI is given

    try:
        check_uri(uri)
    except ValueError as error:
        raise ValueError(str(error)) from None
    return uri


class RegistrySection(Section):
    uri: Annotated[NonEmptyStr, pydantic.AfterValidator(_registry_uri)] | None = Field(
        None, description="the model registry: a folder or s3://bucket/prefix "
                          "(default: $MORAM_REGISTRY_URI, else <run.output_dir>/registry)")


class MlflowSection(Section):
    tracking_uri: NonEmptyStr | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else "
                                                               "sqlite:///<run.output_dir>/mlflow.db")
    experiment: NonEmptyStr | None = Field(None, description="MLflow experiment (default: the benchmark name)")


class JobConfig(Section):
    """A validated job config (load_config, config_from_dict): the platform's sections; the model
    of a given benchmark adds that benchmark's own section (``config_model``)."""

    benchmark: Annotated[Str, rule(lambda v: v in BENCHMARKS, f"must be one of {list(BENCHMARKS)}")] = Field(
        "trace", description="the benchmark (moram_platform.benchmark.BENCHMARKS)")
    run: RunSection = Field(default_factory=RunSection, description="the run's identity and local storage")
    model: ModelSection = Field(default_factory=ModelSection, description="the frozen base model")
    moram: dict[Str, Any] = Field(
        default_factory=dict, description="MoRAMConfig fields (r, k, tau, delta, target_modules, method, ...); "
                                          "unset ones take the benchmark's defaults, then MoRAMConfig's; "
                                          "moram.seed defaults to run.seed")
    data: DataSection = Field(description="the tasks and their data")
    train: TrainSection = Field(default_factory=TrainSection, description="training of each task's atoms")
    eval: EvalSection = Field(default_factory=EvalSection, description="evaluation after each task")
    scaling: ScalingSection = Field(default_factory=ScalingSection, description="Ray Train workers")
    registry: RegistrySection = Field(default_factory=RegistrySection, description="where versions are stored")
    mlflow: MlflowSection = Field(default_factory=MlflowSection, description="experiment tracking")

    # -- derived ---------------------------------------------------------------------------
    @property
    def moram_config(self) -> MoRAMConfig:
        """moram.* over the benchmark's defaults; the atoms' seed is run.seed unless moram.seed is set."""
        defaults = {**self.benchmark_moram_defaults, "seed": self.run.seed}
        return MoRAMConfig.from_dict({**defaults, **self.moram})

    @property
    def benchmark_moram_defaults(self) -> dict[str, Any]:
        """The moram.* values the benchmark sets where the config leaves them out."""
        return benchmark_class(self.benchmark).moram_defaults

    def epochs_for(self, task_index: int) -> int | None:
        """Epochs of task ``task_index``; None: as many as ``train.max_steps`` needs."""
        epochs = self.train.epochs
        return epochs[task_index] if isinstance(epochs, list) else epochs

    def registry_uri(self) -> str:
        """registry.uri, else $MORAM_REGISTRY_URI, else <run.output_dir>/registry."""
        return self.registry.uri or os.environ.get("MORAM_REGISTRY_URI") or str(
            Path(self.run.output_dir).resolve() / "registry")

    def tracking_uri(self) -> str:
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{Path(self.run.output_dir).resolve() / 'mlflow.db'}"

    def to_dict(self) -> dict[str, Any]:
        """The config as YAML data (config_from_dict reads it back)."""
        return self.model_dump()

    def with_absolute_paths(self) -> "JobConfig":
        """Relative local paths resolved against this process's working directory, so that Ray
        workers (which run elsewhere) read the same files. URIs and model aliases are kept."""
        config = self.model_copy(deep=True)
        config.data.root = absolute(config.data.root)
        config.run.output_dir = absolute(config.run.output_dir)
        if config.run.storage_path:
            config.run.storage_path = absolute(config.run.storage_path)
        config.registry.uri = absolute(config.registry.uri) if config.registry.uri else config.registry_uri()
        if config.model.cache_dir:
            config.model.cache_dir = absolute(config.model.cache_dir)
        if Path(config.model.source).expanduser().exists():
            config.model.source = absolute(config.model.source)
        if config.model.source.startswith("local-dir:"):  # an open_clip model folder
            config.model.source = "local-dir:" + absolute(config.model.source.removeprefix("local-dir:"))
        section = getattr(config, config.benchmark, None)
        if hasattr(section, "resolve_paths"):
            section.resolve_paths()
        config.mlflow.tracking_uri = config.tracking_uri()
        return config


def _section_field(model: type) -> tuple[type, Any]:
    summary = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
    return model, Field(default_factory=model, description=summary)


@cache
def config_model(benchmark: str) -> type[JobConfig]:
    """The job config of ``benchmark``: JobConfig plus the benchmark's own section, if it has
    one. Only that benchmark is imported (a TRACE config never imports open_clip), and another
    benchmark's section is an unknown key."""
    model = section_model(benchmark)
    if model is None:
        return JobConfig
    return pydantic.create_model(f"JobConfig_{benchmark}", __base__=JobConfig, __module__=__name__,
                                 **{benchmark: _section_field(model)})


# -- loading ---------------------------------------------------------------------------------
def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML config (or the defaults), apply ``key.path=value`` overrides, validate."""
    raw = read_yaml_mapping(path, "config file") if path is not None else {}
    for override in overrides or []:
        apply_override(raw, override)
    return config_from_dict(raw)


def read_yaml_mapping(path: str | os.PathLike, what: str, error: type[ValueError] = ConfigError) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; ``error`` names the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as problem:
        raise error(f"{what} {path}: not valid YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise error(f"{what} {path}: the top level must be a mapping")
    return raw


def apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected key.path=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    set_path(raw, key.strip(), value)


def set_path(raw: dict[str, Any], key: str, value: Any, error: type[ValueError] = ConfigError) -> None:
    """``raw[a][b][c] = value`` for ``key`` "a.b.c", making the sections on the way."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise error(f"{key}: {part} is not a section")
    node[parts[-1]] = value


def get_path(raw: dict[str, Any], key: str) -> Any:
    """``raw[a][b][c]`` for ``key`` "a.b.c" (KeyError when a part is missing)."""
    node = raw
    for part in key.split("."):
        node = node[part]
    return node


def config_from_dict(raw: dict[str, Any]) -> JobConfig:
    """Validate YAML data as a job config: types and ranges of every key (all reported at once),
    then the rules that tie keys together, the benchmark's own rules and moram.*."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: must be a mapping, got {raw!r}")
    benchmark = raw.get("benchmark", JobConfig.model_fields["benchmark"].default)
    model = config_model(benchmark) if isinstance(benchmark, str) and benchmark in BENCHMARKS else JobConfig
    if isinstance(benchmark, str) and benchmark in BENCHMARKS:
        moved = _renamed_keys(raw, benchmark_class(benchmark).renamed_keys)
        if moved:
            raise ConfigError("\n".join(moved))
        raw = with_benchmark_defaults(raw, benchmark_class(benchmark).config_defaults)
    try:
        config = model.model_validate(raw)
    except pydantic.ValidationError as error:
        raise ConfigError("\n".join(first_per_key(error_lines(error)))) from None
    problems = _cross_key_problems(config) + benchmark_class(config.benchmark)().validate_config(config)
    try:
        config.moram_config
    except MoRAMConfigError as error:
        problems += [f"moram.{line}" for line in str(error).splitlines()]
    if problems:
        raise ConfigError("\n".join(problems))
    return config


def _renamed_keys(raw: dict[str, Any], renamed: dict[str, str]) -> list[str]:
    """One line per key the config sets under a name the benchmark has moved (old -> new)."""
    lines = []
    for old, new in renamed.items():
        try:
            get_path(raw, old)
        except (KeyError, TypeError):
            continue
        lines.append(f"{old}: moved to {new}; write it as {new.replace('.', ': ', 1)} (its own section)")
    return lines


def with_benchmark_defaults(raw: dict[str, Any], defaults: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``raw`` with the benchmark's values for the keys it leaves out (a section that is not a
    mapping is left for validation to refuse)."""
    raw = dict(raw)
    for section, values in defaults.items():
        given = raw.get(section, {})
        if isinstance(given, dict):
            raw[section] = {**copy.deepcopy(values), **given}
    return raw


def _cross_key_problems(config: JobConfig) -> list[str]:
    """Rules between keys, as ``key: message, got value`` lines."""
    train, tasks, scaling = config.train, config.data.tasks, config.scaling
    problems = []

    def refuse(key: str, message: str, value: Any) -> None:
        problems.append(f"{key}: {message}, got {value!r}")

    if isinstance(train.epochs, list) and len(train.epochs) < len(tasks):  # never reused in a cycle
        refuse("train.epochs", f"lists {len(train.epochs)} values for the {len(tasks)} tasks of data.tasks; give "
                               f"one per task, or one integer for all", train.epochs)
    if train.epochs is None and train.max_steps is None:
        refuse("train.epochs", "null needs train.max_steps (the steps per task)", train.epochs)
    if train.global_batch_size % (train.micro_batch_size * scaling.num_workers):
        refuse("train.global_batch_size", f"must be a multiple of train.micro_batch_size x scaling.num_workers "
                                          f"({train.micro_batch_size} x {scaling.num_workers})",
               train.global_batch_size)
    limit = config.data.max_train_examples
    if limit is not None and limit < scaling.num_workers:  # a worker without examples takes no step
        refuse("data.max_train_examples", f"must be >= scaling.num_workers ({scaling.num_workers}): every worker "
                                          f"trains on its own share", limit)
    if train.engine == "deepspeed" and train.zero_stage == 3:
        refuse("train.zero_stage", "ZeRO-3 is not supported: it partitions each parameter across workers, and "
                                   "committing a task exports its atoms whole from one worker; use 0, 1 or 2",
               train.zero_stage)
    if train.optimizer_across_tasks == "carry" and train.lr_schedule != "constant":
        refuse("train.optimizer_across_tasks", "carry continues one schedule over the whole sequence (the official "
                                               "TRACE code's constant one); it needs train.lr_schedule: constant",
               train.optimizer_across_tasks)
    if scaling.use_gpu and scaling.gpus_per_worker == 0:
        refuse("scaling.gpus_per_worker", "must be > 0 with scaling.use_gpu", scaling.gpus_per_worker)
    return problems
