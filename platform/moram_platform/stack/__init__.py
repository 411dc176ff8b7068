"""The local stack: a Ray head, an S3 server (SeaweedFS) and an MLflow server, all on 127.0.0.1.

    python -m moram_platform.stack up       [--state-dir DIR] [--num-cpus N]   (infra/local/up.sh)
    python -m moram_platform.stack status   [--state-dir DIR]                  (infra/local/status.sh)
    python -m moram_platform.stack down     [--state-dir DIR]                  (infra/local/down.sh)

Everything lives in one state directory (default ``$MORAM_STACK_DIR``, else ``~/.moram/stack``):

    stack.json          ports, process ids, URLs: no secrets
    credentials.json    the generated S3 keys and MLflow user/password (0600)
    ray-auth-token      the Ray cluster's token (0600): RAY_AUTH_TOKEN_PATH names it
    stack.env           the environment to ``source`` for jobs and clients (0600: it holds the keys)
    seaweedfs/          S3 data (the registry and the MLflow artifacts) and weed.log
    mlflow/             mlflow.db (runs, metrics, params) and server.log
    ray-head.log        the output of ``ray start``; Ray's own logs are in ``ray_temp_dir``

``down`` stops exactly the processes ``up`` started (their ids and start times are recorded) and
leaves the data; ``up`` again brings the same data back with the same credentials and, where
they are still free, the same ports (else new ones, and ``stack.env`` is rewritten).

Nothing listens unauthenticated: Ray runs with token authentication (RAY_AUTH_MODE=token), MLflow
with its basic-auth app, SeaweedFS's S3 gateway with the generated keys. The Ray head runs with
the S3 keys, the MLflow user, MORAM_REGISTRY_URI and MLFLOW_TRACKING_URI in its environment, so
jobs submitted with ``ray job submit`` reach the registry and MLflow without any secret in their
runtime env (which the dashboard shows).

Modules: ``services`` (one record per service: start, health, env), ``local`` (``LocalStack``,
which runs them), ``processes`` (pids, ports, private files), and the servers themselves,
``seaweed`` (``SeaweedServer``) and ``mlflow_server`` (``MlflowServer``).
"""
from .local import BUCKET, SERVICES, STATE_DIR_ENV, LocalStack, default_state_dir
from .processes import HOST, Process
from .services import StackError, ray_temp_dir

__all__ = ["BUCKET", "HOST", "SERVICES", "STATE_DIR_ENV", "LocalStack", "Process", "StackError",
           "default_state_dir", "ray_temp_dir"]
