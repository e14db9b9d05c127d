"""LongBench metrics against hand-computed cases (refreekv.eval.metrics)."""

import pytest

from refreekv.eval import metrics as m
from refreekv.eval.tasks import TASKS

approx = pytest.approx


class TestQaF1:
    def test_normalization_drops_case_punctuation_articles_and_spaces(self):
        assert m.normalize_answer("The  Cat's hat, a BIG one!") == "cats hat big one"
        assert m.normalize_answer("An apple; the END.") == "apple end"
        # articles only as whole words
        assert m.normalize_answer("Theater anthem") == "theater anthem"

    def test_hand_computed_f1(self):
        # [cat, sat] vs [cat, sat, down]: P = 1, R = 2/3, F1 = 0.8
        assert m.qa_f1_score("The cat sat", "a cat sat down") == approx(0.8)
        # [paris, france] vs [paris]: P = 1/2, R = 1, F1 = 2/3
        assert m.qa_f1_score("Paris, France.", "Paris") == approx(2 / 3)
        # tokens count as a multiset: [b, b, b] vs [b]: P = 1/3, R = 1, F1 = 0.5
        assert m.qa_f1_score("b b b", "b") == approx(0.5)

    def test_punctuation_and_articles_do_not_matter(self):
        assert m.qa_f1_score("The Eiffel Tower!", "eiffel tower") == 1.0

    def test_empty_or_article_only_prediction_scores_zero(self):
        assert m.qa_f1_score("", "Paris") == 0.0
        assert m.qa_f1_score("the", "Paris") == 0.0
        assert m.qa_f1_score("London", "Paris") == 0.0

    def test_chinese_f1_over_jieba_words(self):
        # jieba: 我 / 爱 / 北京 vs 北京: P = 1/3, R = 1, F1 = 0.5
        assert m.qa_f1_zh_score("我爱北京", "北京") == approx(0.5)
        # the full-width full stop is dropped by the normalization
        assert m.qa_f1_zh_score("北京。", "北京") == 1.0
        assert m.qa_f1_zh_score("", "北京") == 0.0
        assert m.normalize_zh_answer("Ａ，北 京！") == "ａ北京"


class TestRouge:
    def test_hand_computed_rouge_l(self):
        # LCS police/arrested/suspect = 3; P = 3/4, R = 3/6, F = 0.6
        assert m.rouge_score("police arrested the suspect", "the police arrested a suspect yesterday") == approx(0.6, abs=1e-6)
        assert m.rouge_score("a b c", "a b c") == approx(1.0, abs=1e-6)

    def test_case_sensitive_like_the_package(self):
        assert m.rouge_score("Cat", "cat") == 0.0

    def test_empty_prediction_scores_zero(self):
        assert m.rouge_score("", "a summary") == 0.0
        assert m.rouge_score("...", "a summary") == 0.0  # only sentence separators

    def test_chinese_rouge_on_jieba_words(self):
        # 我们/在/北京/工作 vs 他/在/上海/工作: LCS 在/工作 = 2 of 4 each way
        assert m.rouge_zh_score("我们在北京工作", "他在上海工作") == approx(0.5, abs=1e-6)
        assert m.rouge_zh_score("", "他在上海工作") == 0.0


class TestClassification:
    CLASSES = ["Human being", "Human", "Location", "Description"]

    def test_exact_class(self):
        assert m.classification_score("Location", "Location", all_classes=self.CLASSES) == 1.0

    def test_overlapping_label_inside_the_gold_one_is_not_held_against_it(self):
        # "Human" matches too, but it is part of the gold "Human being"
        assert m.classification_score("Type: Human being", "Human being", all_classes=self.CLASSES) == 1.0

    def test_overlapping_label_alone_is_wrong(self):
        assert m.classification_score("Human", "Human being", all_classes=self.CLASSES) == 0.0

    def test_several_classes_share_the_credit(self):
        assert m.classification_score("Location or Description", "Location", all_classes=self.CLASSES) == 0.5
        # matched [Human being, Human, Location]; Human dropped -> 2 left
        assert m.classification_score("Location or Human being", "Human being", all_classes=self.CLASSES) == 0.5

    def test_reference_removal_quirk_is_kept(self):
        # matched [a, ab, abc] for gold "abc": "a" is dropped and the reference
        # scorer then skips "ab" (in-place removal while iterating), so 2 stay.
        assert m.classification_score("abc", "abc", all_classes=["a", "ab", "abc"]) == 0.5

    def test_no_class_named_scores_zero(self):
        # no string-similarity fallback: "Locaton" is not "Location"
        assert m.classification_score("Locaton", "Location", all_classes=self.CLASSES) == 0.0
        assert m.classification_score("", "Location", all_classes=self.CLASSES) == 0.0

    def test_needs_classes(self):
        with pytest.raises(ValueError, match="all_classes"):
            m.classification_score("Location", "Location", all_classes=None)


