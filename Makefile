# The README's commands live here. `make quickstart` and `make test` each set up everything they
# need on a fresh machine: a project-local virtualenv, torch==2.13.0 first (a CPU build on machines
# without a GPU), then the package with its extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv quickstart test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,serve,board,scale]"
	touch $(STAMP)

venv: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/posttrain quickstart

# The board's tests drive Debian's chromium headless; they are skipped only where no chromium binary exists.
test: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "could not install chromium (needs root on Debian): the board's browser tests will be skipped"
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/pip install -q -e ".[dev,bench]"
	$(BIN)/python bench/sft.py

clean:
	rm -rf $(VENV) runs
