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


# -- prefill modes (the `prefill` key) ------------------------------------------


def test_the_prefill_key_sweeps_modes_as_points_of_their_own(tmp_path):
    points = grid(tmp_path, """
[fullkv]
prefill = ["one-forward", "question-after", "streaming-512", "streaming-1024"]

[snapkv]
budget = [0.25, 0.5]
prefill = ["streaming-512", "question-after"]

[coverage]
prefill = "question-after"

[refreekv]
""")
    assert [p.label for p in points] == [
        "fullkv", "fullkv [question after]", "fullkv [streaming 512]", "fullkv [streaming 1024]",
        "snapkv(budget=0.25) [streaming 512]", "snapkv(budget=0.25) [question after]",
        "snapkv(budget=0.5) [streaming 512]", "snapkv(budget=0.5) [question after]",
        "coverage [question after]", "refreekv",
    ]  # fmt: skip
    assert [(p.prefill.kind, p.prefill.chunk) for p in points[:4]] == [
        ("one-forward", None), ("question-after", None), ("streaming", 512), ("streaming", 1024),
    ]  # fmt: skip
    # prefill is no method option; sweep.json names it beside them (older points without it are one-forward)
    snap = points[6]
    assert snap.options == {"budget": 0.5} and "prefill" not in snap.all_options
    assert snap.to_json() == {"label": "snapkv(budget=0.5) [streaming 512]", "method": "snapkv", "options": snap.all_options,
                              "prefill": "streaming-512"}  # fmt: skip
    assert points[-1].to_json()["prefill"] == "one-forward" and points[-1].prefill.one_forward


def test_a_fixed_budget_streaming_point_is_capped_at_its_budget_of_the_prompt(tmp_path):
    snap, tokens, refree, full = grid(tmp_path, """
[snapkv]
budget = 0.5
prefill = "streaming-512"

[[h2o]]
budget = 300
prefill = "streaming-512"

[refreekv]
prefill = "streaming-512"

[fullkv]
prefill = "streaming-512"
""")
    assert [snap.prefill.max_cache_tokens(snap.instance, n) for n in (2000, 2001, 2003, 9)] == [1000, 1000, 1002, 8]
    assert tokens.prefill.max_cache_tokens(tokens.instance, 2000) == 300  # a budget in tokens is the cap itself
    assert refree.prefill.max_cache_tokens(refree.instance, 2000) is None  # threshold-free: no cap
    assert full.prefill.max_cache_tokens(full.instance, 2000) is None
    assert [snap.prefill.pieces(n) for n in (512, 513, 2048)] == [1, 2, 4]


@pytest.mark.parametrize(
    "text, message",
    [
        ('[snapkv]\nprefill = "chunked"', r"\[snapkv\] prefill: unknown prefill mode 'chunked'; expected one-forward, "
                                          r"question-after or streaming-<tokens> \(e.g. streaming-512\)"),
        ('[snapkv]\nprefill = "streaming"', r"streaming-<tokens> takes the tokens per piece, a whole number >= 1 .*got 'streaming'"),
        ('[snapkv]\nprefill = "streaming-0"', r"a whole number >= 1 .*got 'streaming-0'"),
        ('[snapkv]\nprefill = "streaming-1.5"', r"got 'streaming-1.5'"),
        ("[snapkv]\nprefill = 512", r"\[snapkv\] prefill: expected a string, .*got 512 \(an integer\)"),
        ("[snapkv]\nprefill = []", r"\[snapkv\] prefill is an empty list"),
        ('[snapkv]\nprefill = ["question-after", "question-after"]', "prefill names question-after twice"),
        ('[adakv]\nbudget = 0.5\nprefill = ["one-forward", "streaming-512"]',
         r"\[adakv\] budget=0.5, prefill='streaming-512': adakv cannot prefill in streaming mode: .*use snapkv"),
        ('[[snapkv]]\nprefill = "streaming-512"\n[[snapkv]]\nprefill = "streaming-512"',
         r"one setting twice: snapkv \[streaming 512\] and snapkv \[streaming 512\]"),
        ('[snapkv]\nbudget = 1.5\nprefill = "question-after"', r"budget=1.5, prefill='question-after': budget as a fraction"),
    ],
)
def test_bad_prefill_modes_are_refused_when_the_grid_is_read(tmp_path, text, message):
    with pytest.raises(UsageError, match=message):
        grid(tmp_path, text)


def test_the_shipped_prefill_modes_grid():
    from pathlib import Path

    points = load_grid(Path(__file__).parent.parent / "sweeps" / "prefill_modes.toml")
    modes = ["", " [question after]", " [streaming 512]", " [streaming 1024]"]
    assert [p.label for p in points] == [f"{m}{mode}" for m in ("fullkv", "coverage", "snapkv(budget=0.5)") for mode in modes]
