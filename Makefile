# One-command entry points. Everything lives in a local virtual environment
# (.venv) built from pinned requirements; nothing is installed system-wide.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
EXT    := $(VENV)/.extension-built
# kvpress's environment for the peer benchmark (`make bench-peers`)
PEERS_VENV ?= .venv-peers
PEERS_PY   := $(PEERS_VENV)/bin/python
PEERS_DEPS := $(PEERS_VENV)/.deps-installed
NATIVE_SOURCES := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \))

.PHONY: setup build test demo bench bench-decode bench-ops bench-paged bench-long-prompts bench-peers needle-sweep quality quality-prefill stopping-rules coverage-axes cuda-build clean

setup: $(DEPS)

$(DEPS): requirements/dev.txt requirements/assets.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade -r requirements/dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements/assets.txt
	touch $@

# torch must be importable while the extension compiles, hence no build isolation.
$(EXT): $(DEPS) setup.py pyproject.toml $(NATIVE_SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

build: $(EXT)

test: build
	$(PY) -m pytest -q

# Main job: a planted-fact question over ~3000 tokens of essays, answered by
# SmolLM2-135M-Instruct with the full cache, ReFreeKV, Coverage (paged), SnapKV and AdaKV at 50%.
demo: build
	$(PY) -m refreekv.demo --plot demo_kept_per_layer.png

# Every benchmark; writes benchmarks/results/{latest.json, dated copy, summary.md, figures.png}.
bench: build $(PEERS_DEPS)
	$(PY) benchmarks/run_all.py --peers-python $(PEERS_PY)

# The peer benchmark alone (part of `make bench`): refreekv against NVIDIA's
# kvpress on the same model and prompts, each in its own environment and
# process; sets `peers` in benchmarks/results/latest.json. kvpress 0.5.5
# needs transformers < 5.3, so it gets its own venv (requirements/peers.txt).
$(PEERS_DEPS): requirements/peers.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install --quiet -r requirements/peers.txt
	touch $@

# PEERS_ARGS passes options on, e.g. PEERS_ARGS=--quick for a 3-minute smoke run.
bench-peers: build $(PEERS_DEPS)
	$(PY) benchmarks/bench_peers.py --peers-python $(PEERS_PY) --update-latest $(PEERS_ARGS)

# Decode-time compression alone (part of `make bench`): 4096 generated tokens
# per setting and the item-recall task on SmolLM2-135M (~30 min on 2 cores).
bench-decode: build
	$(PY) benchmarks/bench_decode.py --plot benchmarks/results/decode_rows.png

bench-ops: build
	$(PY) benchmarks/bench_ops.py

# Paged against padded storage alone (part of `make bench`): KV bytes held,
# decode tokens/s and packing cost for Coverage and AdaKV at 4k, 8k and 16k
# tokens on SmolLM2-135M, and the plot of KV bytes held against prompt length;
# sets nothing in latest.json on its own.
bench-paged: build
	$(PY) benchmarks/bench_paged.py --plot benchmarks/results/paged_held_bytes.png

# Long prompts in pieces alone (part of `make bench`, SPEC 11): peak RSS
# growth, KV held at the peak and prefill time of one forward against
# chunked and streaming prefill (full cache, Coverage, SnapKV at 50%) at 4k
# to 32k tokens on SmolLM2-135M, each row in its own process (about 24 min on
# 2 cores; fewer rows at 16k and 32k, see its docstring), and the plot of peak
# RSS growth against prompt length; sets nothing in latest.json on its own.
# LONG_PROMPTS_ARGS passes options on, e.g. --quick (2 min) or --lengths 4096.
bench-long-prompts: build
	$(PY) benchmarks/bench_long_prompts.py --plot benchmarks/results/long_prompts_peak.png $(LONG_PROMPTS_ARGS)

# ReFreeKV's options on the needle tasks of tests/test_real_model.py (~4 min)
needle-sweep: build
	$(PY) benchmarks/needle_sweep.py

# The quality map (~36 min on 2 cores): the full cache, ReFreeKV at three
# thresholds, Coverage at its default and every fixed-budget baseline at three
# budgets on the RULER-style suite's ten families at 1k and 2k tokens, suite
# seed 1 (the report part: no setting was chosen on it; sweeps/quality.toml), then the
# harness's speed, branched against plain. Sweeps run in build/quality;
# tables, figures and run.json go to benchmarks/results/quality/.
quality: build
	$(PY) benchmarks/quality_map.py

# Prompts that arrive in pieces on the quality map (SPEC 11): the full cache,
# Coverage and SnapKV at 50%, each in one forward, with the question fed after
# a question-agnostic cut of the context, and streaming in pieces of 512 and
# 1024 tokens (sweeps/prefill_modes.toml), on the RULER-style suite at 2k
# tokens. Not part of `make quality` (already ~36 min on 2 cores): these modes
# run plainly, one sequence per call. Sweeps run in build/quality-prefill;
# tables and figures go to benchmarks/results/quality_prefill/.
# PREFILL_SAMPLES sets the samples per task (default 3).
PREFILL_SAMPLES ?= 3
quality-prefill: build
	$(PY) benchmarks/quality_map.py --grid sweeps/prefill_modes.toml --lengths 2048 --samples $(PREFILL_SAMPLES) \
		--work-dir build/quality-prefill --output benchmarks/results/quality_prefill --speed-samples 0 --seed 0

# The stopping-rule study (docs/coverage.md): Coverage's axes one at a time
# with the quality grid at 1k and 2k tokens (sweeps/stopping_rules.toml), then
# the chosen settings with the baselines at 4k (sweeps/stopping_rules_long.toml);
# tables and frontier in benchmarks/results/stopping_rules/. About 70 minutes
# on 2 cores from nothing. STUDY_ARGS="--reuse build/quality-seed0/sweep" starts
# from a finished quality map of the study's seed 0, made without touching
# `make quality`'s (seed 1) with `benchmarks/quality_map.py --seed 0
# --work-dir build/quality-seed0 --output build/quality-seed0/out
# --speed-samples 0`, and only adds the study's points (measured when the map
# had 16 points and 8 families: 25 min for stage 1, 19 for stage 2).
stopping-rules: build
	$(PY) benchmarks/stopping_rules.py $(STUDY_ARGS)

# Coverage's new axes (docs/coverage.md C.9), chosen on one part of the data
# and reported on another: the tuning part (suite seed 0, the 8 studied
# families, 2k and 4k tokens, 5 samples; sweeps/coverage_axes_tune.toml),
# the choice by the rule fixed in the script, then the report part (seed 1,
# all 10 families, the 2 held-out ones included, 1k to 4k tokens, 10
# samples; sweeps/coverage_axes_report.toml plus the choice). Tables in
# benchmarks/results/coverage_axes/. About 2 hours on 2 cores from nothing.
coverage-axes: build
	$(PY) benchmarks/coverage_axes.py $(AXES_ARGS)

# CUDA build check, on any machine with nvcc (no GPU needed): a second venv
# with torch built for CUDA 13.0, the extension compiled out of tree with the
# CUDA kernels for sm_75, sm_80 and sm_90 (the in-place CPU build that `make test`
# uses is left alone), then proof that it links and registers CUDA kernels,
# and the tests of what differs between the two builds against it: the
# extension, its operators and the build decisions (the Python layers above
# the operators are the same files, run by `make test`; the CUDA tests run on
# a GPU machine and are skipped, saying so, elsewhere).
CUDA_VENV  ?= .venv-cuda
CUDA_PY    := $(CUDA_VENV)/bin/python
CUDA_DEPS  := $(CUDA_VENV)/.deps-installed
CUDA_LIB   := build/cuda-lib
CUDA_ARCHS ?= 7.5;8.0;9.0
# torch finds nvcc through PATH; a wrapper script in /usr/local/bin would make
# it guess /usr/local, so point it at the toolkit.
CUDA_HOME  ?= $(firstword $(wildcard /usr/local/cuda) $(patsubst %/bin/nvcc,%,$(realpath $(shell command -v nvcc))))

$(CUDA_DEPS): requirements/cuda.txt requirements/dev.txt requirements/assets.txt
	$(PYTHON) -m venv $(CUDA_VENV)
	grep -v '^torch==' requirements/dev.txt > $(CUDA_VENV)/dev-without-torch.txt
	$(CUDA_PY) -m pip install --quiet -r requirements/cuda.txt -r $(CUDA_VENV)/dev-without-torch.txt
	$(CUDA_PY) -m pip install --quiet --no-deps -r requirements/assets.txt
	touch $@

cuda-build: $(CUDA_DEPS)
	rm -rf $(CUDA_LIB) && mkdir -p $(CUDA_LIB)/refreekv
	cd refreekv && find . -name '*.py' -not -path '*/__pycache__/*' -exec cp --parents {} ../$(CUDA_LIB)/refreekv/ \;
	CUDA_HOME=$(CUDA_HOME) REFREEKV_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" MAX_JOBS=$${MAX_JOBS:-2} \
		$(CUDA_PY) setup.py --quiet build_ext --build-temp build/cuda-temp --build-lib $(CUDA_LIB)
	# -P: the source tree (with its CPU-only extension) must not shadow the build.
	PYTHONPATH=$(CURDIR)/$(CUDA_LIB) CUDA_HOME=$(CUDA_HOME) $(CUDA_PY) -P .ci/check_cuda_build.py --archs "$(CUDA_ARCHS)"
	PYTHONPATH=$(CURDIR)/$(CUDA_LIB):$(CURDIR)/.ci $(CUDA_VENV)/bin/pytest -q -p no:cacheprovider -p pytest_cuda_build \
		tests/test_native.py tests/test_setup.py tests/test_ops_*.py

clean:
	rm -rf build refreekv/_C*.so *.egg-info $(VENV) $(CUDA_VENV) $(PEERS_VENV)

# LongBench pipeline on synthetic tasks made offline from the bundled essays
# (passage retrieval, passage count, a planted-fact question; LongBench
# format and metrics): full cache, ReFreeKV and SnapKV at 50% on
# SmolLM2-135M-Instruct, then the comparison table and plot. Re-running
# resumes: finished samples are skipped.
LB_DIR     ?= longbench_synthetic
LB_SAMPLES ?= 6
LB_WORDS   ?= 1400
LB_RUN      = $(PY) -m refreekv.eval.longbench run --model bundled:smollm2 --data-dir $(LB_DIR)/data \
              --tasks passage_retrieval_en,passage_count,multifieldqa_en --max-input-length 4096

.PHONY: longbench-synthetic
longbench-synthetic: build
	$(PY) -m refreekv.eval.synthetic --output-dir $(LB_DIR)/data --samples $(LB_SAMPLES) --words $(LB_WORDS)
	$(LB_RUN) --method fullkv --output-dir $(LB_DIR)/fullkv
	$(LB_RUN) --method refreekv --output-dir $(LB_DIR)/refreekv
	$(LB_RUN) --method snapkv --option budget=0.5 --output-dir $(LB_DIR)/snapkv
	$(PY) -m refreekv.eval.longbench compare $(LB_DIR)/fullkv $(LB_DIR)/refreekv $(LB_DIR)/snapkv --output-dir $(LB_DIR)
