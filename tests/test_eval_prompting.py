"""Prompt building, chat-template exceptions and middle truncation
(refreekv.eval.prompting, refreekv.eval.tasks) on fixtures."""

import json

import pytest
from eval_fixtures import build_tokenizer

from refreekv.eval.data import Sample, read_samples
from refreekv.eval.prompting import build_input, format_prompt, truncate_middle
from refreekv.eval.tasks import (
    ALL_TASKS,
    CHAT_TEMPLATE_EXCEPTIONS,
    ENGLISH_TASKS,
    LONGBENCH_E_TASKS,
    TASKS,
    length_band,
    resolve_tasks,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def sample(context="Some context.", question="What?", **extra):
    return Sample(0, "id-0", question, context, ["answer"], extra.get("all_classes"), extra.get("length"), raw={})


class TestTasks:
    def test_task_sets(self):
        assert len(ALL_TASKS) == 21 and len(ENGLISH_TASKS) == 16 and len(LONGBENCH_E_TASKS) == 13
        assert not {"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"} & set(ENGLISH_TASKS)
        assert set(LONGBENCH_E_TASKS) <= set(ENGLISH_TASKS)

    def test_generation_lengths(self):
        lengths = {name: task.max_new_tokens for name, task in TASKS.items()}
        assert lengths["narrativeqa"] == lengths["qasper"] == lengths["dureader"] == lengths["samsum"] == 128
        assert lengths["gov_report"] == lengths["qmsum"] == lengths["multi_news"] == lengths["vcsum"] == 512
        assert lengths["hotpotqa"] == lengths["triviaqa"] == lengths["passage_count"] == 32
        assert lengths["lcc"] == lengths["repobench-p"] == lengths["trec"] == lengths["multifieldqa_en"] == 64

    def test_resolve(self):
        assert resolve_tasks(None) == list(ENGLISH_TASKS)
        assert resolve_tasks("all") == list(ALL_TASKS)
        assert resolve_tasks("all", longbench_e=True) == list(LONGBENCH_E_TASKS)
        assert resolve_tasks("trec, lcc") == ["trec", "lcc"]
        with pytest.raises(ValueError, match="unknown task.*'nope'"):
            resolve_tasks("trec,nope")
        with pytest.raises(ValueError, match="no LongBench-E variant"):
            resolve_tasks("narrativeqa", longbench_e=True)
        with pytest.raises(ValueError, match="twice"):
            resolve_tasks("trec,trec")

    def test_length_bands(self):
        assert [length_band(x) for x in (0, 3999, 4000, 7999, 8000, 50000)] == ["0-4k", "0-4k", "4-8k", "4-8k", "8k+", "8k+"]


class TestPromptTemplates:
    def test_every_template_takes_context_and_input(self):
        for name, task in TASKS.items():
            text = format_prompt(task, sample(context="CONTEXT{x}", question="QUESTION"))
            assert "CONTEXT{x}" in text, name  # braces in the data are kept
            if "{input}" in task.prompt:
                assert "QUESTION" in text, name

    def test_templates_as_in_the_benchmark(self):
        assert format_prompt(TASKS["lcc"], sample(context="def f():\n")) == (
            "Please complete the code given below. \ndef f():\nNext line of code:\n"
        )
        assert format_prompt(TASKS["repobench-p"], sample(context="# a.py\n", question="x = ")) == (
            "Please complete the code given below. \n# a.py\nx = Next line of code:\n"
        )
        assert format_prompt(TASKS["trec"], sample(context="EX", question="Q")) == (
            "Please determine the type of the question below. Here are some examples of questions.\n\nEX\nQ"
        )
        text = format_prompt(TASKS["passage_retrieval_en"], sample(context="C", question="A"))
        assert text.startswith("Here are 30 paragraphs from Wikipedia, along with an abstract.")
        assert text.endswith('The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ')
        assert format_prompt(TASKS["multifieldqa_zh"], sample(context="C", question="Q")).endswith("问题：Q\n回答：")


class TestTruncation:
    def test_short_prompt_is_unchanged(self, tokenizer):
        assert truncate_middle(tokenizer, "a short prompt", 100) == ("a short prompt", False)

    def test_keeps_first_and_last_halves(self, tokenizer):
        words = " ".join(f"w{i}" for i in range(400))
        prompt = "INSTRUCTION START " + words + " QUESTION END"
        ids = tokenizer(prompt)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and len(ids) > 64
        text, truncated = truncate_middle(tokenizer, prompt, 64)
        assert truncated
        # exactly the decoded first 32 and last 32 tokens, BOS dropped
        assert text == tokenizer.decode(ids[:32], skip_special_tokens=True) + tokenizer.decode(ids[-32:], skip_special_tokens=True)
        assert text.startswith("INSTRUCTION START") and text.endswith("QUESTION END")
        assert "w200" not in text
        retokenized = len(tokenizer(text)["input_ids"])
        assert abs(retokenized - 64) <= 3  # the seam may merge differently

    def test_odd_max_length_uses_floor_half(self, tokenizer):
        prompt = " ".join(f"w{i}" for i in range(300))
        ids = tokenizer(prompt)["input_ids"]
        text, _ = truncate_middle(tokenizer, prompt, 41)
        assert text == tokenizer.decode(ids[:20], skip_special_tokens=True) + tokenizer.decode(ids[-20:], skip_special_tokens=True)


class TestBuildInput:
    @pytest.mark.parametrize("task", sorted(TASKS))
    def test_chat_template_except_few_shot_and_code(self, tokenizer, task):
        built = build_input(tokenizer, TASKS[task], sample(), max_length=1000)
        raw = format_prompt(TASKS[task], sample())
        if task in CHAT_TEMPLATE_EXCEPTIONS:
            assert not built.chat and built.text == raw
            assert built.input_ids[0].tolist() == tokenizer(raw)["input_ids"]
        else:
            assert built.chat
            assert built.text == f"<|user|>\n{raw}</s>\n<|assistant|>\n"
            # the template's text is tokenized without adding a second BOS
            assert built.input_ids[0].tolist() == tokenizer(built.text, add_special_tokens=False)["input_ids"]

    def test_chat_template_can_be_turned_off(self, tokenizer):
        built = build_input(tokenizer, TASKS["hotpotqa"], sample(), max_length=1000, chat_template=False)
        assert not built.chat and built.text == format_prompt(TASKS["hotpotqa"], sample())

    def test_no_chat_template_on_the_tokenizer(self, tokenizer):
        plain = build_tokenizer()
        plain.chat_template = None
        assert not build_input(plain, TASKS["hotpotqa"], sample(), max_length=1000).chat

    def test_truncation_happens_before_the_chat_template(self, tokenizer):
        long_context = " ".join(f"w{i}" for i in range(600))
        built = build_input(tokenizer, TASKS["hotpotqa"], sample(context=long_context, question="Who?"), max_length=128)
        assert built.truncated and built.chat
        assert built.text.startswith("<|user|>\nAnswer the question based on the given passages.")
        assert built.text.endswith("Question: Who?\nAnswer:</s>\n<|assistant|>\n")
        assert 128 < built.input_ids.shape[1] <= 128 + 12  # the template's own tokens come on top


class TestReadSamples:
    def test_malformed_lines_reported_with_line_numbers(self, tmp_path):
        good = {"_id": "a", "input": "q", "context": "c", "answers": ["x"], "length": 3, "all_classes": None}
        lines = [
            json.dumps(good),
            "{not json",
            "",
            json.dumps([1, 2]),
            json.dumps({**good, "_id": "b", "answers": "x"}),
            json.dumps({"_id": "c", "input": "q"}),
            json.dumps(good),  # duplicate id
            json.dumps({**good, "_id": "d"}),
        ]
        path = tmp_path / "hotpotqa.jsonl"
        path.write_text("\n".join(lines) + "\n")
        samples, bad = read_samples(path)
        assert [s.id for s in samples] == ["a", "d"] and [s.index for s in samples] == [0, 1]
        assert [(b.line, b.file) for b in bad] == [(2, str(path)), (4, str(path)), (5, str(path)), (6, str(path)), (7, str(path))]
        assert "not valid JSON" in bad[0].error and "not an object" in bad[1].error
        assert "answers" in bad[2].error and "missing field(s) context, answers" in bad[3].error
        assert "duplicate _id 'a' (first on line 1)" in bad[4].error

    def test_limit_counts_valid_samples(self, tmp_path):
        good = {"input": "q", "context": "c", "answers": ["x"]}
        path = tmp_path / "t.jsonl"
        path.write_text("oops\n" + "".join(json.dumps({**good, "_id": str(i)}) + "\n" for i in range(5)))
        samples, bad = read_samples(path, limit=2)
        assert [s.id for s in samples] == ["0", "1"] and len(bad) == 1
