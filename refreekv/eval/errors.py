"""The errors the evaluation commands report in one line, with exit code 2
(no traceback: the user has to change the request, not the code)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

__all__ = ["ConfigMismatch", "UsageError", "usage_errors"]


class UsageError(ValueError):
    """A request that cannot run: found before any work starts."""


class ConfigMismatch(UsageError):
    """The output directory holds a run made with another configuration."""


@contextmanager
def usage_errors() -> Iterator[None]:
    """Checks of a request: a ValueError or TypeError (a bad value), or an
    OSError (a file or folder that cannot be read), becomes a UsageError."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, OSError) as error:
        raise UsageError(str(error)) from error
