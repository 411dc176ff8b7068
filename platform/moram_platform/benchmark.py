"""What the platform needs from a benchmark (TRACE, X-TAIL): data, model, loss, evaluation.

The sequence driver, the Ray Train workers and the Tune trials are written once against this
protocol; a benchmark plugs in its own data format and task metric.
"""
from __future__ import annotations

from typing import Any, Iterable, Protocol

import torch
from torch import nn

from .config import JobConfig


class Benchmark(Protocol):
    name: str

    def validate(self, config: JobConfig) -> None:
        """Check every task and data file up front; raise a clear error naming what is wrong."""

    def load_model(self, config: JobConfig) -> tuple[nn.Module, Any]:
        """The frozen base model and its processor (tokenizer, image transform...)."""

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


def get_benchmark(name: str) -> Benchmark:
    if name == "trace":
        from .trace.benchmark import TraceBenchmark

        return TraceBenchmark()
    if name == "xtail":
        from .xtail.benchmark import XTailBenchmark

        return XTailBenchmark()
    raise ValueError(f"benchmark: unknown benchmark {name!r}; choose 'trace' or 'xtail'")


def batches(examples: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(examples), size):
        yield examples[start:start + size]
