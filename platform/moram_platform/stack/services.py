"""The services of the local stack, one record each: how it starts, how it answers, how it stops,
and what it adds to ``stack.env``. ``LocalStack`` runs them in order and knows none of them by name.

A service keeps no state of its own: its ports and process live in the stack's ``stack.json``
under its ``name``, and every method reads them through the ``LocalStack`` it is given.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

from .mlflow_server import MlflowAuth, MlflowServer
from .processes import HOST, http_ok, log_tail
from .seaweed import PORT_NAMES as SEAWEED_PORTS
from .seaweed import REGION, SeaweedServer, free_ports

if TYPE_CHECKING:
    from .local import LocalStack

# Variables of the caller's shell that must not leak into the stack's services: the stack sets its own.
_INHERITED_NOT = ("AWS_", "MLFLOW_TRACKING_", "MLFLOW_S3_", "MLFLOW_AUTH_", "MLFLOW_FLASK_SERVER_SECRET_KEY",
                  "MORAM_REGISTRY_URI", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_")


class StackError(RuntimeError):
    """The stack could not be started, stopped or read; the message names the file or service."""


@dataclass(frozen=True)
class Startup:
    """What ``up`` gives every service it starts."""
    keys: dict[str, str]         # the stack's S3 keys: access_key, secret_key
    mlflow: MlflowAuth           # the MLflow server's user, password and cookie key
    timeout: float               # seconds a service may take to answer
    num_cpus: int | None         # CPUs the Ray head offers (None: all)


def key_env(keys: dict[str, str]) -> dict[str, str]:
    """The S3 keys as the standard AWS variables."""
    return {"AWS_ACCESS_KEY_ID": keys["access_key"], "AWS_SECRET_ACCESS_KEY": keys["secret_key"]}


class Service:
    """One service of the stack. Subclasses set ``name`` (its key in ``stack.json``) and
    ``port_names`` (``None``: a single port, recorded as a bare number)."""
    name: ClassVar[str]
    port_names: ClassVar[tuple[str, ...] | None] = None
    stop_leader_only: ClassVar[bool] = False    # SIGTERM the leader alone, which stops its children

    def fresh_ports(self) -> int | dict[str, int]:
        if self.port_names is None:
            return free_ports(1)[0]
        return dict(zip(self.port_names, free_ports(len(self.port_names))))

    def ports(self, stack: "LocalStack"):
        return stack.ports[self.name]

    def url(self, stack: "LocalStack") -> str:
        """Where it answers (shown by ``status``)."""
        raise NotImplementedError

    def env(self, stack: "LocalStack") -> dict[str, str]:
        """What jobs and clients need to reach it, without secrets (``stack.env`` adds the keys)."""
        return {}

    def state(self, stack: "LocalStack") -> dict:
        """Facts for ``stack.json`` besides its ports and process (no secrets)."""
        return {}

    def start(self, stack: "LocalStack", startup: Startup, started: Callable[[int | None], None]) -> None:
        """Start it and wait until it answers. ``started(pid)`` records the process as soon as it
        exists, so that a start that fails after that point is stopped with the rest."""
        raise NotImplementedError

    def healthy(self, stack: "LocalStack") -> bool:
        raise NotImplementedError


def port_values(ports: int | dict[str, int]) -> list[int]:
    return [ports] if isinstance(ports, int) else list(ports.values())


class SeaweedFS(Service):
    """SeaweedFS (master, volume, filer, S3 gateway): the registry and the MLflow artifacts."""
    name = "seaweedfs"
    port_names = SEAWEED_PORTS

    def url(self, stack):
        return f"http://{HOST}:{self.ports(stack)['s3.port']}"

    def s3_env(self, stack) -> dict[str, str]:
        """The standard AWS variables that point boto3 at it (keys aside)."""
        return {"AWS_ENDPOINT_URL_S3": self.url(stack), "AWS_DEFAULT_REGION": REGION,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def env(self, stack):
        return {"MORAM_REGISTRY_URI": stack.registry_uri, **self.s3_env(stack)}

    def start(self, stack, startup, started):
        server = SeaweedServer(stack.state_dir / "seaweedfs", startup_timeout=startup.timeout,
                               ports=self.ports(stack), access_key=startup.keys["access_key"],
                               secret_key=startup.keys["secret_key"], stop_at_exit=False)
        try:
            server.start()
        except (RuntimeError, TimeoutError) as error:
            raise StackError(f"SeaweedFS did not start: {error}") from None
        started(server.pid)
        server.create_bucket(stack.bucket)

    def healthy(self, stack):
        try:   # any HTTP answer from the S3 gateway (it refuses anonymous calls) means it is up
            urllib.request.urlopen(self.url(stack), timeout=2).close()
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True


class Mlflow(Service):
    """The MLflow tracking server: sqlite in the state dir, artifacts proxied to the S3 bucket,
    MLflow's basic-auth app in front (the user and password are in ``stack.env``)."""
    name = "mlflow"

    def url(self, stack):
        return f"http://{HOST}:{self.ports(stack)}"

    def env(self, stack):
        return {"MLFLOW_TRACKING_URI": self.url(stack)}

    def start(self, stack, startup, started):
        server = MlflowServer(stack.state_dir / "mlflow", artifacts=stack.artifacts_uri,
                              startup_timeout=startup.timeout, port=self.ports(stack), auth=startup.mlflow)
        s3 = {**stack.s3.s3_env(stack), **key_env(startup.keys), "MLFLOW_S3_ENDPOINT_URL": stack.s3.url(stack)}
        try:
            server.start(env=s3, base_env=base_env())
        except (RuntimeError, TimeoutError) as error:
            server.stop()   # its process group: a worker of a server that died must not linger
            raise StackError(f"MLflow did not start: {error}") from None
        started(server.pid)
        server.log.close()   # the server keeps its own handle

    def healthy(self, stack):
        return http_ok(f"{self.url(stack)}/health")     # the one path basic-auth leaves open


