#!/usr/bin/env bash
# GPU check for refreekv's CUDA kernels, on a fresh GPU machine where a CUDA
# build of torch (and pytest) is already installed; nothing is downloaded.
#
#   benchmarks/gpu_check.sh            # from any directory
#
# 1. builds the extension in place for this machine's GPU (TORCH_CUDA_ARCH_LIST
#    defaults to the device's own capability, e.g. 9.0 on an H200; MAX_JOBS to
#    the core count),
# 2. runs the operator tests, which then run on CUDA as well as CPU
#    (tests/test_ops_*.py, including the CUDA/CPU parity suite with the paged
#    operators, and
#    tests/test_native.py),
# 3. runs benchmarks/gpu_integration_check.py: refreekv.patch end to end on
#    tiny models of six families, tokens and kept counts against the CPU,
# 4. runs benchmarks/bench_cuda.py: w = 1 bandwidth against a device copy,
#    w = n time and TFLOP/s against SDPA, keep-count and compaction timings.
# About 3-4 minutes on an H200. Exits non-zero if the build or a test fails;
# the benchmark reports figures and targets but does not fail on them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
start=$SECONDS

"$PYTHON" - <<'PY'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a visible CUDA device"
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {p.name}, sm_{p.major}{p.minor}")
PY
"$PYTHON" -c "import pytest" 2>/dev/null || { echo "gpu_check.sh: pytest is not installed for $PYTHON" >&2; exit 1; }

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi

echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
REFREEKV_FORCE_CUDA=1 "$PYTHON" setup.py --quiet build_ext --inplace
"$PYTHON" -c "import refreekv; assert refreekv.built_with_cuda(), 'extension built without CUDA'; print('refreekv.built_with_cuda() = True')"
echo "   build done after $((SECONDS - start)) s"

echo "== CUDA operator tests"
# Spread over the machine's cores when pytest-xdist is there; the GPU holds one
# CUDA context per worker with room to spare.
parallel=()
if "$PYTHON" -c "import xdist" 2>/dev/null; then parallel=(-n "${PYTEST_WORKERS:-8}"); fi
"$PYTHON" -m pytest -q -p no:cacheprovider ${parallel[@]+"${parallel[@]}"} tests/test_ops_*.py tests/test_native.py
echo "   tests done after $((SECONDS - start)) s"

echo "== refreekv.patch on CUDA against the CPU"
# A failure here is reported at the end: GPU time is scarce, the benchmark
# still runs.
integration=0
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/gpu_integration_check.py || integration=$?
echo "   integration check done after $((SECONDS - start)) s (exit status $integration)"

echo "== benchmark"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/bench_cuda.py "$@"
echo "== gpu_check.sh finished in $((SECONDS - start)) s"
if [ "$integration" -ne 0 ]; then echo "gpu_check.sh: the integration check failed" >&2; exit "$integration"; fi
