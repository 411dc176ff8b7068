"""The local stack (infra/local, moram_platform.stack) with real servers: it comes up on loopback,
runs `ray job submit` jobs that reach the S3 registry and MLflow with the head's credentials only,
stops by its recorded process ids, and comes back with its data, keys and ports."""
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from moram_platform.registry import Registry
from moram_platform.stack import SERVICES, LocalStack, Process, StackError, ray_temp_dir
from fixtures.paths import PROJECT_ROOT, TRACE_500

INFRA = PROJECT_ROOT / "infra" / "local"
RAY = str(Path(sys.executable).parent / "ray")
# The only files that may hold a secret: the S3 keys, the MLflow password, the Ray token.
SECRET_FILES = {"stack.env", "credentials.json", "s3.json", "ray-auth-token"}
SMOKE_CONFIG = "jobs/configs/trace/smollm2-135m_moram_cpu-smoke.yaml"
RUNTIME_ENV = PROJECT_ROOT / "infra" / "runtime_env.yaml"
# Where the driver and a Ray worker import the project's packages from, as one JSON line.
IMPORT_PROBE = """
import json, ray, moram, moram_platform

@ray.remote(num_cpus=0.1)
def worker_imports():
    import moram, moram_platform
    return {"moram": moram.__file__, "moram_platform": moram_platform.__file__}

ray.init()
driver = {"moram": moram.__file__, "moram_platform": moram_platform.__file__}
print("import-paths:", json.dumps({"driver": driver, "worker": ray.get(worker_imports.remote())}))
"""


@pytest.fixture
def state_dir(tmp_path):
    """A fresh state dir; whatever happens in the test, the stack is down afterwards."""
    state = tmp_path / "stack"
    yield state
    try:
        LocalStack(state).down()
    except StackError:     # a test that damaged the state file started nothing
        pass
    shutil.rmtree(ray_temp_dir(state.resolve()), ignore_errors=True)     # Ray's files live outside tmp_path


