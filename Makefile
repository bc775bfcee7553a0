# The two commands the README opens with: `make serve` and `make test`.
# Both create .venv in the repository root when it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
BNFOLD := $(VENV)/bin/bnfold
STAMP  := $(VENV)/.bnfold-installed

.PHONY: serve test test-soak lint repository bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[convert,dev]'
	touch $(STAMP)

## Build the embedded default repository (trains and converts the built-in models; cached).
repository: $(STAMP)
	$(BNFOLD) models build

## Serve the embedded default repository on 127.0.0.1:8000, converting it first if needed.
serve: repository
	$(BNFOLD) serve

## Lint and run the whole test suite (what CI runs).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

## The reliability soak variants: the same cases, minutes of load (RELIABILITY.md).
test-soak: $(STAMP)
	$(PY) -m pytest -m soak tests/reliability

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/convert_bench.py

clean:
	rm -rf $(VENV) models/repository models/.cache
