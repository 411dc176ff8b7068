"""An MLflow tracking server on loopback: sqlite backend, artifacts wherever asked.

    with MlflowServer(tmp_dir, artifacts="s3://bucket/mlflow") as server:
        os.environ["MLFLOW_TRACKING_URI"] = server.uri

Artifacts go through the server (``--artifacts-destination``, proxied): clients need no
storage credentials of their own. For S3 the server reads the standard AWS variables and
MLFLOW_S3_ENDPOINT_URL from its environment.

With ``auth`` (``MlflowAuth``) the server runs MLflow's basic-auth app: every request but
``/health`` needs the user and password (clients: MLFLOW_TRACKING_USERNAME/PASSWORD, what
``auth.client_env()`` gives). The password reaches the server through its environment only; its
``basic_auth.ini`` and log hold none.

The local stack's MLflow service (moram_platform.stack); the pytest fixture
(tests/fixtures/mlflow_server.py) starts a throwaway one. ``port`` reuses a known port (the
local stack keeps its URLs across restarts); ``base_env`` replaces this process's environment
as the one the server starts from.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .seaweed import free_ports

# Basic-auth settings without a secret: the admin's password comes from the environment.
# auth_cache_ttl_seconds: one password hash per client and 5 minutes, not one per request
# (a PBKDF2 hash costs ~0.3 s on 2 cores; one worker process, so no stale cache elsewhere).
_AUTH_INI = """[mlflow]
default_permission = READ
database_uri = sqlite:///{database}
admin_username = {username}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 300
"""


@dataclass(frozen=True)
class MlflowAuth:
    """The MLflow server's admin user and the key of its session cookies (CSRF)."""
    username: str
    password: str
    flask_secret: str

    @classmethod
    def generate(cls, username: str = "moram") -> "MlflowAuth":
        return cls(username, secrets.token_urlsafe(24), secrets.token_hex(32))

    def client_env(self) -> dict[str, str]:
        """What MLflow clients read to authenticate."""
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}

    def server_env(self, config_path: Path) -> dict[str, str]:
        return {"MLFLOW_AUTH_CONFIG_PATH": str(config_path), "MLFLOW_AUTH_ADMIN_PASSWORD": self.password,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": self.flask_secret}


class MlflowServer:
    def __init__(self, workdir: str | os.PathLike, artifacts: str | None = None, startup_timeout: float = 90.0,
                 *, port: int | None = None, auth: MlflowAuth | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.artifacts = artifacts or str(self.workdir / "artifacts")
        self.port = port or free_ports(1)[0]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.auth = auth
        self.process: subprocess.Popen | None = None

    def start(self, env: dict[str, str] | None = None, *, base_env: dict[str, str] | None = None) -> "MlflowServer":
        environment = {**(os.environ if base_env is None else base_env), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                       "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", "1", "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
                   "--artifacts-destination", self.artifacts, "--serve-artifacts"]
        if self.auth is not None:
            config = self.workdir / "basic_auth.ini"
            config.write_text(_AUTH_INI.format(database=self.workdir / "basic_auth.db", username=self.auth.username))
            environment.update(self.auth.server_env(config))
            command += ["--app-name", "basic-auth"]
        self.log = open(self.workdir / "server.log", "ab")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=environment,
                                        start_new_session=True)
        self._wait_ready()
        return self

    @property
    def pid(self) -> int | None:
        """The server's process id (also its process group and session), None when stopped."""
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"mlflow server not ready after {self.startup_timeout}s:\n{self._log_tail()}")

    def stop(self) -> None:
        if self.process is None:
            return
        import signal

        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process = None
        self.log.close()

    def _log_tail(self, lines: int = 30) -> str:
        path = self.workdir / "server.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
