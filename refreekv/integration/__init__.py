"""The Hugging Face transformers integration: `patch` and what it reports."""

from refreekv.integration.patch import PatchHandle, patch
from refreekv.integration.stats import CompressionStats, KVMemory, kv_memory

__all__ = ["CompressionStats", "KVMemory", "PatchHandle", "kv_memory", "patch"]
