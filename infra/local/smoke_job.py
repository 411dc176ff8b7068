"""A one-minute check of a stack: a Ray task commits a small synthetic version to the registry,
and the driver logs an MLflow run with a metric and an artifact (which the server puts in S3).

    ray job submit --working-dir . -- python infra/local/smoke_job.py --run-name smoke-1

Everything comes from the environment of the Ray head (MORAM_REGISTRY_URI, MLFLOW_TRACKING_URI and
the S3 variables): nothing secret is passed with the job. Prints one JSON line, prefixed
``smoke-result:``, with what it wrote.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for source in (str(ROOT), str(ROOT / "platform")):
    if source not in sys.path:
        sys.path.insert(0, source)

import ray  # noqa: E402


@ray.remote(num_cpus=0.1)
def commit_synthetic_version(run_name: str) -> dict:
    """Runs on a Ray worker: it reaches S3 with the credentials the head gave it."""
    from moram_platform.registry import Registry
    from moram_platform.testing.shards import synthetic_shard

    registry = Registry()     # $MORAM_REGISTRY_URI
    version = registry.commit(run_name, synthetic_shard("smoke", 0), base_model="synthetic",
                              metrics={"accuracy": 42.0})
    return {"registry": registry.uri, "version": version.version}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-name", required=True, help="registry run and MLflow run name")
    parser.add_argument("--experiment", default="stack-smoke")
    args = parser.parse_args()
    for key in ("MORAM_REGISTRY_URI", "MLFLOW_TRACKING_URI"):
        if not os.environ.get(key):
            print(f"error: {key} is not set in the job's environment (start the Ray head with it)", file=sys.stderr)
            return 2

    ray.init()          # the cluster the job was submitted to (RAY_ADDRESS)
    written = ray.get(commit_synthetic_version.remote(args.run_name))

    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment(args.experiment)
    with mlflow.start_run(run_name=args.run_name) as run:
        mlflow.log_param("registry_version", written["version"])
        mlflow.log_metric("accuracy", 42.0)
        with tempfile.TemporaryDirectory() as folder:
            note = Path(folder) / "smoke.txt"
            note.write_text(f"run {args.run_name}: registry version {written['version']}\n")
            mlflow.log_artifact(str(note))
    written.update(mlflow_run_id=run.info.run_id, experiment=args.experiment)
    print("smoke-result:", json.dumps(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
