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

$(DEPS): requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade -r requirements/dev.txt
	touch $@

# torch must be importable while the extension compiles, hence no build isolation.
$(EXT): $(DEPS) setup.py pyproject.toml $(NATIVE_SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

build: $(EXT)

test: build
	$(PY) -m pytest -q

# Main job. Until the Hugging Face integration lands it runs the operator
# benchmark (reduced set); `make bench-ops` runs the full one.
demo: build
	$(PY) benchmarks/bench_ops.py --quick

bench-ops: build
	$(PY) benchmarks/bench_ops.py

clean:
	rm -rf build refreekv/_C*.so *.egg-info $(VENV)
