"""Whether the calling thread is inside a forward of a refreekv-patched model.

A compressed cache layer appends only there: an unpatched model would attend
over its rows with masks built for the positions it stands for.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["patched_forward", "patched_forward_began", "patched_forward_ended", "require_patched_forward"]


class _PatchedForwards(threading.local):
    """How deep the calling thread is in forwards of refreekv-patched models."""

    depth = 0


_patched_forwards = _PatchedForwards()


def patched_forward_began() -> None:
    _patched_forwards.depth += 1


def patched_forward_ended() -> None:
    _patched_forwards.depth -= 1


def require_patched_forward(layer) -> None:
    """Refuses an append to a compressed layer outside a patched forward."""
    if _patched_forwards.depth == 0:
        raise RuntimeError(
            f"this cache holds a prompt compressed by refreekv ({type(layer).__name__} standing for "
            f"{layer.get_seq_length()} positions), which only a model patched by refreekv can continue (its "
            "attention reads the rows held, not those transformers' masks describe). Continue it inside "
            "refreekv.patch(model, ...) (any method), or start from a new cache"
        )


@contextmanager
def patched_forward() -> Iterator[None]:
    """Appending to compressed layers outside a model's forward (tests,
    tools that fill a cache by hand) as a patched forward would."""
    patched_forward_began()
    try:
        yield
    finally:
        patched_forward_ended()
