"""Checks of option values, shared by the methods and `refreekv.patch`.

Each check names the option, says what it takes and what it got, and
returns the value as a plain Python object. A value of the wrong type is a
TypeError, one of the right type but out of range a ValueError. Python and
NumPy scalars are accepted (NumPy registers its numbers with the `numbers`
ABCs); tensors are not: options are settings, not data. A bool is never a
number here, although Python makes it an int: `window=True` is a mistake,
not a window of one token.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Iterable, Mapping
from typing import Any, Sequence

__all__ = [
    "check_bool",
    "check_budget",
    "check_choice",
    "check_count_or_fraction",
    "check_int",
    "check_kernel",
    "check_layer_indices",
    "check_num_sinks",
    "check_real",
    "check_tolerance",
    "check_window",
    "is_integer",
]


def _wrong_type(name: str, expected: str, value: Any) -> TypeError:
    return TypeError(f"{name} must be {expected}, got {value!r} of type {type(value).__name__}")


def _is_bool(value: Any) -> bool:
    # A NumPy bool can only exist once NumPy is imported, so this never imports it.
    numpy = sys.modules.get("numpy")
    return isinstance(value, bool) or (numpy is not None and isinstance(value, numpy.bool_))


def is_integer(value: Any) -> bool:
    """Whether `value` is an integer (a NumPy one too) and not a bool."""
    return not _is_bool(value) and isinstance(value, numbers.Integral)


def check_bool(name: str, value: Any) -> bool:
    """True or False (a NumPy bool too); never a truthy stand-in such as
    "no", 0 or None."""
    if not _is_bool(value):
        raise _wrong_type(name, "True or False", value)
    return bool(value)


def check_int(name: str, value: Any, *, minimum: int, odd: bool = False) -> int:
    """An integer >= `minimum` (odd with `odd`); 4.0 and True are refused."""
    expected = f"{'an odd' if odd else 'an'} integer >= {minimum}"
    if not is_integer(value):
        raise _wrong_type(name, expected, value)
    if value < minimum or (odd and value % 2 == 0):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def check_real(name: str, value: Any, *, minimum: float, below: float | None = None) -> float:
    """A number in [minimum, below), or >= minimum without `below`; NaN is
    refused either way."""
    expected = f"in [{minimum:g}, {below:g})" if below is not None else f"a number >= {minimum:g}"
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise _wrong_type(name, expected, value)
    number = float(value)
    # Written so that NaN, which compares False with everything, fails.
    if not (minimum <= number and (below is None or number < below)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return number


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of `choices` (strings)."""
    quoted = [repr(choice) for choice in choices]
    if len(quoted) == 2:
        expected = f"{quoted[0]} or {quoted[1]},"
    else:
        expected = f"one of {', '.join(quoted)};"  # a comma would run into the list
    if not isinstance(value, str):
        raise TypeError(f"{name} must be {expected} got {value!r} of type {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be {expected} got {value!r}")
    return str(value)


def check_count_or_fraction(name: str, value: Any, count: str = "a token count") -> int | float:
    """An int is a count (>= 1), a float a fraction of the prompt in (0, 1]:
    how budgets and window_rows are given."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise _wrong_type(name, f"a fraction in (0, 1] or {count} >= 1", value)
    if isinstance(value, numbers.Integral):
        if value < 1:
            raise ValueError(f"{name} as {count} must be >= 1, got {value!r}")
        return int(value)
    if not 0.0 < value <= 1.0:
        hint = f" (for {count}, write {int(value)})" if float(value).is_integer() and value > 1 else ""
        raise ValueError(f"{name} as a fraction of the prompt must be in (0, 1], got {value!r}{hint}")
    return float(value)


def check_layer_indices(name: str, value: Any) -> tuple[int, ...]:
    """A sequence of layer indices (negative ones count from the last
    layer), sorted and without repeats. A bare int is refused rather than
    guessed: 5 could mean layer 5 or the first five."""
    expected = "a sequence of layer indices (e.g. (0, 1), or (5,) for layer 5 alone)"
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise _wrong_type(name, expected, value)
    items = tuple(value)  # once: an iterator would be empty the second time
    wrong = [i for i in items if not is_integer(i)]
    if wrong:
        raise TypeError(f"{name} must be {expected}, got {value!r}: {', '.join(map(repr, wrong))} not an integer")
    return tuple(sorted({int(i) for i in items}))


# The options several methods share, checked alike in each of them.


def check_budget(value: Any) -> int | float:
    """A fixed budget: a token count or a fraction of the prompt."""
    return check_count_or_fraction("budget", value)


def check_window(value: Any) -> int:
    """The recent tokens a method always keeps (and reads the queries of)."""
    return check_int("window", value, minimum=1)


def check_kernel(value: Any) -> int:
    """A pooling width along the keys: odd, so it is centred on each key."""
    return check_int("kernel", value, minimum=1, odd=True)


def check_num_sinks(value: Any) -> int:
    """The first real tokens a method always keeps."""
    return check_int("num_sinks", value, minimum=0)


def check_tolerance(name: str, value: Any) -> float:
    """The share of the signal a threshold-free cut may lose, in [0, 1)."""
    return check_real(name, value, minimum=0.0, below=1.0)