class TestRetrievalAndCount:
    def test_retrieval(self):
        assert m.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
        assert m.retrieval_score("Paragraph 3 and Paragraph 13", "Paragraph 3") == 0.5
        assert m.retrieval_score("It is paragraph 3, not 30 or 4.", "Paragraph 3") == approx(1 / 3)
        assert m.retrieval_score("The answer is 30", "Paragraph 3") == 0.0
        assert m.retrieval_score("", "Paragraph 3") == 0.0
        assert m.retrieval_score("no number", "Paragraph 3") == 0.0

    def test_retrieval_zh(self):
        assert m.retrieval_zh_score("段落7", "段落7") == 1.0
        assert m.retrieval_zh_score("答案是段落7或段落8", "段落7") == 0.5

    def test_retrieval_gold_without_paragraph(self):
        with pytest.raises(ValueError, match="names no paragraph"):
            m.retrieval_score("1", "3")

    def test_count(self):
        assert m.count_score("5", "5") == 1.0
        assert m.count_score("There are 5 unique paragraphs out of 12.", "5") == 0.5
        assert m.count_score("15", "5") == 0.0  # whole numbers only
        assert m.count_score("five", "5") == 0.0
        assert m.count_score("", "5") == 0.0


class TestCodeSimilarity:
    def test_first_code_line_is_compared(self):
        prediction = "```python\n# the next line\n    return a + b\nprint(a)"
        assert m.code_sim_score(prediction, "    return a + b") == 1.0

    def test_leading_newlines_and_comment_styles(self):
        assert m.code_sim_score("\n\n// js comment\nfoo();", "foo();") == 1.0

    def test_hand_computed_ratio(self):
        # matching characters 2 * 3 / 8 = 0.75; 2 * 2 / 6 = 66.7 -> rounded to 67
        assert m.code_sim_score("abcd", "abce") == approx(0.75)
        assert m.code_sim_score("abc", "abd") == approx(0.67)

    def test_only_comments_or_empty_scores_zero(self):
        assert m.code_sim_score("# a comment\n```", "x = 1") == 0.0
        assert m.code_sim_score("", "x = 1") == 0.0


class TestSampleScore:
    def test_max_over_gold_answers(self):
        assert m.sample_score("qa_f1", "Paris", ["London", "Paris, France"]) == approx(2 / 3)
        assert m.sample_score("qa_f1", "Paris", []) == 0.0

    def test_first_line_only(self):
        assert m.sample_score("qa_f1", "\nParis\nLondon", ["London"], first_line_only=True) == 0.0
        assert m.sample_score("qa_f1", "\nParis\nLondon", ["London"], first_line_only=False) == approx(2 / 3)
        assert m.first_line("\n\nA\nB") == "A"

    def test_every_task_has_a_metric(self):
        assert {task.metric for task in TASKS.values()} <= set(m.METRICS)
        assert {name for name, task in TASKS.items() if task.first_line_only} == {"trec", "triviaqa", "samsum", "lsht"}


class TestStringMatch:
    """RULER's metrics: case-insensitive substring matches against the whole
    answer list."""

    def test_all_is_the_share_of_answers_found(self):
        assert m.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == approx(2 / 3)
        assert m.string_match_all("ANCHOR, Banjo", ["anchor", "banjo"]) == 1.0
        assert m.string_match_all("nothing here", ["anchor"]) == 0.0
        assert m.string_match_all("anything", []) == 0.0

    def test_part_is_one_when_any_answer_is_found(self):
        assert m.string_match_part("It was the Silver Heron.", ["silver heron", "Blue Falcon"]) == 1.0
        assert m.string_match_part("It was the Silver Falcon.", ["silver heron", "Blue Falcon"]) == 0.0
        assert m.string_match_part("anything", []) == 0.0

    def test_substrings_count(self):
        # a match is a substring, as in RULER: "12" is in "123"
        assert m.string_match_all("123", ["12"]) == 1.0

    def test_sample_score_passes_the_whole_answer_list(self):
        answers = ["OVGHS", "IINLI", "ZHQRX", "CSCXQ"]
        # a max over single answers would give 1; the set metric gives 2 of 4
        assert m.sample_score("string_match_all", "ovghs, zhqrx", answers) == approx(0.5)
        assert m.sample_score("string_match_part", "ovghs", answers) == 1.0
        assert m.sample_score("string_match_all", "x\n123", ["123"], first_line_only=True) == 0.0
        assert m.ANSWER_SET_METRICS == {"string_match_all", "string_match_part"} <= set(m.METRICS)
