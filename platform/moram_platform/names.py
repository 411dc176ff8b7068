"""The one rule for names that become storage keys and run ids: runs, tasks, sweeps, studies
and a study's grid labels. The registry, the job config and Tune all check it here, so a name
one accepts the others accept too (``-x`` was once a valid run.name the registry refused)."""
from __future__ import annotations

import re

MAX_LENGTH = 128
# Letters, digits and . _ - + = @, starting with a letter or digit: no path separators, no
# '.'/'..', no whitespace; the same name is a valid local path component and S3 key segment.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=@-]*")


def name_problem(name: object, max_length: int = MAX_LENGTH) -> str | None:
    """What is wrong with ``name`` as a run, task, sweep or study name (None: nothing)."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if "/" in name or "\\" in name or ".." in name:
        return "contains a path separator or '..'"
    if len(name) > max_length or not _NAME.fullmatch(name):
        return f"must be 1-{max_length} letters, digits and . _ - + = @, starting with a letter or digit"
    return None
