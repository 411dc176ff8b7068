"""Test-session environment and shared fixtures (real servers live in tests/fixtures/)."""
import os

from fixtures.auth import session_auth_env

# Authentication on, as on a real cluster: every Ray runtime of the session (ray.init() in the
# test process, the jobs it starts) checks a token of this session's own, read from a 0600 file
# by RAY_AUTH_TOKEN_PATH; the MLflow server fixture asks for this session's user and password.
for key, value in session_auth_env().items():
    os.environ.setdefault(key, value)

# Nothing leaves this machine, nothing is downloaded at run time.
for key, value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

pytest_plugins = [
    "fixtures.paths",
    "fixtures.models",
    "fixtures.s3",
    "fixtures.mlflow_server",
    "fixtures.ray_runtime",
    "fixtures.images",
    "fixtures.smollm2",
    "fixtures.tiny_lm",
    "fixtures.memory",
]
