"""Prefill modes in the quality suite (refreekv.eval.prefill, SPEC 11): a
tiny sweep of one-forward, question-after and streaming points on a tiny
random Llama, its records and report rows; and the report of hand-made
records in several modes (series, reference, baselines)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from eval_fixtures import markdown_tables, save_tiny_model, with_settings

from refreekv.eval import runner, sweep as sweep_module
from refreekv.eval.errors import UsageError
from refreekv.eval.generation import Decoder
from refreekv.eval.grid import parse_grid
from refreekv.eval.report import OVERALL, summarize, write_quality_report
from refreekv.eval.report.frontier import judge_point
from refreekv.eval.rundir import read_records
from refreekv.eval.sweep import SweepRequest, run_sweep

LENGTH = 512
CHUNK = 128
TASKS = ["niah_single", "qa_planted"]
SAMPLES = 2
MODES = '["one-forward", "question-after", "streaming-128"]'
GRID = f"""
[fullkv]
prefill = {MODES}

[coverage]
prefill = {MODES}

[snapkv]
budget = 0.5
prefill = {MODES}
"""
LABELS = [
    f"{point}{mode}"
    for point in ("fullkv", "coverage", "snapkv(budget=0.5)")
    for mode in ("", " [question after]", " [streaming 128]")
]
COMPARED = ("pred", "new_tokens", "input_tokens", "budget", "held_budget", "kept_per_layer", "context_tokens",
            "question_tokens", "context_budget", "prefill_chunk", "pieces", "max_cache_tokens")  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("prefill")
    grid = root / "grid.toml"
    grid.write_text(GRID, encoding="utf-8")
    return root, save_tiny_model(root / "model"), grid


def request(assets, output: Path, **overrides) -> SweepRequest:
    _, model, grid = assets
    values = dict(model=str(model), output_dir=str(output), grid=str(grid), lengths=[LENGTH], tasks=TASKS, suite="ruler",
                  samples=SAMPLES, batch_size=4)  # fmt: skip
    return SweepRequest(**with_settings(values, overrides))


def mode_of(label: str) -> str:
    """The prefill mode a label names: "snapkv(budget=0.5) [streaming 128]" -> "streaming-128"."""
    return {"": "one-forward", "question after": "question-after", "streaming 128": "streaming-128"}[
        label.partition(" [")[2].removesuffix("]")
    ]


def keyed(records):
    return {(r["point"], r["task"], r["_id"]): r for r in records}


@pytest.fixture(scope="module")
def swept(assets):
    output = assets[0] / "sweep"
    report = run_sweep(request(assets, output))
    assert report["finished"] and report["done_now"] == len(TASKS) * SAMPLES * len(LABELS)
    return output


def test_every_mode_is_a_point_with_its_own_label_and_records(swept):
    stored = json.loads((swept / "sweep.json").read_text())
    assert [p["label"] for p in stored["points"]] == LABELS
    assert [p["prefill"] for p in stored["points"]] == ["one-forward", "question-after", "streaming-128"] * 3
    records = read_records(swept)[0]
    assert sorted({r["point"] for r in records}) == sorted(LABELS)
    assert all(r["prefill"] == mode_of(r["point"]) for r in records)


def test_question_after_records_split_the_input_and_count_the_question(swept):
    for r in read_records(swept)[0]:
        if r["prefill"] != "question-after":
            assert "context_tokens" not in r
            continue
        n, q = r["input_tokens"], r["question_tokens"]
        assert r["context_tokens"] + q == n and 0 < q < n // 2
        # every row of the question part is held; the context is cut alone
        assert len(r["kept_per_layer"]) == 4 and all(k >= q for k in r["kept_per_layer"])
        context_kept = [k - q for k in r["kept_per_layer"]]
        assert math.isclose(r["context_budget"], sum(context_kept) / len(context_kept) / r["context_tokens"])
        assert math.isclose(r["budget"], sum(k / n for k in r["kept_per_layer"]) / len(context_kept))
        if r["method"] == "fullkv":
            assert r["budget"] == r["context_budget"] == 1.0
        if r["method"] == "snapkv":  # half of the context, whatever the question
            assert context_kept == [round(0.5 * r["context_tokens"])] * 4


def test_streaming_records_name_their_pieces_and_cap(swept):
    for r in read_records(swept)[0]:
        if r["prefill"] != "streaming-128":
            assert "pieces" not in r
            continue
        n = r["input_tokens"]
        assert r["prefill_chunk"] == CHUNK and r["pieces"] == -(-n // CHUNK) > 1
        if r["method"] == "snapkv":  # capped at its budget in tokens of the prompt: it holds what one forward keeps
            assert r["max_cache_tokens"] == round(0.5 * n) and r["kept_per_layer"] == [round(0.5 * n)] * 4
        else:
            assert r["max_cache_tokens"] is None
        if r["method"] == "fullkv":  # the same pieces without a cut
            assert r["budget"] == 1.0 and r["kept_per_layer"] == [n] * 4


def test_the_report_shows_each_mode_as_its_own_row_and_series(swept):
    summary = json.loads((swept / "quality.json").read_text())
    overall = {c["point"]: c for c in summary["cells"] if c["task"] == OVERALL}
    assert list(overall) == LABELS and all(c["complete"] for c in overall.values())
    assert overall["snapkv(budget=0.5) [streaming 128]"]["series"] == "snapkv [streaming 128]"
    assert overall["coverage [question after]"]["prefill"] == "question-after"
    # the full-cache reference is the one-forward fullkv point alone
    assert {tuple(r["points"]) for r in summary["reference"]} == {("fullkv",)}
    assert [row["series"] for row in summary["safe_budgets"] if row["task"] == OVERALL] == [
        "coverage", "coverage [question after]", "coverage [streaming 128]",
        "snapkv", "snapkv [question after]", "snapkv [streaming 128]",
    ]  # fmt: skip
    text = (swept / "quality.md").read_text()
    rows = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")}
    assert set(LABELS) <= rows and {"snapkv [streaming 128]", "coverage [question after]"} <= rows
    assert "`[streaming N]`, the prompt in pieces of N tokens" in text
    csv_rows = list(csv.DictReader((swept / "quality.csv").open()))
    assert {(r["point"], r["prefill"]) for r in csv_rows if r["task"] == OVERALL} == {(label, mode_of(label)) for label in LABELS}
    assert (swept / "frontier.png").read_bytes().startswith(b"\x89PNG")


def test_mode_points_do_not_depend_on_their_batch(assets, swept):
    """Mode points run unpadded groups of sequences (question-after: one
    context and question length; streaming: one prompt length): a batch of
    one gives what the batch gave."""
    single = assets[0] / "single"
    run_sweep(request(assets, single, batch_size=1, grid=parse_grid({"coverage": {"prefill": ["question-after", "streaming-128"]},
                                                                     "snapkv": {"budget": 0.5, "prefill": "streaming-128"}})))
    batched = keyed(read_records(swept)[0])
    alone = keyed(read_records(single)[0])
    assert len(alone) == len(TASKS) * SAMPLES * 3
    for key, record in alone.items():
        assert {f: record.get(f) for f in COMPARED} == {f: batched[key].get(f) for f in COMPARED}, key


def test_a_resumed_sweep_skips_the_mode_points_it_has(assets, swept):
    before = (swept / "records.jsonl").read_bytes()
    report = run_sweep(request(assets, swept))
    assert report["done_now"] == 0 and (swept / "records.jsonl").read_bytes() == before


def test_a_question_after_point_refuses_a_task_it_cannot_split_before_loading_the_model(assets, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the request was checked")

    monkeypatch.setattr(sweep_module, "split_refusal", lambda task: "its question comes first" if task.name == "qa_planted" else None)
    with monkeypatch.context() as patched, pytest.raises(
        UsageError, match=r"question-after point\(s\) coverage \[question after\] .*task qa_planted cannot be: its question comes first"
    ):
        patched.setattr(runner, "load_model", refuse)
        run_sweep(request(assets, tmp_path / "out", grid=parse_grid({"coverage": {"prefill": ["one-forward", "question-after"]}})))
    assert not (tmp_path / "out").exists()
    # without a question-after point the same tasks run
    run_sweep(request(assets, tmp_path / "ok", tasks=["qa_planted"], samples=1, grid=parse_grid({"fullkv": {"prefill": "streaming-128"}})))
    assert [r["point"] for r in read_records(tmp_path / "ok")[0]] == ["fullkv [streaming 128]"]


def test_the_decoder_runs_each_mode_on_its_own_path():
    points = parse_grid({"snapkv": {"prefill": ["one-forward", "streaming-64"]}})
    decoder = Decoder(model=None, plain=True)
    with pytest.raises(ValueError, match=r"snapkv \[streaming 64\] go through mode_point"):
        list(decoder.points(points, None, None, None))
    with pytest.raises(ValueError, match="snapkv is a one-forward point"):
        decoder.mode_point(points[0], [], None, "cpu")
    with pytest.raises(TypeError, match="needs each input split"):
        decoder.mode_point(parse_grid({"snapkv": {"prefill": "question-after"}})[0], [object()], None, "cpu")


# -- the report of several modes, on hand-made records ---------------------------


def record(point, method, prefill, budget, correct, index=0, task="hotpotqa"):
    return {"point": point, "method": method, "options": {}, "length": 1024, "task": task, "_id": f"{task}-{index}",
            "index": index, "pred": "Paris" if correct else "nothing", "answers": ["Paris"], "all_classes": None,
            "input_tokens": 100, "new_tokens": 2, "budget": budget, **({} if prefill is None else {"prefill": prefill})}  # fmt: skip


def mode_records():
    rows = [
        ("fullkv", "fullkv", None, 1.0, [True, True]),  # an older record: no prefill field, one forward
        ("fullkv [streaming 512]", "fullkv", "streaming-512", 1.0, [True, False]),
        ("snapkv(budget=0.25)", "snapkv", "one-forward", 0.25, [False, False]),
        ("snapkv(budget=0.5)", "snapkv", "one-forward", 0.5, [True, True]),
        ("snapkv(budget=0.25) [streaming 512]", "snapkv", "streaming-512", 0.25, [True, True]),
        ("snapkv(budget=0.5) [streaming 512]", "snapkv", "streaming-512", 0.5, [True, True]),
        ("coverage [question after]", "coverage", "question-after", 0.3, [True, False]),
    ]
    return [record(point, method, prefill, budget, ok, i) for point, method, prefill, budget, ok in rows for i, ok in enumerate(ok)]


def test_modes_are_series_of_their_own_and_the_reference_is_one_forward(tmp_path):
    summary = summarize(mode_records())
    assert [(p["label"], p["prefill"], p["series"]) for p in summary["points"]][:2] == [
        ("fullkv", "one-forward", "fullkv"), ("fullkv [streaming 512]", "streaming-512", "fullkv [streaming 512]"),
    ]  # fmt: skip
    (reference,) = [r for r in summary["reference"] if r["task"] == OVERALL]
    assert reference["score"] == 100.0 and reference["points"] == ["fullkv"]  # not the streaming fullkv's 50
    safe = {row["series"]: row["safe_budget"] for row in summary["safe_budgets"] if row["task"] == OVERALL}
    # one forward, snapkv is safe from 0.5; in pieces from 0.25: each series on its own
    assert safe == {"snapkv": 0.5, "snapkv [streaming 512]": 0.25, "coverage [question after]": None}
    # a point is judged against the baselines' one-forward curves only
    judged = judge_point(summary, "coverage [question after]", 1024)
    assert judged["baselines"] == {"snapkv": pytest.approx(100 * (0.3 - 0.25) / 0.25)}
    files = {path.name for path in write_quality_report(summary, tmp_path)}
    assert {"frontier.png", "quality.md"} <= files
    scores, safe_table = [t["rows"] for t in markdown_tables((tmp_path / "quality.md").read_text())]
    assert list(safe_table) == ["snapkv", "snapkv [streaming 512]", "coverage [question after]"]
    assert safe_table["snapkv [streaming 512]"][0] == "25.0%" and safe_table["snapkv"][0] == "50.0%"
    assert "fullkv [streaming 512]" in scores
