# The two entry points of the README. Each installs what it needs, idempotently.
#   make demo   a local federation: services, hub, three spokes, one study, results
#   make test   the whole test suite (lint, unit, end-to-end on real services)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo demo-containers test test-unit lint services services-down schemas bench clean

$(STAMP): pyproject.toml */pyproject.toml scripts/bootstrap.sh
	sh scripts/bootstrap.sh "$(PYTHON)" "$(VENV)"
	touch $@

services: $(STAMP)
	$(BIN)/tributary services up

services-down: $(STAMP)
	$(BIN)/tributary services down

demo: services
	$(BIN)/tributary demo $(DEMO_ARGS)

# The same study with broker, registry, hub and spokes as the containers of
# docker-compose.yml (ports beside those of `make services`; images tributary/hub and
# tributary/spoke). As root, the state goes to /var/lib/tributary/compose: the containers'
# account cannot enter root's home (docs/deployment.md).
demo-containers: $(STAMP)
	$(BIN)/tributary demo --containers --broker-port 61623 --registry-port 5010 $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

schemas: $(STAMP)
	$(BIN)/tributary contract schemas docs/schemas

# Workers (pytest-xdist): each test file runs whole on one worker (see tests/conftest.py).
# Most of an end-to-end test's time is spent waiting for other processes, so three workers
# on two cores take the suite from about 36 to 19 minutes. PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 3

test: services lint
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# The fast half: no broker, registry or Docker engine needed.
test-unit: $(STAMP)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

bench: services
	$(BIN)/python bench/bench_deid.py
	$(BIN)/python bench/bench_aggregation.py
	$(BIN)/python bench/bench_recovery.py
	$(BIN)/python bench/bench_case_overhead.py
	$(BIN)/python bench/bench_hub_scale.py --quick
	$(BIN)/python bench/bench_training_rounds.py --quick
	$(BIN)/python bench/bench_training_privacy.py --quick
	$(BIN)/python bench/bench_cohorts.py

clean:
	rm -rf $(VENV) build .pytest_cache
