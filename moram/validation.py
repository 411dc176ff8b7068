"""One error format for every config in the project: ``key.path: message, got value``.

Configs are pydantic v2 models (it reports every bad key at once); users see one line per
bad key, each starting with the key's full dotted path, never a pydantic traceback.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import pydantic


def error_lines(error: pydantic.ValidationError, prefix: str = "") -> list[str]:
    """One ``key.path: message, got value`` line per problem pydantic found."""
    lines = []
    for problem in error.errors(include_url=False):
        path = ".".join(str(part) for part in problem["loc"] if not _is_union_branch(part))
        key = f"{prefix}{path}" if path else (prefix.rstrip(".") or "config")
        message = _message(problem)
        lines.append(f"{key}: {message}{_got(problem)}")
    return lines


# The kinds YAML gives: a bool is not an integer (``true`` is no ``1``), an int stands for a float.
def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_integer(value: Any, minimum: int) -> int:
    """An int (not a bool) >= ``minimum``, else ValueError("must be an integer >= minimum")."""
    if not is_integer(value) or value < minimum:
        raise ValueError(f"must be an integer >= {minimum}")
    return value


def check_real(value: Any, rule: str, ok: Callable[[float], bool]) -> float:
    """A finite number (not a bool) for which ``ok`` holds, else ValueError(rule). ``rule``
    says what the value must be, without the key (``"must be > 0"``): the line names it."""
    if not is_number(value) or not math.isfinite(value) or not ok(value):
        raise ValueError(rule)
    return value


def format_errors(error: pydantic.ValidationError, prefix: str = "") -> str:
    """Every problem of ``error``, one per line (the first line is the first bad key)."""
    return "\n".join(error_lines(error, prefix))


def _is_union_branch(part: Any) -> bool:
    # pydantic names the branch of a union it tried (e.g. "int", "list[int]", "function-after[...]")
    return isinstance(part, str) and ("[" in part or part in {"int", "float", "str", "bool", "none"})


def _message(problem: dict[str, Any]) -> str:
    kind = problem["type"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):  # a BaseModel's / a pydantic dataclass's
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    message = str(problem["msg"])
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _got(problem: dict[str, Any]) -> str:
    if problem["type"] in ("missing",) or "input" not in problem:
        return ""
    value = problem["input"]
    if isinstance(value, dict):
        return ""
    text = repr(value)
    return f", got {text if len(text) <= 80 else text[:77] + '...'}"
