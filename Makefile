# Tessera: the commands the README names. Every target sets itself up (venv, installs).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run worker test test-fast bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[worker,dev]'
	touch $(STAMP)

setup: $(STAMP)  ## create the virtualenv and install Tessera with the worker and dev extras

run: $(STAMP)  ## migrate, create the first admin, start API + workers (Ctrl-C stops all)
	$(BIN)/tessera serve

test: $(STAMP)  ## the whole test suite (SQLite; also Postgres/Redis when TEST_DATABASE_URL/TEST_REDIS_URL are set)
	$(BIN)/python -m pytest

bench: $(STAMP)  ## CPU benchmarks: JSON + PNG under bench/results/
	$(BIN)/python -m bench.memory
	$(BIN)/python -m bench.throughput

lint: $(STAMP)
	$(BIN)/ruff check backend worker tests bench

clean:
	rm -rf $(VENV) .pytest_cache
