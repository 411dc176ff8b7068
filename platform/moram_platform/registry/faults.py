"""Fault injection inside a commit, for the fault tests and drills (never set in production).

    MORAM_FAULT_IN_COMMIT=kill-before-manifest@2     the commit of version 2 has written and read back
                                                     its shard, the manifest is not created yet
    MORAM_FAULT_IN_COMMIT=kill-after-manifest@2      version 2's manifest exists, the commit has not
                                                     returned yet
    MORAM_FAULT_IN_COMMIT=pause-before-manifest@2=/tmp/marker
                                                     creates the marker file, then waits (at most
                                                     10 min) until it holds "go": a test can stop
                                                     the storage exactly before the manifest create

The commit runs in the run's registry actor, a Ray worker (its own process group) in the
driver's session. ``kill`` SIGKILLs the process group of the session leader, then the actor: for
a job started in its own session (``setsid jobs/trace.py``, as the fault tests start it) that is
the driver with its embedded Ray, the same kill as the tests' ``os.killpg(driver.pid, SIGKILL)``,
landing exactly at that point of the commit. Never set it for a job started from a shell's
session. A pause fires once (its marker file then exists).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

FAULT_ENV = "MORAM_FAULT_IN_COMMIT"
PAUSE_LIMIT_S = 600.0


def fault_point(point: str, version: int) -> None:
    """Act on $MORAM_FAULT_IN_COMMIT if it names this point of this version's commit."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    action_point, _, rest = spec.partition("@")
    number, _, marker = rest.partition("=")
    action, _, wanted = action_point.partition("-")
    if wanted != point or number != str(version):
        return
    if action == "kill":
        os.killpg(os.getsid(0), signal.SIGKILL)   # the driver and its embedded Ray
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "pause" and marker:
        _pause(Path(marker))


def _pause(marker: Path) -> None:
    try:
        with open(marker, "x") as handle:   # fires once: a retried commit finds the marker and goes on
            handle.write(f"{os.getpid()}\n")
    except FileExistsError:
        return
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while marker.read_text().strip() != "go" and time.monotonic() < deadline:
        time.sleep(0.05)
