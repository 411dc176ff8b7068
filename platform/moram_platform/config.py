"""Job configs: YAML data, validated whole before any work starts.

A config is nested sections of typed fields. Every error names the key at fault with its full
path (``train.lr: must be > 0, got -1``). CLI overrides use the same paths:
``--set train.lr=1e-3 --set data.tasks='[C-STANCE, FOMC]'`` (values are parsed as YAML).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moram import MoRAMConfig, MoRAMConfigError


class ConfigError(ValueError):
    """A job config is invalid; the message starts with the key path at fault."""


# moram.* keys a benchmark fills in when the config leaves them out (moram's own defaults are
# LLM attention projections). X-TAIL: both CLIP towers' q, k, v, out and MLP c_fc, c_proj.
BENCHMARK_MORAM_DEFAULTS: dict[str, dict[str, Any]] = {
    "xtail": {"target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"]},
}


# -- sections --------------------------------------------------------------------------------
@dataclass
class RunSection:
    name: str | None = None          # the run id: registry namespace, Ray storage name, MLflow parent
    seed: int = 42
    output_dir: str = "moram_runs"   # embedded defaults live here (registry, MLflow db, Ray storage)


@dataclass
class ModelSection:
    source: str = "smollm2"          # "smollm2" (the packaged SmolLM2-135M), a model folder or a .gguf
    id: str | None = None            # name recorded in the registry (default: derived from source)
    dtype: str = "float32"           # weights of the base model: float32 | bfloat16
    cache_dir: str | None = None     # where GGUF models are dequantised once (default ~/.cache/moram)


@dataclass
class DataSection:
    root: str = "../shared/datasets/TRACE-500"   # local folder or s3://bucket/prefix
    tasks: list[str] = field(default_factory=lambda: ["C-STANCE", "FOMC", "MeetingBank", "Py150",
                                                      "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"])
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    eval_split: str = "test"
    max_prompt_tokens: int = 1024
    long_prompt_tasks: dict[str, int] = field(default_factory=lambda: {"MeetingBank": 4096})
    max_answer_tokens: int = 512


@dataclass
class TrainSection:
    epochs: list[int] | int | None = field(default_factory=lambda: [2, 1, 3, 2, 1, 2, 2, 3])
    max_steps: int | None = None     # cap per task; with epochs: null, exactly this many steps (X-TAIL: 500)
    lr: float = 5e-4
    lr_schedule: str = "constant"    # constant | cosine (decays to 0 over the task's steps)
    warmup_steps: int = 0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    global_batch_size: int = 32
    micro_batch_size: int = 4        # per worker and step; accumulation makes up the global batch
    precision: str = "bf16"          # bf16 | fp32 (bf16 on CPU works but is slow)
    engine: str = "deepspeed"        # deepspeed | torch (plain PyTorch, e.g. a lone GPU box)
    zero_stage: int = 2
    checkpoint_every_steps: int = 50


@dataclass
class EvalSection:
    profile: str = "reference"       # reference | trace (see moram_platform.trace.evaluate)
    max_new_tokens: int = 64
    batch_size: int = 8
    baseline: bool = True            # also evaluate the base model (version 0): the zero-shot row, FWT


@dataclass
class ScalingSection:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    max_failures: int = 2            # a lost worker restarts from the last Ray Train checkpoint


@dataclass
class XTailSection:
    """CLIP / X-TAIL specifics (benchmark: xtail); model.source is the open_clip model name."""

    pretrained: str | None = None            # an open_clip pretrained tag (already cached) or a checkpoint path
    allow_random_init: bool = False          # no pretrained weights: only with this flag, and a warning
    model_config: dict[str, Any] | None = None   # a custom open_clip model config registered as model.source
    shots: int = 16
    split_seed: int = 0
    split_dir: str | None = None             # where few-shot split files are saved (default: next to the data)
    domain_sources: dict[str, str] = field(default_factory=dict)   # domain -> folder or s3:// (default <data.root>/<domain>)
    templates: dict[str, list[str]] = field(default_factory=dict)  # domain -> prompt templates
    cache_dir: str | None = None             # local mirror of s3:// domains


@dataclass
class RegistrySection:
    uri: str | None = None           # default: $MORAM_REGISTRY_URI, else <run.output_dir>/registry


@dataclass
class MlflowSection:
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db
    experiment: str | None = None    # default: the benchmark name


@dataclass
class JobConfig:
    benchmark: str = "trace"
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    moram: dict[str, Any] = field(default_factory=dict)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    registry: RegistrySection = field(default_factory=RegistrySection)
    mlflow: MlflowSection = field(default_factory=MlflowSection)
    xtail: XTailSection = field(default_factory=XTailSection)

    # -- derived ---------------------------------------------------------------------------
    @property
    def moram_config(self) -> MoRAMConfig:
        return MoRAMConfig.from_dict({**BENCHMARK_MORAM_DEFAULTS.get(self.benchmark, {}), **self.moram})

    def epochs_for(self, task_index: int) -> int | None:
        """Epochs of task ``task_index``; None: as many as ``train.max_steps`` needs."""
        epochs = self.train.epochs
        if epochs is None or isinstance(epochs, int):
            return epochs
        return epochs[task_index % len(epochs)]

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
        return dataclasses.asdict(self)

    def with_absolute_paths(self) -> "JobConfig":
        """Relative local paths resolved against this process's working directory, so that Ray
        workers (which run elsewhere) read the same files. URIs and model aliases are kept."""
        config = copy.deepcopy(self)
        config.data.root = _absolute(config.data.root)
        config.run.output_dir = _absolute(config.run.output_dir)
        config.registry.uri = _absolute(config.registry.uri) if config.registry.uri else config.registry_uri()
        if config.model.cache_dir:
            config.model.cache_dir = _absolute(config.model.cache_dir)
        if Path(config.model.source).expanduser().exists():
            config.model.source = _absolute(config.model.source)
        if config.model.source.startswith("local-dir:"):  # an open_clip model folder
            config.model.source = "local-dir:" + _absolute(config.model.source.removeprefix("local-dir:"))
        xtail = config.xtail
        for key in ("split_dir", "cache_dir"):
            if getattr(xtail, key):
                setattr(xtail, key, _absolute(getattr(xtail, key)))
        if xtail.pretrained and Path(xtail.pretrained).expanduser().exists():  # a file, not a tag
            xtail.pretrained = _absolute(xtail.pretrained)
        xtail.domain_sources = {name: _absolute(source) for name, source in xtail.domain_sources.items()}
        config.mlflow.tracking_uri = config.tracking_uri()
        return config


def _absolute(location: str) -> str:
    if "://" in location:
        return location
    return str(Path(location).expanduser().resolve())


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
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[parts[-1]] = value


def config_from_dict(raw: dict[str, Any]) -> JobConfig:
    config = _build(JobConfig, raw, "")
    validate(config)
    return config


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; known keys here: {sorted(known)}")
    values = {}
    for name, value in raw.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value, f"{prefix}{name}.")
        else:
            values[name] = _check_type(f"{prefix}{name}", value, kind)
    return cls(**values)


def _check_type(key: str, value: Any, kind) -> Any:
    """Accept ``value`` if it fits the annotation ``kind`` (ints may stand for floats)."""
    if isinstance(value, str) and (kind is float or float in typing.get_args(kind)):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if _fits(value, kind):
        if kind is float or float in typing.get_args(kind):
            return float(value) if isinstance(value, int) and not isinstance(value, bool) else value
        return value
    raise ConfigError(f"{key}: expected {_describe(kind)}, got {value!r}")


def _fits(value: Any, kind) -> bool:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_fits(value, arg) for arg in args)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    return isinstance(value, kind)


def _describe(kind) -> str:
    return str(kind).replace("typing.", "").replace("<class '", "").replace("'>", "")


# -- value rules -----------------------------------------------------------------------------
def validate(config: JobConfig) -> None:
    """Range and consistency rules; types were checked while building."""
    rules = [
        ("benchmark", config.benchmark in ("trace", "xtail"), "must be 'trace' or 'xtail'"),
        ("run.name", config.run.name is None or _is_safe_name(config.run.name),
         "must be letters, digits, '.', '_' or '-' (it names storage paths)"),
        ("run.seed", config.run.seed >= 0, "must be >= 0"),
        ("model.dtype", config.model.dtype in ("float32", "bfloat16"), "must be float32 or bfloat16"),
        ("data.tasks", len(config.data.tasks) > 0, "must list at least one task"),
        ("data.tasks", len(set(config.data.tasks)) == len(config.data.tasks), "lists a task twice"),
        ("data.max_train_examples", _positive_or_none(config.data.max_train_examples), "must be >= 1 or null"),
        ("data.max_eval_examples", _positive_or_none(config.data.max_eval_examples), "must be >= 1 or null"),
        ("data.eval_split", config.data.eval_split in ("eval", "test"), "must be 'eval' or 'test'"),
        ("data.max_prompt_tokens", config.data.max_prompt_tokens >= 1, "must be >= 1"),
        ("data.max_answer_tokens", config.data.max_answer_tokens >= 1, "must be >= 1"),
        ("train.epochs", _epochs_ok(config.train.epochs, config.train.max_steps),
         "must be an integer >= 1 or a non-empty list of them (or null with train.max_steps set)"),
        ("train.lr_schedule", config.train.lr_schedule in ("constant", "cosine"), "must be constant or cosine"),
        ("train.warmup_steps", config.train.warmup_steps >= 0, "must be >= 0"),
        ("train.max_steps", _positive_or_none(config.train.max_steps), "must be >= 1 or null"),
        ("train.lr", math.isfinite(config.train.lr) and config.train.lr > 0, "must be > 0"),
        ("train.betas", len(config.train.betas) == 2 and all(0 <= b < 1 for b in config.train.betas),
         "must be two numbers in [0, 1)"),
        ("train.weight_decay", config.train.weight_decay >= 0, "must be >= 0"),
        ("train.grad_clip", config.train.grad_clip >= 0, "must be >= 0 (0 disables clipping)"),
        ("train.micro_batch_size", config.train.micro_batch_size >= 1, "must be >= 1"),
        ("train.global_batch_size",
         config.train.global_batch_size % (config.train.micro_batch_size * config.scaling.num_workers) == 0,
         "must be a multiple of train.micro_batch_size x scaling.num_workers"),
        ("train.precision", config.train.precision in ("bf16", "fp32"), "must be bf16 or fp32"),
        ("train.engine", config.train.engine in ("deepspeed", "torch"), "must be deepspeed or torch"),
        ("train.zero_stage", config.train.zero_stage in (0, 1, 2, 3), "must be 0, 1, 2 or 3"),
        ("train.checkpoint_every_steps", config.train.checkpoint_every_steps >= 1, "must be >= 1"),
        ("eval.profile", config.eval.profile in ("reference", "trace"), "must be 'reference' or 'trace'"),
        ("eval.max_new_tokens", config.eval.max_new_tokens >= 1, "must be >= 1"),
        ("eval.batch_size", config.eval.batch_size >= 1, "must be >= 1"),
        ("scaling.num_workers", config.scaling.num_workers >= 1, "must be >= 1"),
        ("scaling.cpus_per_worker", config.scaling.cpus_per_worker > 0, "must be > 0"),
        ("scaling.gpus_per_worker", config.scaling.gpus_per_worker >= 0, "must be >= 0"),
        ("scaling.max_failures", config.scaling.max_failures >= -1, "must be >= -1 (-1: retry forever)"),
        ("xtail.shots", config.xtail.shots >= 1, "must be >= 1"),
        ("xtail.split_seed", config.xtail.split_seed >= 0, "must be >= 0"),
    ]
    for key, ok, rule in rules:
        if not ok:
            raise ConfigError(f"{key}: {rule}, got {_value_at(config, key)!r}")
    try:
        config.moram_config
    except MoRAMConfigError as error:
        raise ConfigError(f"moram.{error}") from None


def _is_safe_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and all(c.isalnum() or c in "._-" for c in name)


def _positive_or_none(value: int | None) -> bool:
    return value is None or value >= 1


def _epochs_ok(epochs: list[int] | int | None, max_steps: int | None) -> bool:
    if epochs is None:
        return max_steps is not None
    values = [epochs] if isinstance(epochs, int) else epochs
    return bool(values) and all(v >= 1 for v in values)


def _value_at(config: JobConfig, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node
