# Every target installs what it needs, so a fresh clone only runs `make demo` or `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help venv lint test demo bench soak clean k8s

help:
	@echo "make demo    - validate the examples, explain their routes, deliver through every example connector"
	@echo "make test    - install everything, lint (ruff, mypy --strict, import contracts), run all tests"
	@echo "make lint    - ruff, mypy --strict and the import contracts"
	@echo "make bench   - relay vs Postfix end to end, and the control plane at scale (BENCH_ARGS=...)"
	@echo "make soak    - long-running suites: SIGKILL the relay under traffic, again and again"
	@echo "make images  - build both images into dist/images: no daemon, no registry (as root)"
	@echo "make test-images - run the built images as the chart does; a second build gives the same digests"
	@echo "make k8s     - build (or reuse) kube-apiserver, etcd & co. from tools/ into ~/.cache/mailflow"
	@echo "make clean   - remove the venv and the tool caches"

venv: $(STAMP)

$(STAMP): pyproject.toml scripts/install-debian-packages.sh scripts/install-helm.sh scripts/install-test-verifiers.sh tests/verifiers/package-lock.json
	@echo "==> Debian packages for the tests on real sockets (postfix, swaks, nsd, Mail::DKIM)"
	bash scripts/install-debian-packages.sh
	bash scripts/install-helm.sh
	bash scripts/install-test-verifiers.sh
	@echo "==> creating $(VENV) with $(PYTHON)"
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@echo "==> installing mailflow (editable) and the test tools"
	$(BIN)/pip install --quiet --progress-bar off -e '.[test,bench]'
	@touch $(STAMP)

lint: venv
	@echo "==> ruff"
	$(BIN)/ruff check operator relay tests bench examples deploy
	$(BIN)/ruff format --check operator relay tests bench examples deploy
	@echo "==> mypy --strict"
	$(BIN)/mypy
	@echo "==> import contracts"
	$(BIN)/lint-imports

# The real control plane of tests/kube and tests/e2e: built from the Go modules in tools/ into
# a cache outside the clone (MAILFLOW_CACHE), reused when fresh. Without Go the suites skip,
# except with CI=true, where a missing toolchain or a failed build fails the run.
k8s:
	@echo "==> kube-apiserver, kube-controller-manager, kubectl, etcd (scripts/build-k8s.sh)"
	@status=0; bash scripts/build-k8s.sh || status=$$?; \
	if [[ $$status -ne 0 ]]; then \
		if [[ $${CI:-} == @(true|1|yes) ]]; then echo "make k8s: failed ($$status) and CI=true"; exit $$status; fi; \
		echo "make k8s: no control plane ($$status); the real-cluster suites will skip"; \
	fi

test: venv lint k8s
	@echo "==> pytest"
	$(BIN)/pytest -m "not soak and not images"

.PHONY: images images-lock test-images
# No daemon, no registry: a Debian base (mmdebstrap), the wheels built here, buildah, skopeo.
# Needs root; installs its Debian tools when missing. IMAGE_PREFIX=registry.example.com/mail/
images: venv
	@bash scripts/build-images.sh

# Refresh images/constraints.txt: the newest dependency releases that pyproject.toml allows.
images-lock: venv
	@bash scripts/build-images.sh --lock

# The built archives in a throwaway podman store, run as the chart runs them, on the host
# network and 127.0.0.1 only; then a second build must give the same digests.
test-images: venv images
	@echo "==> pytest tests/images (the images, run as the chart runs them)"
	$(BIN)/pytest -m images tests/images

demo: venv
	@bash examples/demo.sh

# Loads on 127.0.0.1 only; a private Postfix instance in a temporary folder (needs root).
# `make bench BENCH_ARGS="--messages 5000 --reuse both"`; `$(BIN)/python bench/run.py -h` lists all.
BENCH_ARGS ?=
BENCH_JSON ?= bench/results/latest.json
bench: venv
	$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/pip install --quiet --progress-bar off -e '.[bench]'
	$(BIN)/python bench/run.py --json $(BENCH_JSON) $(BENCH_ARGS)

soak: venv
	@echo "==> soak: SIGKILL the relay under traffic, again and again; reloads, full disks; the SMTP dialogue fuzzer (minutes)"
	$(BIN)/pytest -m soak -s tests/soak tests/reliability tests/security 2>&1 | tee .soak.log
	@echo "==> soak summaries"
	@grep -o 'SUMMARY .*' .soak.log || true

clean:
	rm -rf build/images $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis .soak.log
