# fl-sim — `make run` (the main job on the embedded default) and `make test` (the test suite).
# Both create .venv on first use (about 2 minutes and 6 GB: torch and flwr[simulation]).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fl-sim-installed
ARGS ?=
# The run-level client secret of `make run` and `make flwr-run` (FL_SIM_CLIENT_SECRET): fixed, so their README
# figures are reproducible. A private run: `make run CLIENT_SECRET=` (OS entropy) or any other integer.
CLIENT_SECRET ?= 0

.PHONY: run test venv flwr-run deploy bench clean-runs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	FL_SIM_CLIENT_SECRET=$(CLIENT_SECRET) $(BIN)/fl-sim run $(ARGS)

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# The same apps through Flower's own CLI (a local SuperLink with the simulation runtime). Flower would otherwise
# `uv sync` the dependencies into a fresh environment for every run; the SuperLink it starts is stopped afterwards.
flwr-run: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 \
	  FLWR_HOME="$(CURDIR)/.flwr-home" FL_SIM_CLIENT_SECRET=$(CLIENT_SECRET) \
	  $(BIN)/python scripts/flwr_run_local.py $(ARGS)

# Flower's deployment engine on this machine: a TLS SuperLink and num-supernodes SuperNodes on 127.0.0.1, `flwr run`,
# then every process stopped (docs/deployment.md has the multi-machine commands).
deploy: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/fl-sim deploy $(ARGS)

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done
