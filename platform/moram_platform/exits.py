"""Bad input ends every entry point the same way (jobs/trace.py, xtail.py, tune.py, study.py
and the ``moram`` command): one line on stderr naming what is wrong, exit status 2, no
traceback. Anything else is a traceback (a bug should show where it is)."""
from __future__ import annotations

import sys
from typing import Callable

EXIT_BAD_INPUT = 2
# Every check of the project raises a ValueError subclass (ConfigError, SpaceError, StudyError,
# ShardError, ...) or a LookupError (an unknown version); a missing or existing file is the user's too.
BAD_INPUT: tuple[type[BaseException], ...] = (ValueError, LookupError, FileNotFoundError, FileExistsError)


def refuse(error: BaseException, prefix: str = "error") -> int:
    """Print ``prefix: error`` on stderr; the exit status of bad input."""
    print(f"{prefix}: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT


def exit_on_bad_input(call: Callable[[], int], *, prefix: str = "error",
                      errors: tuple[type[BaseException], ...] = BAD_INPUT) -> int:
    """``call()``'s exit status, or 2 with one line when it raises one of ``errors``."""
    try:
        return call()
    except errors as error:
        return refuse(error, prefix)