RAY_PORTS = ("gcs", "dashboard", "client_server", "dashboard_agent_http", "dashboard_agent_grpc",
             "metrics_export", "runtime_env_agent", "node_manager", "object_manager")
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
RAY_CLIENT_KEYS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")   # where a client finds the head


def ray_temp_dir(state_dir: Path) -> Path:
    """Ray's session files for a stack. Its Unix sockets need a short path, so a long state dir
    gets one in the temp folder, named after the state dir (the same one after a restart)."""
    inside = Path(state_dir) / "ray"
    if len(str(inside)) <= 40:
        return inside
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"moram-ray-{digest}"


class RayHead(Service):
    """``ray start --head --block``: the dashboard and job API, and the one node of the cluster.

    Its environment is what jobs and their workers inherit: the registry, MLflow and the S3 keys,
    so no secret travels in a job's runtime env (which the dashboard shows).

    Token authentication (RAY_AUTH_MODE=token) guards every Ray entry point: the dashboard, the
    job API and the GCS refuse a request without the stack's token, which lives in the file
    ``ray-auth-token`` of the state dir (0600). Clients find it by RAY_AUTH_TOKEN_PATH
    (``stack.env``); the token itself is in no environment, command line or log."""
    name = "ray"
    port_names = RAY_PORTS
    stop_leader_only = True     # ``ray start --block`` drains the node and stops its own children on SIGTERM

    def url(self, stack):
        return f"http://{HOST}:{self.ports(stack)['dashboard']}"

    def address(self, stack) -> str:
        return f"{HOST}:{self.ports(stack)['gcs']}"

    def env(self, stack):
        return {"RAY_ADDRESS": self.address(stack), "RAY_API_SERVER_ADDRESS": self.url(stack),
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(stack.ray_token_file)}

    def state(self, stack):
        return {"ray_temp_dir": str(stack.ray_temp_dir)}

    def start(self, stack, startup, started):
        env = {**base_env(), **RAY_ENV, **stack.public_env(), **key_env(startup.keys), **startup.mlflow.client_env(),
               "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}   # ray-head.log as it happens
        for key in RAY_CLIENT_KEYS:   # the head is not a client of itself (its token: RAY_AUTH_*)
            env.pop(key)
        stack.ray_temp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_path = stack.state_dir / "ray-head.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(self._command(stack, startup.num_cpus), stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env, cwd=stack.state_dir, start_new_session=True)
        started(process.pid)
        deadline = time.monotonic() + startup.timeout
        # Ready = the head node is registered and alive (the dashboard answers before the raylet
        # has started, and before a failing `ray start` gives up) and the job API answers.
        while not (self.healthy(stack) and http_ok(f"{self.url(stack)}/api/jobs/", headers=token_header(stack))):
            if process.poll() is not None:
                raise StackError(f"ray start exited with code {process.returncode}; log {log_path}:\n"
                                 f"{log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise StackError(f"Ray dashboard {self.url(stack)} not ready after {startup.timeout:.0f} s; "
                                 f"log {log_path}:\n{log_tail(log_path)}")
            time.sleep(0.5)

    def _command(self, stack, num_cpus: int | None) -> list[str]:
        ports = self.ports(stack)
        command = [
            str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
            f"--node-ip-address={HOST}", f"--dashboard-host={HOST}", "--disable-usage-stats",
            f"--temp-dir={stack.ray_temp_dir}",
            f"--port={ports['gcs']}", f"--dashboard-port={ports['dashboard']}",
            f"--ray-client-server-port={ports['client_server']}",
            f"--dashboard-agent-listen-port={ports['dashboard_agent_http']}",
            f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
            f"--metrics-export-port={ports['metrics_export']}",
            f"--runtime-env-agent-port={ports['runtime_env_agent']}",
            f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
        ]
        return command + ([f"--num-cpus={num_cpus}"] if num_cpus is not None else [])

    def healthy(self, stack):
        """The head node is registered and alive."""
        request = urllib.request.Request(f"{self.url(stack)}/api/v0/nodes", headers=token_header(stack))
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                nodes = json.loads(response.read())["data"]["result"]["result"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return any(node.get("state") == "ALIVE" for node in nodes)


def token_header(stack: "LocalStack") -> dict[str, str]:
    """The Authorization header Ray's dashboard asks for (Ray's own clients send the same)."""
    try:
        return {"Authorization": f"Bearer {stack.ray_token_file.read_text().strip()}"}
    except OSError:
        return {}


def base_env() -> dict[str, str]:
    """This process's environment less what the stack sets itself, with this interpreter's
    scripts first on PATH (jobs run ``python``, and it must be this environment's)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(_INHERITED_NOT)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull   # no ~/.aws settings
    return env
