"""How a sweep point's prompt reaches the model (SPEC 11): its prefill mode.

A grid point runs in one of three modes, named in the grid by the `prefill`
key of its method's table (refreekv.eval.grid):

* "one-forward" (the default, and every point before this key existed):
  the whole prompt (context, question and answer prefix) in one forward,
  then the cut. Branched from one prefill per batch, or plain.
* "question-after": the context alone is prefilled and cut (a
  question-agnostic cache, `PatchHandle.compress_context`), then the
  question part (the rest of the prompt: the question, the chat template's
  end of turn and the answer prefix) is fed and the answer generated from
  a copy of that cache (`CompressedContext.generate`). The prompt is
  split where the context ends (refreekv.eval.prompting.split_input).
* "streaming-<N>": the prompt in pieces of N tokens
  (`generate(prefill_chunk_size=N)`) under `refreekv.patch(...,
  prefill="streaming")`: the first piece is cut as a prompt, every later
  one re-cuts the rows held. A fixed-budget method then needs a cap,
  `max_cache_tokens`: the point's budget in tokens of the sample's whole
  prompt, round(budget * prompt tokens) (a budget given in tokens is the
  cap itself), never fewer than the rows every cut of the method keeps;
  so after the last piece it holds what its one-forward cut keeps.
  Threshold-free methods (refreekv, coverage) set their own budget and
  take no cap; adakv cannot re-cut and is refused when the grid is read.
  fullkv never cuts, so its streaming point is the chunked prefill itself
  (exact mode, the same N): the full-cache reference of the same pieces.
  A prompt of at most N tokens arrives in one forward, so it is cut as
  in one-forward mode.

Both new modes run plainly (one patched `generate` per point and group of
sequences), never branched from a shared prefill: a prefill that sees the
question, or that is not cut piece by piece, cannot be branched into them.

No torch here (the report reads modes without the generation code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["ONE_FORWARD", "PREFILL_KEY", "PrefillMode", "QUESTION_AFTER", "STREAMING", "series_name"]

PREFILL_KEY = "prefill"  # the grid key, and the field of sweep.json points and records
ONE_FORWARD, QUESTION_AFTER, STREAMING = "one-forward", "question-after", "streaming"
_EXPECTED = f"{ONE_FORWARD}, {QUESTION_AFTER} or {STREAMING}-<tokens> (e.g. {STREAMING}-512)"
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a float", list: "a list", dict: "a table"}


@dataclass(frozen=True)
class PrefillMode:
    kind: str  # ONE_FORWARD, QUESTION_AFTER or STREAMING
    chunk: Optional[int] = None  # streaming: tokens per piece

    @classmethod
    def parse(cls, value: Any) -> PrefillMode:
        """The mode a grid (or a sweep.json point, a record) names; None is
        the default. ValueError says what was expected."""
        if value is None:
            return cls(ONE_FORWARD)
        if isinstance(value, PrefillMode):
            return value
        if not isinstance(value, str):
            given = _TYPE_NAMES.get(type(value), type(value).__name__)
            raise ValueError(f"expected a string, {_EXPECTED}; got {value!r} ({given})")
        text = value.strip().lower()
        if text in (ONE_FORWARD, QUESTION_AFTER):
            return cls(text)
        head, dash, tokens = text.partition("-")
        if head == STREAMING:
            if not dash or not tokens.isdigit() or int(tokens) < 1:
                raise ValueError(
                    f"{STREAMING}-<tokens> takes the tokens per piece, a whole number >= 1 (e.g. {STREAMING}-512); "
                    f"got {value!r}"
                )
            return cls(STREAMING, int(tokens))
        raise ValueError(f"unknown prefill mode {value!r}; expected {_EXPECTED}")

    @property
    def name(self) -> str:
        """As the grid writes it: one-forward, question-after, streaming-512."""
        return f"{STREAMING}-{self.chunk}" if self.kind == STREAMING else self.kind

    @property
    def label(self) -> str:
        """As a report shows it: "", "question after", "streaming 512"."""
        if self.kind == ONE_FORWARD:
            return ""
        return f"{STREAMING} {self.chunk}" if self.kind == STREAMING else "question after"

    @property
    def one_forward(self) -> bool:
        return self.kind == ONE_FORWARD

    def suffix(self) -> str:
        """What a point's label gets after its method and options."""
        return f" [{self.label}]" if self.label else ""

    def check_method(self, method: str, instance) -> None:
        """ValueError if the method cannot run in this mode, by the
        integration's own rules (streaming: `DecodeCompression.configure`,
        with the smallest cap for a fixed-budget method)."""
        if self.kind != STREAMING or method == "fullkv":
            return
        from refreekv.integration.recompress import DecodeCompression

        cap = instance.fewest_kept() if instance.fixed_budget else None
        try:
            DecodeCompression.configure(instance, None, cap, streaming=True)
        except ValueError as error:
            raise ValueError(f"{method} cannot prefill in streaming mode: {error}") from None

    def max_cache_tokens(self, instance, prompt_tokens: int) -> Optional[int]:
        """The cap of a streaming point on a prompt of `prompt_tokens`
        tokens: its budget in tokens of that prompt (see the module's
        docstring); None outside streaming or for a method without a
        fixed budget."""
        if self.kind != STREAMING or not getattr(instance, "fixed_budget", False):
            return None
        budget = instance.budget
        if isinstance(budget, int) and not isinstance(budget, bool):
            tokens = budget
        else:
            tokens = round(float(budget) * int(prompt_tokens))  # half to even, as resolve_budget's torch.round
        return max(int(tokens), instance.fewest_kept())

    def pieces(self, prompt_tokens: int) -> int:
        """Forwards the prompt arrives in."""
        return 1 if self.kind != STREAMING else max(1, -(-int(prompt_tokens) // self.chunk))


def series_name(method: str, prefill: Any = None) -> str:
    """One curve of a frontier plot: a method in one prefill mode, e.g.
    "snapkv" (one forward) or "snapkv [streaming 512]"."""
    return method + PrefillMode.parse(prefill).suffix()
