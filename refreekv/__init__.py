"""refreekv: threshold-free KV-cache pruning (ReFreeKV, arXiv 2502.16886).

Importing the package loads the native operators (torch.ops.refreekv.*).
"""

from refreekv._native import built_with_cuda
from refreekv.ops import adaptive_keep_count, attention_importance, compact_kv

__version__ = "0.1.0"

__all__ = [
    "adaptive_keep_count",
    "attention_importance",
    "built_with_cuda",
    "compact_kv",
]
