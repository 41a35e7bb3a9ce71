# Every habit is one target. `make run` and `make test` install first when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=
# Test processes (pytest-xdist; 0 runs the tests in pytest's own process). Most of a test's time
# is spent waiting on services and subprocesses, so three share two cores well.
TEST_PROCESSES ?= 3
# Each test file runs whole in one process, its tests in order (tests/conftest.py puts the
# broker-cluster file and the slow ones first, so that the longest go out first).
PYTEST := $(PY) -m pytest -n $(TEST_PROCESSES) --dist loadfile --no-loadscope-reorder

.PHONY: install install-load migrate run api worker test test-fast test-faults fuzz lint format openapi bench bench-quick cluster-up cluster-down clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

install: $(INSTALLED)

LOAD_INSTALLED := $(VENV)/.installed-load
$(LOAD_INSTALLED): $(INSTALLED)
	$(PY) -m pip install --quiet -e '.[dev,load]'
	touch $(LOAD_INSTALLED)

# locust, matplotlib and uvloop: only the benchmark and the load-test kit need them.
install-load: $(LOAD_INSTALLED)

migrate: install
	$(PY) -m shared.migrate

# API + one worker in the foreground; Ctrl-C (or either one exiting) stops both. A stop asked
# for exits 0; either one failing exits with its status.
run: export LOG_FORMAT ?= text
run: migrate
	@$(PY) -m worker & worker=$$!; \
	$(PY) -m api & api=$$!; \
	trap 'kill -TERM $$worker $$api 2>/dev/null; wait; exit 0' INT TERM; \
	wait -n; status=$$?; kill -TERM $$worker $$api 2>/dev/null; wait; exit $$status

api: migrate
	$(PY) -m api

worker: migrate
	$(PY) -m worker

# Everything: unit, API, races and fault injection (what CI runs).
test: install
	$(PYTEST) $(PYTEST_ARGS)

# Without the slow races and the fault injection: a quick loop while coding.
test-fast: install
	$(PYTEST) -m "not slow and not faults" $(PYTEST_ARGS)

# Only the fault injection: full queues, outages, crash loops, SIGTERM, fuzzing.
test-faults: install
	$(PYTEST) -m faults $(PYTEST_ARGS)

# The randomised tests (hypothesis properties, seeded mutations, schemathesis) with fresh randomness
# and ten times the examples. make test replays fixed examples; this explores. The seed is printed
# first and again on failure: `FUZZ_SEED=<seed> make fuzz` replays that run.
fuzz: install
	@seed=$${FUZZ_SEED:-$$(shuf -i 1-2147483647 -n 1)}; \
	echo "make fuzz: FUZZ_SEED=$$seed"; \
	TEST_FUZZ=1 FUZZ_SEED=$$seed $(PY) -m pytest -m "hypothesis or fuzz" \
		--hypothesis-seed=$$seed $(PYTEST_ARGS) \
		|| { echo "make fuzz failed: replay with FUZZ_SEED=$$seed make fuzz"; exit 1; }

lint: install-load
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Written aside and moved into place: a failure leaves the checked-in document as it was.
openapi: install
	$(PY) -m api.openapi > openapi.json.tmp && mv openapi.json.tmp openapi.json || { rm -f openapi.json.tmp; exit 1; }

# A flash sale against the synchronous design; figures to bench/results/ (see README).
bench: install-load
	$(PY) -m bench.run

bench-quick: install-load
	$(PY) -m bench.run --quick

# A local 3-node RabbitMQ cluster (t1..t3@localhost, AMQP 5701-5703, management 15701-15703)
# for the cluster tests and bench; the system node on 5672 is never touched. The tests and the
# bench start it themselves when it is not up, and stop it after them.
cluster-up: install
	$(PY) -m tests.broker_cluster up

cluster-down: install
	$(PY) -m tests.broker_cluster down

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
