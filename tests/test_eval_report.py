"""The quality map of a budget sweep on hand-made records (no model): means,
the full-cache reference and safe budgets, incomplete cells, needle depths,
per-layer budgets, the written report, and `compare` on sweep directories."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from eval_fixtures import markdown_tables
from refreekv.eval.longbench import main
from refreekv.eval.report import OVERALL, summarize, write_quality_report
from refreekv.eval.report.figures import study_figure
from refreekv.eval.report.tables import family_table, study_table

ANSWERS = {"hotpotqa": "Paris", "passage_count": "5", "passage_retrieval_en": "Paragraph 3", "multifieldqa_en": "Blue Heron"}


def record(point, length, task, correct, budget=0.5, index=0, **extra):
    """One sweep record; `correct` True scores 100, False scores 0 on every
    task used here (the metric finds nothing of the answer in 'nothing')."""
    method = point.split("(")[0]
    return {
        "point": point, "method": method, "options": {"budget": budget}, "length": length, "task": task,
        "_id": f"{task}-{index}", "index": index, "pred": ANSWERS[task] if correct else "nothing",
        "answers": [ANSWERS[task]], "all_classes": None, "input_tokens": 100, "new_tokens": 3, "budget": budget, **extra,
    }  # fmt: skip


def records_for(point, length, task, outcomes, budget=0.5, **extra):
    return [record(point, length, task, correct, budget, index=i, **extra) for i, correct in enumerate(outcomes)]


def find(rows, **fields):
    matches = [row for row in rows if all(row[key] == value for key, value in fields.items())]
    assert len(matches) == 1, (fields, matches)
    return matches[0]


# -- summary ------------------------------------------------------------------


def test_means_per_cell_and_overall_weights_tasks_equally():
    records = (
        records_for("fullkv", 1024, "hotpotqa", [True, True], budget=1.0)
        + records_for("fullkv", 1024, "passage_count", [True, False], budget=1.0)
        + records_for("snapkv(budget=0.5)", 1024, "hotpotqa", [True, False], budget=0.4)
        + records_for("snapkv(budget=0.5)", 1024, "passage_count", [False, False], budget=0.6)
        # a partial F1 (one of two predicted words right: P 1/2, R 1) and a budget-less record
        + [record("fullkv", 2048, "hotpotqa", True, budget=None) | {"pred": "Paris France"}]
    )
    summary = summarize(records)
    assert [p["label"] for p in summary["points"]] == ["fullkv", "snapkv(budget=0.5)"]
    assert summary["lengths"] == [1024, 2048] and summary["tasks"] == ["hotpotqa", "passage_count"]
    cells = summary["cells"]
    snap = find(cells, point="snapkv(budget=0.5)", length=1024, task="hotpotqa")
    assert snap["score"] == pytest.approx(50.0) and snap["kept_budget"] == pytest.approx(0.4) and snap["samples"] == 2
    assert find(cells, point="snapkv(budget=0.5)", length=1024, task="passage_count")["score"] == 0.0
    overall = find(cells, point="snapkv(budget=0.5)", length=1024, task=OVERALL)
    assert overall["score"] == pytest.approx(25.0) and overall["kept_budget"] == pytest.approx(0.5)
    assert overall["samples"] == 4 and overall["method"] == "snapkv"
    partial = find(cells, point="fullkv", length=2048, task="hotpotqa")
    assert partial["score"] == pytest.approx(100 * 2 * 0.5 * 1 / 1.5) and partial["kept_budget"] is None
    assert find(summary["reference"], length=1024, task=OVERALL) == {
        "length": 1024, "task": OVERALL, "score": pytest.approx(75.0), "points": ["fullkv"],
    }  # fmt: skip


def test_overall_is_the_mean_of_task_means_not_of_samples():
    records = records_for("h2o(budget=0.3)", 512, "hotpotqa", [True]) + records_for(
        "h2o(budget=0.3)", 512, "passage_count", [False, False, False]
    )
    overall = find(summarize(records)["cells"], task=OVERALL)
    assert overall["score"] == pytest.approx(50.0) and overall["samples"] == 4


def test_sweep_order_of_points_and_repeated_records_counted_once():
    records = records_for("streamingllm", 512, "hotpotqa", [True]) + records_for("fullkv", 512, "hotpotqa", [False])
    points = [{"label": "fullkv", "method": "fullkv", "options": {}}, {"label": "never-run", "method": "h2o", "options": {}}]
    summary = summarize(records + records[:1], points)
    assert [p["label"] for p in summary["points"]] == ["fullkv", "never-run", "streamingllm"]
    assert summary["duplicates"] == 1
    assert find(summary["cells"], point="streamingllm", task="hotpotqa")["samples"] == 1


def sweep_for_safe_budgets(with_full_cache=True):
    """Full cache: hotpotqa 50, passage_count 100, overall 75 (so 95%: 71.25,
    47.5 and 95). snapkv's four budgets pass, fail, pass, pass overall."""
    outcomes = {  # budget: (hotpotqa, passage_count)
        0.2: ([True, False], [True, True]),    # 50, 100 -> 75
        0.4: ([False, False], [True, True]),   # 0, 100 -> 50
        0.6: ([True, True], [True, False]),    # 100, 50 -> 75
        0.8: ([True, False], [True, True]),    # 50, 100 -> 75
    }  # fmt: skip
    records = []
    for budget, (hotpotqa, passage_count) in outcomes.items():
        records += records_for(f"snapkv(budget={budget})", 1024, "hotpotqa", hotpotqa, budget=budget)
        records += records_for(f"snapkv(budget={budget})", 1024, "passage_count", passage_count, budget=budget)
    records += records_for("h2o(budget=0.5)", 1024, "hotpotqa", [False, False])
    records += records_for("h2o(budget=0.5)", 1024, "passage_count", [False, False])
    if with_full_cache:
        records += records_for("fullkv", 1024, "hotpotqa", [True, False], budget=1.0)
        records += records_for("fullkv", 1024, "passage_count", [True, True], budget=1.0)
    return records


