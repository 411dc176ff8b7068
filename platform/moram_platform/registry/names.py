"""Run and task names become storage keys: check them before any I/O happens (the rule:
``moram_platform.names``)."""
from ..names import name_problem
from .errors import InvalidNameError


def check_name(kind: str, name: object) -> str:
    """Return ``name`` if it is a valid run/task name, else raise InvalidNameError."""
    problem = name_problem(name)
    if problem == "must be a non-empty string":
        raise InvalidNameError(f"{kind} name must be a non-empty string, got {name!r}")
    if problem is not None:
        raise InvalidNameError(f"{kind} name {name!r} {problem.replace('must be', 'is not allowed: use', 1)}")
    return name
