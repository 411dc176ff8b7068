"""Which cells of the accuracy matrix a sequence evaluates (``eval.schedule``).

    full   every version on every task, and the zero-shot row (version 0): every metric, FWT and
           X-TAIL Transfer/Average included; T(T+1) task evaluations (+T for the zero-shot row)
    seen   each version on the tasks trained so far (the lower triangle, diagonal included): what
           the official TRACE runner evaluates after each round (Artificer-AI-Lab/MoRAM
           TRACE/inference/infer_multi_command.py:291, ``for inference_task_id in
           range(round + 1)``); OP and BWT after every task (learning curves, Tune's schedulers),
           no FWT; T(T+1)/2 evaluations
    final  the diagonal and the last row: exactly what OP and the Eq.-10 BWT read; 2T-1 evaluations

A cell a schedule skips is ``None`` in the matrix and every metric that reads it is absent
(``moram.metrics.MissingScores``), never 0.
"""
from __future__ import annotations

SCHEDULES = ("full", "seen", "final")

# The summary metrics each schedule can compute (the benchmark's summary names, report columns
# and Tune objective names); a metric listed in no schedule below `full` needs `full`.
_WITHOUT_UPPER_TRIANGLE = {"OP", "BWT_signed", "BWT_eq10", "reference_forgetting_magnitude", "xtail_last",
                           "forgetting_ref", "own_routing", "op", "bwt", "forgetting", "forgetting_magnitude"}
KNOWN_METRICS = _WITHOUT_UPPER_TRIANGLE | {"FWT", "xtail_transfer", "xtail_average"}
GIVES = {"final": _WITHOUT_UPPER_TRIANGLE, "seen": _WITHOUT_UPPER_TRIANGLE, "full": None}   # None: all
CHEAPEST_FIRST = ("final", "seen", "full")


def tasks_after(schedule: str, tasks: list[str], index: int) -> list[str]:
    """The tasks version ``index + 1`` (trained on tasks[0..index]) is scored on."""
    last = index == len(tasks) - 1
    if schedule == "full" or last:
        return list(tasks)
    if schedule == "seen":
        return list(tasks[: index + 1])
    if schedule == "final":
        return [tasks[index]]
    raise ValueError(f"eval.schedule: must be one of {list(SCHEDULES)}, got {schedule!r}")


def baseline_wanted(schedule: str, baseline: bool | None) -> bool:
    """Whether the zero-shot row is evaluated: ``eval.baseline`` when set, else only under
    ``full`` (its one use is FWT, which reads the upper triangle too)."""
    return schedule == "full" if baseline is None else baseline


def gives(schedule: str, metric: str) -> bool:
    allowed = GIVES[schedule]
    return allowed is None or metric in allowed


def cheapest_for(metrics: list[str] | tuple[str, ...]) -> str:
    """The cheapest schedule that computes every metric of ``metrics``."""
    return next(s for s in CHEAPEST_FIRST if all(gives(s, m) for m in metrics))


def check_gives(schedule: str, metrics: list[str] | tuple[str, ...], wanted_by: str) -> None:
    """A ValueError naming ``eval.schedule`` when ``wanted_by`` asks for a metric it cannot compute."""
    missing = [m for m in metrics if not gives(schedule, m)]
    if missing:
        raise ValueError(f"eval.schedule: {schedule!r} cannot compute {', '.join(missing)}, needed by {wanted_by}; "
                         f"use {cheapest_for(metrics)!r}")
