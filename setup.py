"""Builds refreekv._C, the native operators, with torch.utils.cpp_extension.

The CPU build never needs a CUDA toolkit. CUDA sources (csrc/cuda/*.cu) are
compiled when a CUDA toolkit and a CUDA build of torch are both present.
Environment switches:
  REFREEKV_FORCE_CUDA=1   compile the CUDA sources or fail saying why
  REFREEKV_NO_CUDA=1      never compile them
  TORCH_CUDA_ARCH_LIST    GPU architectures (honoured by torch's build helper)
  MAX_JOBS                parallel compile jobs (honoured by torch's build helper)
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _build_cuda() -> bool:
    if _flag("REFREEKV_FORCE_CUDA") and _flag("REFREEKV_NO_CUDA"):
        raise RuntimeError("REFREEKV_FORCE_CUDA=1 and REFREEKV_NO_CUDA=1 contradict each other; set one")
    if _flag("REFREEKV_NO_CUDA"):
        return False
    available = CUDA_HOME is not None and torch.version.cuda is not None
    if _flag("REFREEKV_FORCE_CUDA") and not available:
        raise RuntimeError(
            "REFREEKV_FORCE_CUDA=1 needs a CUDA toolkit and a CUDA build of torch; "
            f"found CUDA_HOME={CUDA_HOME!r} and torch {torch.__version__} (torch.version.cuda={torch.version.cuda!r})"
        )
    return available


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _cuda_library_headers() -> list[str]:
    """torch's CUDA headers include cuSPARSE/cuBLAS headers. A toolkit that
    ships only the compiler and runtime lacks them; torch's own nvidia-* wheels
    carry them. Their folder is searched after the toolkit's (-isystem), so
    the toolkit's runtime headers still win."""
    if CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    headers = sorted(glob.glob(os.path.join(site_packages, "nvidia", "*", "include", "cusparse.h")))
    return ["-isystem", os.path.dirname(headers[0])] if headers else []


def _extension():
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # No -std: torch's build helper adds the C++ standard its headers need
    # (C++20 for torch 2.13 and 2.14; the 2.14 headers refuse C++17).
    cxx_flags = ["-O3", "-fno-math-errno"]
    cuda_sources = _sources("csrc/cuda/*.cu")
    if _build_cuda() and cuda_sources:
        # Exact expf/logf/division (no --use_fast_math): the operator is held to
        # float32 accuracy. -lineinfo costs nothing at run time and lets
        # profilers map kernels to source lines.
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + _cuda_library_headers()
        return CUDAExtension(
            "refreekv._C",
            sources + cuda_sources,
            define_macros=[("REFREEKV_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    return CppExtension("refreekv._C", sources, extra_compile_args={"cxx": cxx_flags})


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
