"""Authentication is on in the test session as on a cluster: the session's Ray runtimes check a
token (tests/fixtures/auth.py) and the MLflow server fixture runs MLflow's basic-auth app. A
client without the credentials is refused; with them it works. (The local stack's services:
tests/test_infra_local.py.)"""
import base64
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import ray
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.timeout(300)
CONNECT = ("import ray; ray.init(address={address!r}, log_to_driver=False); "
           "print('nodes', len(ray.nodes()))")


def _client(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_a_ray_client_without_the_token_is_refused_with_it_connects():
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    assert os.environ["RAY_AUTH_MODE"] == "token" and os.stat(os.environ["RAY_AUTH_TOKEN_PATH"]).st_mode & 0o777 == 0o600
    if ray.is_initialized():
        ray.shutdown()
    context = ray.init(num_cpus=1, include_dashboard=False)
    try:
        assert is_token_auth_enabled()
        code = CONNECT.format(address=context.address_info["gcs_address"])
        without = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH_")}
        refused = _client(code, {**without, "RAY_AUTH_MODE": "disabled"})
        assert refused.returncode != 0 and "nodes" not in refused.stdout, refused.stdout + refused.stderr[-2000:]
        accepted = _client(code, dict(os.environ))
        assert accepted.returncode == 0 and "nodes 1" in accepted.stdout, accepted.stderr[-2000:]
    finally:
        ray.shutdown()


def _status(url: str, user: str | None = None, password: str | None = None) -> int:
    headers = {}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=20) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_mlflow_server_refuses_requests_without_its_credentials(mlflow_server):
    search = f"{mlflow_server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    user, password = os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
    assert _status(search) == 401
    assert _status(search, user, password + "x") == 401
    assert _status(f"{mlflow_server.uri}/") == 401                      # the UI too
    assert _status(search, user, password) == 200
    assert _status(f"{mlflow_server.uri}/health") == 200                # the health probe alone is open
    MlflowClient(mlflow_server.uri).search_experiments()               # the session's clients: from the env
    log = (mlflow_server.workdir / "server.log").read_text(errors="replace")
    ini = (mlflow_server.workdir / "basic_auth.ini").read_text()
    assert password not in log and password not in ini
