"""The LongBench v1 tasks: prompt template, generation length, metric and
handling of each (facts of the benchmark, THUDM/LongBench, ACL 2024).

Every task reads `<task>.jsonl` (LongBench-E: `<task>_e.jsonl`) from the
benchmark's data archive; each line holds `input`, `context`, `answers`,
`length`, `dataset`, `language`, `all_classes` and `_id`.

The registry also holds the RULER-style synthetic tasks (RULER_TASKS),
defined in refreekv.eval.ruler next to the generator that writes their files
in the same format. ALL_TASKS and ENGLISH_TASKS stay LongBench's.
"""

from __future__ import annotations

from refreekv.eval import ruler
from refreekv.eval.task import CHAT_TEMPLATE_EXCEPTIONS, FIRST_LINE_TASKS, Task

__all__ = [
    "ALL_TASKS",
    "CHAT_TEMPLATE_EXCEPTIONS",
    "ENGLISH_TASKS",
    "FIRST_LINE_TASKS",
    "LONGBENCH_E_TASKS",
    "RULER_TASKS",
    "TASKS",
    "Task",
    "resolve_tasks",
]


_QA_ONLY = "Only give me the answer and do not output any other words."
# "asconcisely" (no space) is the benchmark's own spelling; published scores
# were made with it, so it stays.
_NARRATIVE = "asconcisely as you can, using a single phrase if possible. Do not provide any explanation."
_QASPER = (
    "as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered "
    'based on the information in the article, write "unanswerable". If the question is a yes/no question, answer '
    '"yes", "no", or "unanswerable". Do not provide any explanation.'
)
_MULTI_DOC = (
    f"Answer the question based on the given passages. {_QA_ONLY}\n\n"
    "The following are given passages.\n{context}\n\n"
    f"Answer the question based on the given passages. {_QA_ONLY}\n\n"
    "Question: {input}\nAnswer:"
)

_SPECS = [
    # name, max_new_tokens, metric, language, category, prompt
    ("narrativeqa", 128, "qa_f1", "en", "single-doc QA",
     "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
     f"{_NARRATIVE}\n\nStory: {{context}}\n\nNow, answer the question based on the story {_NARRATIVE}\n\n"
     "Question: {input}\n\nAnswer:"),
    ("qasper", 128, "qa_f1", "en", "single-doc QA",
     f"You are given a scientific article and a question. Answer the question {_QASPER}\n\nArticle: {{context}}\n\n"
     f" Answer the question based on the above article {_QASPER}\n\nQuestion: {{input}}\n\nAnswer:"),
    ("multifieldqa_en", 64, "qa_f1", "en", "single-doc QA",
     "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the "
     "above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"),
    ("multifieldqa_zh", 64, "qa_f1_zh", "zh", "single-doc QA",
     "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。"
     "\n\n问题：{input}\n回答："),
    ("hotpotqa", 32, "qa_f1", "en", "multi-doc QA", _MULTI_DOC),
    ("2wikimqa", 32, "qa_f1", "en", "multi-doc QA", _MULTI_DOC),
    ("musique", 32, "qa_f1", "en", "multi-doc QA", _MULTI_DOC),
    ("dureader", 128, "rouge_zh", "zh", "multi-doc QA",
     "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答："),
    ("gov_report", 512, "rouge", "en", "summarization",
     "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}"
     "\n\nNow, write a one-page summary of the report.\n\nSummary:"),
    ("qmsum", 512, "rouge", "en", "summarization",
     "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one "
     "or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in "
     "one or more sentences.\n\nQuery: {input}\nAnswer:"),
    ("multi_news", 512, "rouge", "en", "summarization",
     "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write "
     "a one-page summary of all the news.\n\nSummary:"),
    ("vcsum", 512, "rouge_zh", "zh", "summarization",
     "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结："),
    ("trec", 64, "classification", "en", "few-shot",
     "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}"),
    ("triviaqa", 32, "qa_f1", "en", "few-shot",
     f"Answer the question based on the given passage. {_QA_ONLY} The following are some examples.\n\n{{context}}"
     "\n\n{input}"),
    ("samsum", 128, "rouge", "en", "few-shot",
     "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}"),
    ("lsht", 64, "classification", "zh", "few-shot", "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}"),
    ("passage_count", 32, "count", "en", "synthetic",
     "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read "
     "these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, "
     "how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique "
     "paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and "
     "so on.\n\nThe final answer is: "),
    ("passage_retrieval_en", 32, "retrieval", "en", "synthetic",
     "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract "
     "is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph "
     'that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\n'
     "The answer is: "),
    ("passage_retrieval_zh", 32, "retrieval_zh", "zh", "synthetic",
     "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
     '请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：'),
    ("lcc", 64, "code_sim", "code", "code", "Please complete the code given below. \n{context}Next line of code:\n"),
    ("repobench-p", 64, "code_sim", "code", "code",
     "Please complete the code given below. \n{context}{input}Next line of code:\n"),
]

TASKS: dict[str, Task] = {
    name: Task(name=name, prompt=prompt, max_new_tokens=max_new, metric=metric, language=language, category=category)
    for name, max_new, metric, language, category, prompt in _SPECS
}

# All 21 tasks, in the benchmark's order.
ALL_TASKS: tuple[str, ...] = tuple(TASKS)
# The 16 English (and code) tasks: the set KV-cache papers report.
ENGLISH_TASKS: tuple[str, ...] = tuple(name for name, task in TASKS.items() if task.language != "zh")
# LongBench-E: 13 tasks with a uniform length distribution, scored per length band.
LONGBENCH_E_TASKS: tuple[str, ...] = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news",
    "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)  # fmt: skip

# LongBench-E length bands, on the `length` field of each sample (words, or
# characters for Chinese, as the data archive counts them).
LENGTH_BANDS: tuple[tuple[str, int, float], ...] = (("0-4k", 0, 4000), ("4-8k", 4000, 8000), ("8k+", 8000, float("inf")))


def length_band(length: float) -> str:
    for name, low, high in LENGTH_BANDS:
        if low <= length < high:
            return name
    raise ValueError(f"negative length {length}")


def resolve_tasks(spec: str | list[str] | None, longbench_e: bool = False) -> list[str]:
    """Task names from a CLI spec: None/"default" (the 16 English tasks, or the
    13 LongBench-E tasks), "all" (21; LongBench-E has 13), "english", or a
    comma-separated list. Unknown names raise ValueError."""
    if spec is None or spec == "default" or spec == "english" or spec == ["default"]:
        return list(LONGBENCH_E_TASKS if longbench_e else ENGLISH_TASKS)
    names = spec if isinstance(spec, list) else [part.strip() for part in spec.split(",") if part.strip()]
    if names == ["all"]:
        return list(LONGBENCH_E_TASKS if longbench_e else ALL_TASKS)
    if not names:
        raise ValueError("no task given")
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; known: {', '.join(TASKS)}")
    if longbench_e:
        missing = [name for name in names if name not in LONGBENCH_E_TASKS]
        if missing:
            raise ValueError(
                f"task(s) {', '.join(map(repr, missing))} have no LongBench-E variant; LongBench-E has: "
                + ", ".join(LONGBENCH_E_TASKS)
            )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"task(s) given twice: {', '.join(duplicates)}")
    return names


# Registered after the LongBench lists above, which stay LongBench's.
TASKS.update(ruler.TASKS)
RULER_TASKS: tuple[str, ...] = ruler.RULER_TASKS
