#!/usr/bin/env bash
# Is the local stack up? One line per service (exit 0: all healthy, 1: not, 3: no stack).
#   infra/local/status.sh [--state-dir DIR]     (state dir default: $MORAM_STACK_DIR or ~/.moram/stack)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
PYTHONPATH="$ROOT/platform${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m moram_platform.stack status "$@"
