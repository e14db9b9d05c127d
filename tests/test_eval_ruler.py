"""The RULER-style suite (refreekv.eval.ruler) on the in-memory tokenizer:
determinism, planted values, fitted lengths, depths, the LongBench format,
and the answer prefix in the model input."""

import json
import re
from collections import Counter

import pytest
from eval_fixtures import build_tokenizer

from refreekv.eval import ruler
from refreekv.eval.data import Sample, read_samples
from refreekv.eval.prompting import build_input, format_prompt
from refreekv.eval.ruler import (
    DEFAULT_DEPTHS,
    HELD_OUT_TASKS,
    NEEDLE_TASKS,
    STUDIED_TASKS,
    generate_samples,
    generate_suite,
    load_tokenizer,
    main,
    task_lengths_dir,
)
from refreekv.eval.tasks import ALL_TASKS, ENGLISH_TASKS, RULER_TASKS, TASKS, resolve_tasks

LENGTHS = (512, 1024)
SAMPLES = len(DEFAULT_DEPTHS)  # every default depth once
LONGBENCH_FIELDS = ("_id", "input", "context", "answers", "length", "dataset", "language", "all_classes")
SENTENCE_START = re.compile(r"[.!?][\"')\]]* (?=\S)")  # the haystack's sentence boundaries, as text


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def suite(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("ruler")
    return folder, generate_suite(folder, tokenizer, LENGTHS, SAMPLES, seed=0)


@pytest.fixture(scope="module")
def records(suite):
    """{(length, task): [record, ...]}"""
    _, paths = suite
    return {key: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] for key, path in paths.items()}


def of_task(records, task):
    return [record for (_, name), group in records.items() if name == task for record in group]


def input_tokens(tokenizer, record) -> int:
    sample = Sample(0, record["_id"], record["input"], record["context"], record["answers"], None, None, raw=record)
    return build_input(tokenizer, TASKS[record["dataset"]], sample, max_length=1 << 40).input_ids.shape[1]


class TestRegistry:
    def test_tasks_are_registered_and_resolvable(self):
        assert RULER_TASKS == ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
                               "variable_tracking", "common_words", "frequent_words", "qa_planted",
                               "multi_hop", "two_place")  # fmt: skip
        assert STUDIED_TASKS == RULER_TASKS[:8] and HELD_OUT_TASKS == ("multi_hop", "two_place")
        assert STUDIED_TASKS + HELD_OUT_TASKS == RULER_TASKS and set(HELD_OUT_TASKS) <= NEEDLE_TASKS
        assert resolve_tasks(",".join(RULER_TASKS)) == list(RULER_TASKS)
        assert all(TASKS[name].answer_prefix and TASKS[name].language == "en" for name in RULER_TASKS)
        assert all(TASKS[name] is ruler.TASKS[name] for name in RULER_TASKS) and ruler.RULER_TASKS == RULER_TASKS

    def test_longbench_lists_stay_longbench(self):
        assert len(ALL_TASKS) == 21 and len(ENGLISH_TASKS) == 16
        assert not set(RULER_TASKS) & (set(ALL_TASKS) | set(resolve_tasks("all")) | set(resolve_tasks(None)))
        assert all(TASKS[name].answer_prefix == "" for name in ALL_TASKS)


