"""``LocalStack``: the services of ``services.py`` in one state directory, started in order,
stopped in reverse, by the process ids and start times it records."""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import secrets
import time
from pathlib import Path

from .mlflow_server import MlflowAuth
from .processes import Process, port_free, write_private
from .services import (Mlflow, RayHead, SeaweedFS, Service, StackError, Startup, key_env, port_values,
                       ray_temp_dir)

BUCKET = "moram"
REGISTRY_PREFIX = "registry"
ARTIFACTS_PREFIX = "mlflow-artifacts"
STATE_DIR_ENV = "MORAM_STACK_DIR"
# credentials.json: the S3 keys, the MLflow user and its session-cookie key.
_CREDENTIALS = ("access_key", "secret_key", "mlflow_username", "mlflow_password", "mlflow_flask_secret")


def stack_services() -> tuple[Service, ...]:
    """The services in start order (MLflow keeps its artifacts in S3; the Ray head hands both
    to jobs); ``down`` stops them in reverse."""
    return SeaweedFS(), Mlflow(), RayHead()


SERVICES = tuple(service.name for service in stack_services())


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or Path.home() / ".moram" / "stack").expanduser()


class LocalStack:
    """The local stack in ``state_dir``; see the package docstring."""

    def __init__(self, state_dir: str | os.PathLike | None = None):
        self.state_dir = Path(state_dir).expanduser().resolve() if state_dir else default_state_dir().resolve()
        self.state_file = self.state_dir / "stack.json"
        self.credentials_file = self.state_dir / "credentials.json"
        self.env_file = self.state_dir / "stack.env"
        self.ray_token_file = self.state_dir / "ray-auth-token"
        self.services = stack_services()
        self.s3, self.tracking, self.ray = self.services
        self.state = self._read_state()

    # -- what the stack offers ---------------------------------------------------------------
    @property
    def ports(self) -> dict:
        return self.state.get("ports", {})

    @property
    def s3_endpoint(self) -> str:
        return self.s3.url(self)

    @property
    def mlflow_uri(self) -> str:
        return self.tracking.url(self)

    @property
    def dashboard_url(self) -> str:
        return self.ray.url(self)

    @property
    def ray_address(self) -> str:
        return self.ray.address(self)

    @property
    def bucket(self) -> str:
        return self.state.get("bucket", BUCKET)

    @property
    def registry_uri(self) -> str:
        return f"s3://{self.bucket}/{REGISTRY_PREFIX}"

    @property
    def artifacts_uri(self) -> str:
        return f"s3://{self.bucket}/{ARTIFACTS_PREFIX}"

    @property
    def ray_temp_dir(self) -> Path:
        return ray_temp_dir(self.state_dir)

    def public_env(self) -> dict[str, str]:
        """The environment for jobs and clients, without secrets (the Ray token's file is named)."""
        return {key: value for service in self.services for key, value in service.env(self).items()}

    def env(self) -> dict[str, str]:
        """``public_env()`` plus the S3 keys and the MLflow user: what ``stack.env`` exports."""
        credentials = self._credentials()
        return {**self.public_env(), **key_env(credentials), **self.mlflow_auth(credentials).client_env()}

    def mlflow_auth(self, credentials: dict | None = None) -> MlflowAuth:
        keys = credentials or self._credentials()
        return MlflowAuth(keys["mlflow_username"], keys["mlflow_password"], keys["mlflow_flask_secret"])

    # -- lifecycle ---------------------------------------------------------------------------
    def up(self, num_cpus: int | None = None, bucket: str = BUCKET, startup_timeout: float = 180.0) -> "LocalStack":
        """Start whatever is not running; idempotent. On a failure, stop what this call started."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._lock():
            self.state = self._read_state()
            running = [service for service in self.services if self._alive(service.name)]
            if len(running) == len(self.services):
                return self
            if running:   # half a stack (a crash, a killed process): restart it whole
                self._stop_all()
            self.state.setdefault("bucket", bucket)
            credentials = self._credentials(create=True)
            startup = Startup(credentials, self.mlflow_auth(credentials), startup_timeout, num_cpus)
            self.state["ports"] = self._ports()
            self.state["processes"] = {}
            for service in self.services:
                self.state.update(service.state(self))
            self._write_state()
            self._write_env_file()
            try:
                for service in self.services:
                    service.start(self, startup, started=functools.partial(self._record, service.name))
            except BaseException:
                self._stop_all()
                raise
            self.state["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            self._write_state()
        return self

    def down(self, timeout: float = 60.0) -> list[str]:
        """Stop the recorded processes in reverse start order; keep every file."""
        if not self.state_file.exists():
            return []
        with self._lock():
            self.state = self._read_state()
            return self._stop_all(timeout)

    def status(self) -> dict[str, dict]:
        """Per service: its pid, whether it runs, whether it answers, and its URL."""
        report = {}
        for service in self.services:
            process = self._process(service.name)
            alive = bool(process and process.alive())
            report[service.name] = {"pid": process.pid if alive else None, "running": alive,
                                    "healthy": alive and service.healthy(self),
                                    "url": service.url(self) if self.ports else None}
        return report

    def _stop_all(self, timeout: float = 60.0) -> list[str]:
        """Stop every recorded service, each even if stopping another failed."""
        stopped, errors = [], []
        for service in reversed(self.services):
            process = self._process(service.name)
            if process is None:
                continue
            try:
                if process.alive() or process.group():
                    process.stop(timeout, leader_only=service.stop_leader_only)
                    stopped.append(service.name)
            except OSError as error:
                errors.append(f"{service.name} (pid {process.pid}): {error}")
                continue
            self.state["processes"].pop(service.name)
            self._write_state()
        if errors:
            raise StackError(f"could not stop {'; '.join(errors)}; their ids stay in {self.state_file}")
        return stopped

    # -- state -------------------------------------------------------------------------------
    def _process(self, name: str) -> Process | None:
        record = self.state.get("processes", {}).get(name)
        return Process(record["pid"], record["start_time"]) if record else None

    def _alive(self, name: str) -> bool:
        process = self._process(name)
        return bool(process and process.alive())

    def _record(self, name: str, pid: int | None) -> None:
        if pid is None:
            raise StackError(f"{name} exited right after it started; see its log in {self.state_dir}")
        self.state.setdefault("processes", {})[name] = vars(Process.of(pid))
        self._write_state()

    def _ports(self) -> dict:
        """The recorded ports where all of a service's ports are still free, else new ones."""
        old = self.state.get("ports", {})
        ports = {}
        for service in self.services:
            previous = old.get(service.name)
            keep = previous and all(port_free(port) for port in port_values(previous))
            ports[service.name] = previous if keep else service.fresh_ports()
        taken = [port for value in ports.values() for port in port_values(value)]
        if len(set(taken)) != len(taken):   # two services got the same fresh port: draw all again
            self.state["ports"] = {}
            return self._ports()
        return ports

    def _credentials(self, create: bool = False) -> dict:
        """The stack's secrets (credentials.json, 0600), and its Ray token file (0600); ``create``
        makes whatever is missing (a stack of an older version gains the MLflow user and token)."""
        keys = {}
        if self.credentials_file.exists():
            try:
                keys = json.loads(self.credentials_file.read_text())
                keys = {name: str(keys[name]) for name in keys if name in _CREDENTIALS}
            except (ValueError, TypeError, AttributeError):
                raise StackError(f"{self.credentials_file}: not a JSON object of the stack's keys") from None
        elif not create:
            raise StackError(f"{self.credentials_file} not found: run `up` first")
        missing = [name for name in _CREDENTIALS if name not in keys]
        if missing and not create:
            raise StackError(f"{self.credentials_file}: {missing[0]} missing (run `up` to add it)")
        if missing:
            mlflow = MlflowAuth.generate()
            fresh = {"access_key": "moram" + secrets.token_hex(8), "secret_key": secrets.token_hex(20),
                     "mlflow_username": mlflow.username, "mlflow_password": mlflow.password,
                     "mlflow_flask_secret": mlflow.flask_secret}
            keys.update({name: fresh[name] for name in missing})
            write_private(self.credentials_file, json.dumps(keys) + "\n")
        if create and not self.ray_token_file.exists():   # Ray reads it by RAY_AUTH_TOKEN_PATH
            write_private(self.ray_token_file, secrets.token_hex(32))
        return keys

    def _write_env_file(self) -> None:
        lines = [f"# MoRAM local stack in {self.state_dir} (written by `up`; holds the S3 keys and the MLflow "
                 f"password: keep it 0600)",
                 *(f"export {key}={value}" for key, value in self.env().items())]
        write_private(self.env_file, "\n".join(lines) + "\n")

    def _read_state(self) -> dict:
        if not self.state_file.exists():
            return {}
        try:
            state = json.loads(self.state_file.read_text())
        except ValueError as error:
            raise StackError(f"{self.state_file}: not valid JSON ({error})") from None
        if not isinstance(state, dict):
            raise StackError(f"{self.state_file}: the top level must be an object")
        return state

    def _write_state(self) -> None:
        temp = self.state_file.with_suffix(".json.tmp")
        temp.write_text(json.dumps(self.state, indent=2, sort_keys=True) + "\n")
        temp.replace(self.state_file)

    @contextlib.contextmanager
    def _lock(self):
        with open(self.state_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
