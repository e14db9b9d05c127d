"""The synthetic LongBench-format tasks made from the essays
(refreekv.eval.synthetic): valid files whose answers are right."""

import json
import re

import pytest

from refreekv.eval.data import read_samples
from refreekv.eval.synthetic import SYNTHETIC_TASKS, generate, main
from refreekv.eval.tasks import TASKS


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    paths = generate(folder, samples=6, words=900, seed=3)
    return {task: read_samples(path) for task, path in paths.items()}, paths


def paragraphs(context):
    return re.findall(r"Paragraph (\d+): (.*?)(?=\n\nParagraph \d+: |\Z)", context, flags=re.S)


def test_files_are_valid_longbench_samples(generated):
    samples, _ = generated
    assert set(samples) == set(SYNTHETIC_TASKS) and all(task in TASKS for task in SYNTHETIC_TASKS)
    for task, (items, bad) in samples.items():
        assert not bad and len(items) == 6
        assert len({s.id for s in items}) == 6
        for s in items:
            assert s.raw["dataset"] == task and s.raw["language"] == "en" and len(s.answers) == 1
            assert 870 <= s.length <= 1000  # about the requested words, plus the paragraph labels


def test_passage_retrieval_answer_is_the_paragraph_the_abstract_opens(generated):
    for s in generated[0]["passage_retrieval_en"][0]:
        found = paragraphs(s.context)
        assert [int(number) for number, _ in found] == list(range(1, 31))
        target = int(re.fullmatch(r"Paragraph (\d+)", s.answers[0]).group(1))
        holders = [int(number) for number, text in found if text.startswith(s.input)]
        assert holders == [target]


def test_passage_count_answer_is_the_number_of_distinct_paragraphs(generated):
    counts = set()
    for s in generated[0]["passage_count"][0]:
        texts = [text for _, text in paragraphs(s.context)]
        assert int(s.answers[0]) == len(set(texts)) < len(texts)
        counts.add(s.answers[0])
    assert len(counts) > 1


def test_planted_fact_is_in_the_context(generated):
    for s in generated[0]["multifieldqa_en"][0]:
        assert s.answers[0] in s.context and s.input.endswith("?")


def test_deterministic(generated, tmp_path):
    _, paths = generated
    again = generate(tmp_path, samples=6, words=900, seed=3)
    for task in SYNTHETIC_TASKS:
        assert again[task].read_bytes() == paths[task].read_bytes()
    other = generate(tmp_path / "other", samples=6, words=900, seed=4)
    assert json.loads(other["passage_count"].read_text().splitlines()[0]) != json.loads(
        paths["passage_count"].read_text().splitlines()[0]
    )


def test_cli_refuses_too_few_words_in_one_line_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--output-dir", str(tmp_path / "out"), "--words", "50"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "error: words must be an integer >= 100, got 50" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