def client_env() -> dict[str, str]:
    """The caller's environment with no S3 keys, registry, MLflow or Ray credentials: a job can
    only get them from the Ray head."""
    drop = ("AWS_", "MLFLOW_TRACKING_", "MORAM_REGISTRY_URI", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_")
    return {key: value for key, value in os.environ.items() if not key.startswith(drop)}


def with_token(stack: LocalStack) -> dict[str, str]:
    """client_env() plus what `source stack.env` gives Ray's clients: token mode and the token's file."""
    return {**client_env(), **{key: stack.public_env()[key] for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}}


def script(name: str, state: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(INFRA / name), "--state-dir", str(state), *args], env=client_env(),
                          capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def client_of(stack: LocalStack):
    """This process with the stack's environment (as after `source stack.env`), restored after."""
    with pytest.MonkeyPatch.context() as patch:
        for key in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
            patch.delenv(key, raising=False)
        for key, value in stack.env().items():
            patch.setenv(key, value)
        yield


def submit(stack: LocalStack, *entrypoint: str, runtime_env: bool = False, timeout: float = 600,
           token: bool = True) -> subprocess.CompletedProcess | str:
    """`ray job submit --working-dir .` from the repository root, with `--runtime-env
    infra/runtime_env.yaml` (as on a cluster without the package) when ``runtime_env``; with the
    stack's token (its stdout), or without any (the finished process, for the refusal)."""
    options = ["--runtime-env", str(RUNTIME_ENV.relative_to(PROJECT_ROOT))] if runtime_env else []
    job = subprocess.run([RAY, "job", "submit", "--address", stack.dashboard_url, *options, "--working-dir", ".",
                          "--", *entrypoint], env=with_token(stack) if token else client_env(), cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=timeout)
    if not token:
        return job
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    return job.stdout


def stack_pids(stack: LocalStack) -> set[int]:
    return {pid for name in SERVICES for pid in stack._process(name).group()}


def listening(pids: set[int]) -> set[str]:
    """Local addresses on which these processes accept TCP connections (from `ss -ltnp`)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return {line.split()[3] for line in out.splitlines()
            if any(int(pid) in pids for pid in re.findall(r"pid=(\d+)", line))}


def files_holding(secret: str, *roots: Path) -> set[Path]:
    found = set()
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                try:
                    if secret.encode() in path.read_bytes():
                        found.add(path)
                except OSError:
                    pass
    return found


def smoke_result(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("smoke-result:"))
    return json.loads(line.split(":", 1)[1])


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(900)
def test_stack_runs_a_job_stops_cleanly_and_comes_back_with_its_data(state_dir):
    up = script("up.sh", state_dir, "--num-cpus", "2")
    assert up.returncode == 0, up.stdout + up.stderr
    stack = LocalStack(state_dir)
    keys = json.loads((state_dir / "credentials.json").read_text())
    for url in (stack.dashboard_url, stack.mlflow_uri, stack.s3_endpoint, stack.registry_uri):
        assert url in up.stdout
    assert f"source {stack.env_file}" in up.stdout
    assert keys["secret_key"] not in up.stdout + up.stderr and keys["access_key"] not in up.stdout
    token = stack.ray_token_file.read_text()
    secrets = {"S3 secret key": keys["secret_key"], "MLflow password": keys["mlflow_password"], "Ray token": token}
    assert not [what for what, secret in secrets.items() if secret in up.stdout + up.stderr]
    for private in (stack.env_file, stack.credentials_file, stack.ray_token_file, state_dir / "seaweedfs" / "s3.json"):
        assert private.stat().st_mode & 0o777 == 0o600, private
    assert f"export AWS_SECRET_ACCESS_KEY={keys['secret_key']}" in stack.env_file.read_text()

    # Everything listens on loopback only.
    pids = stack_pids(stack)
    started = [Process.of(pid) for pid in pids]
    addresses = listening(pids)
    assert addresses and all(a.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]") for a in addresses), addresses

    # `up` again while it runs changes nothing; `status` says all is well.
    assert script("up.sh", state_dir).returncode == 0
    assert {name: LocalStack(state_dir)._process(name) for name in SERVICES} == \
           {name: stack._process(name) for name in SERVICES}
    status = script("status.sh", state_dir)
    assert status.returncode == 0 and status.stdout.count("healthy") == 3, status.stdout

    # Nobody gets in without credentials: a job submitted without the token is refused (and
    # never runs), the dashboard's API answers 401 without it and 403 to a wrong one; MLflow
    # refuses a request without its user, the S3 gateway one without its keys.
    refused = submit(stack, "python", "-c", "open('/tmp/moram-must-not-run', 'w')", token=False)
    assert refused.returncode != 0 and "Authentication required" in refused.stderr, refused.stderr[-2000:]
    assert not Path("/tmp/moram-must-not-run").exists()
    assert _status(f"{stack.dashboard_url}/api/jobs/") == 401
    assert _status(f"{stack.dashboard_url}/api/jobs/", {"Authorization": "Bearer " + "0" * 64}) == 403
    assert _status(f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1") == 401
    assert _status(f"{stack.s3_endpoint}/{stack.bucket}") == 403
    assert _status(f"{stack.mlflow_uri}/health") == 200       # the health probe alone is open

    # A job: a Ray task commits to the S3 registry, the driver logs an MLflow run with an artifact.
    run_name = f"smoke-{uuid.uuid4().hex[:6]}"
    out = submit(stack, "python", "infra/local/smoke_job.py", "--run-name", run_name)
    result = smoke_result(out)
    assert result["registry"] == stack.registry_uri and result["version"] == 1
    with client_of(stack):            # the test process as a client, as after `source stack.env`
        assert Registry(stack.registry_uri).versions(run_name) == [1]
        client = MlflowClient(stack.mlflow_uri)
        assert client.get_run(result["mlflow_run_id"]).data.metrics == {"accuracy": 42.0}

    # With infra/runtime_env.yaml, the packages come from what the job shipped: `moram` from the
    # working dir, `moram_platform` as a py_module (on a cluster whose nodes lack the package;
    # this venv has it installed in editable mode, which must lose to the shipped copies).
    out = submit(stack, "python", "-c", IMPORT_PROBE, runtime_env=True)
    paths = json.loads(next(line for line in out.splitlines() if line.startswith("import-paths:")).split(":", 1)[1])
    print("import paths with infra/runtime_env.yaml:", json.dumps(paths, indent=1))
    shipped = (stack.ray_temp_dir / "session_latest").resolve() / "runtime_resources"
    for where, modules in paths.items():
        assert Path(modules["moram"]).resolve().is_relative_to(shipped / "working_dir_files"), (where, modules)
        assert Path(modules["moram_platform"]).resolve().is_relative_to(shipped / "py_modules_files"), (where, modules)

    jobs = json.dumps(_get_json(f"{stack.dashboard_url}/api/jobs/", {"Authorization": f"Bearer {token}"}))
    assert keys["access_key"] not in jobs
    assert not [what for what, secret in secrets.items() if secret in jobs]      # not in any runtime env
    with client_of(stack):            # nor in an MLflow param, tag or metric of the job
        run = MlflowClient(stack.mlflow_uri).get_run(result["mlflow_run_id"])
        logged = json.dumps([run.data.params, run.data.tags, run.data.metrics])
    assert not [what for what, secret in secrets.items() if secret in logged]

    # Stop: exactly the recorded processes, and their ports close.
    down = script("down.sh", state_dir)
    assert down.returncode == 0 and "stopped: ray, mlflow, seaweedfs" in down.stdout, down.stdout + down.stderr
    assert not [p.pid for p in started if p.alive()], "a stack process outlived down"
    assert not listening(pids)
    assert script("status.sh", state_dir).returncode == 1
    for what, secret in secrets.items():   # the logs of every service and Ray's session files
        leaked = files_holding(secret, state_dir, stack.ray_temp_dir)
        assert {path.name for path in leaked} <= SECRET_FILES, (what, leaked)

    # Restart with MLflow's port taken by someone else: the rest keeps its ports, MLflow moves,
    # and stack.env says where; the keys and all the data are the same.
    old_ports = stack.ports
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # the old server's TIME_WAITs
        squatter.bind(("127.0.0.1", old_ports["mlflow"]))
        squatter.listen()
        again = script("up.sh", state_dir, "--num-cpus", "2")
        assert again.returncode == 0, again.stdout + again.stderr
    stack = LocalStack(state_dir)
    assert stack.ports["seaweedfs"] == old_ports["seaweedfs"] and stack.ports["ray"] == old_ports["ray"]
    assert stack.ports["mlflow"] != old_ports["mlflow"]
    assert f"export MLFLOW_TRACKING_URI={stack.mlflow_uri}" in stack.env_file.read_text()
    assert json.loads(stack.credentials_file.read_text()) == keys and stack.ray_token_file.read_text() == token

    with client_of(stack):
        client = MlflowClient(stack.mlflow_uri)
        run = client.get_run(result["mlflow_run_id"])
        assert run.info.run_name == run_name and run.data.metrics == {"accuracy": 42.0}
        artifact = Path(client.download_artifacts(run.info.run_id, "smoke.txt", str(state_dir.parent)))
        assert artifact.read_text() == f"run {run_name}: registry version 1\n"
        registry = Registry(stack.registry_uri)
        assert registry.versions(run_name) == [1]
        registry.verify(run_name, 1)
    # The restarted stack serves jobs too: the same commit again is the same version (idempotent).
    assert smoke_result(submit(stack, "python", "infra/local/smoke_job.py", "--run-name", run_name))["version"] == 1
    assert script("down.sh", state_dir).returncode == 0


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(300)
def test_a_failed_start_stops_what_it_started(state_dir):
    up = script("up.sh", state_dir, "--num-cpus", "-1")       # SeaweedFS and MLflow start, then Ray fails
    assert up.returncode == 2 and "ray start exited" in up.stderr, up.stdout + up.stderr
    assert f"log {state_dir / 'ray-head.log'}" in up.stderr      # the error names the log, which says why
    assert "must be nonnegative" in (state_dir / "ray-head.log").read_text()
    assert json.loads((state_dir / "stack.json").read_text())["processes"] == {}
    left = _processes_mentioning(str(state_dir)) + _processes_mentioning(str(LocalStack(state_dir).ray_temp_dir))
    assert not left, f"processes of the failed start still run: {left}"


def test_a_damaged_state_file_is_named(state_dir):
    state_dir.mkdir()
    (state_dir / "stack.json").write_text("{not json")
    up = script("up.sh", state_dir, timeout=60)
    assert up.returncode != 0 and f"{state_dir / 'stack.json'}: not valid JSON" in up.stderr
    assert script("status.sh", state_dir, timeout=60).returncode != 0


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(1800)
def test_trace_job_on_the_stack_then_after_a_restart(state_dir):
    """The real jobs/trace.py (SmolLM2-135M, TRACE-500, Ray Train + DeepSpeed) submitted to the
    stack with infra/runtime_env.yaml: its registry version lands in S3 and its runs in MLflow,
    and both survive a restart."""
    stack = LocalStack(state_dir).up(num_cpus=2)
    run_name = f"trace-stack-{uuid.uuid4().hex[:6]}"
    out = submit(stack, "python", "jobs/trace.py", "--config", SMOKE_CONFIG, "--run-name", run_name, "--quiet",
                 "--set", "data.tasks=[C-STANCE]", "--set", "data.max_train_examples=4",
                 "--set", "data.max_eval_examples=2", "--set", "train.global_batch_size=4",
                 "--set", "scaling.num_workers=1", "--set", f"data.root={TRACE_500}",
                 "--set", "eval.max_new_tokens=4", "--set", "eval.batch_size=2", runtime_env=True, timeout=1500)
    assert f"== {run_name} ==" in out and stack.registry_uri in out

    def check(stack: LocalStack) -> None:
        with client_of(stack):
            assert Registry(stack.registry_uri).versions(run_name) == [1]
            Registry(stack.registry_uri).verify(run_name, 1)
            client = MlflowClient(stack.mlflow_uri)
            runs = client.search_runs([client.get_experiment_by_name("trace").experiment_id],
                                      filter_string=f"tags.`moram.run_id` = '{run_name}'")
        assert sorted(r.info.run_name for r in runs) == sorted([run_name, "task-0-C-STANCE"])

    check(stack)
    stack.down()
    check(LocalStack(state_dir).up(num_cpus=2))


def test_status_of_a_stopped_stack_names_each_service_and_its_url(state_dir):
    """No server needed: every service reads its URL and its part of stack.env from the
    recorded ports, and a recorded process that is gone reads as stopped."""
    stack = LocalStack(state_dir)
    state_dir.mkdir()
    gone = vars(Process(pid=2 ** 22 + 1, start_time=1))          # above the kernel's largest pid
    stack.state = {"ports": {service.name: service.fresh_ports() for service in stack.services},
                   "processes": {name: gone for name in SERVICES}}
    stack._write_state()
    assert set(stack.public_env()) == {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH",
                                       "MLFLOW_TRACKING_URI", "MORAM_REGISTRY_URI", "AWS_ENDPOINT_URL_S3",
                                       "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED"}
    assert stack.public_env()["RAY_AUTH_MODE"] == "token"           # the file's name; the token is in no env
    assert stack.public_env()["RAY_API_SERVER_ADDRESS"] == stack.dashboard_url
    status = script("status.sh", state_dir, timeout=60)
    assert status.returncode == 1, status.stdout + status.stderr
    lines = status.stdout.splitlines()
    for name, url in zip(SERVICES, (stack.s3_endpoint, stack.mlflow_uri, stack.dashboard_url)):
        assert any(line.split()[:2] == [name, "stopped"] and line.endswith(url) for line in lines), status.stdout
    assert LocalStack(state_dir).down() == []        # nothing recorded is alive: nothing to signal


def _get_json(url: str, headers: dict | None = None):
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
        return json.loads(response.read())


def _status(url: str, headers: dict | None = None) -> int:
    """The HTTP status of a GET without credentials (or with ``headers``)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _processes_mentioning(text: str) -> list[str]:
    """`pid command` of the live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
                if text.encode() in command and Process.of(int(entry.name)).alive():
                    words = command.decode(errors="replace").split("\0")
                    found.append(f"{entry.name} {' '.join(words)[:200]}")
            except OSError:
                pass
    return found
