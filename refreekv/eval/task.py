"""What the evaluation knows of a task: its prompt template, generation
length, metric and handling. The suites define their tasks with it
(LongBench's in refreekv.eval.tasks, the RULER-style ones in
refreekv.eval.ruler), and refreekv.eval.tasks registers them all; it is a
module of its own so that a suite can define tasks without importing the
registry that imports it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CHAT_TEMPLATE_EXCEPTIONS", "FIRST_LINE_TASKS", "Task"]


@dataclass(frozen=True)
class Task:
    name: str
    prompt: str  # str.format template with {context} and {input}
    max_new_tokens: int
    metric: str  # a name in refreekv.eval.metrics.METRICS
    language: str  # "en" or "zh"
    category: str
    # The words that open the answer, for the model to complete (RULER's
    # "answer prefix"): a str.format template over the fields that
    # refreekv.eval.ruler records with each sample. The generator writes the
    # filled-in text into the record's `answer_prefix` field, and
    # prompting.build_input appends that field, so a data file states
    # exactly what the model read. Empty for the LongBench tasks.
    answer_prefix: str = ""

    @property
    def chat_template(self) -> bool:
        """Whether a chat model gets its chat template on this task (the
        benchmark leaves few-shot and code completion prompts raw)."""
        return self.name not in CHAT_TEMPLATE_EXCEPTIONS

    @property
    def first_line_only(self) -> bool:
        """Whether only the first line of a prediction is scored."""
        return self.name in FIRST_LINE_TASKS

    @property
    def stop_at_newline(self) -> bool:
        """samsum generates until a newline (and at least one token): the
        benchmark does this to stop the model from continuing the few-shot
        pattern with a new dialogue."""
        return self.name == "samsum"


# Few-shot (trec, triviaqa, samsum, lsht) and code (lcc, repobench-p) prompts
# are fed without the chat template.
CHAT_TEMPLATE_EXCEPTIONS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
# Few-shot tasks: the model tends to continue the example pattern, so the
# benchmark scores the first line only.
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})
