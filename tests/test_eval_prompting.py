"""Prompt building, chat-template exceptions and middle truncation
(refreekv.eval.prompting, refreekv.eval.tasks) on fixtures."""

import json

import pytest
from eval_fixtures import build_tokenizer

from refreekv.eval.data import Sample, read_samples
from refreekv.eval.prompting import build_input, format_prompt, split_input, split_refusal, truncate_middle
from refreekv.eval.task import Task
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


class TestSplitInput:
    """The context part and the question part of the question-after mode:
    together exactly `build_input`'s tokens, the context part ending where
    the sample's context ends."""

    CONTEXT = "The heron nests by the lake. " * 20

    def with_prefix(self, prefix="The answer is"):
        return Sample(0, "id-0", "Where does it nest?", self.CONTEXT, ["lake"], None, None, raw={"answer_prefix": prefix})

    def check(self, tokenizer, task, item, max_length=10**6, chat_template=True):
        split = split_input(tokenizer, task, item, max_length, chat_template)
        built = build_input(tokenizer, task, item, max_length, chat_template)
        ids = built.input_ids[0].tolist()
        assert split.built.input_ids[0].tolist() == ids and split.built.text == built.text
        assert split.context_ids[0].tolist() + split.question_ids[0].tolist() == ids
        assert split.context_tokens + split.question_tokens == len(ids) and split.question_tokens > 0
        return split, tokenizer.decode(split.context_ids[0]), tokenizer.decode(split.question_ids[0])

    @pytest.mark.parametrize("task", ["hotpotqa", "passage_retrieval_en", "gov_report", "qa_planted", "niah_single"])
    def test_chat_template_concatenation_is_the_input(self, tokenizer, task):
        item = self.with_prefix() if task in ("qa_planted", "niah_single") else sample(context=self.CONTEXT, question="Where?")
        split, context, question = self.check(tokenizer, TASKS[task], item)
        assert split.built.chat and split.moved_tokens == 0
        # the context part ends with the sample's context; the rest of the template follows it
        assert context.rstrip().endswith(self.CONTEXT.rstrip()) and context.startswith("<|user|>\n")
        after = TASKS[task].prompt.split("{context}")[1].format(input=item.input)
        prefix = item.raw.get("answer_prefix", "")
        assert question == f"{after}</s>\n<|assistant|>\n{prefix}"

    def test_the_answer_prefix_is_in_the_question_part(self, tokenizer):
        _, context, question = self.check(tokenizer, TASKS["qa_planted"], self.with_prefix("Answer:"))
        assert question.endswith("Where does it nest? Answer in a few words.</s>\n<|assistant|>\nAnswer:")
        assert "Answer:" not in context and "Where does it nest?" not in context
        _, _, raw_question = self.check(tokenizer, TASKS["qa_planted"], self.with_prefix("Answer:"), chat_template=False)
        assert raw_question == "\n\nQuestion: Where does it nest? Answer in a few words.\nAnswer:"

    @pytest.mark.parametrize("task", ["trec", "lcc", "hotpotqa"])
    def test_raw_template_concatenation_is_the_input(self, tokenizer, task):
        """Few-shot and code tasks are raw; so is any task without the chat template."""
        item = sample(context=self.CONTEXT, question="Question: Where is it?\nType:")
        split, context, question = self.check(tokenizer, TASKS[task], item, chat_template=False)
        assert not split.built.chat
        assert split.context_ids[0, 0].item() == tokenizer.bos_token_id  # the raw tokenization's BOS opens the context part
        assert context.rstrip().endswith(self.CONTEXT.rstrip())
        assert question == TASKS[task].prompt.split("{context}")[1].format(input=item.input)

    def test_a_truncated_prompt_splits_where_its_kept_context_ends(self, tokenizer):
        item = sample(context=" ".join(f"w{i}" for i in range(600)), question="Who?")
        split, context, question = self.check(tokenizer, TASKS["hotpotqa"], item, max_length=300)
        assert split.built.truncated and "Question: Who?" in question and "Question: Who?" not in context
        assert context.rstrip().endswith("w599")  # the end of the context is kept, and ends the context part

    def test_a_question_cut_by_the_truncation_cannot_be_split(self, tokenizer):
        item = sample(context="short", question=" ".join(f"q{i}" for i in range(400)))
        with pytest.raises(ValueError, match="no longer whole after the middle truncation"):
            split_input(tokenizer, TASKS["hotpotqa"], item, 64)

    def test_a_template_with_the_question_first_cannot_be_split(self, tokenizer):
        question_first = Task("question_first", "Question: {input}\n\nRead this:\n{context}\nAnswer:", 8, "qa_f1", "en", "test")
        assert "comes before the context" in split_refusal(question_first)
        assert "exactly once" in split_refusal(Task("no_context", "Question: {input}", 8, "qa_f1", "en", "test"))
        with pytest.raises(ValueError, match=r"task question_first: cannot split .*\(\{input\}\) comes before the context"):
            split_input(tokenizer, question_first, sample(), 1000)
        # every shipped task puts its question after its context
        assert [name for name, task in TASKS.items() if split_refusal(task)] == []


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
