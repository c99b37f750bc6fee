# Pier — developer entry points. `make run` starts the embedded default; `make test` runs everything.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIER := $(VENV)/bin/pier
NPM_DIR := deps/npm

.PHONY: install test lint format run clean

install: $(VENV)/.installed $(NPM_DIR)/node_modules/.installed

$(VENV)/.installed: pyproject.toml deps/install-system.sh
	./deps/install-system.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

$(NPM_DIR)/node_modules/.installed: $(NPM_DIR)/package.json $(NPM_DIR)/package-lock.json deps/install-system.sh
	./deps/install-system.sh
	cd $(NPM_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: install lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

run: install
	exec $(PIER) up

clean:
	rm -rf $(VENV) $(NPM_DIR)/node_modules .pytest_cache .ruff_cache
