# The two commands of the README: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: test lint typecheck pytest demo matrix clean

$(VENV)/.test-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[test]'
	touch $@

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -e .
	touch $@

## test: lint, format check, mypy --strict and pytest (warnings are errors)
test: lint typecheck pytest

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy --strict jwtplus.py

pytest: $(VENV)/.test-installed
	$(BIN)/pytest

## demo: the SPA demo on http://127.0.0.1:8080 (examples/spa_demo.py; log in as jacky / jwtplus-demo)
demo: $(VENV)/.installed
	$(BIN)/python examples/spa_demo.py --host 127.0.0.1 --port 8080

## matrix: pytest on the oldest supported pins (Python 3.10, aiohttp 3.14.0, PyJWT 2.13.0)
## and on the newest (Python 3.13, latest aiohttp 3.14.x and PyJWT 2.x)
matrix:
	bash .ci/matrix

clean:
	rm -rf $(VENV) .venv-* .mypy_cache .ruff_cache .pytest_cache .hypothesis