class TestFiles:
    def test_layout_and_paths(self, suite):
        folder, paths = suite
        assert set(paths) == {(length, task) for length in LENGTHS for task in RULER_TASKS}
        for (length, task), path in paths.items():
            assert path == task_lengths_dir(folder, length) / f"{task}.jsonl" == folder / str(length) / f"{task}.jsonl"

    def test_read_as_longbench_samples(self, suite):
        _, paths = suite
        for (length, task), path in paths.items():
            samples, bad = read_samples(path)
            assert not bad and len(samples) == SAMPLES
            for sample in samples:
                record = sample.raw
                assert all(name in record for name in LONGBENCH_FIELDS)
                assert record["dataset"] == task and record["language"] == "en" and record["all_classes"] is None
                assert record["length"] == len(record["context"].split())
                assert record["target_tokens"] == length and record["seed"] == 0
                assert record["answer_prefix"] == TASKS[task].answer_prefix.format(**record)
                assert sample.answers and all(isinstance(answer, str) and answer for answer in sample.answers)

    def test_same_seed_same_bytes_other_seed_other_data(self, suite, tokenizer, tmp_path):
        _, paths = suite
        again = generate_suite(tmp_path / "again", tokenizer, LENGTHS, SAMPLES, seed=0)
        other = generate_suite(tmp_path / "other", tokenizer, LENGTHS, SAMPLES, seed=1)
        for key, path in paths.items():
            assert again[key].read_bytes() == path.read_bytes(), key
            assert other[key].read_bytes() != path.read_bytes(), key

    def test_cli_writes_the_suite(self, tmp_path, tokenizer, capsys):
        model_dir = tmp_path / "model"
        tokenizer.save_pretrained(model_dir)
        main(["--output-dir", str(tmp_path / "out"), "--lengths", "512", "--samples", "2", "--seed", "3",
              "--tasks", "niah_single,common_words", "--depths", "0.5", "--model", str(model_dir)])  # fmt: skip
        assert sorted(p.name for p in (tmp_path / "out" / "512").iterdir()) == ["common_words.jsonl", "niah_single.jsonl"]
        expected = generate_samples("niah_single", load_tokenizer(str(model_dir)), 512, 2, seed=3, depths=(0.5,))
        written = (tmp_path / "out" / "512" / "niah_single.jsonl").read_text(encoding="utf-8")
        assert written == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in expected)
        with pytest.raises(SystemExit):
            main(["--output-dir", str(tmp_path / "bad"), "--tasks", "hotpotqa"])
        assert "unknown task(s) hotpotqa" in capsys.readouterr().err
        for option, value, message in (("--samples", "0", "samples must be >= 1"), ("--depths", "1.5", "depths must be"),
                                       ("--lengths", "64", "without filler already has")):  # fmt: skip
            with pytest.raises(SystemExit):
                main(["--output-dir", str(tmp_path / "bad"), "--model", str(model_dir), option, value])
            assert message in capsys.readouterr().err, option


class TestLength:
    def test_within_two_percent_below_the_target(self, records, tokenizer):
        for (length, task), group in records.items():
            for record in group:
                tokens = input_tokens(tokenizer, record)
                assert tokens == record["fitted_tokens"], (length, task)
                assert 0.98 * length <= tokens <= length, (length, task, tokens)

    def test_too_short_a_target_is_refused(self, tokenizer):
        with pytest.raises(ValueError, match="without filler already has"):
            generate_samples("niah_multiquery", tokenizer, 64, 1)


