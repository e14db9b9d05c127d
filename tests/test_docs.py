"""The documentation runs: every ```python block of README.md and docs/*.md
is executed, so the pages cannot drift from the code.

* Blocks of one page share one namespace and run in page order: a later
  block may use names an earlier one defined. Each block is its own test
  (`README.md-block2`); selecting one alone still runs its page's earlier
  blocks first, and a failure names the page, the block and its line.
* A block whose first line is `# requires: cuda` needs a GPU and a CUDA
  build of refreekv; without them it is skipped, saying so. No other skip
  exists, and any other requirement is refused.
* A python block with no code (empty, or only comments, `pass` or `...`)
  fails: a placeholder is not documentation.
* Blocks that load a model use the bundled SmolLM2-135M-Instruct
  (`refreekv.assets.load_bundled_model`) or tiny random models built from
  configs; nothing is downloaded. The bundled model is loaded once here
  and every call hands out a fresh deep copy, so a page gets
  exactly what the call documents without paying the load again.
* Blocks run on one thread (the `one_thread` fixture): the examples are
  small, and on a 2-core machine shared with other work more threads only
  contend.
* Other blocks (bash, text, output tables) are not run.

Beside the runner: README.md stays a front door (at most 200 lines,
linking every page of docs/), and every relative link of README.md and
docs/*.md points to an existing file inside the repository, and to an
existing heading when it names one.
"""

from __future__ import annotations

import ast
import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PYTHON_LANGUAGES = {"python", "py"}
REQUIREMENTS = {"cuda"}
REQUIRES = re.compile(r"^#\s*requires:\s*(.*?)\s*$")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def pages() -> list[Path]:
    return [README] + sorted((ROOT / "docs").glob("*.md"))


def page_name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --------------------------------------------------------------------------
# Reading the pages
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Fenced:
    """One fenced block: its language, its first line in the page (1-based,
    the opening fence) and its text, dedented to the fence."""

    language: str
    line: int
    source: str


def fenced_blocks(text: str) -> list[Fenced]:
    """Every fenced block of a markdown text, in order (an unclosed fence
    runs to the end of the text, as CommonMark reads it)."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match or (match["fence"][0] == "`" and "`" in match["info"]):
            i += 1
            continue
        indent, fence = len(match["indent"]), match["fence"]
        language = match["info"].strip().split(" ")[0].lower() if match["info"].strip() else ""
        start, body = i + 1, []
        i += 1
        while i < len(lines):
            closing = FENCE.match(lines[i])
            closes = closing and closing["fence"][0] == fence[0] and len(closing["fence"]) >= len(fence)
            if closes and not closing["info"].strip():
                break
            line = lines[i]
            # strip the fence's indentation, as CommonMark does (up to that many spaces)
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
            i += 1
        blocks.append(Fenced(language, start, "\n".join(body) + ("\n" if body else "")))
        i += 1
    return blocks


@dataclass(frozen=True)
class Block:
    """A python block of a page: `index` counts the page's python blocks from 1."""

    page: str
    index: int
    line: int
    source: str

    @property
    def where(self) -> str:
        return f"{self.page}, python block {self.index} (line {self.line})"

    @property
    def requirement(self) -> str | None:
        first = self.source.lstrip("\n").split("\n", 1)[0]
        match = REQUIRES.match(first.strip())
        return match[1] if match else None


def python_blocks(page: str, text: str) -> list[Block]:
    fenced = [block for block in fenced_blocks(text) if block.language in PYTHON_LANGUAGES]
    return [Block(page, index, block.line, block.source) for index, block in enumerate(fenced, start=1)]


class DocsError(AssertionError):
    """A block that cannot count as documentation, or one that failed."""


def check_block(block: Block) -> None:
    """Refuses a block with no code and an unknown requirement."""
    if block.requirement is not None and block.requirement not in REQUIREMENTS:
        raise DocsError(f"{block.where}: unknown requirement {block.requirement!r} (known: {sorted(REQUIREMENTS)})")
    try:
        tree = ast.parse(block.source, filename=block.where)
    except SyntaxError as error:
        raise DocsError(f"{block.where}: not valid Python: {error}") from error
    placeholders = (ast.Pass, ast.Expr)
    code = [
        node
        for node in tree.body
        if not (isinstance(node, placeholders) and (isinstance(node, ast.Pass) or _is_placeholder(node.value)))
    ]
    if not code:
        raise DocsError(f"{block.where}: a python block with no code")


def _is_placeholder(value: ast.expr) -> bool:
    return isinstance(value, ast.Constant) and (value.value is Ellipsis or isinstance(value.value, str))


def missing_requirement(block: Block) -> str | None:
    """Why this machine cannot run the block, or None when it can."""
    if block.requirement != "cuda":
        return None
    if not torch.cuda.is_available():
        return f"{block.where} requires CUDA: this machine has no CUDA device"
    import refreekv

    if not refreekv.built_with_cuda():
        return f"{block.where} requires CUDA: this build of refreekv has no CUDA kernels"
    return None


