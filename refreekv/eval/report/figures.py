"""Figures, drawn with matplotlib's Agg backend (files only, no display):

* the quality map (`write_quality_figures`):
  frontier.png: overall score against mean kept budget, one curve per
  method and prefill mode (a method's modes share its color, each mode
  its line style and marker: `snapkv [streaming 512]` beside `snapkv`),
  one panel per context length, full cache as a reference line (its
  points in other prefill modes as labelled markers beside it);
  frontier_<task>.png: the same for each task (one file per task keeps every
  panel large enough to read, where a task x length grid would not);
  frontier_held.png: overall score against mean held budget (the rows in
  memory), when some point holds more than it keeps (a per-head method in
  padded storage, block rounding in paged storage): the memory the score
  actually costs;
  needle_heatmap.png: score by needle depth and context length, one panel
  per grid point (records with a depth only, mean over the needle tasks);
  layer_budgets.png: kept fraction of the prompt per layer, one line per grid
  point whose kept fraction varies by layer (refreekv, pyramidkv: a flat
  line would only repeat the budget, and the flat lines of uniform methods
  hide each other), one panel per context length;
* `compare` of run directories (`comparison_figure`): average score against
  average kept budget, one marker per run, small markers per task;
* the stopping-rule study (`study_figure`): the studied points against the
  fixed-budget baselines' curves, one panel per context length.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

from refreekv.eval.prefill import ONE_FORWARD, PrefillMode
from refreekv.eval.report.summary import FULL_CACHE_METHOD, OVERALL, group_by

__all__ = ["comparison_figure", "study_figure", "write_quality_figures"]

FULL_CACHE_COLOR = "black"
LINE_STYLES = ("-", "--", ":", "-.")
# Per prefill mode, in order of appearance (one-forward first): curve markers, and the full cache's.
MODE_MARKERS = ("o", "s", "^", "D", "v", "P")
FULL_CACHE_MARKERS = ("*", "X", "P", "d", "h", "p")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_quality_figures(summary: dict[str, Any], output_dir: Path) -> list[Path]:
    if not summary["lengths"]:
        return []
    colors = _method_colors(summary["points"])
    paths = [_plot_frontier(summary, OVERALL, output_dir / "frontier.png", colors)]
    paths += [_plot_frontier(summary, task, output_dir / f"frontier_{task}.png", colors) for task in summary["tasks"]]
    if any(_holds_more_than_it_keeps(cell) for cell in summary["cells"]):
        paths.append(_plot_frontier(summary, OVERALL, output_dir / "frontier_held.png", colors, budget="held"))
    if summary["needle"]:
        paths.append(_plot_needle_heatmap(summary, output_dir / "needle_heatmap.png"))
    if any(_varies_by_layer(row) for row in summary["layers"]):
        paths.append(_plot_layer_budgets(summary, output_dir / "layer_budgets.png", colors))
    return paths


def _method_colors(points: list[dict[str, Any]]) -> dict[str, str]:
    """One color per method, the same in every figure."""
    palette = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    methods = [m for m in dict.fromkeys(p["method"] for p in points) if m != FULL_CACHE_METHOD]
    colors = {method: palette[i % len(palette)] for i, method in enumerate(methods)}
    return {**colors, FULL_CACHE_METHOD: FULL_CACHE_COLOR}


def _panels(count: int, columns: int, panel_size: tuple[float, float]):
    """A figure of `count` panels in rows of `columns`; unused ones hidden."""
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    figure, axes = _pyplot().subplots(
        rows, columns, figsize=(panel_size[0] * columns + 2.5, panel_size[1] * rows), squeeze=False, layout="constrained"
    )
    flat = list(axes.flat)
    for unused in flat[count:]:
        unused.set_visible(False)
    return figure, flat[:count]


def _save(figure, path: Path, title: str) -> Path:
    figure.suptitle(title)
    figure.savefig(path, dpi=120)
    _pyplot().close(figure)
    return path


def _figure_legend(figure, axes) -> None:
    """One legend for all panels (the same methods everywhere), outside them."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        figure.legend(entries.values(), entries.keys(), loc="outside right upper", fontsize=8)


