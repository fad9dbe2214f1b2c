# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test check lint bench services clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "accord needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@ $(VENV)/.installed

$(VENV)/.installed-bench: $(VENV)/.installed-dev bench/requirements.txt
	$(BIN)/python -m pip install --quiet -r bench/requirements.txt
	@# arq pins redis<6; the figures are measured with accord's own redis-py and no hiredis.
	$(BIN)/python -m pip install --quiet --no-deps --upgrade 'redis>=8'
	-$(BIN)/python -m pip uninstall --quiet -y hiredis
	@touch $@

demo: $(VENV)/.installed
	$(BIN)/accord demo

services:
	scripts/services

check: $(VENV)/.installed-dev
	scripts/check

lint: $(VENV)/.installed-dev
	scripts/lint

test: $(VENV)/.installed-dev services check
	scripts/test

bench: $(VENV)/.installed-bench services
	scripts/bench

clean:
	rm -rf $(VENV) storage .pytest_cache .mypy_cache .ruff_cache