def test_safe_budget_is_the_lowest_budget_from_which_every_point_passes():
    safe = summarize(sweep_for_safe_budgets())["safe_budgets"]
    # 0.2 passes on its own, but 0.4 above it falls below 95%: safe from 0.6.
    assert find(safe, method="snapkv", length=1024, task=OVERALL)["safe_budget"] == pytest.approx(0.6)
    assert find(safe, method="snapkv", length=1024, task="hotpotqa")["safe_budget"] == pytest.approx(0.6)
    assert find(safe, method="snapkv", length=1024, task="passage_count")["safe_budget"] == pytest.approx(0.8)
    assert find(safe, method="h2o", length=1024, task=OVERALL)["safe_budget"] is None
    assert not [row for row in safe if row["method"] == "fullkv"]


def test_no_safe_budget_without_full_cache():
    summary = summarize(sweep_for_safe_budgets(with_full_cache=False))
    assert summary["reference"] == []
    assert summary["safe_budgets"] and all(row["safe_budget"] is None for row in summary["safe_budgets"])


def test_incomplete_cells_have_fewer_samples_than_another_point():
    records = (
        records_for("fullkv", 1024, "hotpotqa", [True, True, True])
        + records_for("fullkv", 1024, "passage_count", [True])
        + records_for("snapkv(budget=0.5)", 1024, "hotpotqa", [True, True])  # one sample short
        + records_for("snapkv(budget=0.5)", 1024, "passage_count", [True])
        + records_for("h2o(budget=0.5)", 1024, "hotpotqa", [True, True, True])  # no passage_count at all
        + records_for("h2o(budget=0.5)", 2048, "hotpotqa", [True])  # alone at 2048: complete
    )
    cells = summarize(records)["cells"]
    complete = {(c["point"], c["length"], c["task"]): c["complete"] for c in cells}
    assert complete == {
        ("fullkv", 1024, "hotpotqa"): True, ("fullkv", 1024, "passage_count"): True, ("fullkv", 1024, OVERALL): True,
        ("snapkv(budget=0.5)", 1024, "hotpotqa"): False, ("snapkv(budget=0.5)", 1024, "passage_count"): True,
        ("snapkv(budget=0.5)", 1024, OVERALL): False,
        ("h2o(budget=0.5)", 1024, "hotpotqa"): True, ("h2o(budget=0.5)", 1024, OVERALL): False,
        ("h2o(budget=0.5)", 2048, "hotpotqa"): True, ("h2o(budget=0.5)", 2048, OVERALL): True,
    }  # fmt: skip