def _setting(label: str, method: str, prefill: str = ONE_FORWARD) -> str:
    """The options part of a point label such as 'snapkv(budget=0.5)' (or
    'snapkv(budget=0.5) [streaming 512]': its series names the mode)."""
    label = label.removesuffix(PrefillMode.parse(prefill).suffix())
    return label.removeprefix(method).removeprefix("(").removesuffix(")") if label.startswith(method) else label


def _mode_styles(points: list[dict[str, Any]]) -> dict[str, int]:
    """Prefill mode -> its index in LINE_STYLES and the marker lists, one-forward first."""
    modes = [ONE_FORWARD] + [p.get("prefill", ONE_FORWARD) for p in points]
    return {mode: i for i, mode in enumerate(dict.fromkeys(modes))}


def _holds_more_than_it_keeps(cell: dict[str, Any]) -> bool:
    held, kept = cell.get("held_budget"), cell["kept_budget"]
    return held is not None and kept is not None and held > kept


def _plot_frontier(
    summary: dict[str, Any], task: str, path: Path, colors: dict[str, str], budget: str = "kept"
) -> Path:
    """Score against the `budget` ("kept" or "held") of each cell; cells
    without that budget are left out."""
    key = f"{budget}_budget"
    lengths = summary["lengths"]
    modes = _mode_styles(summary["points"])
    figure, axes = _panels(len(lengths), columns=3, panel_size=(4.5, 3.6))
    for ax, length in zip(axes, lengths):
        cells = [c for c in summary["cells"] if (c["length"], c["task"]) == (length, task) and c.get(key) is not None]
        compressed = [c for c in cells if c["method"] != FULL_CACHE_METHOD]
        # older summaries name no series: a method is one
        for series, members in group_by(compressed, lambda cell: cell.get("series", cell["method"])).items():
            _draw_method_curve(ax, series, sorted(members, key=lambda cell: cell[key]), colors, key, modes)
        _draw_full_cache(ax, summary, length, task, [c for c in cells if c["method"] == FULL_CACHE_METHOD], key, modes)
        # Fixed axes: panels of different lengths and tasks compare at a glance.
        ax.set(title=f"{length} tokens", xlabel=f"mean {budget} KV cache (% of prompt)", ylabel="score",
               xlim=(0, 105), ylim=(0, 105))  # fmt: skip
        ax.grid(alpha=0.3)
    _figure_legend(figure, axes)
    name = "overall score (mean over tasks)" if task == OVERALL else task
    return _save(figure, path, f"{name} against {budget} budget")


def _draw_method_curve(
    ax, series: str, cells: list[dict[str, Any]], colors: dict[str, str], key: str, modes: dict[str, int]
) -> None:
    """One series: a method's points in one prefill mode, in its color,
    with the mode's line style and marker."""
    method, prefill = cells[0]["method"], cells[0].get("prefill", ONE_FORWARD)
    style = modes.get(prefill, 0)
    budgets = [100 * cell[key] for cell in cells]
    scores = [cell["score"] for cell in cells]
    ax.plot(budgets, scores, marker=MODE_MARKERS[style % len(MODE_MARKERS)], linestyle=LINE_STYLES[style % len(LINE_STYLES)],
            color=colors[method], label=series)  # fmt: skip
    for budget, score, cell in zip(budgets, scores, cells):
        ax.annotate(_setting(cell["point"], method, prefill), (budget, score), textcoords="offset points", xytext=(3, 3),
                    fontsize=6, color=colors[method])  # fmt: skip


