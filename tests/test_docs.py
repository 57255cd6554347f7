"""The documentation works from a clone: every relative link in the Markdown files
resolves inside the repository, to a file that exists and, with a ``#fragment``, to a
heading of that file; nothing links or cites a file that a clone does not have.

Links are read the way a Markdown renderer reads them: inline ``[text](target)`` and
reference definitions ``[name]: target``, outside fenced code blocks and code spans.
Heading anchors follow GitHub's rule (lower case, punctuation dropped, spaces to
hyphens, ``-1``, ``-2`` ... for repeats), since that is where the files are read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
# Directories that hold no project documentation (tool caches, the venv, build output).
SKIP_DIRS = frozenset({".git", ".venv", "var", "dist", "build", "node_modules"})

_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+).+?\1")
_INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
# The design notes the project was started from live outside the repository; a clone
# does not have them, so the docs explain themselves (docs/architecture.md).
_OUTSIDE_NOTES = re.compile(r"\bDESIGN\.md\b")


@dataclass(frozen=True, slots=True)
class Link:
    """One link target as written, with where it was written."""

    source: Path
    line: int
    target: str

    def __str__(self) -> str:
        return f"{self.source.relative_to(REPO)}:{self.line}: ({self.target})"


def markdown_files() -> list[Path]:
    """Every Markdown file of the project (README.md, docs/, and the folders' READMEs)."""
    files: list[Path] = []
    for path in sorted(REPO.rglob("*.md")):
        parts = path.relative_to(REPO).parts
        if any(part in SKIP_DIRS or part.startswith(".") for part in parts[:-1]):
            continue
        files.append(path)
    return files


def unfenced_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The lines outside fenced code blocks, numbered from 1."""
    fence: str | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)[0] * 3
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                fence = None
            continue
        yield number, line


def prose_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The lines outside fenced code blocks, code spans blanked out, numbered from 1."""
    for number, line in unfenced_lines(path):
        yield number, _CODE_SPAN.sub("", line)


def links(path: Path) -> list[Link]:
    """The link targets of one Markdown file."""
    found: list[Link] = []
    for number, line in prose_lines(path):
        targets = _INLINE_LINK.findall(line)
        reference = _REFERENCE.match(line)
        if reference:
            targets.append(reference.group(1))
        found.extend(Link(path, number, target) for target in targets)
    return found


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading's text (before de-duplication)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, repeats numbered as GitHub does."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for _number, line in unfenced_lines(path):
        heading = _HEADING.match(line)
        if heading is None:
            continue
        slug = github_slug(heading.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def link_problem(link: Link) -> str | None:
    """Why a link does not work from a clone, or None when it does."""
    target = link.target
    if not target or _SCHEME.match(target) or target.startswith("//"):
        return None  # a URL: not ours to check offline
    path_part, _, fragment = target.partition("#")
    if path_part:
        resolved = (link.source.parent / unquote(path_part)).resolve()
        if not resolved.is_relative_to(REPO):
            return "points outside the repository"
        if not resolved.exists():
            return "no such file"
    else:
        resolved = link.source
    if fragment and resolved.suffix == ".md" and unquote(fragment) not in anchors(resolved):
        return f"no heading with anchor #{fragment} in {resolved.relative_to(REPO)}"
    return None


DOCS = markdown_files()


def test_the_project_has_markdown_files_to_check() -> None:
    names = {path.relative_to(REPO).as_posix() for path in DOCS}
    assert {"README.md", "docs/architecture.md", "docs/operations.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves_inside_the_repository(doc: Path) -> None:
    problems = [f"{link}: {why}" for link in links(doc) if (why := link_problem(link))]
    assert problems == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_doc_cites_design_notes_a_clone_does_not_have(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8").splitlines()
    cited = [
        f"{number}: {line.strip()}"
        for number, line in enumerate(text, 1)
        if _OUTSIDE_NOTES.search(line)
    ]
    assert cited == []


def test_the_readme_lists_each_document_once() -> None:
    """The README's Documentation section names every docs/*.md file, each once."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Documentation\n", 1)[1].split("\n## ", 1)[0]
    # Each list item starts with the link to its document.
    items = re.findall(r"^- \[[^\]]+\]\((docs/[^)#]+)\)", section, flags=re.MULTILINE)
    assert len(items) == len(set(items)), f"listed more than once: {sorted(items)}"
    expected = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))
    assert sorted(items) == expected


# -- the checker itself, on known input ------------------------------------------------


def test_github_slug_matches_githubs_anchors() -> None:
    assert github_slug("Behind a load balancer (PROXY protocol)") == (
        "behind-a-load-balancer-proxy-protocol"
    )
    assert github_slug("Before reloading: `check-config --against`") == (
        "before-reloading-check-config---against"
    )
    assert github_slug("1. No message is ever lost") == "1-no-message-is-ever-lost"


def test_link_problem_finds_each_kind_of_broken_link() -> None:
    doc = REPO / "docs" / "operations.md"
    assert link_problem(Link(doc, 1, "../../shared/DESIGN.md")) == "points outside the repository"
    assert link_problem(Link(doc, 1, "no-such-file.md")) == "no such file"
    assert link_problem(Link(doc, 1, "#no-such-heading")) is not None
    assert link_problem(Link(doc, 1, "configuration.md#no-such-heading")) is not None
    assert link_problem(Link(doc, 1, "#reloading")) is None
    assert link_problem(Link(doc, 1, "https://example.net/x")) is None
    assert link_problem(Link(doc, 1, "../contrib/systemd/popproxy.service")) is None


def test_links_skip_code_and_read_references(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("See [a](a.md#top) and `[b](b.md)`.\n```sh\n[c](c.md)\n```\n[d]: d.md\n")
    assert [link.target for link in links(doc)] == ["a.md#top", "d.md"]
