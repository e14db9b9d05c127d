"""The layout section of the development page (docs/development.md, linked
from the README) draws the tree as it is: every file of the package is on a
line of its own, and every path drawn exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUT_PAGE = ROOT / "docs" / "development.md"


def layout_paths() -> list[str]:
    page = LAYOUT_PAGE.read_text(encoding="utf-8")
    section = page.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    return [line.split()[0] for line in block.splitlines() if line.strip()]


def test_every_package_file_has_its_own_line():
    drawn = set(layout_paths())
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "refreekv").rglob("*.py") if "__pycache__" not in p.parts)
    assert [f for f in files if f not in drawn] == []


def test_every_drawn_path_exists():
    missing = []
    for path in layout_paths():
        # `<op>` stands for each operator, `{h,cpp}` for each suffix, `*` for any name
        pattern = re.sub(r"<[^>]+>", "*", path)
        alternatives = [pattern]
        if "{" in pattern:
            head, rest = pattern.split("{", 1)
            options, tail = rest.split("}", 1)
            alternatives = [head + option + tail for option in options.split(",")]
        if not all(any(ROOT.glob(alternative)) for alternative in alternatives):
            missing.append(path)
    assert missing == []
