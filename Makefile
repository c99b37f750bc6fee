# Pier — developer entry points. `make run` starts the embedded default; `make test` runs everything.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIER := $(VENV)/bin/pier
NPM_DIR := deps/npm

.PHONY: install test test-fast test-k8s lint format run clean manifests

install: $(VENV)/.installed $(NPM_DIR)/node_modules/.installed

# uv installs the workspace exactly as uv.lock pins it (every component editable, plus the dev tools);
# it bootstraps itself from PyPI into the venv, where the lock then keeps it.
UV := $(VENV)/bin/uv
MEMBERS := core sidecar router jobs operator examples cli
$(VENV)/.installed: pyproject.toml uv.lock $(MEMBERS:%=%/pyproject.toml) deps/install-system.sh
	./deps/install-system.sh
	test -x $(UV) || { python3 -m venv $(VENV) && $(VENV)/bin/pip install --quiet "uv>=0.13,<0.14"; }
	$(UV) sync --frozen --quiet
	touch $@

$(NPM_DIR)/node_modules/.installed: $(NPM_DIR)/package.json $(NPM_DIR)/package-lock.json deps/install-system.sh
	./deps/install-system.sh
	cd $(NPM_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: install lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The inner loop: the unit tests first (one module alone, no servers: seconds; exit 5 is "none selected"),
# then everything but them, the Kubernetes tier and the load and fault tests (marked slow), on two
# workers (every test has its own Redis, ports and sessions).
test-fast: install lint
	$(PY) -m pytest -q -m unit $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(PY) -m pytest -q -n 2 -m "not unit and not k8s and not slow" $(PYTEST_ARGS)

# The Kubernetes tier alone: the real test node (builds its binaries and images once, then reuses them; root).
test-k8s: install
	$(PY) -m pytest -q -m k8s $(PYTEST_ARGS)

run: install
	exec $(PIER) up

# The chart's values.yaml, values.schema.json and CRDs, and deploy/ (the chart rendered), from code (tools/helm.py).
manifests: install
	$(PY) -m tools.helm

clean:
	rm -rf $(VENV) $(NPM_DIR)/node_modules .pytest_cache .ruff_cache

# The test cluster's Kubernetes v1.20.2 (kube-apiserver, kube-controller-manager, kubectl; kubelet, kube-scheduler,
# kube-proxy, pause; kubemark's hollow node), built from Debian's source package into
# ${PIER_K8S_CACHE:-~/.cache/pier}/k8s-1.20.2/bin: ~14 minutes once on 2 cores, instant afterwards. The images its node runs (the Dockerfile's among them, built with
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

# The simulated cluster (bench/k8s_scale.py): the real control plane, 100 kubemark hollow nodes (make k8s-binaries),
# the operator and a router; 10,000 MCPSessions. bench/results/k8s-scale.{md,json}; README: Sizing. Not in `make test`.
# `make k8s-scale SCALE_ARGS=--quick`: 10 nodes, 500 sessions (the harness, in about fifteen minutes).
.PHONY: k8s-scale
k8s-scale: install
	./tests/k8s/build-k8s.sh
	$(PY) -m bench.k8s_scale $(SCALE_ARGS)

# Benchmarks (bench/README.md): peers from PyPI and npm into bench/.peers (pinned in bench/pins.toml), then
# every scenario on loopback; bench/results/latest.{md,json,png}. `bench-quick` takes under two minutes.
# BENCH_ARGS=--traces: Pier's processes export traces to a collector of the bench's own (what tracing costs).
BENCH_PY := bench/.peers/venv/bin/python
.PHONY: bench bench-quick
bench: install
	$(PY) -m bench.peers
	$(BENCH_PY) -m bench.run $(BENCH_ARGS)

bench-quick: install
	$(PY) -m bench.peers
	$(BENCH_PY) -m bench.run --quick $(BENCH_ARGS)
