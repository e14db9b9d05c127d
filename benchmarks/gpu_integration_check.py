"""refreekv.patch end to end on a GPU, judged against the same run on the CPU.

    python benchmarks/gpu_integration_check.py

Tiny random models of several families (tests/integration_models.py) in
float32 (the operators take no float64), the same weights on both devices, a
left-padded batch. For every method and for decode-time recompression it
prints whether the generated tokens and the kept counts per layer and
sequence are equal on CUDA and on the CPU, and the largest logit difference
next to that of the uncompressed model (fullkv), the precision floor between
the two devices. A kept count can differ legitimately only where a score sits
within float32 rounding of a threshold, so differences are listed for
judgement; the script exits non-zero if any case raises or if more than a
fifth of the cases differ.
"""

from __future__ import annotations

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import refreekv  # noqa: E402
from integration_models import greedy, prompts, tiny_model  # noqa: E402

# Families that put each attention variant of the CUDA importance kernel in
# play: plain GQA, soft-capping, sinks, sliding and linear-attention layers,
# KV-shared layers.
FAMILIES = [
    ("llama", "sdpa"),
    ("qwen3", "eager"),
    ("gemma2", "sdpa"),
    ("gpt_oss", "eager"),
    ("qwen3_next", "sdpa"),
    ("gemma4-kv-shared", "sdpa"),
]
CASES = [
    ("fullkv", {}),  # first: its logit difference is the floor the others are read against
    ("refreekv", {}),
    ("refreekv", {"ranking": "attention", "include_sinks_in_norm": True}),
    ("coverage", {"window": 8}),
    ("streamingllm", {}),
    ("h2o", {"observation": "all"}),
    ("snapkv", {"budget": 0.4}),
    ("pyramidkv", {}),
    ("refreekv", {"recompress_every": 4}),
    ("snapkv", {"window": 4, "recompress_every": 4, "max_cache_tokens": 24}),
    ("refreekv", {"evict": False}),
    # Paged storage (paged_attention, paged_write) in small blocks, so that
    # tiny prompts are paged and decoding crosses block boundaries.
    ("coverage", {"window": 8, "block_rows": 4}),
    ("adakv", {"budget": 0.5, "block_rows": 4}),
    ("coverage", {"window": 4, "block_rows": 4, "recompress_every": 4}),
]
NEW_TOKENS = 10


def run(model, batch, method, options):
    with refreekv.patch(model, method, **options) as kv:
        tokens, logits = greedy(model, *batch, new_tokens=NEW_TOKENS)
        return tokens.cpu(), logits.cpu(), kv.stats.kept.cpu()


def main() -> int:
    assert torch.cuda.is_available(), "needs a visible CUDA device"
    assert refreekv.built_with_cuda(), "the extension was built without CUDA"
    batch_cpu = prompts([40, 29, 33])
    batch_gpu = tuple(t.cuda() for t in batch_cpu)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    errors = differing = cases = 0
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
    for family, attention in FAMILIES:
        floor = float("nan")  # the family's fullkv difference, once measured
        try:
            cpu_model = tiny_model(family, attention)
            gpu_model = tiny_model(family, attention).cuda()
        except Exception as error:  # e.g. a transformers without this family
            print(f"ERROR {family}: the tiny model could not be built: {type(error).__name__}: {error}")
            errors += 1
            continue
        for method, options in CASES:
            name = f"{family:17s} {attention:5s} {method:12s} {options}"
            try:
                t_cpu, l_cpu, k_cpu = run(cpu_model, batch_cpu, method, options)
                t_gpu, l_gpu, k_gpu = run(gpu_model, batch_gpu, method, options)
            except Exception as error:  # report and go on: one line per case
                print(f"ERROR {name}: {type(error).__name__}: {error}")
                errors += 1
                continue
            cases += 1
            same_tokens = torch.equal(t_cpu, t_gpu)
            same_kept = torch.equal(k_cpu, k_gpu)
            logit_error = (l_cpu - l_gpu).abs().max().item()
            if method == "fullkv":
                floor = logit_error
            differing += not (same_tokens and same_kept)
            print(f"{'same ' if same_tokens and same_kept else 'DIFF '} {name}: tokens {same_tokens}, kept {same_kept}, "
                  f"max |logit diff| {logit_error:.2e} (fullkv {floor:.2e}), kept mean {k_cpu.double().mean():.2f}")
    print(f"{cases} cases ran, {differing} differ between CUDA and CPU, {errors} raised")
    return 1 if errors or differing * 5 > cases else 0


if __name__ == "__main__":
    sys.exit(main())
