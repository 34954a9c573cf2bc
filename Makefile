# Every target builds or refreshes the local virtualenv first, so each works on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
DATABASE_URL ?= sqlite:///bandit.db

.PHONY: run test bench simulate mlflow-ui lint clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert (3, 11) <= sys.version_info[:2] <= (3, 12), "bandit_engine needs Python 3.11 or 3.12 (vowpal-wabbit-next wheels stop at 3.12); set PYTHON=python3.12"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

## make run: install, create the SQLite database, seed a demo catalog and keys, serve on :8000
run: $(STAMP)
	$(BIN)/bandit-engine --database-url $(DATABASE_URL) demo --host $(HOST) --port $(PORT)

## make test: the whole suite (PostgreSQL tests run when BANDIT_ENGINE_TEST_POSTGRES_URL is set)
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## make bench: speed and quality benchmarks, each against a floor measured in the same run
## (one BLAS thread: the figures are per core, and the small matrices gain nothing from more)
bench: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m benchmarks $(BENCH_ARGS)

simulate: $(STAMP)
	$(BIN)/bandit-engine simulate simulations/default.toml

mlflow-ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --workers 1 \
	  --backend-store-uri sqlite:///mlruns/mlflow.db --default-artifact-root ./mlruns \
	  --host $(HOST) --port 5000

lint: $(STAMP)
	$(BIN)/ruff check bandit_engine tests benchmarks simulations notebooks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
