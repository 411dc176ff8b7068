"""A registry version logged as an MLflow pyfunc model answers prompts over HTTP through
`mlflow models serve` on loopback, exactly as generating in-process does."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from fixtures.memory import RUN

from moram_platform.generation import RegistrySpec, generate, load_memory_model
from moram_platform.serving import _prompts, log_memory_model

PROMPTS = ["What is the capital of France?", "Name a colour."]
MAX_NEW_TOKENS = 4
READY_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 300   # the server's default (60 s) is too short on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S + 30) as response:
        return json.loads(response.read())


def _wait_ready(url: str, server: subprocess.Popen, log_path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    pytest.fail(f"mlflow models serve not ready after {READY_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")


def test_prompts_from_what_the_scoring_server_hands_over():
    import pandas as pd

    assert _prompts(pd.DataFrame({"prompt": ["a", "b"]})) == ["a", "b"]
    assert _prompts(pd.DataFrame({0: ["a"]})) == ["a"]
    assert _prompts(["a", "b"]) == ["a", "b"] and _prompts("a") == ["a"] and _prompts({"prompt": "a"}) == ["a"]
    with pytest.raises(ValueError, match="non-empty prompt strings"):
        _prompts([""])


@pytest.mark.slow
@pytest.mark.long
def test_served_version_answers_like_local_generation(trained_memory, mlflow_server, tmp_path):
    spec = RegistrySpec(str(trained_memory.registry_root), RUN, 1)
    info = log_memory_model(spec, tracking_uri=mlflow_server.uri, experiment="serving-test",
                            max_new_tokens=MAX_NEW_TOKENS)
    model_uri = f"runs:/{info.run_id}/model"

    port = _free_port()
    log_path = tmp_path / "serve.log"
    # as from an activated environment: the server runs `uvicorn` from the PATH
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri, "PATH": path}
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "-w", "1", "-t", str(REQUEST_TIMEOUT_S)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, server, log_path)
        served = _post(f"{url}/invocations", {"inputs": PROMPTS})["predictions"]
        as_frame = _post(f"{url}/invocations", {"dataframe_split": {"columns": ["prompt"], "data": [[PROMPTS[0]]]},
                                                "params": {"max_new_tokens": 2}})["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)   # the server and its uvicorn worker
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    model, tokenizer, _ = load_memory_model(spec)
    assert served == generate(model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW_TOKENS)
    assert all(answer for answer in served)
    assert as_frame == generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2)
