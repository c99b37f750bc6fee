# Pier — developer entry points. `make run` starts the embedded default; `make test` runs everything.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIER := $(VENV)/bin/pier
NPM_DIR := deps/npm

.PHONY: install test test-k8s lint format run clean manifests

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

# The Kubernetes tier alone: the real test node (builds its binaries and images once, then reuses them; root).
test-k8s: install
	$(PY) -m pytest -q -m k8s $(PYTEST_ARGS)

run: install
	exec $(PIER) up

# The chart's values.yaml, values.schema.json and CRDs, and deploy/ (the chart rendered), from code (pier/helm.py).
manifests: install
	$(PY) -m pier.helm

clean:
	rm -rf $(VENV) $(NPM_DIR)/node_modules .pytest_cache .ruff_cache

# The test cluster's Kubernetes v1.20.2 (kube-apiserver, kube-controller-manager, kubectl; kubelet, kube-scheduler,
# kube-proxy, pause), built from Debian's source package into ${PIER_K8S_CACHE:-~/.cache/pier}/k8s-1.20.2/bin:
# ~11 minutes once on 2 cores, instant afterwards. The images its node runs (the Dockerfile's among them, built with
# buildah from a debootstrap base): ~3 minutes the first time, seconds when nothing changed.
.PHONY: k8s-binaries k8s-images k8s-up k8s-down
k8s-binaries:
	./tests/k8s/build-k8s.sh

k8s-images:
	./tests/k8s/build-images.sh

# A cluster for people: control plane + a real node, Pier installed by Helm (release pier, namespace pier). Prints
# `export KUBECONFIG=...` last. `make k8s-down` stops it and restores the host.
k8s-up: install
	$(PY) -m tests.k8s.up

k8s-down: install
	$(PY) -m tests.k8s.up --down

# Benchmarks (bench/README.md): peers from PyPI and npm into bench/.peers (pinned in bench/pins.toml), then
# every scenario on loopback; bench/results/latest.{md,json,png}. `bench-quick` takes under two minutes.
BENCH_PY := bench/.peers/venv/bin/python
.PHONY: bench bench-quick
bench: install
	$(PY) -m bench.peers
	$(BENCH_PY) -m bench.run

bench-quick: install
	$(PY) -m bench.peers
	$(BENCH_PY) -m bench.run --quick
