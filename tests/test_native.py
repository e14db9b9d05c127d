"""The native extension must be what runs: no Python fallback may hide it."""

import importlib.machinery
import os

import torch

import refreekv

OPERATORS = [
    "attention_importance", "adaptive_keep_count", "mass_keep_count", "compact_kv", "paged_attention", "paged_write",
]


def test_extension_is_a_compiled_module():
    path = refreekv._native._C.__file__
    assert path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), path
    assert os.path.dirname(path) == os.path.dirname(refreekv.__file__)


def test_every_operator_has_a_native_cpu_kernel():
    for name in OPERATORS:
        qualified = f"refreekv::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU"), qualified


def test_cuda_kernels_exist_exactly_when_built_with_cuda():
    for name in OPERATORS:
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(f"refreekv::{name}", "CUDA")
        assert has_cuda == refreekv.built_with_cuda(), name


def test_wrappers_call_the_registered_operators():
    assert refreekv.attention_importance is refreekv.ops.attention_importance
    for name in OPERATORS:
        assert hasattr(torch.ops.refreekv, name)