def needle_records(point="snapkv(budget=0.5)", length=1024, budget=0.5):
    """passage_retrieval_en: depth 0 -> 50 (2 samples), depth 0.3 -> 100;
    multifieldqa_en: depth 0 -> 100, depth 0.3 (written 0.1 + 0.2) -> 0 (2 samples)."""
    depths = [
        ("passage_retrieval_en", 0.0, True), ("passage_retrieval_en", 0.0, False), ("passage_retrieval_en", 0.3, True),
        ("multifieldqa_en", 0.0, True), ("multifieldqa_en", 0.1 + 0.2, False), ("multifieldqa_en", 0.3, False),
    ]  # fmt: skip
    return [record(point, length, task, correct, budget, index=i, depth=depth) for i, (task, depth, correct) in enumerate(depths)]


def test_needle_rows_per_depth_and_mean_over_needle_tasks():
    records = needle_records() + records_for("snapkv(budget=0.5)", 1024, "hotpotqa", [False], depth=None)
    needle = summarize(records)["needle"]
    assert {row["task"] for row in needle} == {"passage_retrieval_en", "multifieldqa_en", OVERALL}
    assert find(needle, task="passage_retrieval_en", depth=0.0)["score"] == pytest.approx(50.0)
    assert find(needle, task="multifieldqa_en", depth=0.3)["samples"] == 2
    # Each needle task weighs the same, whatever its sample count.
    assert find(needle, task=OVERALL, depth=0.0)["score"] == pytest.approx((50 + 100) / 2)
    assert find(needle, task=OVERALL, depth=0.3)["score"] == pytest.approx((100 + 0) / 2)
    assert find(needle, task=OVERALL, depth=0.3)["samples"] == 3


def test_layer_budgets_are_kept_fractions_averaged_over_samples():
    records = [
        record("refreekv", 1024, "hotpotqa", True, index=0, input_tokens=100, kept_per_layer=[100, 50]),
        record("refreekv", 1024, "hotpotqa", True, index=1, input_tokens=200, kept_per_layer=[200, 50]),
    ]
    layers = summarize(records)["layers"]
    assert layers == [{"point": "refreekv", "method": "refreekv", "length": 1024, "kept_fraction": [1.0, 0.375], "samples": 2}]


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="unknown task 'no_such_task'"):
        summarize([record("fullkv", 1024, "hotpotqa", True) | {"task": "no_such_task"}])


# -- report -------------------------------------------------------------------


def full_sweep():
    """Safe-budget sweep at two lengths, with needles and per-layer budgets."""
    records = []
    for length in (1024, 2048):
        for item in sweep_for_safe_budgets():
            item = item | {"length": length, "kept_per_layer": [100, round(100 * item["budget"])]}
            records.append(item)
        for point, budget in (("fullkv", 1.0), ("snapkv(budget=0.2)", 0.2), ("snapkv(budget=0.8)", 0.8)):
            records += needle_records(point, length, budget)
    return records


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    output = tmp_path_factory.mktemp("quality")
    summary = summarize(full_sweep())
    return summary, output, write_quality_report(summary, output, title="Test sweep")


