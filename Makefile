# Set-up and everyday commands. torch==2.13.0 (a CPU build) is installed before
# the project, because a bare torch requirement resolved first pulls a multi-GB CUDA build.
# Two stamps, each redone when pyproject.toml or the constraints change: .installed is what
# running needs (make install, make demo), .installed-dev adds the test, lint, Ray, LangChain
# and ONNX Runtime toolchains on top (make lint, make test, make test-quick).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --constraint .ci/constraints.txt

.PHONY: install install-dev demo test test-quick lint clean

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# The server extra: the Quickstart that make demo leads to ends with indexer serve.
$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[server]'
	touch $@

# After the runtime stamp, so a change to pyproject.toml or the constraints redoes both, in this order.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev,ray,langchain,onnx]'
	touch $@

demo: install
	$(BIN)/indexer build dataset/corpus.jsonl --index products
	$(BIN)/indexer query products "boots that keep my feet dry on muddy mountain trails" -k 3
	@echo "Next: run '. $(VENV)/bin/activate' to put indexer on your PATH, then try the Quickstart in README.md."

lint: install-dev
	$(BIN)/ruff check indexer tests benchmarks

# Test files are shared out among one worker per core (at most 4: a worker can reach 4 GB), whole files at a
# time so that module fixtures are built once (pytest-xdist, --dist loadfile).
WORKERS := -n auto --maxprocesses 4 --dist loadfile

# The whole suite; it prints its wall time and the 15 slowest tests. CLI calls run in-process where the process
# is not what is tested (tests/helpers.py run_cli). 5 min 30 s to 6 min 50 s on a 2-core machine, no test process over 2.3 GB.
test: lint
	$(BIN)/python -m pytest -q $(WORKERS) --durations=15

# The inner loop: without the tests marked slow (crash loops, concurrent readers, Ray, full disk, huge texts) or
# process (whole processes: start-up imports, the docs' examples, models loaded on demand, a real server and browser).
test-quick: lint
	$(BIN)/python -m pytest -q $(WORKERS) -m "not slow and not process"

clean:
	rm -rf $(VENV) indexes/*/ .pytest_cache
