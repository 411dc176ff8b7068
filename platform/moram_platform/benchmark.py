"""What the platform needs from a benchmark (TRACE, X-TAIL): config rules, data, model, loss,
evaluation and what its summary reports.

The sequence driver, the Ray Train workers and the Tune trials are written once against this
protocol; a benchmark plugs in its own data format, task metric and config section.
``BENCHMARKS`` is the one list of benchmark names (docs/config.md: adding a benchmark).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Iterable, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import JobConfig


@dataclass(frozen=True)
class BenchmarkEntry:
    """Where a benchmark lives, imported only when a config names it (a TRACE job never imports
    open_clip): its ``Benchmark`` class and, if it has one, the model of its own config section
    (the section is named after the benchmark: ``xtail:``), both as ``"module:attribute"``."""

    benchmark: str
    section: str | None = None


BENCHMARKS: dict[str, BenchmarkEntry] = {
    "trace": BenchmarkEntry("moram_platform.trace.benchmark:TraceBenchmark",
                            section="moram_platform.trace.config:TraceSection"),
    "xtail": BenchmarkEntry("moram_platform.xtail.benchmark:XTailBenchmark",
                            section="moram_platform.xtail.config:XTailSection"),
}


class Benchmark(Protocol):
    name: str
    moram_defaults: dict[str, Any]   # moram.* values used when the config leaves them out
    # section -> key -> value, for the keys a config leaves out (data.tasks, data.root, train.epochs...)
    config_defaults: dict[str, dict[str, Any]]
    renamed_keys: dict[str, str]     # old key path -> new one: a config still using the old is refused

    # -- the config, before anything starts ------------------------------------------------------
    def validate_config(self, config: JobConfig) -> list[str]:
        """This benchmark's own config rules: one ``key.path: message, got value`` line per broken
        rule (empty: fine). Cheap: no data or model is read (``validate`` does that)."""

    def eval_profile(self, config: JobConfig) -> str:
        """The evaluation profile scores are recorded (and found again) under in the registry."""

    def summary(self, matrix: list[list[float]], baseline: list[float] | None,
                tasks: list[str]) -> dict[str, float]:
        """The sequence's metrics (DESIGN.md, Metrics) under names that say which variant each is."""

    # -- what reports, comparisons and the moram command need (report.py, runs.py, cli/) --------------
    summary_columns: tuple[str, ...]   # the names ``summary`` reports, in the order a table shows them
    eval_profiles: tuple[str, ...]     # the evaluation profiles it defines, its default first
    data_error: type[ValueError]       # what its data checks raise (a bad task folder, file or row)

    @classmethod
    def paper_setting(cls, tasks: list[str]) -> str | None:
        """The setting of the paper anchors (data/paper_anchors.csv) a task list belongs to, if
        any: published numbers are comparable only there."""

    # -- data and model -------------------------------------------------------------------------
    def validate(self, config: JobConfig) -> None:
        """Check every task and data file up front; raise a clear error naming what is wrong."""

    def load_model(self, config: JobConfig) -> tuple[nn.Module, Any]:
        """The frozen base model and its processor (tokenizer, image transform...)."""

    def empty_model(self, config: JobConfig) -> nn.Module:
        """The model ``load_model`` returns, built on the meta device by the same loader: its
        structure and dtypes, no weights (``moram_platform.preflight`` checks it before Ray starts)."""

    def model_ref(self, config: JobConfig) -> tuple[str, str | None]:
        """(model id, revision/content hash) recorded in the registry."""

    def train_examples(self, config: JobConfig, task: str) -> list[Any]:
        """The task's training examples, in a fixed order."""

    def collate(self, config: JobConfig, processor: Any, task: str, examples: list[Any]) -> dict[str, torch.Tensor]:
        """One training micro-batch."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of a micro-batch."""

    def evaluate(self, config: JobConfig, model: nn.Module, processor: Any, task: str,
                 progress: bool = True) -> dict[str, Any]:
        """{"task", "metric", "score" (0-100), "n", "profile"} on the task's evaluation split."""


def _entry(name: str) -> BenchmarkEntry:
    if name not in BENCHMARKS:
        raise ValueError(f"benchmark: unknown benchmark {name!r}; choose one of {list(BENCHMARKS)}")
    return BENCHMARKS[name]


def _import(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


@cache
def benchmark_class(name: str) -> type:
    return _import(_entry(name).benchmark)


def get_benchmark(name: str) -> Benchmark:
    """A new instance of the benchmark ``name`` (instances cache data and text features)."""
    return benchmark_class(name)()


def section_model(name: str) -> type | None:
    """The model of benchmark ``name``'s own config section (named after it), if it has one."""
    entry = _entry(name)
    return _import(entry.section) if entry.section else None


def paper_setting(tasks: list[str], benchmark: str | None = None) -> str | None:
    """The paper setting of ``tasks`` under ``benchmark`` (None: the first benchmark that has one)."""
    names = [benchmark] if benchmark else list(BENCHMARKS)
    return next((found for name in names if (found := benchmark_class(name).paper_setting(list(tasks)))), None)


def summary_columns(benchmarks: Iterable[str]) -> list[str]:
    """The summary columns of ``benchmarks``, each benchmark's in its own order, once each."""
    return list(dict.fromkeys(column for name in benchmarks for column in benchmark_class(name).summary_columns))


def summary_from(values: dict[str, float], names: dict[str, str]) -> dict[str, float]:
    """``moram.metrics.summarize`` output renamed: ``names`` maps its keys to the reported names."""
    return {name: values[key] for key, name in names.items() if key in values}


def batches(examples: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(examples), size):
        yield examples[start:start + size]
