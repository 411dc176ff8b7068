"""Operating-system helpers of the local stack: the processes it started, ports, files, HTTP probes."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"     # every service of the stack listens here and nowhere else


@dataclass(frozen=True)
class Process:
    """A process the stack started: its id and kernel start time (so a reused id is never hit)."""
    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> "Process":
        return cls(pid, _start_time(pid) or 0)

    def alive(self) -> bool:
        return _start_time(self.pid) == self.start_time

    def group(self) -> list[int]:
        """Live processes of this process's group (it leads its own session) started no earlier."""
        members = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                stat = _stat(int(entry.name))
                if stat and int(stat[2]) == self.pid and int(stat[19]) >= self.start_time:   # pgrp, starttime
                    members.append(int(entry.name))
        return members

    def stop(self, timeout: float, leader_only: bool = False) -> None:
        """SIGTERM (the leader, or the whole group), wait, then SIGKILL what is left of the group."""
        targets = [self.pid] if leader_only and self.alive() else self.group()
        _signal(targets, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self.alive() or self.group()):
            time.sleep(0.2)
        leftovers = self.group()
        if leftovers:
            _signal(leftovers, signal.SIGKILL)
            time.sleep(0.5)


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, pgrp, session, ...), None if gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return None if len(fields) < 20 or fields[0] in ("Z", "X") else fields


def _start_time(pid: int) -> int | None:
    stat = _stat(pid)
    return int(stat[19]) if stat else None


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def port_free(port: int) -> bool:
    """Nothing listens on it (connections of the last run still in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def http_ok(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def write_private(path: Path, text: str) -> None:
    """Write a file that only its owner can read, without a moment at a wider mode."""
    temp = path.with_name(path.name + ".tmp")
    temp.unlink(missing_ok=True)
    with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(text)
    temp.replace(path)


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