# --------------------------------------------------------------------------
# Running a page
# --------------------------------------------------------------------------


@dataclass
class PageRun:
    """The shared namespace of one page's blocks and how far they have run."""

    blocks: list[Block]
    namespace: dict = field(default_factory=dict)
    done: int = 0  # blocks run (or skipped for a requirement) so far
    failed: Block | None = None

    def __post_init__(self):
        self.namespace.setdefault("__name__", "__docs__")

    def run_through(self, index: int) -> str | None:
        """Runs the page's blocks up to block `index` (1-based) that have not
        run yet, in order. Returns why block `index` was skipped (a missing
        requirement), or None once it ran; raises DocsError naming the block
        that failed, itself or an earlier one."""
        if self.failed is not None and self.failed.index < index:
            raise DocsError(f"{self.failed.where} failed, so the later blocks of this page cannot run")
        skipped = None
        while self.done < index:
            block = self.blocks[self.done]
            check_block(block)
            reason = missing_requirement(block)
            if reason is None:
                try:
                    exec(compile(block.source, block.where, "exec"), self.namespace)
                except (Exception, SystemExit) as error:
                    self.failed = block
                    raise DocsError(f"{block.where} raised {type(error).__name__}: {error}") from error
            self.done += 1
            skipped = reason
        return skipped


def run_page(page: str, text: str) -> list[str | None]:
    """Runs every python block of a markdown text; returns, per block, why
    it was skipped or None. Used on made-up pages below."""
    run = PageRun(python_blocks(page, text))
    return [run.run_through(block.index) for block in run.blocks]


def all_blocks() -> list[Block]:
    return [block for path in pages() for block in python_blocks(page_name(path), path.read_text(encoding="utf-8"))]


BLOCKS = all_blocks()
_RUNS: dict[str, PageRun] = {}


@pytest.fixture(scope="module")
def bundled_model_once():
    """`refreekv.assets.load_bundled_model` loads the model once for this
    module; each call returns a deep copy of (model, tokenizer), so no page
    sees what another did to its model."""
    import refreekv.assets

    load = refreekv.assets.load_bundled_model
    loaded = {}

    def load_bundled_model(dtype=torch.float32, attn_implementation="sdpa", **config_overrides):
        key = (dtype, attn_implementation, repr(sorted(config_overrides.items())))
        if key not in loaded:
            loaded[key] = load(dtype, attn_implementation, **config_overrides)
        return copy.deepcopy(loaded[key])

    load_bundled_model.__doc__ = load.__doc__
    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(refreekv.assets, "load_bundled_model", load_bundled_model)
        yield
    loaded.clear()


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{block.page}-block{block.index}" for block in BLOCKS])
def test_block_runs(block: Block, bundled_model_once, one_thread):
    check_block(block)
    page_blocks = [b for b in BLOCKS if b.page == block.page]
    run = _RUNS.setdefault(block.page, PageRun(page_blocks))
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        reason = run.run_through(block.index)
    finally:
        os.chdir(cwd)
        if block.index == len(page_blocks) or run.failed is not None:
            run.namespace.clear()  # the page is done: free its models
            run.namespace["__name__"] = "__docs__"
    if reason is not None:
        pytest.skip(reason)


def test_every_python_block_is_collected():
    """The collection itself works: every line that opens a python fence,
    counted naively, is a collected block, and the README and the usage
    page hold some."""
    for path in pages():
        opened = re.findall(r"^[ \t]*(?:```|~~~)[ \t]*py(?:thon)?\b", path.read_text(encoding="utf-8"), re.M | re.I)
        assert len(opened) == sum(1 for block in BLOCKS if block.page == page_name(path)), page_name(path)
    assert {"README.md", "docs/usage.md"} <= {block.page for block in BLOCKS}


# --------------------------------------------------------------------------
# The runner's own behaviour, on made-up pages
# --------------------------------------------------------------------------


PAGE = """# A page

Text, then a block:

```python
x = 1
```

```bash
this is not python and is not run
```

* In a list:

  ```python
  y = x + 1          # a later block sees the earlier one's names
  ```

~~~py
assert y == 2
~~~
"""


def test_runner_collects_python_blocks_in_order_and_shares_names():
    blocks = python_blocks("made-up.md", PAGE)
    assert [(block.index, block.line) for block in blocks] == [(1, 5), (2, 15), (3, 19)]
    assert blocks[1].source == "y = x + 1          # a later block sees the earlier one's names\n"
    assert run_page("made-up.md", PAGE) == [None, None, None]


