"""The errors the evaluation commands report in one line, with exit code 2
(no traceback: the user has to change the request, not the code)."""

from __future__ import annotations

__all__ = ["ConfigMismatch", "UsageError"]


class UsageError(ValueError):
    """A request that cannot run: found before any work starts."""


class ConfigMismatch(UsageError):
    """The output directory holds a run made with another configuration."""
