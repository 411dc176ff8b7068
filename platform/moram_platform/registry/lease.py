"""Run leases: at most one driver works on a run at a time.

A lease is a small JSON record in the registry's own storage, next to the run's versions:

    <run>/leases/<n:08d>.json     lease number n: holder (host, pid), expiry, released flag

Taking the run means creating record n + 1 with the storage's create-only put (local: a hard
link, S3: If-None-Match), so of two drivers that start at once exactly one succeeds and the
other is refused at once. Record n + 1 may only be created when record n is free:

  * released  (its driver finished or failed cleanly), or
  * orphaned  (its holder ran on this host and that process no longer exists: a driver killed
               with SIGKILL is taken over at once by a rerun on the same machine; a live one
               on this host keeps the run even if its heartbeat is late), or
  * expired   (a holder on another host sent no heartbeat for ``ttl`` seconds: that driver or
               its host is gone, or cannot reach the storage).

The holder renews its record every ttl/3 seconds from a daemon thread. The lease keeps work
from being done twice (two drivers training the same task, duplicate MLflow runs); it is not
what keeps the registry consistent: versions are create-only whatever happens.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass

from .errors import LeaseHeldError, LeaseLostError, ObjectNotFoundError, StorageError
from .layout import VERSION_DIGITS
from .names import check_name
from .storage import Storage

log = logging.getLogger(__name__)

LEASE_TTL_ENV = "MORAM_LEASE_TTL_S"
DEFAULT_TTL_S = 120.0


def leases_prefix(run_id: str) -> str:
    return f"{check_name('run', run_id)}/leases"


def lease_key(run_id: str, number: int) -> str:
    return f"{leases_prefix(run_id)}/{number:0{VERSION_DIGITS}d}.json"


def default_ttl() -> float:
    """$MORAM_LEASE_TTL_S, else 120 s."""
    value = os.environ.get(LEASE_TTL_ENV)
    try:
        ttl = float(value) if value else DEFAULT_TTL_S
    except ValueError:
        raise ValueError(f"{LEASE_TTL_ENV}={value!r}: expected a number of seconds") from None
    if ttl <= 0:
        raise ValueError(f"{LEASE_TTL_ENV}={value!r}: expected a positive number of seconds")
    return ttl


@dataclass
class Holder:
    """Who holds a lease, and until when (seconds since the epoch)."""

    host: str
    pid: int
    process_start: str          # this process's start time in clock ticks since boot (Linux), or ""
    boot_id: str                # the host's boot id (Linux), or ""
    acquired_at: float
    expires_at: float
    released: bool = False

    @classmethod
    def this_process(cls, ttl: float) -> "Holder":
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()), _boot_id(), now, now + ttl)

    def is_free(self, now: float) -> bool:
        """Released; or, on this host, its process is gone (liveness is certain here, so a slow
        heartbeat does not free a live driver's run); elsewhere, expired."""
        if self.released:
            return True
        if self.is_local():
            return self.is_orphaned()
        return now > self.expires_at

    def is_local(self) -> bool:
        return self.host == socket.gethostname() and bool(self.boot_id) and bool(self.process_start)

    def is_orphaned(self) -> bool:
        """Its process ran on this host and is gone (or the host rebooted since)."""
        if not self.is_local():
            return False
        if self.boot_id != _boot_id():
            return True
        return _process_start(self.pid) != self.process_start   # "" when gone; differs when the pid was reused

    def describe(self, now: float) -> str:
        return (f"held by pid {self.pid} on {self.host} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(self.acquired_at))} UTC, "
                f"expires in {max(0.0, self.expires_at - now):.0f}s unless renewed")


class RunLease:
    """This driver's lease on a run; a context manager that renews it and releases it."""

    def __init__(self, storage: Storage, run_id: str, number: int, holder: Holder, ttl: float):
        self.storage, self.run_id, self.number, self.holder, self.ttl = storage, run_id, number, holder, ttl
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def key(self) -> str:
        return lease_key(self.run_id, self.number)

    @classmethod
    def acquire(cls, storage: Storage, run_id: str, ttl: float | None = None) -> "RunLease":
        """Take the run, or raise LeaseHeldError naming the holder if another driver has it."""
        ttl = default_ttl() if ttl is None else ttl
        latest = check_free(storage, run_id)
        if latest is not None and not latest[1].released:
            holder = latest[1]
            log.warning("run %s: taking over the lease of pid %d on %s (%s)", run_id, holder.pid, holder.host,
                        "its process is gone" if holder.is_orphaned() else "expired")
        number = latest[0] + 1 if latest is not None else 1
        holder = Holder.this_process(ttl)
        if not storage.create(lease_key(run_id, number), _encode(holder)):
            raise LeaseHeldError(f"run {run_id} was just taken by another driver (lease "
                                 f"{storage.where(lease_key(run_id, number))}); use another run name or wait")
        return cls(storage, run_id, number, holder, ttl)

    def renew(self) -> None:
        """Push the expiry ttl seconds ahead; LeaseLostError if another driver took the run."""
        latest = latest_lease(self.storage, self.run_id)
        if latest is not None and latest[0] > self.number:
            self.lost = True
            raise LeaseLostError(f"run {self.run_id}: the lease was taken over by pid {latest[1].pid} on "
                                 f"{latest[1].host} (this driver missed its heartbeats for {self.ttl:.0f}s)")
        self.holder.expires_at = time.time() + self.ttl
        self.storage.write(self.key, _encode(self.holder))

    def release(self) -> None:
        """Free the run for the next driver (best effort: an unreleased lease expires anyway)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.lost:
            return
        self.holder.released = True
        try:
            self.storage.write(self.key, _encode(self.holder))
        except StorageError as error:
            log.warning("run %s: could not release the lease (%s); it expires in %.0fs", self.run_id, error, self.ttl)

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except LeaseLostError as error:
                log.error("%s", error)
                return
            except StorageError as error:   # a storage hiccup: try again at the next beat
                log.warning("run %s: lease renewal failed (%s); retrying", self.run_id, error)

    def __enter__(self) -> "RunLease":
        self.start_heartbeat()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_free(storage: Storage, run_id: str) -> tuple[int, Holder] | None:
    """LeaseHeldError if another driver holds the run now; else the run's newest lease record.
    A probe only (a job calls it before starting Ray): ``RunLease.acquire`` is what takes the run."""
    latest = latest_lease(storage, run_id)
    now = time.time()
    if latest is not None and not latest[1].is_free(now):
        number, holder = latest
        raise LeaseHeldError(
            f"run {run_id} is in use by another driver ({holder.describe(now)}; lease "
            f"{storage.where(lease_key(run_id, number))}); wait for it to finish, or use another run name")
    return latest


def refuse_if_busy(uri: str, run_id: str) -> None:
    """``check_free`` on a registry URI, for a job's early checks; a storage failure is left for
    the job's real acquisition to report."""
    from .storage import open_storage

    try:
        check_free(open_storage(uri), run_id)
    except StorageError:
        pass


def latest_lease(storage: Storage, run_id: str) -> tuple[int, Holder] | None:
    """The run's newest lease record as (number, holder), None if it never had one."""
    numbers = sorted(int(name[:-5]) for name in storage.children(leases_prefix(run_id))
                     if name.endswith(".json") and name[:-5].isdigit())
    for number in reversed(numbers):
        try:
            return number, Holder(**json.loads(storage.read(lease_key(run_id, number))))
        except ObjectNotFoundError:
            continue
    return None


def _encode(holder: Holder) -> bytes:
    return json.dumps(asdict(holder), sort_keys=True).encode()


def _process_start(pid: int) -> str:
    """A process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), "" if
    there is no such process or no /proc. Together with the pid it names one process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode(errors="replace")
    except OSError:
        return ""
    fields = stat[stat.rfind(")") + 2:].split()   # the command name may contain spaces
    if len(fields) <= 19 or fields[0] in ("Z", "X"):  # a killed process not yet reaped is gone too
        return ""
    return fields[19]


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return ""
