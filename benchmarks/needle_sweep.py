"""Does ReFreeKV keep a planted fact? Its options swept on the bundled model.

The same five needle tasks as tests/test_real_model.py (a fact planted at half
depth in ~2000 tokens of essays, SmolLM2-135M-Instruct, greedy): for each
configuration, how many answers equal the full-cache answers, how many
contain the planted value, and the mean kept budget. It measures quality, not speed, and asserts nothing.

    python benchmarks/needle_sweep.py [--tokens 2000] [--count 5]
"""

from __future__ import annotations

import argparse
import statistics

from refreekv.assets import load_bundled_model, needle_tasks
from refreekv.demo import answer

MAX_NEW_TOKENS = 24

# (method, options): the paper's defaults first, then each knob of SPEC 2 on
# its own, then a fixed-budget baseline for contrast.
CONFIGURATIONS = [
    ("refreekv", {}),
    ("refreekv", {"threshold": 0.001}),
    ("refreekv", {"threshold": 0.0001}),
    ("refreekv", {"window_rows": 0.01}),
    ("refreekv", {"window_rows": 0.05}),
    ("refreekv", {"include_sinks_in_norm": True}),
    ("snapkv", {"budget": 0.5}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2000, help="haystack length in tokens")
    parser.add_argument("--count", type=int, default=5, help="number of needle tasks")
    args = parser.parse_args()
    model, tokenizer = load_bundled_model()
    tasks = needle_tasks(tokenizer, context_tokens=args.tokens, count=args.count)
    full = [answer(model, tokenizer, task.messages(), "fullkv", MAX_NEW_TOKENS).text for task in tasks]
    found = sum(task.answer.lower() in text.lower() for task, text in zip(tasks, full))
    print(f"full cache: planted value in {found}/{len(tasks)} answers")
    print(f"{'method':<9} {'options':<32} {'same as full':>12} {'has value':>9} {'mean kept':>9}  answers that differ")
    for method, options in CONFIGURATIONS:
        results = [answer(model, tokenizer, task.messages(), method, MAX_NEW_TOKENS, **options) for task in tasks]
        same = sum(result.text == text for result, text in zip(results, full))
        has_value = sum(task.answer.lower() in result.text.lower() for task, result in zip(tasks, results))
        kept = statistics.mean(result.stats.budget for result in results)
        differing = [result.text for result, text in zip(results, full) if result.text != text]
        shown = ", ".join(f"{key}={value}" for key, value in options.items()) or "paper defaults"
        print(f"{method:<9} {shown:<32} {same:>7}/{len(tasks):<4} {has_value:>5}/{len(tasks):<3} {kept:>9.1%}  {differing}")


if __name__ == "__main__":
    main()