def test_report_json_round_trips(report):
    summary, output, _ = report
    assert json.loads((output / "quality.json").read_text()) == summary


def test_report_csv_rows(report):
    summary, output, _ = report
    rows = list(csv.DictReader((output / "quality.csv").open()))
    assert list(rows[0]) == [
        "point", "method", "options", "length", "task", "score", "kept_budget", "held_budget", "samples", "complete",
        "prefill",
    ]  # fmt: skip
    assert len(rows) == len(summary["cells"])
    overall = find(rows, point="snapkv(budget=0.4)", length="2048", task=OVERALL)
    assert overall == {
        "point": "snapkv(budget=0.4)", "method": "snapkv", "options": '{"budget": 0.4}', "length": "2048",
        "task": OVERALL, "score": "50.0000", "kept_budget": "0.400000",
        "held_budget": "",  # these records predate held_budget
        "samples": "4", "complete": "False",
        "prefill": "one-forward",  # and a prefill mode: these records predate it too
    }  # fmt: skip


def test_report_markdown_tables(report):
    _, output, _ = report
    text = (output / "quality.md").read_text()
    assert text.startswith("# Test sweep\n")
    scores, safe = markdown_tables(text)
    header = ["1024 overall", "1024 hotpotqa", "1024 passage_count", "1024 passage_retrieval_en", "1024 multifieldqa_en"]
    assert scores["header"] == ["point"] + header + [h.replace("1024", "2048") for h in header]
    assert list(scores["rows"]) == [f"snapkv(budget={b})" for b in (0.2, 0.4, 0.6, 0.8)] + ["h2o(budget=0.5)", "fullkv"]
    snap = scores["rows"]["snapkv(budget=0.4)"]
    # Needle tasks only for three points: the others lack two tasks, so their overall is incomplete.
    assert snap[:3] == ["50.00 (40.0%)*", "0.00", "100.00"] and snap[3] == "-"
    # Needle cells average samples (2 of 3 right; 1 of 3), overall averages tasks.
    assert scores["rows"]["snapkv(budget=0.2)"][:5] == ["62.50 (20.0%)", "50.00", "100.00", "66.67", "33.33"]
    assert safe["header"][0] == "method"
    assert safe["rows"]["snapkv"][:3] == ["60.0%", "60.0%", "80.0%"]
    assert safe["rows"]["h2o"][:3] == ["never", "never", "never"]
    assert "How to read it" in text and "full cache overall: 62.50 at 1024" in text


