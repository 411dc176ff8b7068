#!/usr/bin/env bash
# Stop the local stack: exactly the processes up.sh started; all data stays in the state dir.
#   infra/local/down.sh [--state-dir DIR]     (state dir default: $MORAM_STACK_DIR or ~/.moram/stack)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
PYTHONPATH="$ROOT/platform${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m moram_platform.stack down "$@"
