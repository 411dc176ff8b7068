"""Run and task names become storage keys: check them before any I/O happens."""
import re

from .errors import InvalidNameError

# Letters, digits and . _ - + = @, starting with a letter or digit: no path separators, no
# '.'/'..', no whitespace; the same name is a valid local path component and S3 key segment.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=@-]{0,127}")


def check_name(kind: str, name: object) -> str:
    """Return ``name`` if it is a valid run/task name, else raise InvalidNameError."""
    if not isinstance(name, str) or not name:
        raise InvalidNameError(f"{kind} name must be a non-empty string, got {name!r}")
    if "/" in name or "\\" in name or ".." in name:
        raise InvalidNameError(f"{kind} name {name!r} contains a path separator or '..'")
    if not _NAME.fullmatch(name):
        raise InvalidNameError(
            f"{kind} name {name!r} is not allowed: use 1-128 letters, digits and . _ - + = @, "
            "starting with a letter or digit")
    return name
