"""Method options, typed by the option's default in `refreekv.methods()`.

Options come as `key=value` text from the command line (`parse_options`) or
already typed from a file such as a sweep's TOML (`coerce_option`). Both
look the option up and pick its rules the same way, so `--option
protected_layers=0,1` and `protected_layers = [0, 1]` give the same value.
"""

from __future__ import annotations

import argparse

from typing import Any, Callable, Iterable

from refreekv.eval.errors import UsageError

__all__ = [
    "coerce_option",
    "format_value",
    "jsonable",
    "method_defaults",
    "parse_bool",
    "parse_number",
    "parse_options",
    "parse_tuple",
]


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def parse_number(text: str) -> int | float:
    """Python literal rules: "512" is an int (a token count for budgets),
    "0.5" or "1e-3" a float."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number (e.g. 0.5 or 512), got {text!r}") from None


def parse_tuple(text: str) -> tuple[int, ...]:
    stripped = text.strip().strip("()[]")
    if stripped.lower() in ("", "none"):
        return ()
    try:
        return tuple(int(part) for part in stripped.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers (e.g. 0,1) or none, got {text!r}") from None


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list", dict: "a table"}


def _given(value: Any) -> str:
    return f"{value!r} ({_TYPE_NAMES.get(type(value), type(value).__name__)})"


def _typed_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected a boolean (true/false), got {_given(value)}")


def _typed_number(value: Any) -> int | float:
    # bool is an int to Python, but `budget = true` is a mistake, not 1 token.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    raise ValueError(f"expected a number (e.g. 0.5 or 512), got {_given(value)}")


def _typed_tuple(value: Any) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise ValueError(f"expected a list of integers (e.g. [0, 1]), got {_given(value)}")


def _typed_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"expected a string, got {_given(value)}")


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, (int, float)):
        return "number"
    if isinstance(default, tuple):
        return "tuple"
    return "str"


_FROM_TEXT: dict[str, Callable[[str], Any]] = {"bool": parse_bool, "number": parse_number, "tuple": parse_tuple, "str": str}
_FROM_VALUE: dict[str, Callable[[Any], Any]] = {
    "bool": _typed_bool, "number": _typed_number, "tuple": _typed_tuple, "str": _typed_str,
}  # fmt: skip


def method_defaults(method: str) -> dict[str, Any]:
    """Every option of `method` with its default; UsageError for an unknown method."""
    import refreekv

    methods = refreekv.methods()
    if method not in methods:
        raise UsageError(f"unknown method {method!r}; available: {', '.join(methods)}")
    return methods[method]


def _convert(method: str, defaults: dict[str, Any], key: str, value: Any, converters: dict[str, Callable[[Any], Any]]) -> Any:
    if key not in defaults:
        raise UsageError(f"method {method!r} has no option {key!r}; its options: {', '.join(defaults) or 'none'}")
    try:
        return converters[_kind(defaults[key])](value)
    except ValueError as error:
        raise UsageError(f"option {key}: {error}") from None


def parse_options(method: str, items: list[str]) -> dict[str, Any]:
    """`key=value` strings to typed options, each value read by the type of
    the option's default (bool: true/false; number: int if it is an integer
    literal, else float; tuple: comma-separated ints, "" or "none" for
    empty; str as is). Unknown methods or keys raise UsageError."""
    defaults = method_defaults(method)  # an unknown method is an error even without options
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--option expects key=value, got {item!r}")
        options[key] = _convert(method, defaults, key, text, _FROM_TEXT)
    return options


def coerce_option(method: str, key: str, value: Any) -> Any:
    """An already-typed option value (from TOML or JSON) checked by the type
    of the option's default: a bool for a bool; an int or float for a number
    (never a bool); a list of ints for a tuple (returned as a tuple); a str
    for a str. Unknown methods or keys, and other types, raise UsageError."""
    return _convert(method, method_defaults(method), key, value, _FROM_VALUE)


def jsonable(value: Any) -> Any:
    """Tuples as lists, as they read back from JSON (for comparisons)."""
    if isinstance(value, tuple):
        return [jsonable(v) for v in value]
    return value


def format_value(value: Any) -> str:
    """An option value as a label shows it: a list as (0,1), no spaces."""
    if isinstance(value, list):
        return "(" + ",".join(map(str, value)) + ")"
    return str(value)


def method_label(method: str, options: dict[str, Any], always: Iterable[str] = ()) -> str:
    """`method(key=value, ...)` showing the options (JSON values) that differ
    from the method's defaults, and those named in `always` whatever their
    value; the bare name when none is shown."""
    defaults = {k: jsonable(v) for k, v in method_defaults(method).items()}
    always = set(always)
    shown = [f"{k}={format_value(v)}" for k, v in options.items() if k in always or defaults.get(k) != v]
    return f"{method}({', '.join(shown)})" if shown else method


def comma_separated(kind: Callable[[str], Any]) -> Callable[[str], list]:
    """An argparse type for a comma-separated list of `kind` values
    (e.g. `--lengths 1024,2048`); bad text is a usage error that says what
    was expected."""

    def convert(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None

    return convert
