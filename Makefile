# int4-qat — make help lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
DRY_RUN ?=
export DRY_RUN

# Short names for the big recipes (make recipe-qwen3-235b == make recipe-qwen3-235b-a22b-int4).
ALIASES := qwen3-235b:qwen3-235b-a22b-int4 qwen3-30b:qwen3-30b-a3b-int4 kimi-k2:kimi-k2-int4 gpt-oss-120b:gpt-oss-120b-mxfp4
resolve = $(or $(patsubst $(1):%,%,$(filter $(1):%,$(ALIASES))),$(1))

.PHONY: help install lint test test-fast demo check-recipes bench gpu-check clean

help: ## list targets
	@grep -hE '^[a-zA-Z0-9_%-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-22s %s\n", $$1, $$2}'
	@echo "  recipes:               $$(ls recipes/*.yaml 2>/dev/null | xargs -n1 basename 2>/dev/null | sed 's/\.yaml//' | tr '\n' ' ')"
	@echo "  aliases:               $(ALIASES)"
	@echo "  DRY_RUN=1 prints the commands of recipe-/slurm-/export- targets instead of running them."

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned, so no other package pulls a multi-GB CUDA build on a CPU machine
	$(PIP) install -q torch==2.13.0
	# llama-cpp-python compiles llama.cpp (cmake + gcc, CPU backend) when it installs: the slow
	# part of an install (~470 CPU-seconds: about 4 minutes on 2 idle cores), so it is timed
	@start=$$(date +%s); $(PIP) install -q $$(grep -E '^(gguf|llama-cpp-python)==' requirements.txt) && \
	  echo "llama-cpp-python + gguf installed (llama.cpp built from source) in $$(( $$(date +%s) - start )) s"
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	@touch $(STAMP)

install: $(STAMP) ## create .venv/ and install the pinned requirements (GPU extras: requirements-gpu.txt)

lint: $(STAMP) ## ruff (pycodestyle, pyflakes, bugbear; settings in pyproject.toml)
	$(VENV)/bin/ruff check .

test: lint ## lint, then run the whole test suite (CPU; gloo multi-process tests included)
	OMP_NUM_THREADS=2 $(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: $(STAMP) ## unit tests only (skips slow and multi-process tests)
	$(PY) -m pytest tests -m "not slow and not multiproc" $(PYTEST_ARGS)

demo: $(STAMP) ## the whole pipeline on CPU: BF16, PTQ vs QAT (INT4/MXFP4/NVFP4), export, reload, table + plots in runs/demo/
	$(PY) tools/demo.py $(DEMO_ARGS)

bench: $(STAMP) ## benchmarks under bench/ (ratios measured side by side)
	$(PY) bench/bench_fake_quant.py
	$(PY) bench/bench_export.py
	$(PY) bench/bench_qat_step.py
	$(PY) bench/bench_qat_overhead.py
	$(PY) bench/bench_export_ckpt.py
	$(PY) bench/bench_checksums.py
	$(PY) bench/bench_llama_cpp.py

check-recipes: $(STAMP) ## validate every recipes/*.yaml (schema, layout, group/shard, Marlin limits) and build each at its layout on meta tensors
	$(PY) tools/launch.py check recipes/*.yaml

gpu-check: $(STAMP) ## the prepared device check on one CUDA GPU (never run by CI); GPU_CHECK_ARGS="--dry-run" runs its code paths on CPU
	$(PY) tools/gpu_check.py $(GPU_CHECK_ARGS)

recipe-%: $(STAMP) ## train recipe % with torchrun on this node (e.g. recipe-tiny-moe, recipe-qwen3-235b)
	$(PY) tools/launch.py train recipes/$(call resolve,$*).yaml

slurm-%: $(STAMP) ## write (and submit, if sbatch exists) a Slurm batch script for recipe %
	$(PY) tools/launch.py slurm recipes/$(call resolve,$*).yaml

export-%: $(STAMP) ## export recipe %'s trained checkpoint to each of its export formats
	$(PY) tools/launch.py export recipes/$(call resolve,$*).yaml

clean: ## remove runs/ and caches (keeps .venv/)
	rm -rf runs .pytest_cache .hypothesis
