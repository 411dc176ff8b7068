#!/usr/bin/env bash
# Start the local stack (Ray head, SeaweedFS S3, MLflow) on 127.0.0.1; print its URLs and environment.
#   infra/local/up.sh [--state-dir DIR] [--num-cpus N]      (state dir default: $MORAM_STACK_DIR or ~/.moram/stack)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
PYTHONPATH="$ROOT/platform${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m moram_platform.stack up "$@"