class TestPlantedValues:
    def test_niah_values_occur_once(self, records):
        for task in ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"):
            for record in of_task(records, task):
                context = record["context"]
                for needle in record["needles"]:
                    assert context.count(needle) == 1
                    value = re.fullmatch(r".* is (\S+)\.", needle).group(1)
                    assert context.lower().count(value.lower()) == 1, (task, value)
                planted = [re.fullmatch(r".* is (\S+)\.", needle).group(1) for needle in record["needles"]]
                expected = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 4, "niah_multiquery": 4}[task]
                assert len(set(planted)) == len(planted) == expected
                asked = len(record["answers"])
                assert record["answers"] == planted[:asked] and asked == record["answer_count"]

    def test_multikey_distractors_never_the_answer(self, records):
        for record in of_task(records, "niah_multikey"):
            (answer,) = record["answers"]
            keys = [re.fullmatch(r"The secret \w+ for (\S+) is .*", needle).group(1) for needle in record["needles"]]
            assert keys[0] == record["query"] and len(set(keys)) == 4
            distractors = [re.fullmatch(r".* is (\S+)\.", needle).group(1) for needle in record["needles"][1:]]
            assert answer not in distractors

    def test_multi_tasks_ask_for_all_their_values(self, records):
        for record in of_task(records, "niah_multivalue"):
            assert all(record["query"] in needle for needle in record["needles"])
            assert len(record["answers"]) == 4
        for record in of_task(records, "niah_multiquery"):
            keys = record["query"].replace(" and ", ", ").split(", ")
            assert len(keys) == 4 and all(key in record["input"] for key in keys)
            for key, answer in zip(keys, record["answers"]):
                assert f"The secret number for {key} is {answer}." in record["context"]

    def test_value_kinds_cycle(self, records):
        patterns = {"number": r"\d{7}", "word": r"[a-z]+", "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"}
        for task in ("niah_single", "niah_multikey"):
            for length in LENGTHS:
                group = records[(length, task)]
                assert [r["value_kind"] for r in group] == [("number", "word", "uuid")[i % 3] for i in range(SAMPLES)]
                for record in group:
                    assert re.fullmatch(patterns[record["value_kind"]], record["answers"][0])
                    assert record["answer_prefix"] == f"The secret {record['value_kind']} for {record['query']} is"

    def test_variable_chains(self, records):
        for record in of_task(records, "variable_tracking"):
            context, names = record["context"], record["answers"]
            assert len(names) == record["answer_count"] == 4
            value = record["query"]
            assert context.count(value) == 1 and f"VAR {names[0]} = {value}." in context
            for source, name in zip(names, names[1:]):  # each link after the one it copies
                assert context.index(f"VAR {name} = {source}.") > context.index(f"VAR {source} =")
            for name in names:  # assigned once, and read by the next link (the last is not read)
                assert context.count(name) == (1 if name == names[-1] else 2)
            values = re.findall(r"VAR [A-Z]{5} = (\d{5})\.", context)
            assert len(values) == 3 and len(set(values)) == 3 and values.count(value) == 1

    def test_common_words(self, records):
        for record in of_task(records, "common_words"):
            entries = [line.split(". ", 1) for line in record["context"].split("\n")]
            assert [int(number) for number, _ in entries] == list(range(1, len(entries) + 1))
            counts = Counter(word for _, word in entries)
            common = record["answers"]
            assert len(common) == 5 and len({counts[word] for word in common}) == 1
            assert counts[common[0]] >= 3 and max(counts[w] for w in counts if w not in common) <= 2
            assert abs(5 * counts[common[0]] / len(entries) - 0.3) < 0.05

    def test_list_words_occur_only_as_their_entries(self, records, tokenizer):
        """string_match_all credits an answer word found anywhere in the
        prediction, so no list word may be in the instructions (an echo of
        them would score) or inside another list word (naming it would)."""
        task = TASKS["common_words"]
        longer = generate_samples("common_words", tokenizer, 4096, 1)  # a list of about a thousand entries
        for record in of_task(records, "common_words") + longer:
            sample = Sample(0, record["_id"], record["input"], record["context"], record["answers"], None, None, raw=record)
            text = build_input(tokenizer, task, sample, max_length=1 << 40).text.lower()
            instructions = text.replace(record["context"], "")
            counts = Counter(line.split(". ", 1)[1] for line in record["context"].split("\n"))
            for word, count in counts.items():
                assert text.count(word) == count, word
            assert not any(word in instructions for word in record["answers"])

    def test_frequent_words(self, records):
        for record in of_task(records, "frequent_words"):
            counts = Counter(record["context"].split(" ")).most_common()
            assert [word for word, _ in counts[:3]] == record["answers"]
            assert counts[0][1] > counts[1][1] > counts[2][1] > counts[3][1]

    def test_frequent_words_at_a_long_length(self, tokenizer):
        """The coded words are drawn once per sample, so a long stream is
        generated in a moment, and still ranks its top words strictly."""
        for record in generate_samples("frequent_words", tokenizer, 8192, 2):
            counts = Counter(record["context"].split(" ")).most_common()
            assert [word for word, _ in counts[:3]] == record["answers"]
            assert counts[0][1] > counts[1][1] > counts[2][1] > counts[3][1]
            assert 0.98 * 8192 <= record["fitted_tokens"] <= 8192

    def test_multi_hop(self, records):
        """Pairs "<A> is the secret number for <B>" and "<B> is <value>": the
        asked key A and every value occur once, every named key B twice (its
        link and its fact), and the answer is the value the asked link leads
        to, never a distractor's."""
        link = re.compile(r"The secret number for (\S+) is the secret number for (\S+)\.")
        fact = re.compile(r"The secret number for (\S+) is (\d{7})\.")
        for record in of_task(records, "multi_hop"):
            context, needles = record["context"], record["needles"]
            assert len(needles) == 6
            pairs = [(link.fullmatch(a).groups(), fact.fullmatch(b).groups())
                     for a, b in zip(needles[::2], needles[1::2])]  # fmt: skip
            assert all(named == fact_key for (_, named), (fact_key, _) in pairs)
            asked_keys, named_keys = [asked for (asked, _), _ in pairs], [named for (_, named), _ in pairs]
            values = [value for _, (_, value) in pairs]
            assert len(set(asked_keys + named_keys)) == 6 and len(set(values)) == 3
            for needle in needles:
                assert context.count(needle) == 1
            for key in asked_keys:
                assert context.lower().count(key) == 1, key
            for key in named_keys:
                assert context.lower().count(key) == 2, key
            for value in values:
                assert context.count(value) == 1, value
            assert record["query"] == asked_keys[0] and record["answers"] == values[:1] and record["answer_count"] == 1
            assert record["input"] == f"What is the secret number for {asked_keys[0]} in the text above?"
            assert record["answer_prefix"] == f"The secret number for {asked_keys[0]} is"

    def test_two_place(self, records):
        """Each key's two halves: every half occurs once, every key twice,
        and the answer is both halves of the asked key."""
        half = re.compile(r"The (first|second) half of the access code for (\S+) is (\d{4})\.")
        for record in of_task(records, "two_place"):
            context, needles = record["context"], record["needles"]
            parsed = [half.fullmatch(needle).groups() for needle in needles]
            assert [which for which, _, _ in parsed] == ["first", "second"] * 3
            keys = [key for _, key, _ in parsed]
            assert keys[::2] == keys[1::2] and len(set(keys)) == 3
            halves = [value for _, _, value in parsed]
            assert len(set(halves)) == 6
            for needle in needles:
                assert context.count(needle) == 1
            for key in set(keys):
                assert context.lower().count(key) == 2, key
            for value in halves:
                assert context.count(value) == 1, value
            assert record["query"] == keys[0] and record["answers"] == halves[:2] and record["answer_count"] == 2
            assert record["answer_prefix"] == f"The two halves of the access code for {keys[0]} are"

    def test_qa_answer_occurs_once(self, records):
        for record in of_task(records, "qa_planted"):
            (answer,) = record["answers"]
            (fact,) = record["needles"]
            assert answer in fact and record["context"].count(fact) == 1
            assert record["context"].lower().count(answer.lower()) == 1


