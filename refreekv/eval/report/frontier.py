"""Judging one grid point of a quality map (SPEC 9): against the full cache,
task family by task family, and against the fixed-budget baselines' curves
at the budget the point actually reached.

Works on `refreekv.eval.report.summarize` output; used by the
stopping-rule study (benchmarks/stopping_rules.py).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from refreekv.compression import fixed_budget_methods
from refreekv.eval.prefill import ONE_FORWARD
from refreekv.eval.report import OVERALL

__all__ = ["FIXED_BUDGET_METHODS", "LOSSLESS_POINTS", "baseline_score_at", "judge_point"]

# SPEC 9: "keeps full-cache quality" = within this many points on every family.
LOSSLESS_POINTS = 2.0
FIXED_BUDGET_METHODS = fixed_budget_methods()


def baseline_score_at(curve: Sequence[tuple[float, float]], budget: float, full_score: float) -> Optional[float]:
    """A fixed-budget method's score at `budget`, linearly interpolated
    between its measured (kept budget, score) points. The full cache is its
    point at budget 1 (every fixed-budget method is the full cache there).
    None below its lowest measured budget: nothing to interpolate from."""
    points = sorted({(b, s) for b, s in curve if b < 1.0} | {(1.0, full_score)})
    if budget < points[0][0]:
        return None
    for (b0, s0), (b1, s1) in zip(points, points[1:]):
        if b0 <= budget <= b1:
            return s0 if b1 == b0 else s0 + (s1 - s0) * (budget - b0) / (b1 - b0)
    return points[-1][1]


def judge_point(summary: dict[str, Any], point: str, length: int) -> Optional[dict[str, Any]]:
    """How `point` does at `length`, or None if it has no complete cells there.

    Returns budget, held budget and score (overall), per-family score, budget and drop
    below the full cache, the worst family, `lossless` (every family within
    LOSSLESS_POINTS of the full cache), each fixed-budget baseline's score
    interpolated at the point's budget, and `on_frontier` (at or above
    every baseline that could be interpolated; None if none could); the
    same at the budget held in memory when the records carry it
    (`baselines_at_held`, `on_frontier_at_held`)."""
    cells = {c["task"]: c for c in summary["cells"] if (c["point"], c["length"]) == (point, length)}
    overall = cells.pop(OVERALL, None)
    if overall is None or not overall["complete"]:
        return None
    reference = {r["task"]: r["score"] for r in summary["reference"] if r["length"] == length}
    families = {
        task: {"score": cell["score"], "budget": cell["kept_budget"], "drop": reference[task] - cell["score"]}
        for task, cell in cells.items()
    }
    worst = max(families, key=lambda task: families[task]["drop"])
    held = overall.get("held_budget")
    baselines = _baselines_at(summary, length, overall["kept_budget"], reference[OVERALL])
    # A cut may hold more rows than it attends to (padding, blocks): judged
    # again at the memory it holds, against each baseline's curve of the
    # memory it holds, i.e. at equal bytes rather than equal fractions.
    held_baselines = None if held is None else _baselines_at(summary, length, held, reference[OVERALL], "held_budget")
    return {
        "point": point,
        "length": length,
        "budget": overall["kept_budget"],
        "held_budget": overall.get("held_budget"),
        "score": overall["score"],
        "full_score": reference[OVERALL],
        "families": families,
        "worst_family": worst,
        "worst_drop": families[worst]["drop"],
        "lossless": all(f["drop"] <= LOSSLESS_POINTS for f in families.values()),
        "baselines": baselines,
        "on_frontier": _at_or_above(overall["score"], baselines),
        "baselines_at_held": held_baselines,
        "on_frontier_at_held": None if held_baselines is None else _at_or_above(overall["score"], held_baselines),
    }


def _baselines_at(summary: dict[str, Any], length: int, budget: float, full_score: float,
                  axis: str = "kept_budget") -> dict[str, Optional[float]]:  # fmt: skip
    """Each fixed-budget method's overall score interpolated at `budget` on
    its curve of `axis` ("kept_budget", or "held_budget": rows held in
    memory, the kept budget where a cell does not record it), from its
    one-forward points (another prefill mode is another method)."""
    baselines = {}
    for method in FIXED_BUDGET_METHODS:
        curve = [
            (c["kept_budget"] if c.get(axis) is None else c[axis], c["score"])
            for c in summary["cells"]
            if (c["method"], c["length"], c["task"]) == (method, length, OVERALL) and c["complete"]
            # the baselines' one-forward curves (cells of older summaries name no mode)
            and c.get("prefill", ONE_FORWARD) == ONE_FORWARD
        ]
        if curve:
            baselines[method] = baseline_score_at(curve, budget, full_score)
    return baselines


def _at_or_above(score: float, baselines: dict[str, Optional[float]]) -> Optional[bool]:
    compared = [value for value in baselines.values() if value is not None]
    return None if not compared else score >= max(compared)

