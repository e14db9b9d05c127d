"""LongBench v1 metrics, written from the benchmark's definitions, and
RULER's two string-match metrics.

Every metric returns a float in [0, 1]; a task's score is the mean over
samples times 100. The LongBench metrics take (prediction, ground_truth,
all_classes) and a sample scores the maximum over its gold answers
(`sample_score`). The RULER metrics (ANSWER_SET_METRICS) take the whole
answer list instead, because a multi-answer sample (four planted values,
the variables of a chain) asks for all of its answers at once:

* qa_f1: token-level F1 after SQuAD normalization (lower case, punctuation
  and the articles a/an/the removed, whitespace collapsed).
* qa_f1_zh: F1 over jieba words, each with Chinese and ASCII punctuation and
  whitespace removed, empty words dropped.
* rouge / rouge_zh: ROUGE-L F of the `rouge` package (the one LongBench
  uses; summary-level LCS over "."-split sentences); 0 when it refuses the
  input (an empty hypothesis). The Chinese variant scores jieba words joined
  by spaces.
* classification: the classes named in the prediction; a matched class that
  is a proper substring of the gold class is dropped (so "Human" does not
  count against "Human being"); the gold class scores 1 / (classes left).
* retrieval / retrieval_zh: of all the numbers in the prediction, the share
  equal to the gold paragraph number ("Paragraph 7" / "段落7").
* count: of all the numbers in the prediction, the share equal to the gold
  count.
* code_sim: the first line of the prediction that is not a comment or a
  markdown fence (no `, # or //), compared with the gold line by the
  fuzzywuzzy ratio (rounded percentage of matching characters).

and, on the whole answer list:

* string_match_all: the share of the gold answers found in the prediction
  (case-insensitive substring); 3 answers of which 2 are found score 2/3.
* string_match_part: 1 if any gold answer is found in the prediction, else 0.
"""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter
from typing import Callable, Optional, Sequence

__all__ = [
    "ANSWER_SET_METRICS",
    "METRICS",
    "classification_score",
    "code_sim_score",
    "count_score",
    "first_line",
    "normalize_answer",
    "normalize_zh_answer",
    "qa_f1_score",
    "qa_f1_zh_score",
    "record_score",
    "retrieval_score",
    "retrieval_zh_score",
    "rouge_score",
    "rouge_zh_score",
    "sample_score",
    "string_match_all",
    "string_match_part",
    "token_f1",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCTUATION = frozenset(string.punctuation)
# Full-width and CJK punctuation the Chinese normalization removes, plus the ASCII set.
_ZH_PUNCTUATION = frozenset(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
) | _ASCII_PUNCTUATION
_NUMBER = re.compile(r"\d+")


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, drop ASCII punctuation, drop the
    articles a/an/the, collapse whitespace (applied in that order)."""
    text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """Lower case, drop Chinese and ASCII punctuation, drop all whitespace."""
    return "".join(ch for ch in text.lower() if ch not in _ZH_PUNCTUATION and not ch.isspace())


def token_f1(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists (0 when nothing overlaps)."""
    common = sum((Counter(prediction) & Counter(ground_truth)).values())
    if common == 0:
        return 0.0
    precision = common / len(prediction)
    recall = common / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _jieba_words(text: str) -> list[str]:
    return list(_jieba().cut(text, cut_all=False))


def qa_f1_zh_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    def words(text):
        return [word for word in (normalize_zh_answer(w) for w in _jieba_words(text)) if word]

    return token_f1(words(prediction), words(ground_truth))


def rouge_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    try:
        scores = _rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # noqa: BLE001 - as the benchmark: whatever the package refuses scores 0
        # It refuses an empty hypothesis or reference (also one that is only
        # dots or whitespace) with ValueError.
        return 0.0
    return float(scores["rouge-l"]["f"])


def rouge_zh_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    return rouge_score(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(ground_truth)))


