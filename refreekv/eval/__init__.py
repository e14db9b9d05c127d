"""Evaluation of KV-cache compression on benchmarks.

`refreekv.eval.longbench` (console script `refreekv-longbench`): LongBench v1
predictions with `refreekv.patch`, scoring with the benchmark's metrics, and
comparison tables. Needs the `eval` extra (tqdm, matplotlib, jieba, rouge,
thefuzz).
"""
