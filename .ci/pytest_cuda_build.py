"""pytest plugin for `make cuda-build`: the session must test the CUDA build.

Loaded with `-p pytest_cuda_build`; it stops the run before any test if the
refreekv that pytest imports is not a CUDA build (for instance the source
tree's CPU-only extension shadowing the out-of-tree build).
"""

import pytest


def pytest_report_header(config):
    import refreekv

    return f"refreekv under test: {refreekv._native._C.__file__} (built_with_cuda={refreekv.built_with_cuda()})"


def pytest_sessionstart(session):
    import refreekv

    if not refreekv.built_with_cuda():
        raise pytest.UsageError(f"expected the CUDA build of refreekv, imported {refreekv._native._C.__file__}")
