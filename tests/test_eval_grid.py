"""Sweep grids (refreekv.eval.grid): TOML tables to checked grid points."""

import pytest

from refreekv.eval.errors import UsageError
from refreekv.eval.grid import load_grid, parse_grid


def grid(tmp_path, text):
    path = tmp_path / "grid.toml"
    path.write_text(text, encoding="utf-8")
    return load_grid(path)


def test_lists_are_swept_as_a_cartesian_product_in_file_order(tmp_path):
    points = grid(tmp_path, """
[fullkv]

[snapkv]
budget = [0.25, 0.5]
window = [8, 16]
pooling = "avg"

[refreekv]
threshold = [1e-3]
""")
    assert [p.label for p in points] == [
        "fullkv",
        "snapkv(budget=0.25, window=8, pooling=avg)",
        "snapkv(budget=0.25, window=16, pooling=avg)",
        "snapkv(budget=0.5, window=8, pooling=avg)",
        "snapkv(budget=0.5, window=16, pooling=avg)",
        "refreekv(threshold=0.001)",
    ]
    snap = points[2]
    assert snap.options == {"budget": 0.25, "window": 16, "pooling": "avg"}
    assert snap.all_options == {"budget": 0.25, "window": 16, "kernel": 7, "pooling": "avg", "protected_layers": []}
    assert snap.instance.window == 16 and snap.instance.budget == 0.25


def test_arrays_of_tables_and_tuple_options(tmp_path):
    points = grid(tmp_path, """
[[h2o]]
budget = [0.25, 0.5]

[[h2o]]
observation = "all"
budget = 64

[[refreekv]]
protected_layers = [0, 1, 2]

[[refreekv]]
protected_layers = [[], [0]]
""")
    assert [p.label for p in points] == [
        "h2o(budget=0.25)", "h2o(budget=0.5)", "h2o(budget=64, observation=all)",
        "refreekv(protected_layers=(0,1,2))", "refreekv(protected_layers=())", "refreekv(protected_layers=(0))",
    ]  # fmt: skip
    assert points[2].instance.budget == 64 and isinstance(points[2].instance.budget, int)
    assert points[3].instance.protected_layers == (0, 1, 2)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[snapkv\nbudget = 0.5", "not valid TOML"),
        ("[snapkvv]\nbudget = 0.5", "unknown method 'snapkvv'; available: refreekv, coverage, fullkv"),
        ("[snapkv]\nbudgets = 0.5", "no option 'budgets'; its options: budget, window"),
        ("[snapkv]\nbudget = [0.5, 1.5]", r"budget=1.5: budget as a fraction of the prompt must be in \(0, 1\], got 1.5"),
        ("[snapkv]\nbudget = []", "budget is an empty list"),
        ("[snapkv]\nwindow = true", "window"),
        ("[refreekv]\nthreshold = \"high\"", "threshold"),
        ("snapkv = 3", r"\[snapkv\] must be a table of options"),
        ("", "the grid names no method"),
        ("[snapkv]\n[[h2o]]\n[[h2o]]\nbudget = 0.5\n", "one setting twice: h2o and h2o\\(budget=0.5\\)"),
    ],
)
def test_bad_grids_are_refused_with_what_was_expected(tmp_path, text, message):
    with pytest.raises(UsageError, match=message):
        grid(tmp_path, text)


def test_a_missing_grid_file_or_a_folder(tmp_path):
    with pytest.raises(UsageError, match="grid file .*nope.toml not found"):
        load_grid(tmp_path / "nope.toml")
    with pytest.raises(UsageError, match="is not a file"):
        load_grid(tmp_path)


BASELINES = {"fullkv", "refreekv", "streamingllm", "h2o", "snapkv", "pyramidkv", "adakv"}


@pytest.mark.parametrize("name,methods", [("default.toml", BASELINES), ("quality.toml", BASELINES | {"coverage"})])
def test_the_shipped_grids_are_valid(name, methods):
    from pathlib import Path

    points = load_grid(Path(__file__).parent.parent / "sweeps" / name)
    assert {p.method for p in points} == methods
    assert parse_grid({"fullkv": {}})[0].label == "fullkv"


def test_a_point_is_checked_by_building_its_method_once(monkeypatch):
    """`GridPoint.of` (a grid's points, `run --method --option`) builds the
    method once; that instance answers the layer check."""
    from refreekv import compression
    from refreekv.eval.grid import GridPoint

    built = []
    make_method = compression.make_method
    monkeypatch.setattr(compression, "make_method", lambda *a, **k: built.append(a) or make_method(*a, **k))
    point = GridPoint.of("refreekv", {"protected_layers": (0, 9)})
    point.check_layers(12)
    with pytest.raises(ValueError, match=r"protected_layers \[9\] out of range for a model with 4 layers"):
        point.check_layers(4)
    assert built == [("refreekv",)] and point.instance.protected_layers == (0, 9)
    assert point.label == "refreekv(protected_layers=(0,9))" and point.all_options["protected_layers"] == [0, 9]
    with pytest.raises(ValueError, match="budget"):
        GridPoint.of("snapkv", {"budget": 1.5})
    with pytest.raises(UsageError, match="unknown method 'nope'"):
        GridPoint.of("nope", {})
