"""Builds refreekv._C, the native operators, with torch.utils.cpp_extension.

The CPU build never needs a CUDA toolkit. CUDA sources (csrc/cuda/*.cu) are
compiled when a CUDA toolkit and a CUDA build of torch are both present.
Environment switches:
  REFREEKV_FORCE_CUDA=1   compile the CUDA sources or fail saying why
  REFREEKV_NO_CUDA=1      never compile them
  TORCH_CUDA_ARCH_LIST    GPU architectures (honoured by torch's build helper);
                          without it, those of the visible GPUs
  MAX_JOBS                parallel compile jobs (honoured by torch's build helper)

The CUDA kernels need sm_70 or newer (float16 tensor-core fragments), and an
architecture the toolkit's nvcc can compile for (CUDA 13 starts at sm_75).
An architecture outside that is named before anything compiles: the build
then installs the CPU operators only, or fails under REFREEKV_FORCE_CUDA=1.
"""

import glob
import os
import re
import subprocess
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
MIN_CUDA_ARCH = (7, 0)


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
    if not available:
        return False
    reason = _unsupported_arch_reason()
    if reason is None:
        return True
    if _flag("REFREEKV_FORCE_CUDA"):
        raise RuntimeError(f"REFREEKV_FORCE_CUDA=1, but {reason}; set TORCH_CUDA_ARCH_LIST to supported architectures")
    print(
        f"refreekv: {reason}. Building the CPU operators only; set TORCH_CUDA_ARCH_LIST to supported "
        "architectures (e.g. \"7.5;8.0\") to build the CUDA kernels.",
        file=sys.stderr,
    )
    return False


def _target_archs() -> list[tuple[int, int]]:
    """The numbered architectures the CUDA build will target: those of
    TORCH_CUDA_ARCH_LIST (named ones, such as "Ampere", are left to torch),
    else those of the visible GPUs; empty when neither says."""
    requested = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if requested:
        numbered = re.findall(r"(\d+)\.(\d+)", requested)
        return sorted({(int(major), int(minor)) for major, minor in numbered})
    if torch.cuda.is_available():
        return sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return []


def _nvcc_archs() -> set[tuple[int, int]]:
    """The architectures the toolkit's nvcc compiles for (empty if it cannot say)."""
    try:
        listing = subprocess.run(
            [os.path.join(CUDA_HOME, "bin", "nvcc"), "--list-gpu-arch"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    return {(int(number[:-1]), int(number[-1])) for number in re.findall(r"compute_(\d+)", listing)}


def _unsupported_arch_reason() -> str | None:
    """Why the CUDA kernels cannot be built for the target architectures, or
    None when they can."""
    archs = _target_archs()
    too_old = [arch for arch in archs if arch < MIN_CUDA_ARCH]
    if too_old:
        return (
            f"the refreekv CUDA kernels need sm_{MIN_CUDA_ARCH[0]}{MIN_CUDA_ARCH[1]} or newer (float16 tensor-core "
            f"fragments); the build targets {', '.join(f'sm_{a}{b}' for a, b in too_old)}"
        )
    known = _nvcc_archs()
    uncompilable = [arch for arch in archs if known and arch not in known]
    if uncompilable:
        return (
            f"the CUDA toolkit at {CUDA_HOME} cannot compile for {', '.join(f'sm_{a}{b}' for a, b in uncompilable)} "
            f"(its nvcc compiles for {', '.join(f'sm_{a}{b}' for a, b in sorted(known))}); a CUDA 12 toolkit still "
            "compiles for sm_70"
        )
    return None


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
    link_flags = []
    # at::parallel_for is a header template whose body is an `omp parallel`
    # region when torch itself uses OpenMP: without -fopenmp here the kernels
    # compile it as a serial loop. Linking with -fopenmp resolves to the libgomp
    # torch already loads.
    # Linux only: Apple's clang has no -fopenmp.
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
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
            extra_link_args=link_flags,
        )
    return CppExtension("refreekv._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
