"""Test-session environment and shared fixtures (real servers live in tests/fixtures/)."""
import os

# Nothing leaves this machine, nothing is downloaded at run time.
for key, value in {
    "RAY_AUTH_MODE": "disabled",
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
