# The single entry point. `make demo` and `make test` set everything up on a fresh machine.
PY := .venv/bin/python
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup test test-unit lint crd demo clean

setup:
	@scripts/setup.sh

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not gpu" -ra

test-unit: setup
	$(PY) -m pytest tests/unit -ra

lint: setup
	$(PY) -m ruff check .

crd: setup
	$(PY) -m seedfork_api.crd crds/seedfork.io_modelreplicasets.yaml

demo: setup
	$(PY) -m seedfork_localdev.demo $(ARGS)

clean:
	rm -rf .venv .pytest_cache .ruff_cache
