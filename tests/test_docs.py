"""The documentation holds together: README.md is the front door, docs/ has a page per task.

- every relative link of README.md and docs/ reaches a file of the repository, and every
  ``#anchor`` a heading of its page (as GitHub spells heading anchors);
- the README's table of contents names every page of docs/;
- the README's second command is what ``.ci/run`` runs;
- the configuration page documents every ini key, and no key that does not exist;
- the pages speak to users: no issue numbers, no reference files users do not have, no
  undefined source tags;
- ``tests/readme.py`` fails loudly when a recipe's page or block is missing.

The recipes themselves run where they are used: test_recipes, test_handler_docs, test_deploy,
test_cgi.
"""

import configparser
import re

import pytest

import wxgate
from readme import REPO, code_block, code_blocks, pages

_FENCE = re.compile(r"^ *```.*?^ *```$", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_DEFINITION = re.compile(r"^\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
_HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.MULTILINE)
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def _prose(text):
    """The page without its code, where a bracket or a `#` is not Markdown."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def anchors(path):
    """The anchors GitHub gives the headings of a page: lower case, punctuation dropped,
    spaces as hyphens, a repeated one numbered."""
    seen, found = {}, set()
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text("utf-8"))):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def broken_links(page, root):
    """The relative links of ``page`` that reach no file under ``root``, or no heading."""
    text = _prose(page.read_text("utf-8"))
    broken = []
    for target in _LINK.findall(text) + _DEFINITION.findall(text):
        if _SCHEME.match(target):
            continue  # a web address: not ours to check offline
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if root.resolve() not in (destination, *destination.parents) \
                or not destination.exists():
            broken.append(target)
        elif anchor and (destination.suffix != ".md" or anchor not in anchors(destination)):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", pages(), ids=lambda path: path.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(page):
    assert broken_links(page, REPO) == []


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# B\n\n## Two words\n", "utf-8")
    page = tmp_path / "README.md"
    page.write_text("# A\n\n[ok](docs/b.md#two-words) [gone](docs/c.md) "
                    "[nowhere](docs/b.md#three) [self](#a) `[code](skipped.md)`\n"
                    "[web](https://example.com/x.md)\n\n```text\n[fenced](skipped.md)\n```\n"
                    "[outside](../../etc/hosts)\n", "utf-8")
    assert broken_links(page, tmp_path) == ["docs/c.md", "docs/b.md#three",
                                            "../../etc/hosts"]


def test_heading_anchors_are_githubs():
    # The anchors other pages link to, spelled as GitHub renders them.
    assert {"the-收到-bot", "acting-as-wechat-from-the-shell"} <= anchors(
        REPO / "docs" / "handlers.md")
    assert {"cloud_source_check--no-the-trade-off", "the-ini-and-botpy"} <= anchors(
        REPO / "docs" / "cloud-hosting.md")
    assert "wechats--400xx-codes" in anchors(REPO / "docs" / "troubleshooting.md")


def test_the_readme_links_every_page_of_docs():
    readme = _prose((REPO / "README.md").read_text("utf-8"))
    linked = {target.partition("#")[0] for target in _LINK.findall(readme)}
    pages_of_docs = {path.relative_to(REPO).as_posix() for path in pages()[1:]}
    assert pages_of_docs and pages_of_docs <= linked, pages_of_docs - linked


def test_ci_runs_the_readmes_second_command():
    # The README opens with two commands; .ci/run must run the second as a user types it.
    first, second = code_blocks(REPO / "README.md")[0].splitlines()
    assert first.endswith("serve example.ini") and "venv" in first
    ci = [line for line in (REPO / ".ci" / "run").read_text("utf-8").splitlines() if line]
    assert ci[-1] == second


def _documented_keys(table):
    """The keys of a configuration table: the backquoted names of each row's first cell."""
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    return {key for cell in rows for key in re.findall(r"`([a-z_]+)`", cell)}


def test_the_configuration_page_documents_every_ini_key():
    text = (REPO / "docs" / "configuration.md").read_text("utf-8")
    gateway, _, apps = text.partition("### The `[app:NAME]` sections")
    assert apps, "the [app:NAME] table has lost its heading"
    assert _documented_keys(gateway) == set(wxgate._GATEWAY_OPTIONS)
    assert _documented_keys(apps) == set(wxgate._APP_OPTIONS)


HISTORY = re.compile(r"\bissue \d+|\bround \d+|PROTOCOL\.md|shared/|\[[OCSL][],]",
                     re.IGNORECASE)


@pytest.mark.parametrize("page", pages(), ids=lambda path: path.relative_to(REPO).as_posix())
def test_pages_cite_no_issue_nor_reference_file_nor_undefined_tag(page):
    assert HISTORY.findall(page.read_text("utf-8")) == []


def test_a_recipe_whose_page_or_block_is_missing_fails_loudly():
    with pytest.raises(LookupError, match=r"docs/gone\.md does not exist"):
        code_block("# backend.py", page="docs/gone.md")
    with pytest.raises(LookupError, match=r"README\.md has 0 code blocks starting with"):
        code_block("# backend.py", page="README.md")
    assert code_block("# backend.py", page="docs/backend.md").startswith("# backend.py")


def test_the_package_description_is_the_readme():
    # setup.cfg's long_description = file: README.md, as setuptools reads it to build (where
    # setuptools is importable: a venv of Python 3.12 or later has none).
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "setup.cfg", encoding="utf-8")
    assert parser["metadata"]["long_description"] == "file: README.md"
    assert parser["metadata"]["long_description_content_type"] == "text/markdown"
    try:
        from setuptools.config.setupcfg import read_configuration
    except ImportError:
        return
    metadata = read_configuration(REPO / "setup.cfg")["metadata"]
    assert metadata["long_description"] == (REPO / "README.md").read_text("utf-8")
