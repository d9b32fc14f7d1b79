# One Makefile for humans and CI. `make test` and `make serve` bootstrap .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch goes in first: any other torch requirement would pull CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

SERVE_STAMP := $(VENV)/.serve-installed
ALL_STAMP := $(VENV)/.all-installed

.PHONY: serve test lint typecheck unit bench container-test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(SERVE_STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[serve]'
	touch $@

$(ALL_STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[train,serve,dev]'
	touch $@ $(SERVE_STAMP)

serve: $(SERVE_STAMP)
	@echo "charstream: serving exports/ on http://$(HOST):$(PORT)  (docs: http://$(HOST):$(PORT)/docs)"
	@echo "try:  curl -s http://$(HOST):$(PORT)/v1/generate -H 'content-type: application/json' -d '{\"prompt\": \"ROMEO:\", \"max_new_chars\": 200, \"seed\": 1}'"
	@echo "      curl -sN http://$(HOST):$(PORT)/v1/generate -H 'content-type: application/json' -d '{\"prompt\": \"ROMEO:\", \"max_new_chars\": 200, \"stream\": true}'"
	$(VENV)/bin/charstream serve --host $(HOST) --port $(PORT)

lint: $(ALL_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(ALL_STAMP)
	$(VENV)/bin/mypy training service exports benchmarks charstream_cli.py

unit: $(ALL_STAMP)
	$(VENV)/bin/pytest

test: lint typecheck unit

bench: $(ALL_STAMP)
	$(PY) -m benchmarks.train_speed
	$(PY) -m benchmarks.export_speed
	$(PY) -m benchmarks.serving

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
