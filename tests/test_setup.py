"""setup.py decides what to compile before compiling anything: a GPU
architecture the CUDA kernels cannot be built for is named up front, and the
CPU operators still install (unless REFREEKV_FORCE_CUDA=1 insists)."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_TORCH = torch.version.cuda is not None


def run_setup(**env):
    # `--name` evaluates the extension (and so every build decision) and
    # compiles nothing.
    return subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env}
    )


def test_forced_cuda_build_refuses_an_architecture_below_sm70():
    result = run_setup(REFREEKV_FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST="6.1;8.0")
    assert result.returncode != 0
    if CUDA_TORCH:
        assert "need sm_70 or newer" in result.stderr and "targets sm_61" in result.stderr, result.stderr
    else:  # a CPU build of torch is refused first, by name too
        assert "REFREEKV_FORCE_CUDA=1 needs a CUDA toolkit and a CUDA build of torch" in result.stderr, result.stderr


@pytest.mark.skipif(not CUDA_TORCH, reason="only a CUDA build of torch compiles CUDA sources; this one is CPU-only")
def test_unbuildable_architecture_falls_back_to_the_cpu_operators():
    result = run_setup(REFREEKV_FORCE_CUDA="0", TORCH_CUDA_ARCH_LIST="5.2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "refreekv"
    assert "targets sm_52" in result.stderr and "Building the CPU operators only" in result.stderr, result.stderr


@pytest.mark.skipif(not CUDA_TORCH, reason="only a CUDA build of torch compiles CUDA sources; this one is CPU-only")
def test_supported_architectures_pass_the_check():
    result = run_setup(REFREEKV_FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST="7.5;8.0;9.0")
    assert result.returncode == 0, result.stderr
    assert "refreekv:" not in result.stderr, result.stderr