def test_report_writes_every_figure(report):
    _, output, files = report
    figures = ["frontier.png"] + [f"frontier_{task}.png" for task in ("hotpotqa", "passage_count", "passage_retrieval_en", "multifieldqa_en")]
    figures += ["needle_heatmap.png", "layer_budgets.png"]
    assert sorted(path.name for path in files) == sorted(["quality.json", "quality.csv", "quality.md"] + figures)
    for name in figures:
        data = (output / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name


def test_report_without_needles_or_layer_data_leaves_those_figures_out(tmp_path):
    files = write_quality_report(summarize(records_for("fullkv", 512, "hotpotqa", [True])), tmp_path)
    assert sorted(path.name for path in files) == ["frontier.png", "frontier_hotpotqa.png", "quality.csv", "quality.json", "quality.md"]


def test_points_that_hold_more_than_they_keep_get_a_held_frontier(tmp_path):
    """A per-head method in padded storage holds more rows than it keeps:
    frontier_held.png plots the score against what memory holds."""
    records = records_for("fullkv", 512, "hotpotqa", [True, True], budget=1.0, held_budget=1.0)
    records += records_for("coverage", 512, "hotpotqa", [True, False], budget=0.6, held_budget=0.8)
    summary = summarize(records)
    cell = find(summary["cells"], point="coverage", task="hotpotqa")
    assert (cell["kept_budget"], cell["held_budget"]) == (0.6, 0.8)
    files = write_quality_report(summary, tmp_path)
    assert "frontier_held.png" in [path.name for path in files]
    scores, _ = markdown_tables((tmp_path / "quality.md").read_text())
    assert scores["rows"]["coverage"][0] == "50.00 (60.0%, held 80.0%)"
    assert scores["rows"]["fullkv"][0] == "100.00 (100.0%)"  # holds what it keeps: one figure
    assert (tmp_path / "frontier_held.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("held", [None, 0.6004, 0.5])  # not recorded; rounds to kept; less than kept
def test_a_point_holding_no_more_than_it_keeps_shows_one_figure(tmp_path, held):
    records = records_for("coverage", 512, "hotpotqa", [True, False], budget=0.6, held_budget=held)
    write_quality_report(summarize(records), tmp_path)
    scores, _ = markdown_tables((tmp_path / "quality.md").read_text())
    assert scores["rows"]["coverage"][0] == "50.00 (60.0%)"


# -- compare on sweep directories ----------------------------------------------


def write_sweep(directory: Path, records, tail="") -> Path:
    directory.mkdir(parents=True)
    points = list({r["point"]: {"label": r["point"], "method": r["method"], "options": r["options"]} for r in records}.values())
    request = {"points": points, "lengths": sorted({r["length"] for r in records}), "tasks": sorted({r["task"] for r in records}),
               "model": "tiny", "environment": {}, "seed": 0}  # fmt: skip
    (directory / "sweep.json").write_text(json.dumps(request))
    lines = [json.dumps(r) + "\n" for r in records]
    (directory / "records.jsonl").write_text("".join(lines) + tail)
    return directory


def test_compare_cli_on_a_sweep_directory(tmp_path, capsys):
    records = sweep_for_safe_budgets()
    sweep = write_sweep(tmp_path / "sweep", records[:3], tail="not json\n" + "".join(json.dumps(r) + "\n" for r in records[3:]))
    with open(sweep / "records.jsonl", "a") as handle:
        handle.write('{"point": "fullkv", "length": 10')  # cut short by a crash: passed over silently
    output = tmp_path / "out"
    assert main(["compare", str(sweep), "--output-dir", str(output)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# Quality map: sweep\n")
    assert f"{sweep / 'records.jsonl'}:4: not valid JSON" in printed and ":26:" not in printed
    summary = json.loads((output / "quality.json").read_text())
    assert summary == summarize(records) | {"skipped_lines": summary["skipped_lines"]}
    assert len(summary["skipped_lines"]) == 1
    assert (output / "frontier.png").stat().st_size > 0 and "written: " in printed


def test_compare_combines_sweeps_and_prefixes_clashing_labels(tmp_path, capsys):
    first = write_sweep(tmp_path / "a", records_for("fullkv", 512, "hotpotqa", [True]) + records_for("h2o", 512, "hotpotqa", [True]))
    second = write_sweep(tmp_path / "b", records_for("fullkv", 512, "hotpotqa", [False]))
    assert main(["compare", str(first), str(second), "--output-dir", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert [p["label"] for p in summary["points"]] == ["a/fullkv", "h2o", "b/fullkv"]
    assert find(summary["reference"], task=OVERALL) == {"length": 512, "task": OVERALL, "score": 50.0, "points": ["a/fullkv", "b/fullkv"]}


def test_compare_refuses_sweeps_mixed_with_runs(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "sweep", records_for("fullkv", 512, "hotpotqa", [True]))
    (tmp_path / "run").mkdir()
    assert main(["compare", str(sweep), str(tmp_path / "run"), "--output-dir", str(tmp_path / "out")]) == 2
    assert "cannot mix sweep directories" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- the stopping-rule study's table and figure ---------------------------------


def judged_row(point, length, budget, score, lossless, baselines, on_frontier, held_budget=None, at_held=None):
    """A `judge_point` row with two task families."""
    return {
        "point": point, "length": length, "budget": budget, "held_budget": held_budget, "score": score,
        "full_score": 60.0, "worst_family": "a", "worst_drop": 60.0 - score, "lossless": lossless,
        "baselines": baselines, "on_frontier": on_frontier, "on_frontier_at_held": None if held_budget is None else False,
        "baselines_at_held": at_held,
        "families": {"a": {"score": score, "budget": budget, "drop": 60.0 - score},
                     "b": {"score": score + 1, "budget": budget + 0.1, "drop": 59.0 - score}},
    }  # fmt: skip


STUDY_ROWS = [
    judged_row("coverage(mass=0.9)", 2048, 0.7, 59.0, True, {"snapkv": 55.0}, True, held_budget=0.8, at_held={"snapkv": 59.5}),
    judged_row("coverage(mass=0.9)", 1024, 0.6, 58.5, True, {"snapkv": 50.0, "h2o": None}, True),
    judged_row("refreekv(threshold=0.01)", 1024, 0.3, 20.0, False, {}, None),
]


def test_study_table_orders_by_length_then_budget_and_shows_each_baseline():
    lines = study_table(STUDY_ROWS, ["h2o", "snapkv"]).splitlines()
    assert lines[0].split("|")[9:11] == [" h2o @ budget ", " snapkv @ budget "]
    body = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [(row[0], row[1]) for row in body] == [
        ("refreekv(threshold=0.01)", "1024"), ("coverage(mass=0.9)", "1024"), ("coverage(mass=0.9)", "2048"),
    ]  # fmt: skip
    # kept %, held %, score, worst family, lossless, h2o, snapkv, on frontier, at held
    assert body[1][2:] == ["60.0", "-", "58.5", "60.0", "a (+1.5)", "yes", "-", "50.0", "yes", "-"]
    assert body[2][2:] == ["70.0", "80.0", "59.0", "60.0", "a (+1.0)", "yes", "-", "55.0", "yes", "no"]
    assert body[0][8:] == ["-", "-", "-", "-"]  # nothing measured low enough, nothing judged


def test_study_table_at_held_shows_the_baselines_at_the_rows_held():
    lines = study_table(STUDY_ROWS, ["snapkv"], at_held=True).splitlines()
    assert lines[0].split("|")[9] == " snapkv @ held "
    body = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[8] for row in body] == ["-", "-", "59.5"]  # nothing judged at held where nothing is held apart


def test_family_table_gives_budget_and_drop_per_length():
    lines = family_table(STUDY_ROWS, "coverage(mass=0.9)").splitlines()
    assert [cell.strip() for cell in lines[0].strip("|").split("|")] == ["task", "1024: kept % (drop)", "2048: kept % (drop)"]
    assert [cell.strip() for cell in lines[2].strip("|").split("|")] == ["a", "60.0 (+1.5)", "70.0 (+1.0)"]
    assert [cell.strip() for cell in lines[3].strip("|").split("|")] == ["b", "70.0 (+0.5)", "80.0 (+0.0)"]


def test_study_figure_has_a_panel_per_length(tmp_path):
    from matplotlib.image import imread

    short = summarize(records_for("fullkv", 1024, "hotpotqa", [True]) + records_for("snapkv(budget=0.5)", 1024, "hotpotqa", [False]))
    long = summarize(records_for("fullkv", 2048, "hotpotqa", [True]))
    widths = []
    for summaries in ([short], [short, long]):
        path = tmp_path / f"frontier{len(summaries)}.png"
        study_figure(summaries, STUDY_ROWS, ["snapkv"], path)
        widths.append(imread(path).shape[1])
    # 5.2 inches per panel plus 3 for the legend, at 120 dpi (matplotlib truncates to whole pixels)
    assert widths == [int(120 * (5.2 + 3)), int(120 * (2 * 5.2 + 3))]