def test_runner_fails_when_a_block_raises_and_names_it():
    page = "```python\nx = 1\n```\n\n```python\nraise ValueError('drifted')\n```\n"
    with pytest.raises(DocsError, match=r"made-up\.md, python block 2 \(line 5\) raised ValueError: drifted"):
        run_page("made-up.md", page)


def test_runner_fails_the_blocks_after_a_failed_one():
    run = PageRun(python_blocks("made-up.md", "```python\n1 / 0\n```\n```python\nx = 1\n```\n"))
    with pytest.raises(DocsError, match="block 1 .* raised ZeroDivisionError"):
        run.run_through(1)
    with pytest.raises(DocsError, match="block 1 .* failed, so the later blocks"):
        run.run_through(2)


def test_runner_runs_earlier_blocks_first_when_one_is_selected():
    run = PageRun(python_blocks("made-up.md", PAGE))
    assert run.run_through(3) is None
    assert run.namespace["y"] == 2


@pytest.mark.parametrize(
    "source", ["", "\n\n", "# only a comment\n", "pass\n", "...\n", "'''a docstring'''\n", "# requires: cuda\n"]
)
def test_runner_fails_on_a_python_block_with_no_code(source):
    page = f"# Page\n\n```python\n{source}```\n"
    with pytest.raises(DocsError, match=r"made-up\.md, python block 1 \(line 3\): a python block with no code"):
        run_page("made-up.md", page)


def test_runner_refuses_unknown_requirements_and_invalid_python():
    with pytest.raises(DocsError, match="unknown requirement 'tpu'"):
        run_page("made-up.md", "```python\n# requires: tpu\nx = 1\n```\n")
    with pytest.raises(DocsError, match="not valid Python"):
        run_page("made-up.md", "```python\nx = = 1\n```\n")


def test_cuda_blocks_run_where_cuda_is_and_are_skipped_with_a_reason_elsewhere():
    page = "```python\n# requires: cuda\nimport torch\nx = torch.ones(2, device='cuda')\n```\n```python\nz = 3\n```\n"
    reasons = run_page("made-up.md", page)
    block = python_blocks("made-up.md", page)[0]
    assert block.requirement == "cuda"
    assert reasons == [missing_requirement(block), None]
    if reasons[0] is not None:
        assert reasons[0].startswith("made-up.md, python block 1 (line 1) requires CUDA: ")


# --------------------------------------------------------------------------
# The front door and the links
# --------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")


def outside_fences(text: str) -> list[str]:
    """The lines of a markdown text, those of fenced blocks (fences
    included) blanked."""
    fenced = set()
    for block in fenced_blocks(text):
        fenced.update(range(block.line, block.line + block.source.count("\n") + 2))
    return ["" if number in fenced else line for number, line in enumerate(text.splitlines(), start=1)]


def prose(text: str) -> str:
    """The text outside fenced blocks and inline code."""
    return "\n".join(INLINE_CODE.sub("", line) for line in outside_fences(text))


def links(text: str) -> list[str]:
    return LINK.findall(prose(text))


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a markdown text (duplicates get
    -1, -2, ...)."""
    anchors: set[str] = set()
    for line in outside_fences(text):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match[1].strip().lower()).replace(" ", "-")
        anchor, count = slug, 0
        while anchor in anchors:
            count += 1
            anchor = f"{slug}-{count}"
        anchors.add(anchor)
    return anchors


def test_readme_is_a_front_door_that_links_every_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    linked = {target.split("#", 1)[0] for target in links(text)}
    assert [page_name(path) for path in sorted((ROOT / "docs").glob("*.md")) if page_name(path) not in linked] == []
    assert "examples/quickstart.ipynb" in linked


def test_readme_keeps_the_two_commands():
    quick_start = README.read_text(encoding="utf-8").split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    commands = [block for block in fenced_blocks(quick_start) if block.language == "bash"][0].source
    assert [line.split("#")[0].strip() for line in commands.splitlines() if line.strip()] == ["make demo", "make test"]


@pytest.mark.parametrize("path", pages(), ids=page_name)
def test_relative_links_resolve(path: Path):
    text = path.read_text(encoding="utf-8")
    broken = []
    for target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.is_relative_to(ROOT):
            broken.append(f"{target}: leaves the repository")
        elif not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in heading_anchors(destination.read_text("utf-8")):
            broken.append(f"{target}: no heading #{anchor} in {page_name(destination)}")
    assert broken == []


def test_link_checker_sees_broken_links_and_anchors():
    text = (
        "# Top `code`\n\n## Two: words\n\n[a](#top-code) [b](#two-words) ![c](img.png) `[d](inline.md)`\n\n"
        "```\n[e](x.md)\n# not a heading\n```\n"
    )
    assert links(text) == ["#top-code", "#two-words", "img.png"]
    assert heading_anchors(text) == {"top-code", "two-words"}
    assert heading_anchors("## A\n## A\n") == {"a", "a-1"}
