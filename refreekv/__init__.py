"""refreekv: threshold-free KV-cache pruning (ReFreeKV, arXiv 2502.16886).

Importing the package loads the native operators (torch.ops.refreekv.*).
`refreekv.patch(model)` compresses a transformers model's KV cache after
prefill; `refreekv.methods()` lists the methods and their options.
"""

from typing import Any

from refreekv import compression  # the methods (torch only): refreekv.compression.fixed_budget_methods() etc.
from refreekv._native import built_with_cuda
from refreekv.ops import (
    adaptive_keep_count,
    attention_importance,
    compact_kv,
    mass_keep_count,
    paged_attention,
    paged_write,
)

__version__ = "0.1.0"

__all__ = [
    "adaptive_keep_count",
    "attention_importance",
    "built_with_cuda",
    "compact_kv",
    "kv_memory",
    "mass_keep_count",
    "methods",
    "paged_attention",
    "paged_write",
    "patch",
]


# The integration imports transformers, which operator-only users may not
# need; it is loaded on first use.


def methods() -> dict[str, dict[str, Any]]:
    """Every compression method's name with its options and their defaults."""
    from refreekv.compression import available_methods

    return available_methods()


def patch(model, method="refreekv", **options):
    """Compresses `model`'s KV cache after prefill; see `refreekv.integration.patch`."""
    from refreekv.integration import patch as _patch

    return _patch(model, method, **options)


def kv_memory(cache, layers=None):
    """Bytes a cache's keys and values hold and allocate now, per layer; see
    `refreekv.integration.stats.kv_memory`."""
    from refreekv.integration import kv_memory as _kv_memory

    return _kv_memory(cache, layers)
