# `make demo`: set up and run the main job. `make test`: set up and run the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup guest demo test lint typecheck unit bench clean

setup: .stamp-system $(VENV)/.stamp

.stamp-system: scripts/install-system-deps
	./scripts/install-system-deps
	touch $@

$(VENV)/.stamp: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The tiny Linux guest of the demo and the end-to-end tests (Debian kernel + busybox, cached).
guest: setup
	$(BIN)/python -m blockcopy.guest.build

demo: guest
	$(BIN)/blockcopy demo

lint: setup
	$(BIN)/ruff check src tests $(wildcard bench)

typecheck: setup
	$(BIN)/mypy

# Two workers: most of the time goes to waiting on QEMU, and the crash matrix is long.
test: lint typecheck guest
	$(BIN)/pytest -q -n 2

# Figures, not pass/fail: writes bench/results/*.json and pause.png (a few minutes; --quick for less).
bench: setup
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .stamp-system .mypy_cache .ruff_cache .pytest_cache
