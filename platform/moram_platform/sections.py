"""Building blocks of job-config sections (``moram_platform.config``) and of the sections a
benchmark adds (e.g. ``moram_platform.xtail.config``): a strict base model and typed fields.

YAML gives ints, floats, strings and booleans; a field takes exactly its own kind (``1`` is not
``true``, ``"3"`` is not ``3``), except that ints stand for floats and numeric strings such as
YAML 1.1's ``1e-3`` (no dot) are read as floats. Type checks and rules raise
``ValueError("must be ...")``, which ``moram.validation.error_lines`` reports as
``key.path: must be ..., got value``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Callable

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict

from moram.validation import is_integer, is_number  # one notion of "an integer" for moram.* and the platform

SECTION_CONFIG = ConfigDict(extra="forbid", validate_default=False)


class Section(BaseModel):
    """A config section: unknown keys are errors, every field says what it is for."""

    model_config = SECTION_CONFIG


def rule(check: Callable[[Any], bool], message: str) -> AfterValidator:
    """A value rule: ``message`` (``"must be >= 1"``) when ``check(value)`` is false."""

    def validate(value: Any) -> Any:
        if value is not None and not check(value):
            raise ValueError(message)
        return value

    return AfterValidator(validate)


def _kind(check: Callable[[Any], bool], message: str, convert: Callable[[Any], Any] = lambda v: v) -> BeforeValidator:
    """The type check of a field, before pydantic's own: one message in the project's words."""

    def validate(value: Any) -> Any:
        value = convert(value)
        if not check(value):
            raise ValueError(message)
        return value

    return BeforeValidator(validate)


def _yaml_number(value: Any) -> Any:
    if isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            return value
    return value


Int = Annotated[int, _kind(is_integer, "must be an integer")]
Bool = Annotated[bool, _kind(lambda v: isinstance(v, bool), "must be true or false")]
Str = Annotated[str, _kind(lambda v: isinstance(v, str), "must be a string")]
Real = Annotated[float, _kind(is_number, "must be a number", _yaml_number), rule(math.isfinite, "must be a finite number")]
AtLeastOne = Annotated[Int, rule(lambda v: v >= 1, "must be >= 1")]
AtLeastZero = Annotated[Int, rule(lambda v: v >= 0, "must be >= 0")]
OneOrNone = Annotated[Int, rule(lambda v: v >= 1, "must be >= 1 or null")]
NonEmptyStr = Annotated[Str, rule(bool, "must not be empty")]


def first_per_key(lines: list[str]) -> list[str]:
    """One line per key: a value that fits no branch of ``X | None`` is reported once (X's)."""
    seen: set[str] = set()
    kept = []
    for line in lines:
        key = line.split(": ", 1)[0]
        if key not in seen:
            seen.add(key)
            kept.append(line)
    return kept


def one_of(*choices: Any) -> AfterValidator:
    names = [repr(c) for c in choices]
    listed = " or ".join(names) if len(names) <= 2 else ", ".join(names[:-1]) + " or " + names[-1]
    return rule(lambda v: v in choices, f"must be {listed}")


def absolute(location: str) -> str:
    """A local path made absolute (Ray workers run elsewhere); URIs (``s3://``) are kept."""
    if "://" in location:
        return location
    return str(Path(location).expanduser().resolve())
