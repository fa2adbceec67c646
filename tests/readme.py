"""The README's code blocks, so tests run the recipes exactly as a user copies them.

    source = code_block("# backend.py")   # the fenced block whose first line starts so

A block is found by the start of its first line (a comment naming the file, in every recipe
the suite runs), so rewording the prose around it never breaks a test, and a recipe that the
README loses or duplicates fails loudly.
"""

import re
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^( *)```[a-z]*\n(.*?)^\1```$", re.MULTILINE | re.DOTALL)


def code_block(first_line):
    """The text of the one fenced block in README.md whose first line starts with
    ``first_line`` (fences excluded, dedented, final newline kept)."""
    # A block inside a list item is indented with it: dedent it as the reader sees it.
    blocks = [textwrap.dedent(match.group(2))
              for match in _FENCE.finditer(README.read_text("utf-8"))]
    blocks = [block for block in blocks if block.startswith(first_line)]
    if len(blocks) != 1:
        raise LookupError(f"README.md has {len(blocks)} code blocks starting with "
                          f"{first_line!r}, not one")
    return blocks[0]
