# rtmdet-serve: every command a developer or CI runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install test test-all lint fmt serve detect bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -m "not slow"

test-all: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

fmt: install
	$(VENV)/bin/ruff check --fix .

serve: install
	$(VENV)/bin/rtmdet serve

detect: install
	$(VENV)/bin/rtmdet detect examples/astronaut.jpg

bench: install
	$(PY) bench/bench_model.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
