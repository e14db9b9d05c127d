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

The `prefill` key of a table is not a method option: it says how the
point's prompt reaches the model (refreekv.eval.prefill): "one-forward"
(the default), "question-after" (the context compressed alone, the question
fed after) or "streaming-<tokens>" (pieces of that many tokens, re-cut
after each). Like an option, a list is swept:

    [snapkv]
    budget = 0.5
    prefill = ["one-forward", "question-after", "streaming-512"]

A point in another mode than one-forward is a point of its own, labelled
with its mode, e.g. `snapkv(budget=0.5) [streaming 512]`.

Every point is checked (method, option names and values, prefill mode
against the method) when the file is read, so a bad grid fails before any
model is loaded.
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
from refreekv.eval.prefill import ONE_FORWARD, PREFILL_KEY, PrefillMode

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["GridPoint", "load_grid", "parse_grid"]


@dataclass(frozen=True)
class GridPoint:
    """One method with its settings and prefill mode. `options` holds what
    the grid (or `run --option`) set; `all_options` every option of the
    method, defaults included. Made by `GridPoint.of`, which checks the
    options and the mode."""

    method: str
    options: dict[str, Any]
    all_options: dict[str, Any]
    # the method, built once by `of` (methods hold only their checked options,
    # so one instance serves every layer check, patch and branch of the point)
    instance: Any = field(repr=False, compare=False)
    prefill: PrefillMode = PrefillMode(ONE_FORWARD)

    @classmethod
    def of(cls, method: str, options: dict[str, Any], prefill: Any = None) -> GridPoint:
        """The point of `method` with typed `options` in the `prefill` mode
        (a PrefillMode or its name; None: one-forward), checked by building
        the method once: an unknown method is a UsageError, an unknown
        option, a bad value or a mode the method cannot run in the method's
        TypeError or ValueError."""
        from refreekv.compression import make_method

        defaults = method_defaults(method)
        mode = PrefillMode.parse(prefill)
        instance = make_method(method, **options)
        mode.check_method(method, instance)
        all_options = {k: jsonable(v) for k, v in {**defaults, **options}.items()}
        return cls(method, dict(options), all_options, instance, mode)

    @property
    def label(self) -> str:
        """The method with the options the grid set and any other that
        differs from its default, then the prefill mode unless it is one
        forward, e.g. `snapkv(budget=0.5)`, `coverage [question after]`."""
        return method_label(self.method, self.all_options, always=self.options) + self.prefill.suffix()

    def check_layers(self, layers: int) -> None:
        """ValueError if an option names a layer a model of `layers` layers lacks."""
        self.instance.check_model(layers)

    def to_json(self) -> dict[str, Any]:
        # A point without `prefill` (sweep.json of an older version) is one-forward.
        return {"label": self.label, "method": self.method, "options": self.all_options, PREFILL_KEY: self.prefill.name}


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
        same = json.dumps([point.method, point.all_options, point.prefill.name], sort_keys=True)
        if same in seen:
            raise UsageError(f"the grid has one setting twice: {seen[same].label} and {point.label}")
        seen[same] = point
    return points


def _prefill_modes(method: str, table: dict[str, Any]) -> list[PrefillMode]:
    """The modes a table's `prefill` key names (one-forward without it)."""
    value = table.get(PREFILL_KEY)
    values = value if isinstance(value, list) else [value]
    if not values:
        raise UsageError(f"[{method}] {PREFILL_KEY} is an empty list; give at least one mode")
    modes = []
    for item in values:
        try:
            modes.append(PrefillMode.parse(item))
        except ValueError as error:
            raise UsageError(f"[{method}] {PREFILL_KEY}: {error}") from None
    names = [mode.name for mode in modes]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UsageError(f"[{method}] {PREFILL_KEY} names {', '.join(twice)} twice")
    return modes


def _expand(method: str, table: dict[str, Any], defaults: dict[str, Any]) -> list[GridPoint]:
    modes = _prefill_modes(method, table)
    axes: list[list[tuple[str, Any]]] = []
    for key, value in table.items():
        if key == PREFILL_KEY:
            continue
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
        for mode in modes:
            try:
                points.append(GridPoint.of(method, options, mode))
            except (TypeError, ValueError) as error:
                shown = [f"{k}={v!r}" for k, v in options.items()]
                shown += [] if mode.one_forward else [f"{PREFILL_KEY}={mode.name!r}"]
                raise UsageError(f"[{method}] {', '.join(shown)}: {error}") from None
    return points
