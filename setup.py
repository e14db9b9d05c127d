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


def _extension():
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-std=c++17", "-fno-math-errno"]
    cuda_sources = _sources("csrc/cuda/*.cu")
    if _build_cuda() and cuda_sources:
        return CUDAExtension(
            "refreekv._C",
            sources + cuda_sources,
            define_macros=[("REFREEKV_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]},
        )
    return CppExtension("refreekv._C", sources, extra_compile_args={"cxx": cxx_flags})


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
