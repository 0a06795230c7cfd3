# The two commands of the README: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: test lint typecheck pytest demo matrix bench mutants campaign clean

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

## demo: the SPA demo on http://127.0.0.1:8080 (examples/spa_demo.py; log in as jacky / jwtplus-demo);
## make demo PORT=8081 for another port (a busy one is a one-line error)
PORT ?= 8080
demo: $(VENV)/.installed
	@$(BIN)/python examples/spa_demo.py --host 127.0.0.1 --port $(PORT)

## bench: jwtplus against bare aiohttp and its peers under wrk, and encode/decode against PyJWT;
## prints a Markdown table and writes it to bench/results.md, then the cache's memory bound and
## instructions per request under callgrind (about 21 minutes; BENCH_ROUNDS=1 BENCH_DURATION=2
## make bench for a quick look). Needs wrk, taskset, two CPUs and (for the last part) valgrind.
bench: $(VENV)/.bench-installed
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends wrk >/dev/null; } || \
	  { echo "make bench needs wrk (Debian/Ubuntu: apt-get install wrk)" >&2; exit 1; }
	$(BIN)/python bench/run.py
	$(BIN)/python bench/memory.py --output bench/results.md
	@if command -v valgrind >/dev/null; then $(BIN)/python bench/instructions.py --output bench/results.md; \
	  else echo "bench/instructions.py skipped: no valgrind (apt-get install valgrind)"; fi

$(VENV)/.bench-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[bench]'
	touch $@

## matrix: pytest on the oldest supported pins (Python 3.10, aiohttp 3.14.0, PyJWT 2.13.0)
## and on the newest (Python 3.13, latest aiohttp 3.x and PyJWT 2.x)
matrix:
	bash .ci/matrix

## mutants: flip one line at a time in the pipeline, checks, policies, guards, time claims and session
## helpers, and count the mutants the tests kill (.ci/mutants.py; about an hour on two cores)
mutants: $(VENV)/.test-installed
	$(BIN)/python .ci/mutants.py --jobs 2

## campaign: two servers and a real redis-server under concurrent clients, through a Redis SIGKILL and
## restart, a SIGSTOP pause and clock skews within and beyond the leeway; prints a Markdown report of
## false accepts, false rejects, errors and 503s by phase and route (.ci/campaign.py;
## about 70 seconds; needs redis-server; exits 1 on a broken invariant)
campaign: $(VENV)/.test-installed
	$(BIN)/python .ci/campaign.py

clean:
	rm -rf $(VENV) .venv-* .mypy_cache .ruff_cache .pytest_cache .hypothesis
