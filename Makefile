# Tessera: the commands the README names. Every target sets itself up (venv, installs).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run test bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[worker,dev]'
	touch $(STAMP)

setup: $(STAMP)  ## create the virtualenv and install Tessera with the worker and dev extras

run: $(STAMP)  ## migrate, create the first admin, start API + workers (Ctrl-C stops all)
	$(BIN)/tessera serve

test: $(STAMP)  ## import contracts, then the whole test suite (SQLite; also Postgres/Redis when TEST_DATABASE_URL/TEST_REDIS_URL are set)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

bench: $(STAMP)  ## the CPU benchmarks of docs/benchmarks.md: JSON + PNG in bench/results/ (hours on 2 cores)
	$(BIN)/python -m bench.memory --cap resnet50=4096 --guard-gib 12
	$(BIN)/python -m bench.memory --backbones resnet50 --sizes 8192 --stream-sizes 8192 \
	    --baseline-sizes 4096,8192 --guard-gib 12 --name memory_cpu_resnet50_8192
	$(BIN)/python -m bench.memory --backbones resnet50 --sizes '' --stream-sizes 16384 --baseline-sizes '' \
	    --name memory_cpu_resnet50_16384
	$(BIN)/python -m bench.memory --backbones resnet50 --sizes '' --stream-sizes '' --baseline-sizes 3072 \
	    --guard-gib 20 --name memory_cpu_resnet50_baseline3072
	$(BIN)/python -m bench.report --plot bench/results/memory_cpu_merged.png bench/results/memory_cpu.json \
	    bench/results/memory_cpu_resnet50_8192.json bench/results/memory_cpu_resnet50_16384.json \
	    bench/results/memory_cpu_resnet50_baseline3072.json
	$(BIN)/python -m bench.planner
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.runtime
	$(BIN)/python -m bench.report bench/results/*_cpu*.json

lint: $(STAMP)
	$(BIN)/ruff check backend worker tests bench
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache
