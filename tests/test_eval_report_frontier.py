"""Judging a grid point against the full cache and the baselines (SPEC 9)."""

import pytest

from refreekv.eval.report.frontier import baseline_score_at, judge_point


def test_baseline_interpolates_linearly_and_ends_at_the_full_cache():
    curve = [(0.25, 20.0), (0.5, 40.0), (0.75, 50.0)]
    assert baseline_score_at(curve, 0.5, 60.0) == 40.0
    assert baseline_score_at(curve, 0.625, 60.0) == pytest.approx(45.0)
    assert baseline_score_at(curve, 0.875, 60.0) == pytest.approx(55.0)  # between 0.75 and the full cache at 1.0
    assert baseline_score_at(curve, 1.0, 60.0) == 60.0
    assert baseline_score_at(curve, 0.2, 60.0) is None  # below anything measured


def cell(point, method, task, score, budget, length=1024, complete=True):
    return {"point": point, "method": method, "length": length, "task": task, "score": score,
            "kept_budget": budget, "samples": 10, "complete": complete}  # fmt: skip


def summary_with(point_cells):
    full = [cell("fullkv", "fullkv", t, s, 1.0) for t, s in (("a", 80.0), ("b", 40.0), ("overall", 60.0))]
    snap = [cell(f"snapkv({b})", "snapkv", "overall", s, b) for b, s in ((0.5, 30.0), (0.75, 50.0))]
    cells = full + snap + point_cells
    reference = [{"length": 1024, "task": c["task"], "score": c["score"], "points": ["fullkv"]} for c in full]
    return {"cells": cells, "reference": reference, "lengths": [1024]}


def test_lossless_needs_every_family_within_two_points():
    within = summary_with([cell("p", "coverage", "a", 78.5, 0.6), cell("p", "coverage", "b", 41.0, 0.8),
                           cell("p", "coverage", "overall", 59.75, 0.7)])  # fmt: skip
    judged = judge_point(within, "p", 1024)
    assert judged["lossless"] and judged["worst_family"] == "a" and judged["worst_drop"] == pytest.approx(1.5)
    assert judged["families"]["b"] == {"score": 41.0, "budget": 0.8, "drop": -1.0}
    # snapkv at 0.7: 30 + (50 - 30) * 0.2 / 0.25 = 46; 59.75 is above it.
    assert judged["baselines"]["snapkv"] == pytest.approx(46.0) and judged["on_frontier"] is True
    assert "h2o" not in judged["baselines"]
    assert judged["baselines_at_held"] is None and judged["on_frontier_at_held"] is None  # no held budget recorded

    one_family_drops = summary_with([cell("p", "coverage", "a", 77.9, 0.6), cell("p", "coverage", "b", 45.0, 0.8),
                                     cell("p", "coverage", "overall", 61.45, 0.7)])  # fmt: skip
    judged = judge_point(one_family_drops, "p", 1024)
    assert not judged["lossless"] and judged["worst_drop"] == pytest.approx(2.1)


def test_a_per_head_cut_is_judged_again_at_the_memory_it_holds():
    overall = cell("p", "coverage", "overall", 49.0, 0.6)
    overall["held_budget"] = 0.9
    judged = judge_point(summary_with([cell("p", "coverage", "a", 79.0, 0.6), cell("p", "coverage", "b", 19.0, 0.6), overall]), "p", 1024)
    # snapkv at 0.6: 38; at the 0.9 held: 50 + (60 - 50) * 0.15 / 0.25 = 56.
    assert judged["on_frontier"] is True and judged["baselines_at_held"]["snapkv"] == pytest.approx(56.0)
    assert judged["on_frontier_at_held"] is False and judged["held_budget"] == 0.9


def test_at_the_held_budget_baselines_are_placed_at_what_they_hold():
    """Equal memory, not equal fractions: a baseline that holds more than
    it keeps (block rounding, padding) is interpolated on its held curve."""
    overall = cell("p", "coverage", "overall", 49.0, 0.6)
    overall["held_budget"] = 0.7
    summary = summary_with([cell("p", "coverage", "a", 79.0, 0.6), cell("p", "coverage", "b", 19.0, 0.6), overall])
    for snap in summary["cells"]:
        if snap["method"] == "snapkv":
            snap["held_budget"] = snap["kept_budget"] + 0.2  # holds 0.7 and 0.95
    judged = judge_point(summary, "p", 1024)
    assert judged["baselines_at_held"]["snapkv"] == pytest.approx(30.0)  # its 0.5 point holds 0.7
    assert judged["baselines"]["snapkv"] == pytest.approx(38.0)  # kept axis unchanged: 0.6 kept


def test_below_the_frontier_and_incomplete_cells():
    below = summary_with([cell("p", "coverage", "a", 40.0, 0.7), cell("p", "coverage", "b", 10.0, 0.7),
                          cell("p", "coverage", "overall", 25.0, 0.7)])  # fmt: skip
    assert judge_point(below, "p", 1024)["on_frontier"] is False
    incomplete = summary_with([cell("p", "coverage", "a", 80.0, 0.7), cell("p", "coverage", "overall", 80.0, 0.7, complete=False)])
    assert judge_point(incomplete, "p", 1024) is None
    assert judge_point(below, "p", 2048) is None
