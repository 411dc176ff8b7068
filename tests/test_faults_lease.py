"""Run leases on both registry backends, with real processes: two drivers racing for one run
(exactly one wins, the other is refused at once), a holder killed with SIGKILL (taken over at
once on the same host), a lease of another host (refused until it expires), the heartbeat."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moram_platform.registry import LeaseHeldError, RunLease, open_storage
from moram_platform.registry.lease import Holder, lease_key, latest_lease
from fixtures.paths import PROJECT_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# A driver stand-in: waits for the start signal, tries to take the run, says what happened,
# then holds the lease (renewing it) until told to release.
CONTENDER = """
import os, sys, time
sys.path.insert(0, {platform!r})
from moram_platform.registry import LeaseHeldError, RunLease, open_storage
uri, run, go, done = sys.argv[1:5]
storage = open_storage(uri)
deadline = time.monotonic() + 120
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit("no start signal")
    time.sleep(0.01)
try:
    lease = RunLease.acquire(storage, run, ttl=float(os.environ.get("TTL", "60")))
except LeaseHeldError as error:
    print("refused:", error, flush=True)
    sys.exit(0)
with lease:
    print("won", lease.number, flush=True)
    while not os.path.exists(done) and time.monotonic() < deadline:
        time.sleep(0.05)
print("released", flush=True)
"""


def contender(tmp_path, uri, run, go, done, **env):
    script = tmp_path / "contender.py"
    script.write_text(CONTENDER.format(platform=str(PROJECT_ROOT / "platform")))
    return subprocess.Popen([sys.executable, str(script), uri, run, str(go), str(done)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})


def read_line(process, timeout: float = 120) -> str:
    """The next line the process prints, within ``timeout`` seconds."""
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    if not selector.select(timeout):
        process.kill()
        raise AssertionError(f"no output from the contender within {timeout}s")
    return process.stdout.readline().strip()


def test_two_drivers_at_once_exactly_one_gets_the_run(tmp_path, registry_uri):
    for round_ in range(3):
        run, go, done = f"race-{round_}", tmp_path / f"go-{round_}", tmp_path / f"done-{round_}"
        processes = [contender(tmp_path, registry_uri, run, go, done) for _ in range(2)]
        go.touch()                                       # both start together
        lines = sorted(read_line(p) for p in processes)
        done.touch()
        outputs = [p.communicate(timeout=120)[0] for p in processes]
        assert all(p.returncode == 0 for p in processes), outputs
        assert lines[0].startswith("refused: run race-") and lines[1] == "won 1", lines
        assert "in use by another driver" in lines[0] or "was just taken by another driver" in lines[0]
        number, holder = latest_lease(open_storage(registry_uri), run)
        assert number == 1 and holder.released                # the winner let go when it finished


def test_a_released_run_is_free_and_a_killed_holder_is_taken_over_at_once(tmp_path, registry_uri):
    storage = open_storage(registry_uri)
    go, done = tmp_path / "go", tmp_path / "done"
    go.touch()
    holder = contender(tmp_path, registry_uri, "killed", go, done)
    assert read_line(holder) == "won 1"
    with pytest.raises(LeaseHeldError, match=rf"run killed is in use by another driver \(held by pid {holder.pid}"):
        RunLease.acquire(storage, "killed")
    holder.send_signal(signal.SIGKILL)                  # no release, no cleanup
    holder.wait(timeout=60)
    started = time.monotonic()
    with RunLease.acquire(storage, "killed") as lease:  # its process is gone: no need to wait for the expiry
        assert lease.number == 2
    assert time.monotonic() - started < 30
    with RunLease.acquire(storage, "killed") as lease:  # released by the with block
        assert lease.number == 3


def test_a_lease_of_another_host_blocks_the_run_until_it_expires(registry_uri):
    storage = open_storage(registry_uri)
    expires = time.time() + 3
    foreign = Holder(host="another-host", pid=1, process_start="1", boot_id="x", acquired_at=time.time(),
                     expires_at=expires)
    assert storage.create(lease_key("foreign", 1), json.dumps(foreign.__dict__).encode())
    with pytest.raises(LeaseHeldError, match="held by pid 1 on another-host"):
        RunLease.acquire(storage, "foreign")
    while time.time() <= expires:                        # the expiry written in the record, not a guess
        time.sleep(0.1)
    with RunLease.acquire(storage, "foreign") as lease:
        assert lease.number == 2


def test_the_heartbeat_pushes_the_expiry_ahead(tmp_path, registry_uri):
    storage = open_storage(registry_uri)
    go, done = tmp_path / "go", tmp_path / "done"
    go.touch()
    holder = contender(tmp_path, registry_uri, "beating", go, done, TTL="1.5")
    assert read_line(holder) == "won 1"
    first = latest_lease(storage, "beating")[1].expires_at
    deadline = time.monotonic() + 60
    while latest_lease(storage, "beating")[1].expires_at <= first:
        assert time.monotonic() < deadline, "the lease was never renewed"
        time.sleep(0.1)
    # past its first expiry, renewed by a live process: still refused
    while time.time() <= first:
        time.sleep(0.1)
    with pytest.raises(LeaseHeldError):
        RunLease.acquire(storage, "beating")
    done.touch()
    assert holder.communicate(timeout=60)[0].strip().endswith("released")
    assert latest_lease(storage, "beating")[1].released
