"""The local stack: a Ray head, an S3 server (SeaweedFS) and an MLflow server, all on 127.0.0.1.

    python -m moram_platform.stack up       [--state-dir DIR] [--num-cpus N]   (infra/local/up.sh)
    python -m moram_platform.stack status   [--state-dir DIR]                  (infra/local/status.sh)
    python -m moram_platform.stack down     [--state-dir DIR]                  (infra/local/down.sh)

Everything lives in one state directory (default ``$MORAM_STACK_DIR``, else ``~/.moram/stack``):

    stack.json          ports, process ids, URLs: no secrets
    credentials.json    the generated S3 keys (0600)
    stack.env           the environment to ``source`` for jobs and clients (0600: it holds the keys)
    seaweedfs/          S3 data (the registry and the MLflow artifacts) and weed.log
    mlflow/             mlflow.db (runs, metrics, params) and server.log
    ray-head.log        the output of ``ray start``; Ray's own logs are in ``ray_temp_dir``

``down`` stops exactly the processes ``up`` started (their ids and start times are recorded) and
leaves the data; ``up`` again brings the same data back with the same credentials and, where
they are still free, the same ports (else new ones, and ``stack.env`` is rewritten).

The Ray head runs with the S3 credentials, MORAM_REGISTRY_URI and MLFLOW_TRACKING_URI in its
environment, so jobs submitted with ``ray job submit`` reach the registry and MLflow without any
secret in their runtime env (which the dashboard shows).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .testing.mlflow_server import MlflowServer
from .testing.seaweed import PORT_NAMES as SEAWEED_PORTS
from .testing.seaweed import REGION, SeaweedServer, free_ports

HOST = "127.0.0.1"
BUCKET = "moram"
REGISTRY_PREFIX = "registry"
ARTIFACTS_PREFIX = "mlflow-artifacts"
STATE_DIR_ENV = "MORAM_STACK_DIR"
SERVICES = ("seaweedfs", "mlflow", "ray")     # start order; ``down`` stops in reverse
RAY_PORTS = ("gcs", "dashboard", "client_server", "dashboard_agent_http", "dashboard_agent_grpc",
             "metrics_export", "runtime_env_agent", "node_manager", "object_manager")
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
# Variables of the caller's shell that must not leak into the stack's services: the stack sets its own.
_INHERITED_NOT = ("AWS_", "MLFLOW_TRACKING_", "MLFLOW_S3_", "MORAM_REGISTRY_URI", "RAY_ADDRESS",
                  "RAY_API_SERVER_ADDRESS")


class StackError(RuntimeError):
    """The stack could not be started, stopped or read; the message names the file or service."""


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or Path.home() / ".moram" / "stack").expanduser()


def ray_temp_dir(state_dir: Path) -> Path:
    """Ray's session files for a stack. Its Unix sockets need a short path, so a long state dir
    gets one in the temp folder, named after the state dir (the same one after a restart)."""
    inside = Path(state_dir) / "ray"
    if len(str(inside)) <= 40:
        return inside
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"moram-ray-{digest}"


# -- processes -------------------------------------------------------------------------------
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


def _port_free(port: int) -> bool:
    """Nothing listens on it (connections of the last run still in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


# -- the stack -------------------------------------------------------------------------------
class LocalStack:
    """The local stack in ``state_dir``; see the module docstring."""

    def __init__(self, state_dir: str | os.PathLike | None = None):
        self.state_dir = Path(state_dir).expanduser().resolve() if state_dir else default_state_dir().resolve()
        self.state_file = self.state_dir / "stack.json"
        self.credentials_file = self.state_dir / "credentials.json"
        self.env_file = self.state_dir / "stack.env"
        self.state = self._read_state()

    # -- what the stack offers ---------------------------------------------------------------
    @property
    def ports(self) -> dict:
        return self.state.get("ports", {})

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['seaweedfs']['s3.port']}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{HOST}:{self.ports['mlflow']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.ports['ray']['dashboard']}"

    @property
    def ray_address(self) -> str:
        return f"{HOST}:{self.ports['ray']['gcs']}"

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
        """The environment for jobs and clients, without the S3 keys."""
        return {
            "RAY_ADDRESS": self.ray_address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "MORAM_REGISTRY_URI": self.registry_uri,
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def env(self) -> dict[str, str]:
        """``public_env()`` plus the S3 keys: what ``stack.env`` exports."""
        keys = self._credentials()
        return {**self.public_env(), "AWS_ACCESS_KEY_ID": keys["access_key"],
                "AWS_SECRET_ACCESS_KEY": keys["secret_key"]}

    # -- lifecycle ---------------------------------------------------------------------------
    def up(self, num_cpus: int | None = None, bucket: str = BUCKET, startup_timeout: float = 180.0) -> "LocalStack":
        """Start whatever is not running; idempotent. On a failure, stop what this call started."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._lock():
            self.state = self._read_state()
            running = {name for name in SERVICES if self._process(name) and self._process(name).alive()}
            if running == set(SERVICES):
                return self
            if running:   # half a stack (a crash, a killed process): restart it whole
                self._stop_all()
            self.state.setdefault("bucket", bucket)
            keys = self._credentials(create=True)
            self.state["ports"] = self._ports()
            self.state["processes"] = {}
            self.state["ray_temp_dir"] = str(self.ray_temp_dir)
            self._write_state()
            self._write_env_file()
            try:
                self._start_seaweedfs(keys, startup_timeout)
                self._start_mlflow(keys, startup_timeout)
                self._start_ray(keys, num_cpus, startup_timeout)
            except BaseException:
                self._stop_all()
                raise
            self.state["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            self._write_state()
        return self

    def down(self, timeout: float = 60.0) -> list[str]:
        """Stop the recorded processes (Ray, then MLflow, then SeaweedFS); keep every file."""
        if not self.state_file.exists():
            return []
        with self._lock():
            self.state = self._read_state()
            return self._stop_all(timeout)

    def status(self) -> dict[str, dict]:
        """Per service: its pid, whether it runs, whether it answers, and its URL."""
        report = {}
        for name in SERVICES:
            process = self._process(name)
            alive = bool(process and process.alive())
            url = {"seaweedfs": self.s3_endpoint, "mlflow": self.mlflow_uri, "ray": self.dashboard_url}[name] \
                if self.ports else None
            healthy = alive and self._healthy(name)
            report[name] = {"pid": process.pid if alive else None, "running": alive, "healthy": healthy, "url": url}
        return report

    # -- services ----------------------------------------------------------------------------
    def _start_seaweedfs(self, keys: dict, timeout: float) -> None:
        server = SeaweedServer(self.state_dir / "seaweedfs", startup_timeout=timeout, ports=self.ports["seaweedfs"],
                               access_key=keys["access_key"], secret_key=keys["secret_key"], stop_at_exit=False)
        try:
            server.start()
        except (RuntimeError, TimeoutError) as error:
            raise StackError(f"SeaweedFS did not start: {error}") from None
        self._record("seaweedfs", server.pid)
        server.create_bucket(self.bucket)

    def _start_mlflow(self, keys: dict, timeout: float) -> None:
        server = MlflowServer(self.state_dir / "mlflow", artifacts=self.artifacts_uri, startup_timeout=timeout,
                              port=self.ports["mlflow"])
        s3 = {"AWS_ACCESS_KEY_ID": keys["access_key"], "AWS_SECRET_ACCESS_KEY": keys["secret_key"],
              "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
              "AWS_ENDPOINT_URL_S3": self.s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint}
        try:
            server.start(env=s3, base_env=self._base_env())
        except (RuntimeError, TimeoutError) as error:
            server.stop()   # its process group: a worker of a server that died must not linger
            raise StackError(f"MLflow did not start: {error}") from None
        self._record("mlflow", server.pid)
        server.log.close()   # the server keeps its own handle

    def _start_ray(self, keys: dict, num_cpus: int | None, timeout: float) -> None:
        ports = self.ports["ray"]
        command = [
            str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
            f"--node-ip-address={HOST}", f"--dashboard-host={HOST}", "--disable-usage-stats",
            f"--temp-dir={self.ray_temp_dir}",
            f"--port={ports['gcs']}", f"--dashboard-port={ports['dashboard']}",
            f"--ray-client-server-port={ports['client_server']}",
            f"--dashboard-agent-listen-port={ports['dashboard_agent_http']}",
            f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
            f"--metrics-export-port={ports['metrics_export']}",
            f"--runtime-env-agent-port={ports['runtime_env_agent']}",
            f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
        ]
        if num_cpus is not None:
            command.append(f"--num-cpus={num_cpus}")
        # The head's environment is what jobs and their workers inherit: registry, MLflow, S3 keys.
        env = {**self._base_env(), **RAY_ENV, **self.public_env(),
               "AWS_ACCESS_KEY_ID": keys["access_key"], "AWS_SECRET_ACCESS_KEY": keys["secret_key"],
               "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}   # ray-head.log as it happens
        for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):   # the head is not a client of itself
            env.pop(key)
        self.ray_temp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_path = self.state_dir / "ray-head.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, cwd=self.state_dir, start_new_session=True)
        self._record("ray", process.pid)
        deadline = time.monotonic() + timeout
        # Ready = the head node is registered and alive (the dashboard answers before the raylet
        # has started, and before a failing `ray start` gives up) and the job API answers.
        while not (self._head_node_alive() and _http_ok(f"{self.dashboard_url}/api/jobs/")):
            if process.poll() is not None:
                raise StackError(f"ray start exited with code {process.returncode}; log {log_path}:\n"
                                 f"{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise StackError(f"Ray dashboard {self.dashboard_url} not ready after {timeout:.0f} s; "
                                 f"log {log_path}:\n{_tail(log_path)}")
            time.sleep(0.5)

    def _head_node_alive(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/v0/nodes", timeout=5) as response:
                nodes = json.loads(response.read())["data"]["result"]["result"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return any(node.get("state") == "ALIVE" for node in nodes)

    def _healthy(self, name: str) -> bool:
        if name == "mlflow":
            return _http_ok(f"{self.mlflow_uri}/health")
        if name == "ray":
            return self._head_node_alive()
        try:   # any HTTP answer from the S3 gateway (it refuses anonymous calls) means it is up
            urllib.request.urlopen(self.s3_endpoint, timeout=2).close()
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True

    def _stop_all(self, timeout: float = 60.0) -> list[str]:
        """Stop every recorded service, each even if stopping another failed."""
        stopped, errors = [], []
        for name in reversed(SERVICES):
            process = self._process(name)
            if process is None:
                continue
            try:
                if process.alive() or process.group():
                    # ``ray start --block`` drains the node and stops its own children on SIGTERM.
                    process.stop(timeout, leader_only=(name == "ray"))
                    stopped.append(name)
            except OSError as error:
                errors.append(f"{name} (pid {process.pid}): {error}")
                continue
            self.state["processes"].pop(name)
            self._write_state()
        if errors:
            raise StackError(f"could not stop {'; '.join(errors)}; their ids stay in {self.state_file}")
        return stopped

    # -- state -------------------------------------------------------------------------------
    def _process(self, name: str) -> Process | None:
        record = self.state.get("processes", {}).get(name)
        return Process(record["pid"], record["start_time"]) if record else None

    def _record(self, name: str, pid: int | None) -> None:
        if pid is None:
            raise StackError(f"{name} exited right after it started; see its log in {self.state_dir}")
        self.state.setdefault("processes", {})[name] = vars(Process.of(pid))
        self._write_state()

    def _ports(self) -> dict:
        """The recorded ports where all of a service's ports are still free, else new ones."""
        old = self.state.get("ports", {})
        wanted = {"seaweedfs": SEAWEED_PORTS, "mlflow": None, "ray": RAY_PORTS}
        ports = {}
        for service, names in wanted.items():
            previous = old.get(service)
            values = [previous] if isinstance(previous, int) else list((previous or {}).values())
            if previous and all(_port_free(port) for port in values):
                ports[service] = previous
            elif names is None:
                ports[service] = free_ports(1)[0]
            else:
                ports[service] = dict(zip(names, free_ports(len(names))))
        taken = [port for service in ports.values() for port in ([service] if isinstance(service, int)
                                                                   else service.values())]
        if len(set(taken)) != len(taken):   # two services got the same fresh port: draw all again
            self.state["ports"] = {}
            return self._ports()
        return ports

    def _credentials(self, create: bool = False) -> dict:
        if self.credentials_file.exists():
            try:
                keys = json.loads(self.credentials_file.read_text())
                return {"access_key": keys["access_key"], "secret_key": keys["secret_key"]}
            except (ValueError, KeyError, TypeError):
                raise StackError(f"{self.credentials_file}: not a JSON object with access_key and secret_key") from None
        if not create:
            raise StackError(f"{self.credentials_file} not found: run `up` first")
        import secrets

        keys = {"access_key": "moram" + secrets.token_hex(8), "secret_key": secrets.token_hex(20)}
        _write_private(self.credentials_file, json.dumps(keys) + "\n")
        return keys

    def _write_env_file(self) -> None:
        lines = [f"# MoRAM local stack in {self.state_dir} (written by `up`; holds S3 keys: keep it 0600)",
                 *(f"export {key}={value}" for key, value in self.env().items())]
        _write_private(self.env_file, "\n".join(lines) + "\n")

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

    @staticmethod
    def _base_env() -> dict[str, str]:
        """This process's environment less what the stack sets itself, with this interpreter's
        scripts first on PATH (jobs run ``python``, and it must be this environment's)."""
        env = {key: value for key, value in os.environ.items() if not key.startswith(_INHERITED_NOT)}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull   # no ~/.aws settings
        return env


def _write_private(path: Path, text: str) -> None:
    """Write a file that only its owner can read, without a moment at a wider mode."""
    temp = path.with_name(path.name + ".tmp")
    temp.unlink(missing_ok=True)
    with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(text)
    temp.replace(path)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- command line ----------------------------------------------------------------------------
def _describe(stack: LocalStack) -> str:
    public = stack.public_env()
    return "\n".join([
        f"MoRAM local stack (state: {stack.state_dir})",
        f"  Ray dashboard    {stack.dashboard_url}",
        f"  Ray (GCS)        {stack.ray_address}",
        f"  MLflow           {stack.mlflow_uri}",
        f"  S3 (SeaweedFS)   {stack.s3_endpoint}   bucket {stack.bucket}",
        f"  registry         {stack.registry_uri}",
        f"  MLflow artifacts {stack.artifacts_uri}",
        "",
        "Environment for jobs and clients:",
        *(f"  export {key}={value}" for key, value in public.items()),
        f"  source {stack.env_file}   # all of the above plus AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
        "",
        "Submit a job (jobs take the S3 keys from the Ray head, not from the runtime env):",
        f"  ray job submit --address {stack.dashboard_url} --working-dir . -- python jobs/trace.py \\",
        "      --config jobs/configs/trace/smollm2-135m_moram_cpu-smoke.yaml --set data.root=$PWD/../shared/datasets/TRACE-500",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moram_platform.stack", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", default=None,
                        help=f"where the stack keeps its data, ports and keys (default ${STATE_DIR_ENV} or ~/.moram/stack)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs the Ray head offers (default: all)")
    args = parser.parse_args(argv)
    try:
        stack = LocalStack(args.state_dir)
        if args.command == "up":
            before = stack.state.get("ports")
            stack.up(num_cpus=args.num_cpus)
            if before and before != stack.ports:
                print(f"note: some recorded ports were taken; new ones are in {stack.env_file}")
            print(_describe(stack))
            return 0
        if args.command == "down":
            stopped = stack.down()
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}; data kept in {stack.state_dir}")
            return 0
        if not stack.state:
            print(f"no stack in {stack.state_dir} (run up)")
            return 3
        report = stack.status()
        for name, item in report.items():
            state = "healthy" if item["healthy"] else "running, not answering" if item["running"] else "stopped"
            print(f"{name:<10} {state:<24} pid {item['pid'] or '-':<8} {item['url']}")
        print(f"environment: source {stack.env_file}")
        return 0 if all(item["healthy"] for item in report.values()) else 1
    except StackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
