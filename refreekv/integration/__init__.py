"""The Hugging Face transformers integration: `patch` and what it reports."""

from refreekv.integration.patch import PatchHandle, patch
from refreekv.integration.stats import CompressionStats

__all__ = ["CompressionStats", "PatchHandle", "patch"]
