"""Merge staging/issue12.py into wxgate.py mechanically: ``python staging/merge_issue12.py``.

Each staged section lands where its banner in staging/issue12.py says; the functions it
replaces are cut out by their ``def`` line up to the next top-level name. The script refuses
to run twice (wxgate.Router exists) and prints what it did; review ``git diff`` afterwards.
Delete staging/ once merged.
"""

import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BANNER = re.compile(r"^#{79}\n# (.+?) #+\n#{79}\n", re.M)


def staged_sections(text):
    marks = list(BANNER.finditer(text))
    return {m.group(1): text[m.end():marks[i + 1].start() if i + 1 < len(marks) else None]
            for i, m in enumerate(marks)}


def banner(title):
    return "#" * 79 + "\n" + f"# {title} ".ljust(79, "#") + "\n" + "#" * 79 + "\n"


def cut(text, start_marker, end_marker):
    """Return (before, after) around the span from start_marker to end_marker (kept)."""
    start = text.index(start_marker)
    end = text.index(end_marker, start + len(start_marker))
    return text[:start], text[end:]


def main(target):
    path = Path(target)
    text = path.read_text("utf-8")
    if "\nclass Router:" in text:
        sys.exit(f"{path} already has Router: merged before")
    staged = staged_sections((ROOT / "staging" / "issue12.py").read_text("utf-8"))
    clean = lambda block: re.sub(r"  # NEW(: was \"if\")?", "", block).replace(
        "# REPLACES wxgate._http_json: the only change is the _Multipart branch (marked "
        "NEW).\n", "").strip("\n") + "\n"

    text = text.replace('    "WeChatClient",\n',
                        '    "WeChatClient",\n    "Router",\n    "Simulator",\n    "FakeAPI",\n', 1)
    text = text.replace("import logging\n", "import logging\nimport mimetypes\n", 1)
    # The module docstring's list of sections, rewrapped.
    start = text.index("The module is cut into sections")
    end = min(text.index("\n\n", start), text.index('\n"""', start))
    paragraph = " ".join(text[start:end].split())
    paragraph = paragraph.replace("Delivery, Durable queue", "Delivery, Router, Durable queue", 1)
    paragraph = paragraph.replace("Push simulator, Command line",
                                  "Push simulator, Fake WeChat API, Command line", 1)
    text = text[:start] + textwrap.fill(paragraph, width=95) + text[end:]

    # access_token: the multipart helpers above a new _http_json.
    before, after = cut(text, "def _http_json(", "def _errcode(")
    text = before + clean(staged["access_token (additions, above _http_json)"]) + "\n\n" + after

    # WeChatClient.upload_temp_media, after send_miniprogrampage.
    method = staged["WeChat API client (method of WeChatClient)"]
    method = method[method.index("def upload_temp_media"):].rstrip("\n")
    method = "\n".join(("    " + line) if line else line for line in method.split("\n"))
    anchor = "    def send_subscribe_message("
    text = text.replace(anchor, method + "\n\n" + anchor, 1)

    # Router, a new section before Durable queue.
    queue = banner("Durable queue")
    text = text.replace(queue, banner("Router") + clean(staged["Router"]) + "\n\n" + queue, 1)

    # demo_handler, and the whole Push simulator section (plus Fake WeChat API).
    before, after = cut(text, "def demo_handler(", banner("Push simulator"))
    text = before + clean(staged["WSGI application (demo_handler, REPLACES the current one)"]) \
        + "\n\n" + after
    before, after = cut(text, banner("Push simulator"), banner("Command line"))
    text = (before + banner("Push simulator") + clean(staged["Push simulator"]) + "\n\n"
            + banner("Fake WeChat API") + clean(staged["Fake WeChat API"]) + "\n\n" + after)

    # Command line: _push and _handshake_command.
    commands = staged["Command line (REPLACES _push and _handshake_command)"]
    push = commands[commands.index("def _push("):commands.index("def _handshake_command(")]
    handshake = commands[commands.index("def _handshake_command("):].strip("\n") + "\n\n\n"
    before, after = cut(text, "def _push(args):", "def _handshake_command(")
    text = before + push + after
    before, after = cut(text, "def _handshake_command(", "def _decrypt_command(")
    text = before + handshake + after

    path.write_text(text, "utf-8")
    long = [n for n, line in enumerate(text.split("\n"), 1) if len(line) > 99]
    print(f"merged issue 12 into {path}; lines over 99 characters: {long or 'none'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ROOT / "wxgate.py")
