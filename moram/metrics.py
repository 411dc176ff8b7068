"""Continual-learning metrics from an accuracy matrix.

``R[i][j]`` is the score (0-100) on task ``j`` after training task ``i``, for ``T`` tasks in
training order; ``R`` is square, ``T x T``. Formulas below use 1-indexed tasks like the papers;
the code is 0-indexed. Pure Python: no torch, no numpy needed (numpy rows are accepted).

Backward transfer exists in two sign conventions. ``backward_transfer`` is the standard,
signed one (negative = forgetting). ``reference_forgetting`` is the reference MoRAM repo's
variant, reported as a non-negative magnitude and named so that it is never mistaken for BWT.

Where a metric has no term to average (``T = 1`` for BWT, FWT and X-TAIL Transfer), it is
defined as 0.0: nothing earlier can be forgotten or transferred.

A cell may be ``None``: not evaluated (an evaluation schedule that skips it, e.g. only the
diagonal and the last row). A metric that needs a missing cell raises ``MissingScores``;
``summarize`` leaves such a metric out, so a missing cell is never read as a score of 0.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]

__all__ = [
    "MissingScores",
    "average_performance",
    "backward_transfer",
    "paper_forgetting",
    "forward_transfer",
    "reference_forgetting",
    "summarize",
    "validate_matrix",
    "xtail_average",
    "xtail_last",
    "xtail_per_domain",
    "xtail_transfer",
]


class MissingScores(ValueError):
    """A metric needs a cell of R (or of the baseline) that was not evaluated."""


def _check_score(value, where: str) -> float | None:
    if value is None:
        return None
    # bool is an int subclass; True as a score is always a bug upstream.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}: expected a number in [0, 100], got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value}")
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"{where}: value {value} is outside [0, 100]")
    return value


def _is_row(obj) -> bool:
    is_sequence = isinstance(obj, Sequence) and not isinstance(obj, (str, bytes))
    return is_sequence or hasattr(obj, "tolist")


def validate_matrix(R: Matrix) -> list[list[float]]:
    """Check that ``R`` is a square ``T x T`` matrix (T >= 1) of finite scores in [0, 100].

    Returns the matrix as a list of lists of floats. Raises ``ValueError`` naming the
    offending row/column.
    """
    if hasattr(R, "tolist"):  # numpy array
        R = R.tolist()
    if not _is_row(R):
        raise ValueError(f"R: expected a list of rows, got {type(R).__name__}")
    T = len(R)
    if T == 0:
        raise ValueError("R: needs at least one row (T >= 1)")
    rows = []
    for i, row in enumerate(R):
        if hasattr(row, "tolist"):
            row = row.tolist()
        if not _is_row(row):
            raise ValueError(f"R row {i}: expected a list of {T} scores, got {type(row).__name__}")
        if len(row) != T:
            raise ValueError(f"R row {i}: has {len(row)} entries, but R must be square ({T} x {T})")
        rows.append([_check_score(v, f"R row {i}, column {j}") for j, v in enumerate(row)])
    return rows


def _validate_baseline(baseline: Sequence[float], T: int) -> list[float]:
    if hasattr(baseline, "tolist"):
        baseline = baseline.tolist()
    if not _is_row(baseline):
        raise ValueError(f"baseline: expected a list of {T} scores, got {type(baseline).__name__}")
    if len(baseline) != T:
        raise ValueError(f"baseline: has {len(baseline)} entries, expected one per task ({T})")
    return [_check_score(v, f"baseline column {j}") for j, v in enumerate(baseline)]


def _get(R: list[list[float | None]], i: int, j: int) -> float:
    """R[i][j], which this metric needs: MissingScores when it was not evaluated."""
    value = R[i][j]
    if value is None:
        raise MissingScores(f"R row {i}, column {j} was not evaluated")
    return value


def _mean(values: Sequence[float | None]) -> float:
    if any(v is None for v in values):
        raise MissingScores("a score this metric needs was not evaluated")
    return math.fsum(values) / len(values)


def average_performance(R: Matrix) -> float:
    """OP = (1/T) Σ_j R[T][j]: mean score over all tasks after training the last one."""
    R = validate_matrix(R)
    return _mean(R[-1])


def backward_transfer(R: Matrix) -> float:
    """BWT (signed, standard) = 1/(T-1) Σ_{j<T} (R[T][j] - R[j][j]).

    Negative means forgetting; forgetting is its negation. ``T = 1`` gives 0.0.
    """
    R = validate_matrix(R)
    T = len(R)
    if T == 1:
        return 0.0
    return _mean([_get(R, -1, j) - _get(R, j, j) for j in range(T - 1)])


def paper_forgetting(R: Matrix) -> float:
    """The MoRAM paper's Eq. 10 "BWT", forgetting-positive (lower is better):
    1/(T-1) Σ_{j<T} (R[j][j] - R[T][j]) = -backward_transfer(R). The number in the paper's
    tables; reported as ``BWT_eq10``. ``T = 1`` gives 0.0."""
    R = validate_matrix(R)
    T = len(R)
    if T == 1:
        return 0.0
    return _mean([_get(R, j, j) - _get(R, -1, j) for j in range(T - 1)])


def reference_forgetting(R: Matrix) -> float:
    """The reference MoRAM repo's forgetting, as a non-negative magnitude.

    ``-(1/T) Σ_j min(R[T][j] - R[j][j], 0)`` over all ``T`` tasks (the last term is always 0).
    Unlike BWT it ignores gains (positive backward transfer) and divides by ``T``, not ``T-1``.
    """
    R = validate_matrix(R)
    # max(R[j][j] - R[T][j], 0) == -min(R[T][j] - R[j][j], 0), without producing -0.0.
    return _mean([max(_get(R, j, j) - _get(R, -1, j), 0.0) for j in range(len(R))])


def forward_transfer(R: Matrix, baseline: Sequence[float]) -> float:
    """FWT = 1/(T-1) Σ_{j>=2} (R[j-1][j] - b_j).

    ``baseline`` (b) holds each task's zero-shot score, i.e. of the initial model before any
    continual training. ``T = 1`` gives 0.0.
    """
    R = validate_matrix(R)
    b = _validate_baseline(baseline, len(R))
    T = len(R)
    if T == 1:
        return 0.0
    return _mean([_get(R, j - 1, j) - _get([b], 0, j) for j in range(1, T)])


def xtail_transfer(R: Matrix) -> float:
    """X-TAIL Transfer = mean over columns j > 1 of mean_{i<j} R[i][j].

    The scores on each task before it was trained (the strict upper triangle), averaged per
    task first. A score of 0.0 is a real score and counts. ``T = 1`` gives 0.0.
    """
    R = validate_matrix(R)
    T = len(R)
    if T == 1:
        return 0.0
    return _mean([_mean([R[i][j] for i in range(j)]) for j in range(1, T)])


def xtail_average(R: Matrix) -> float:
    """X-TAIL Average = mean of all T*T entries of R (0.0 entries count)."""
    R = validate_matrix(R)
    return _mean([v for row in R for v in row])


def xtail_last(R: Matrix) -> float:
    """X-TAIL Last = mean of the final row of R (the same number as OP)."""
    R = validate_matrix(R)
    return _mean(R[-1])


def xtail_per_domain(R: Matrix, tasks: Sequence[str]) -> dict[str, float]:
    """X-TAIL's metrics per domain j, before the mean over domains (DESIGN.md, Metrics):
    ``transfer/<j>`` = mean_{i<j} R[i][j] (none for the first domain), ``average/<j>`` =
    mean_i R[i][j], ``last/<j>`` = R[T][j]."""
    R = validate_matrix(R)
    if len(tasks) != len(R):
        raise ValueError(f"tasks: {len(tasks)} names for a {len(R)}x{len(R)} matrix")
    values: dict[str, float] = {}
    for j, task in enumerate(tasks):
        column = [row[j] for row in R]
        if j > 0 and None not in column[:j]:
            values[f"transfer/{task}"] = _mean(column[:j])
        if None not in column:
            values[f"average/{task}"] = _mean(column)
        if column[-1] is not None:
            values[f"last/{task}"] = column[-1]
    return values


def summarize(R: Matrix, baseline: Sequence[float] | None = None) -> dict[str, float]:
    """All metrics of ``R`` in one dict, under names that say which variant each is.

    Keys: ``T``, ``OP``, ``BWT_signed`` (standard, negative = forgetting), ``BWT_eq10`` (the
    paper's Eq. 10, forgetting-positive), ``reference_forgetting_magnitude``,
    ``xtail_transfer``, ``xtail_average``, ``xtail_last``, and ``FWT`` when ``baseline``
    is given. A metric whose cells were not all evaluated (``None``) is absent.
    """
    R = validate_matrix(R)
    metrics = {
        "OP": average_performance,
        "BWT_signed": backward_transfer,
        "BWT_eq10": paper_forgetting,
        "reference_forgetting_magnitude": reference_forgetting,
        "xtail_transfer": xtail_transfer,
        "xtail_average": xtail_average,
        "xtail_last": xtail_last,
    }
    if baseline is not None:
        metrics["FWT"] = lambda R: forward_transfer(R, baseline)
    summary: dict[str, float] = {"T": len(R)}
    for name, metric in metrics.items():
        try:
            summary[name] = metric(R)
        except MissingScores:
            continue
    return summary
