"""A whole X-TAIL sequence in one process: the zero-shot row, then per domain begin_task ->
train_domain -> end_task -> evaluate_domains on every domain. The reference composition of the
building blocks; distributed jobs arrange the same calls around their own storage."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from moram import MoRAMModel

from .data import Domain
from .evaluate import evaluate_domains
from .train import XTailSettings, train_domain

logger = logging.getLogger(__name__)


@dataclass
class XTailResult:
    """R[i][j] = accuracy (0-100) on domain j after training domain i, plus the zero-shot row."""

    domains: list[str]
    zero_shot: dict[str, float]
    matrix: list[list[float]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Transfer, Average and Last of the matrix (moram.metrics, DESIGN.md's definitions)."""
        from moram.metrics import xtail_average, xtail_last, xtail_transfer

        return {"transfer": xtail_transfer(self.matrix), "average": xtail_average(self.matrix),
                "last": xtail_last(self.matrix)}


def run_sequence(model: MoRAMModel, domains: Sequence[Domain], settings: XTailSettings, *,
                 tokenizer: Callable, train_transform: Callable, eval_transform: Callable,
                 on_task_end: Callable[[int, Domain, dict[str, float]], None] | None = None) -> XTailResult:
    """Train ``domains`` in order through MoRAM and score every domain after each one.

    ``on_task_end(i, domain, scores)`` runs right after task i is frozen and scored, while
    ``model.export_shard()`` still returns that task's atoms.
    """
    def evaluate() -> dict[str, float]:
        return evaluate_domains(model, domains, tokenizer=tokenizer, transform=eval_transform,
                                batch_size=settings.eval_batch_size, num_workers=settings.num_workers)

    result = XTailResult(domains=[d.name for d in domains], zero_shot=evaluate())
    logger.info("zero-shot: %s", _row(result.zero_shot))
    seen: list[str] = []
    for index, domain in enumerate(domains):
        model.begin_task(domain.name)
        result.training.append(train_domain(model, domain, seen, settings, tokenizer=tokenizer,
                                            transform=train_transform))
        model.end_task()
        scores = evaluate()
        result.matrix.append([scores[name] for name in result.domains])
        logger.info("after task %d (%s): %s", index + 1, domain.name, _row(scores))
        if on_task_end is not None:
            on_task_end(index, domain, scores)
        seen.extend(domain.classnames)
    return result


def _row(scores: dict[str, float]) -> str:
    return ", ".join(f"{name} {score:.2f}" for name, score in scores.items())
