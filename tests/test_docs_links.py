"""The README, CONTRIBUTING.md and docs/ point only at files and headings that exist, and the README stays short.

The pages are read with markdown-it-py (CommonMark plus tables, as GitHub renders them), so code blocks and HTML
comments are never mistaken for links. Checked:

- `[text](target)` links that are not URLs: the file, relative to the page, and its `#anchor` among the target's
  headings, slugged as GitHub slugs them;
- `docs/<name>.md` named anywhere in a page's text or code spans (relative to the repository root: that is how the
  pages and the code name them);
- code spans that are a path in the repository (`recipe/carl/trainer.py`, `tests/...`).

The README is what a newcomer reads first (what CARL is, the two commands, the GPU run, their own data, evaluation,
links); the reference lives in docs/, and every docs/ page is listed in the README. Fast: no network.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

from markdown_it import MarkdownIt

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 260
PAGES = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
#: A code span that names a path in the repository (no spaces, globs or placeholders).
REPO_PATH = re.compile(r"(?:carl_core|recipe|scripts|tests|benchmarks|data_preprocess|docs)/[\w./-]*")
DOCS_MENTION = re.compile(r"(?<![\w/.-])docs/[\w.-]+\.md")
URL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, ...

_MD = MarkdownIt("commonmark").enable("table")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading's rendered text: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _inline_tokens(page: Path):
    """(line, inline token) of every paragraph, heading and table cell; code blocks and HTML have none."""
    for token in _MD.parse(page.read_text(encoding="utf-8")):
        if token.type == "inline":
            yield token.map[0] + 1 if token.map else 0, token


def heading_anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, a repeated heading numbered as GitHub numbers it (`-1`, `-2`)."""
    tokens = _MD.parse(page.read_text(encoding="utf-8"))
    seen: Counter[str] = Counter()
    anchors = set()
    for opening, inline in zip(tokens, tokens[1:], strict=False):
        if opening.type != "heading_open":
            continue
        text = "".join(c.content for c in inline.children or [] if c.type in ("text", "code_inline"))
        slug = github_slug(text)
        anchors.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return anchors


def problems(pages: list[Path], root: Path) -> tuple[list[str], int]:
    """What of the pages points nowhere, as `page:line: what` (the line its paragraph starts on), and how many
    references were checked."""
    found, checked = [], 0

    def check(page: Path, line: int, target: Path, anchor: str, shown: str) -> None:
        nonlocal checked
        checked += 1
        where = f"{page.relative_to(root)}:{line}"
        if not target.exists():
            found.append(f"{where}: {shown} does not exist")
        elif anchor and target.suffix == ".md" and anchor not in heading_anchors(target):
            found.append(f"{where}: {shown}: no heading with the anchor #{anchor} in {target.relative_to(root)}")

    for page in pages:
        for line, inline in _inline_tokens(page):
            for child in inline.children or []:
                if child.type == "link_open":
                    href = unquote(str(child.attrGet("href") or ""))
                    if URL.match(href):
                        continue
                    path, _, anchor = href.partition("#")
                    check(page, line, (page.parent / path).resolve() if path else page, anchor, f"link ({href})")
                if child.type in ("text", "code_inline"):
                    for name in DOCS_MENTION.findall(child.content):
                        check(page, line, root / name, "", name)
                if child.type == "code_inline" and REPO_PATH.fullmatch(child.content):
                    if not DOCS_MENTION.fullmatch(child.content):  # counted above
                        check(page, line, root / child.content, "", f"`{child.content}`")
    return found, checked


def test_every_reference_resolves():
    found, checked = problems(PAGES, REPO)
    assert found == []
    assert checked > 200  # the pages hold hundreds of references: parsing found them


def test_readme_is_short_and_lists_every_docs_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES, "the reference belongs in docs/ (see the README's last list)"
    linked = {
        unquote(str(c.attrGet("href"))).partition("#")[0]
        for _, inline in _inline_tokens(REPO / "README.md")
        for c in inline.children or []
        if c.type == "link_open"
    }
    pages = sorted(h for h in linked if h.startswith("docs/") and h.endswith(".md"))  # figures may be linked too
    assert sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")) == pages


def test_github_slug():
    # By hand, GitHub's rule: lower case, drop what is not a letter, digit, `_`, `-` or space, spaces become `-`.
    assert github_slug("Older drivers") == "older-drivers"
    assert github_slug("The start-up check (`recipe/carl/gpu_stack.py`)") == "the-start-up-check-recipecarlgpu_stackpy"
    assert github_slug("One node per distinct action (`merge: true`, the default)") == (
        "one-node-per-distinct-action-merge-true-the-default"
    )
    assert github_slug("Does CARL beat GRPO here?") == "does-carl-beat-grpo-here"


def test_broken_references_are_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "x.py").write_text("")
    (tmp_path / "docs" / "b.md").write_text("# Title\n\n## A `code` part (yes)\n\n## A `code` part (yes)\n")
    page = tmp_path / "docs" / "a.md"
    page.write_text(
        "# A\n\n"
        "[ok](b.md#a-code-part-yes) [ok](b.md#a-code-part-yes-1) [ok](#a) [web](https://example.org/x.md)\n"
        "`recipe/x.py` and docs/b.md exist.\n\n"
        "[missing file](c.md) [missing anchor](b.md#nothing) [missing here](#nowhere)\n\n"
        "`recipe/y.py` and `docs/d.md` and (docs/e.md) do not.\n\n"
        "```bash\n[in code](nowhere.md) docs/f.md\n```\n\n    [indented code](nowhere.md)\n\n"
        "<!-- docs/g.md in a comment -->\n"
    )
    found, checked = problems([page], tmp_path)
    assert [f.split(": ", 1)[1] for f in found] == [
        "link (c.md) does not exist",
        "link (b.md#nothing): no heading with the anchor #nothing in docs/b.md",
        "link (#nowhere): no heading with the anchor #nowhere in docs/a.md",
        "`recipe/y.py` does not exist",
        "docs/d.md does not exist",
        "docs/e.md does not exist",
    ]
    assert [f.split(":")[1] for f in found] == ["6", "6", "6", "8", "8", "8"]  # where the paragraph starts
    assert checked == 11