def classification_score(prediction: str, ground_truth: str, all_classes: Optional[Sequence[str]] = None) -> float:
    if not all_classes:
        raise ValueError("classification needs the task's all_classes")
    matched = [name for name in all_classes if name in prediction]
    # Drop matched classes that are proper substrings of the gold class. This
    # follows the reference scorer exactly, including what its in-place
    # removal does: right after a class is dropped, the next matched class is
    # not examined (it stays). Without a match the score is 0 (the reference
    # has a string-similarity fallback that its condition never reaches).
    kept, skip_next = [], False
    for name in matched:
        if skip_next:
            kept.append(name)
            skip_next = False
        elif name in ground_truth and name != ground_truth:
            skip_next = True
        else:
            kept.append(name)
    if ground_truth in kept:
        return 1.0 / len(kept)
    return 0.0


def _share_equal(prediction: str, target: str) -> float:
    numbers = _NUMBER.findall(prediction)
    if not numbers:
        return 0.0
    return sum(number == target for number in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    return _share_equal(prediction, str(ground_truth))


def _retrieval(prediction: str, ground_truth: str, pattern: str) -> float:
    found = re.findall(pattern, ground_truth)
    if not found:
        raise ValueError(f"gold answer {ground_truth!r} names no paragraph")
    return _share_equal(prediction, found[0])


def retrieval_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    return _retrieval(prediction, ground_truth, r"Paragraph (\d+)")


def retrieval_zh_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    return _retrieval(prediction, ground_truth, r"段落(\d+)")


def code_sim_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return _fuzz().ratio(line, ground_truth) / 100


def _found(prediction: str, answers: Sequence[str]) -> list[bool]:
    lowered = prediction.lower()
    return [answer.lower() in lowered for answer in answers]


def string_match_all(prediction: str, answers: Sequence[str], all_classes=None) -> float:
    """The share of `answers` that occur in the prediction (0 without answers)."""
    found = _found(prediction, answers)
    return sum(found) / len(found) if found else 0.0


def string_match_part(prediction: str, answers: Sequence[str], all_classes=None) -> float:
    return float(any(_found(prediction, answers)))


def first_line(prediction: str) -> str:
    """The first line after leading newlines (few-shot tasks score only it)."""
    return prediction.lstrip("\n").split("\n")[0]


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score,
    "qa_f1_zh": qa_f1_zh_score,
    "rouge": rouge_score,
    "rouge_zh": rouge_zh_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "retrieval_zh": retrieval_zh_score,
    "count": count_score,
    "code_sim": code_sim_score,
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
}
# The metrics that score a prediction against the whole answer list at once.
ANSWER_SET_METRICS = frozenset({"string_match_all", "string_match_part"})


def sample_score(metric: str, prediction: str, answers: Sequence[str], all_classes=None, first_line_only=False) -> float:
    """The max over gold answers of `metric`, or for an answer-set metric its
    score against all of them (0 without answers)."""
    if first_line_only:
        prediction = first_line(prediction)
    function = METRICS[metric]
    if metric in ANSWER_SET_METRICS:
        return float(function(prediction, answers, all_classes=all_classes))
    return max((float(function(prediction, answer, all_classes=all_classes)) for answer in answers), default=0.0)


def record_score(task, record: dict) -> float:
    """`sample_score` of one prediction record under `task`'s metric and
    handling: the one scoring call of `score` and the quality map."""
    return sample_score(task.metric, record["pred"], record["answers"], record.get("all_classes"), task.first_line_only)


# -- the metric packages, imported on first use ---------------------------

_CACHE: dict[str, object] = {}


def _rouge():
    if "rouge" not in _CACHE:
        from rouge import Rouge

        _CACHE["rouge"] = Rouge(metrics=["rouge-l"])
    return _CACHE["rouge"]


def _fuzz():
    if "fuzz" not in _CACHE:
        from thefuzz import fuzz

        _CACHE["fuzz"] = fuzz
    return _CACHE["fuzz"]


def _jieba():
    if "jieba" not in _CACHE:
        import logging

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jieba imports the deprecated pkg_resources
            import jieba
        jieba.setLogLevel(logging.WARNING)
        _CACHE["jieba"] = jieba
    return _CACHE["jieba"]