def strip_needles(context: str, needles: list[str]) -> tuple[str, int]:
    """The haystack without its needles, and where the first needle starts in it
    (each needle was planted as one more space-separated word)."""
    def remove(text, needle):
        at = text.index(needle)
        if text.startswith(needle + " ", at):
            return text[:at] + text[at + len(needle) + 1 :]
        return text[: at - 1] + text[at + len(needle) :]  # at the very end

    text = context
    for needle in needles[1:]:
        text = remove(text, needle)
    position = text.index(needles[0])
    return remove(text, needles[0]), position


def needle_positions(context: str, needles: list[str]) -> tuple[int, list[int]]:
    """The length of the haystack without its needles, and where each needle
    starts in the haystack with only that needle planted."""
    haystack, _ = strip_needles(context, needles)
    positions = []
    for k, needle in enumerate(needles):
        others = needles[:k] + needles[k + 1 :]
        positions.append(strip_needles(context, [needle] + others)[1])
    return len(haystack), positions


# The second needle's least distance from the first, in haystack characters.
APART = {"multi_hop": 0.25, "two_place": 0.4}


def assert_apart(records):
    """The second needle of multi_hop and two_place (the fact the asked link
    names, the second half) is far enough from the first, and on both sides
    of it over the records."""
    for task, apart in APART.items():
        sides = set()
        for record in (r for r in records if r["dataset"] == task):
            length, (first, second, *_) = needle_positions(record["context"], record["needles"])
            assert abs(second - first) >= apart * length, (task, record["depth"], (second - first) / length)
            sides.add(second > first)
        assert sides == {True, False}, task


class TestDepth:
    def test_first_needle_at_the_nearest_sentence_boundary(self, records):
        """Depth is measured in characters of the haystack (the essays without
        the needles): the asked needle starts at the sentence start (or the
        end) nearest to depth x haystack length. So it is off the exact
        fraction by at most half the sentence it had to snap to."""
        for task in NEEDLE_TASKS:
            for record in of_task(records, task):
                haystack, position = strip_needles(record["context"], record["needles"])
                boundaries = [0] + [m.end() for m in SENTENCE_START.finditer(haystack)] + [len(haystack) + 1]
                assert position in boundaries, task
                target = record["depth"] * len(haystack)
                assert abs(position - target) == min(abs(b - target) for b in boundaries), task
                gaps = max(b - a for a, b in zip(boundaries, boundaries[1:]))
                assert abs(position / len(haystack) - record["depth"]) <= gaps / 2 / len(haystack) + 1e-9

    def test_second_needle_apart(self, records, tokenizer):
        assert_apart([record for group in records.values() for record in group])
        # At the middle depth, before and after it both have room: each is drawn.
        middle = [record for task in APART for record in generate_samples(task, tokenizer, 1024, 10, depths=(0.5,))]
        assert_apart(middle)

    def test_depths_cycle_and_are_configurable(self, records, tokenizer):
        for (_, task), group in records.items():
            expected = [DEFAULT_DEPTHS[i % len(DEFAULT_DEPTHS)] for i in range(SAMPLES)] if task in NEEDLE_TASKS else [None] * SAMPLES
            assert [record["depth"] for record in group] == expected, task
            assert all((record["needles"] is None) == (task not in NEEDLE_TASKS) for record in group)
        extremes = generate_samples("niah_single", tokenizer, 512, 2, depths=(0.0, 1.0))
        assert extremes[0]["context"].startswith(extremes[0]["needles"][0])
        assert extremes[1]["context"].endswith(" " + extremes[1]["needles"][0])
        with pytest.raises(ValueError, match="depths"):
            generate_samples("niah_single", tokenizer, 512, 1, depths=(1.5,))