def _draw_full_cache(
    ax, summary: dict[str, Any], length: int, task: str, full_cache_cells: list[dict[str, Any]], key: str,
    modes: dict[str, int],
) -> None:
    """Full cache as a line across the panel (what every budget is measured
    against), its 95% line (the safe-budget bar) and a marker where it is;
    its points in other prefill modes as markers of their own."""
    reference = next((r for r in summary["reference"] if (r["length"], r["task"]) == (length, task)), None)
    if reference is None:
        return
    ax.axhline(reference["score"], color=FULL_CACHE_COLOR, linestyle="--", linewidth=1, label="full cache")
    ax.axhline(summary["safe_fraction"] * reference["score"], color="grey", linestyle=":", linewidth=1,
               label=f"{100 * summary['safe_fraction']:g}% of full cache")  # fmt: skip
    for prefill, members in group_by(full_cache_cells, lambda cell: cell.get("prefill", ONE_FORWARD)).items():
        style = modes.get(prefill, 0)
        label = None if prefill == ONE_FORWARD else members[0].get("series", members[0]["point"])
        ax.scatter([100 * c[key] for c in members], [c["score"] for c in members], color=FULL_CACHE_COLOR,
                   marker=FULL_CACHE_MARKERS[style % len(FULL_CACHE_MARKERS)], s=80 if style == 0 else 40, zorder=3,
                   label=label)  # fmt: skip


def _plot_needle_heatmap(summary: dict[str, Any], path: Path) -> Path:
    overall = [row for row in summary["needle"] if row["task"] == OVERALL]
    labels = list(dict.fromkeys(row["point"] for row in overall))
    # The same axes in every panel, so that a cell means the same everywhere.
    lengths = sorted({row["length"] for row in overall})
    depths = sorted({row["depth"] for row in overall})
    figure, axes = _panels(len(labels), columns=4, panel_size=(3.2, 3.0))
    for ax, label in zip(axes, labels):
        scores = {(row["depth"], row["length"]): row["score"] for row in overall if row["point"] == label}
        image = _draw_heatmap(ax, scores, depths, lengths)
        ax.set_title(label, fontsize=9)
    figure.colorbar(image, ax=axes, label="score", shrink=0.8)
    return _save(figure, path, "Needle retrieval by depth and context length (mean over needle tasks)")


def _draw_heatmap(ax, scores: dict[tuple[float, int], float], depths: list[float], lengths: list[int]):
    """Depths down, lengths across, the score written in each cell ('-': not measured)."""
    grid = [[scores.get((depth, length), math.nan) for length in lengths] for depth in depths]
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for y, depth in enumerate(depths):
        for x, length in enumerate(lengths):
            value = scores.get((depth, length))
            text = "-" if value is None else f"{value:.0f}"
            ax.text(x, y, text, ha="center", va="center", fontsize=8, color=_text_color(value))
    ax.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * depth:g}%" for depth in depths])
    ax.set(xlabel="context length (tokens)", ylabel="needle depth")
    return image


def _text_color(score: Optional[float]) -> str:
    """White on the dark ends of the red-to-green scale, black in between."""
    return "white" if score is not None and (score < 15 or score > 85) else "black"


def _varies_by_layer(layer_row: dict[str, Any]) -> bool:
    """More than half a percent between its layers (rounding of kept counts is less)."""
    return max(layer_row["kept_fraction"]) - min(layer_row["kept_fraction"]) > 0.005


def _plot_layer_budgets(summary: dict[str, Any], path: Path, colors: dict[str, str]) -> Path:
    rows = [row for row in summary["layers"] if _varies_by_layer(row)]
    lengths = sorted({row["length"] for row in rows})
    styles = _line_styles(summary["points"])
    figure, axes = _panels(len(lengths), columns=2, panel_size=(5.0, 3.6))
    for ax, length in zip(axes, lengths):
        for row in (r for r in rows if r["length"] == length):
            ax.plot([100 * fraction for fraction in row["kept_fraction"]], color=colors[row["method"]],
                    linestyle=styles[row["point"]], marker=".", label=row["point"])  # fmt: skip
        ax.set(title=f"{length} tokens", xlabel="layer", ylabel="kept KV cache (% of prompt)", ylim=(0, 105))
        ax.grid(alpha=0.3)
    _figure_legend(figure, axes)
    return _save(figure, path, "Kept budget per layer (mean over samples; points whose budget varies by layer)")


