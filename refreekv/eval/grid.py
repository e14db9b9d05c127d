"""Sweep grids: which methods and settings a sweep runs, from a TOML file.

One table per method, named as in `refreekv.methods()`; each key is an
option of that method. A list value is swept, every other value is fixed,
and a table yields the cartesian product of its lists. A method may appear
several times as an array of tables (`[[h2o]]`) for settings that do not
combine. Options whose default is a tuple (`protected_layers`) take a list
of ints as one value and a list of lists as a sweep.

    [fullkv]

    [refreekv]
    threshold = [1e-4, 1e-3, 1e-2]

    [[h2o]]
    budget = [0.25, 0.5]

    [[h2o]]
    observation = "all"
    budget = 0.5

Every point is checked (method, option names and values) when the file is
read, so a bad grid fails before any model is loaded.
"""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refreekv.eval.errors import UsageError
from refreekv.eval.options import coerce_option, jsonable, method_defaults, method_label

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["GridPoint", "load_grid", "parse_grid"]


@dataclass(frozen=True)
class GridPoint:
    """One method with its settings. `options` holds what the grid (or
    `run --option`) set; `all_options` every option of the method, defaults
    included. Made by `GridPoint.of`, which checks the options."""

    method: str
    options: dict[str, Any]
    all_options: dict[str, Any]
    # the method, built once by `of` (methods hold only their checked options,
    # so one instance serves every layer check, patch and branch of the point)
    instance: Any = field(repr=False, compare=False)

    @classmethod
    def of(cls, method: str, options: dict[str, Any]) -> GridPoint:
        """The point of `method` with typed `options`, checked by building
        the method once: an unknown method is a UsageError, an unknown
        option or a bad value the method's TypeError or ValueError."""
        from refreekv.compression import make_method

        defaults = method_defaults(method)
        instance = make_method(method, **options)
        return cls(method, dict(options), {k: jsonable(v) for k, v in {**defaults, **options}.items()}, instance)

    @property
    def label(self) -> str:
        """The method with the options the grid set and any other that
        differs from its default, e.g. `snapkv(budget=0.5)`."""
        return method_label(self.method, self.all_options, always=self.options)

    def check_layers(self, layers: int) -> None:
        """ValueError if an option names a layer a model of `layers` layers lacks."""
        self.instance.check_model(layers)

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "method": self.method, "options": self.all_options}


def load_grid(path: str | Path) -> list[GridPoint]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"grid file {path} not found" if not path.exists() else f"grid file {path} is not a file")
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"grid file {path} is not valid TOML: {error}") from None
    try:
        return parse_grid(document)
    except UsageError as error:
        raise UsageError(f"grid file {path}: {error}") from None


def parse_grid(document: dict[str, Any]) -> list[GridPoint]:
    """The points of a parsed grid document, in file order."""
    import refreekv

    methods = refreekv.methods()
    points: list[GridPoint] = []
    for method, tables in document.items():
        if method not in methods:
            raise UsageError(f"unknown method {method!r}; available: {', '.join(methods)}")
        if isinstance(tables, dict):
            tables = [tables]
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise UsageError(f"[{method}] must be a table of options (or an array of tables), got {tables!r}")
        for table in tables:
            points += _expand(method, table, methods[method])
    if not points:
        raise UsageError("the grid names no method")
    seen: dict[str, GridPoint] = {}
    for point in points:
        same = json.dumps([point.method, point.all_options], sort_keys=True)
        if same in seen:
            raise UsageError(f"the grid has one setting twice: {seen[same].label} and {point.label}")
        seen[same] = point
    return points


def _expand(method: str, table: dict[str, Any], defaults: dict[str, Any]) -> list[GridPoint]:
    axes: list[list[tuple[str, Any]]] = []
    for key, value in table.items():
        swept = isinstance(value, list) and (
            not isinstance(defaults.get(key), tuple) or any(isinstance(v, list) for v in value)
        )
        values = value if swept else [value]
        if swept and not values:
            raise UsageError(f"[{method}] {key} is an empty list; give at least one value")
        axes.append([(key, coerce_option(method, key, v)) for v in values])
    points = []
    for combination in itertools.product(*axes):
        options = dict(combination)
        try:
            points.append(GridPoint.of(method, options))
        except (TypeError, ValueError) as error:
            shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
            raise UsageError(f"[{method}] {shown}: {error}") from None
    return points
