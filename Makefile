# The two commands the README opens with: `make serve` and `make test`.
# Both create .venv in the repository root when it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
BNFOLD := $(VENV)/bin/bnfold
STAMP  := $(VENV)/.bnfold-installed

.PHONY: serve test browser screenshots test-soak lint repository bench bench-convert bench-onnx-fold bench-serve bench-peers load-generators bench-recalibrate bench-warmup bench-memory clean

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
test: $(STAMP) browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

## The browser tests (tests/browser) drive Debian's chromium, installed here when missing
## and we are root; playwright's own browser download is never used. Without it they skip,
## except under CI=true, where they fail.
browser:
	@test -x /usr/bin/chromium || \
		if [ "$$(id -u)" != 0 ]; then \
			echo "chromium is not installed (installing it needs root): the browser tests will skip"; \
		elif ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }; then \
			echo "installing chromium failed: the browser tests will skip (and fail under CI=true)"; \
		fi

## Rewrite the console's screenshots in docs/console/ from the browser tests.
screenshots: $(STAMP) browser
	BNFOLD_UPDATE_SCREENSHOTS=1 $(PY) -m pytest -m browser tests/browser

## The reliability soak variants: the same cases, minutes of load (RELIABILITY.md).
test-soak: $(STAMP)
	$(PY) -m pytest -m soak tests/reliability

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

## Benchmarks: the converter, ONNX folding against its peers, serving, then recalibration
## (BENCHMARKS.md). The serving benchmark drives load with wrk (REST) and h2load (gRPC;
## Debian's wrk and nghttp2-client, installed here when missing and we are root), else
## with its own bounded Python clients for both.
bench: bench-convert bench-onnx-fold bench-serve bench-recalibrate bench-warmup bench-memory

bench-convert: $(STAMP)
	$(PY) benchmarks/convert_bench.py

bench-onnx-fold: $(STAMP)
	$(PY) benchmarks/onnx_fold_bench.py --write

load-generators:
	@{ command -v wrk && command -v h2load; } >/dev/null || \
		{ [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq wrk nghttp2-client; } || \
		echo "wrk or h2load is not installed (installing them needs root): the serving benchmark uses its Python clients"

bench-serve: $(STAMP) load-generators
	$(PY) benchmarks/serve_bench.py

## bnfold against MLServer, KServe and PyTriton on the same models and load, interleaved
## (BENCHMARKS.md). Not part of `bench`: the first run downloads the three peers from PyPI
## into virtualenvs of their own, outside the repository (~/.cache/bnfold/peers, or
## BNFOLD_PEERS_DIR), about 1.4 GB, a few minutes; then about 10 minutes a run. Never in CI.
bench-peers: $(STAMP) load-generators
	$(PY) benchmarks/peers_bench.py

## Accuracy of the digits models under a shift, recalibrated by `bnfold recalibrate` and by
## torch's update_bn; ResNet-18's recalibration time; the drift endpoint before and after.
bench-recalibrate: $(STAMP)
	$(PY) benchmarks/recalibration_bench.py

## What --warmup costs at start and saves the first request (fresh servers, on/off interleaved).
bench-warmup: $(STAMP)
	$(PY) benchmarks/warmup_bench.py

## Where a serving process's memory goes: fresh servers read from /proc, per-session and
## per-import costs (BENCHMARKS.md); `--ab` times session runs now against before.
bench-memory: $(STAMP)
	$(PY) benchmarks/memory_bench.py --section BENCHMARKS.md

clean:
	rm -rf $(VENV) models/repository models/.cache