class TestAnswerPrefix:
    def test_opens_the_assistant_turn(self, records, tokenizer):
        record = records[(512, "niah_single")][0]
        sample = Sample(0, record["_id"], record["input"], record["context"], record["answers"], None, None, raw=record)
        task = TASKS["niah_single"]
        prompt = format_prompt(task, sample)
        built = build_input(tokenizer, task, sample, max_length=1 << 40)
        assert built.text == f"<|user|>\n{prompt}</s>\n<|assistant|>\n{record['answer_prefix']}"
        raw = build_input(tokenizer, task, sample, max_length=1 << 40, chat_template=False)
        assert raw.text == f"{prompt}\n{record['answer_prefix']}"
        assert raw.input_ids[0].tolist() == tokenizer(raw.text)["input_ids"]

    def test_a_non_string_prefix_is_refused(self, tokenizer):
        sample = Sample(0, "x", "q", "c", ["a"], None, None, raw={"answer_prefix": 3})
        with pytest.raises(ValueError, match="answer_prefix must be a string"):
            build_input(tokenizer, TASKS["niah_single"], sample, max_length=100)


@pytest.mark.slow
def test_lengths_with_the_real_tokenizer():
    """SmolLM2's own tokenizer, at 1024 and 4096 tokens: every task within 2%."""
    tokenizer = load_tokenizer("bundled:smollm2")
    for length in (1024, 4096):
        for task in RULER_TASKS:
            for record in generate_samples(task, tokenizer, length, 2, seed=0):
                tokens = input_tokens(tokenizer, record)
                assert tokens == record["fitted_tokens"] and 0.98 * length <= tokens <= length, (task, length, tokens)


@pytest.mark.slow
def test_held_out_tasks_with_the_real_tokenizer():
    """multi_hop and two_place with SmolLM2's tokenizer at 1024, 2048 and
    4096 tokens: within 2% of the target, the second needle far enough from
    the first, and the same records again from the same seed."""
    tokenizer = load_tokenizer("bundled:smollm2")
    for length in (1024, 2048, 4096):
        records = []
        for task in HELD_OUT_TASKS:
            group = generate_samples(task, tokenizer, length, SAMPLES, seed=0)
            assert group == generate_samples(task, tokenizer, length, SAMPLES, seed=0)
            for record in group:
                tokens = input_tokens(tokenizer, record)
                assert tokens == record["fitted_tokens"] and 0.98 * length <= tokens <= length, (task, length, tokens)
            records += group
        assert_apart(records)


def test_score_and_compare_find_ruler_tasks_in_a_run_directory(tmp_path):
    """A `run` over the suite is scored like a LongBench run: RULER tasks are
    in the task registry that `score` and `compare` walk."""
    from refreekv.eval.compare import compare_runs
    from refreekv.eval.scoring import score_run

    run_dir = tmp_path / "run"
    (run_dir / "niah_multivalue").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"config": {"method": "fullkv"}}), encoding="utf-8")
    predictions = [
        {"_id": "a", "index": 0, "pred": "1234567 and 7654321", "answers": ["1234567", "7654321", "1111111", "2222222"], "budget": 1.0},
        {"_id": "b", "index": 1, "pred": "none", "answers": ["3333333"], "budget": 1.0},
    ]
    (run_dir / "niah_multivalue" / "predictions.rank0.jsonl").write_text(
        "".join(json.dumps(p) + "\n" for p in predictions), encoding="utf-8"
    )
    result = score_run(run_dir)
    assert result["tasks"]["niah_multivalue"]["score"] == 25.0  # (2/4 + 0) / 2
    table = compare_runs([run_dir], tmp_path / "table", names=["full"])
    assert table["rows"][0] == ["niah_multivalue", "25.00 (100.0%)"]
