"""LongBench task files as a new user's files come (byte-order marks, bytes
that are not UTF-8, classification samples without classes, malformed
lines past a limit, empty files), prediction records checked like samples,
and prompts byte for byte the benchmark's."""

from __future__ import annotations

import codecs
import json
import re

import pytest

from refreekv.eval.data import needs_classes, prediction_problem, read_samples
from refreekv.eval.tasks import TASKS

GOOD = {"_id": "a", "input": "q", "context": "c", "answers": ["x"], "length": 3, "all_classes": None}


def jsonl(*records: dict) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def test_narrativeqa_prompt_keeps_the_benchmarks_spelling():
    # THUDM/LongBench config/dataset2prompt.json writes "asconcisely", twice.
    assert TASKS["narrativeqa"].prompt == (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\n"
        "Story: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single "
        "phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
    )


def test_byte_order_mark_before_the_first_sample_is_accepted(tmp_path):
    path = tmp_path / "hotpotqa.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + jsonl(GOOD, {**GOOD, "_id": "b"}).encode())
    samples, bad = read_samples(path)
    assert [s.id for s in samples] == ["a", "b"] and not bad


def test_bytes_that_are_not_utf8_skip_their_line_and_are_never_replaced(tmp_path):
    path = tmp_path / "hotpotqa.jsonl"
    latin1 = json.dumps({**GOOD, "_id": "b", "context": "café"}, ensure_ascii=False).encode("latin-1") + b"\n"
    path.write_bytes(jsonl(GOOD).encode() + latin1 + jsonl({**GOOD, "_id": "c", "context": "café"}).encode())
    samples, bad = read_samples(path)
    assert [s.id for s in samples] == ["a", "c"] and samples[1].context == "café"
    assert [(b.file, b.line) for b in bad] == [(str(path), 2)]
    column = latin1.index("é".encode("latin-1")) + 1
    assert bad[0].error == f"not UTF-8 text (expected UTF-8, got byte 0xe9 at byte {column} of the line)"


def test_classification_samples_need_their_classes(tmp_path):
    path = tmp_path / "trec.jsonl"
    path.write_text(jsonl({**GOOD, "all_classes": ["Location"]}, {**GOOD, "_id": "b"}, {**GOOD, "_id": "c", "all_classes": []}))
    assert needs_classes(TASKS["trec"]) and needs_classes(TASKS["lsht"]) and not needs_classes(TASKS["hotpotqa"])
    samples, bad = read_samples(path, classes_required=True)
    assert [s.id for s in samples] == ["a"] and [(b.file, b.line) for b in bad] == [(str(path), 2), (str(path), 3)]
    assert bad[0].error == (
        "all_classes is required for classification tasks: expected a non-empty list of class names, got null"
    )
    assert bad[1].error.endswith("got an empty list")
    assert len(read_samples(path)[0]) == 3  # other tasks do not need classes


def test_limit_takes_the_first_samples_of_a_fully_checked_file(tmp_path):
    path = tmp_path / "hotpotqa.jsonl"
    path.write_text(jsonl(*({**GOOD, "_id": str(i)} for i in range(3))) + "{broken\n" + jsonl({**GOOD, "_id": "0"}))
    samples, bad = read_samples(path, limit=2)
    assert [s.id for s in samples] == ["0", "1"]
    assert [b.line for b in bad] == [4, 5] and "duplicate _id '0' (first on line 1)" in bad[1].error


@pytest.mark.parametrize("content", [b"", b"\n  \n", codecs.BOM_UTF8 + b"\n"], ids=["no bytes", "blank lines", "only a BOM"])
def test_empty_task_file_is_an_error_naming_it(tmp_path, content):
    path = tmp_path / "hotpotqa.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"task file {re.escape(str(path))} is empty: expected one JSON sample per line"):
        read_samples(path)


def test_messages_say_what_was_expected_and_what_was_given(tmp_path):
    path = tmp_path / "hotpotqa.jsonl"
    path.write_text(
        jsonl(
            {**GOOD, "answers": "x"},
            {**GOOD, "answers": ["x", 3]},
            {**GOOD, "length": "long"},
            {**GOOD, "_id": True},
            {**GOOD, "context": None},
            {**GOOD, "all_classes": {"a": 1}},
            {"_id": "b", "input": "q"},
        )
    )
    samples, bad = read_samples(path)
    assert not samples and [b.error for b in bad] == [
        'answers must be a list of strings, got a string "x"',
        "answers must be a list of strings, got a list with a number 3 at index 1",
        'length must be a number or null, got a string "long"',
        "_id must be a string or an integer, got a boolean true",
        "context must be a string, got null",
        "all_classes must be a list of strings or null, got an object",
        "missing field(s) context, answers (expected _id, input, context, answers)",
    ]


def test_prediction_records_are_checked_like_samples():
    record = {"_id": "a", "pred": "Location", "answers": ["Location"], "all_classes": ["Location", "Human being"]}
    assert prediction_problem(record, classes_required=True) is None
    assert prediction_problem({**record, "answers": "Location"}) == 'answers must be a list of strings, got a string "Location"'
    assert prediction_problem({**record, "pred": ["Location"]}) == "pred must be a string, got a list of strings"
    assert prediction_problem({**record, "budget": "half"}) == 'budget must be a number or null, got a string "half"'
    assert prediction_problem({**record, "all_classes": None}) is None
    assert prediction_problem({**record, "all_classes": None}, classes_required=True).startswith("all_classes is required")
    assert prediction_problem({"_id": "a", "pred": "x"}) == "missing field(s) answers (expected _id, pred, answers)"