def _line_styles(points: list[dict[str, Any]]) -> dict[str, str]:
    """Points of one method share its color; the line style tells them apart."""
    styles = {}
    for members in group_by(points, lambda point: point["method"]).values():
        styles.update({point["label"]: LINE_STYLES[i % len(LINE_STYLES)] for i, point in enumerate(members)})
    return styles



# -- `compare` of run directories ----------------------------------------------


def comparison_figure(labels, results, averages, common, path: Path) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, result, average) in enumerate(zip(labels, results, averages)):
        color = colors[i % len(colors)]
        points = [
            (100 * result["tasks"][t]["kept_budget"], result["tasks"][t]["score"])
            for t in common
            if result["tasks"][t]["kept_budget"] is not None
        ]
        if points:
            axes.scatter(*zip(*points), color=color, alpha=0.35, s=18)
        if average["score"] is not None and average["kept_budget"] is not None:
            axes.scatter([100 * average["kept_budget"]], [average["score"]], color=color, s=90, marker="D",
                         edgecolor="black", label=f"{label}: {average['score']:.2f} at {100 * average['kept_budget']:.1f}%")  # fmt: skip
    axes.set_xlabel("mean kept fraction of the prompt KV cache (%)")
    axes.set_ylabel("LongBench score")
    axes.set_xlim(0, 105)
    axes.set_title(f"Score against kept budget ({len(common)} task(s); diamonds: average)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -- the stopping-rule study -------------------------------------------------


def study_figure(summaries: Sequence[dict[str, Any]], rows: list[dict[str, Any]], baselines: Sequence[str], path: Path) -> None:
    """The curves of `baselines` (methods); the judged points on them: lossless
    ones as stars, other coverage points as triangles, the rest as grey crosses."""
    plt = _pyplot()
    panels = [(s, length) for s in summaries for length in s["lengths"]]
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 3, 4.4), squeeze=False, layout="constrained")
    for ax, (summary, length) in zip(axes[0], panels):
        overall = [c for c in summary["cells"] if c["length"] == length and c["task"] == OVERALL and c["complete"]]
        for method in baselines:
            curve = sorted(
                (100 * c["kept_budget"], c["score"])
                for c in overall
                if c["method"] == method and c.get("prefill", ONE_FORWARD) == ONE_FORWARD
            )
            if curve:
                ax.plot(*zip(*curve), marker="o", linewidth=1, alpha=0.7, label=method)
        full = [c["score"] for c in overall if c["method"] == FULL_CACHE_METHOD and c.get("prefill", ONE_FORWARD) == ONE_FORWARD]
        if full:
            ax.axhline(full[0], color=FULL_CACHE_COLOR, linestyle="--", linewidth=1, label="full cache")
        for row in (r for r in rows if r["length"] == length):
            marker = "*" if row["lossless"] else ("^" if row["point"].startswith("coverage") else "x")
            ax.scatter(100 * row["budget"], row["score"], marker=marker, s=60, color="crimson" if marker != "x" else "grey", zorder=3)
            ax.annotate(row["point"].removeprefix("coverage"), (100 * row["budget"], row["score"]),
                        textcoords="offset points", xytext=(3, 3), fontsize=5)  # fmt: skip
        ax.set(title=f"{length} tokens", xlabel="mean kept KV cache (% of prompt)", ylabel="overall score", xlim=(0, 105))
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right upper", fontsize=8)
    figure.suptitle("Stopping rules: coverage (triangles; stars = lossless) and refreekv (x) against the baselines")
    figure.savefig(path, dpi=120)
    plt.close(figure)
