"""The code blocks of README.md and docs/, so tests run the recipes exactly as a user copies them.

    source = code_block("# backend.py", page="docs/backend.md")

A block is found by the start of its first line (a comment naming the file, in every recipe
the suite runs), so rewording the prose around it never breaks a test. ``page`` says where the
recipe lives: a page that is missing, a page that lost the recipe or holds it twice, and a
recipe that another page holds too (a copy no test runs) all fail loudly.
"""

import re
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^( *)```[a-z]*\n(.*?)^\1```$", re.MULTILINE | re.DOTALL)


def pages():
    """The documentation a user reads: README.md, then every page of docs/."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def code_blocks(path):
    """The fenced blocks of one page, as the reader sees them (dedented, fences excluded)."""
    # A block inside a list item is indented with it: dedent it as the reader sees it.
    return [textwrap.dedent(match.group(2))
            for match in _FENCE.finditer(path.read_text("utf-8"))]


def code_block(first_line, *, page):
    """The text of the one fenced block of ``page`` (a path from the repository's root) whose
    first line starts with ``first_line`` (fences excluded, dedented, final newline kept)."""
    path = REPO / page
    if not path.is_file():
        raise LookupError(f"{page} does not exist: where did the {first_line!r} recipe go?")
    found = [block for block in code_blocks(path) if block.startswith(first_line)]
    if len(found) != 1:
        raise LookupError(f"{page} has {len(found)} code blocks starting with "
                          f"{first_line!r}, not one")
    elsewhere = [other.relative_to(REPO).as_posix() for other in pages() if other != path
                 and any(block.startswith(first_line) for block in code_blocks(other))]
    if elsewhere:
        raise LookupError(f"{first_line!r} is in {page} and also in {', '.join(elsewhere)}: "
                          f"keep one copy, the one the tests run")
    return found[0]
