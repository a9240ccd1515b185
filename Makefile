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

.PHONY: run test venv flwr-run deploy bench bench-full bench-args clean-runs

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

# Every benchmarks/bench_*.py, each ending with one JSON line of its headline figures. `make bench` runs the short
# versions (sizes below, ~15 minutes on the idle 2-core machine; each script's time is printed), `make bench-full`
# the long ones (each script's defaults, and issue 13's 10,000-client and 100-round figures). BENCH_ARGS_<name>
# overrides one script's arguments, e.g. `make bench BENCH_ARGS_bench_main="100 10"`.
BENCH_ARGS_bench_attacks ?= --seeds 1
BENCH_ARGS_bench_batch_leak ?= lenet-tanh 1
BENCH_ARGS_bench_breaching ?= --ig-iterations 500
BENCH_ARGS_bench_defenses ?= --rounds 10
BENCH_ARGS_bench_deploy ?= --rounds 3
BENCH_ARGS_bench_gpu ?= --rounds 5 --ig-iterations 200
BENCH_ARGS_bench_gradinversion ?= --iterations 100
BENCH_ARGS_bench_labels ?= lenet-tanh 1 64
BENCH_ARGS_bench_main ?= 100 10
BENCH_ARGS_bench_scale ?= --clients 100 1000 --rounds 20
BENCH_FULL_ARGS_bench_defenses ?= --rounds 100
BENCH_FULL_ARGS_bench_scale ?= --full
BENCH_FULL_ARGS_bench_gradinversion ?= --iterations 2000 --seeds 3
BENCH_FULL_ARGS_bench_labels ?= lenet-tanh 3 64
BENCH_KIND ?= BENCH_ARGS

bench: $(STAMP)
	@start=$$(date +%s); for f in benchmarks/bench_*.py; do n=$$(basename $$f .py); \
	  args=$$($(MAKE) -s --no-print-directory bench-args NAME=$$n); t=$$(date +%s); \
	  echo "== $$f $$args"; PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(BIN)/python $$f $$args || exit 1; \
	  echo "== $$f: $$(( $$(date +%s) - t )) s"; done; echo "== make bench: $$(( $$(date +%s) - start )) s in all"

bench-full:
	$(MAKE) bench BENCH_KIND=BENCH_FULL_ARGS

bench-args:
	@echo $($(BENCH_KIND)_$(NAME))
