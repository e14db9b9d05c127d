"""Loads the compiled extension. There is no Python fallback: without the
native operators refreekv does not import."""

import torch  # noqa: F401  (loads libtorch, which the extension links against)

try:
    from refreekv import _C
except ImportError as error:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "refreekv's native extension (refreekv._C) is not built or does not match the "
        "installed torch. Build it with `pip install --no-build-isolation -e .` (or `make build`) "
        f"in the source tree. Original error: {error}"
    ) from error


def built_with_cuda() -> bool:
    """True when the CUDA kernels were compiled into the extension."""
    return bool(_C.built_with_cuda())
