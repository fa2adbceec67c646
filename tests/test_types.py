"""The public API's annotations, checked by mypy with setup.cfg's [mypy].

One mypy run checks wxgate.py, tests/typed_usage.py and every typed snippet below together
(mypy's start and its pass over wxgate.py are most of a run's time); each test then reads the
lines of its own file in that run's output. The tests of an installed wxgate run mypy as a user
would, in a project of their own against a virtual environment's site-packages.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from readme import code_block

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("mypy", reason="mypy is in the test extra: pip install '.[test]'")


def mypy(*arguments, cwd=REPO):
    # No cache: nothing stale read from one, and no .mypy_cache left in the checkout.
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", os.devnull,
         *map(str, arguments)], cwd=cwd, capture_output=True, text=True, timeout=600)


MISUSES = '''
import wxgate

def misuse(message: wxgate.Message, config: wxgate.Config) -> None:
    signature: int = wxgate.sign("token", "1", "2")
    wxgate.make_app(42)
    wxgate.Simulator(config).push("not a dict")
    router = wxgate.Router()
    router.message(1)
    client = message.client
    client.send_text(message.msg_type, "x")
    media_id: bytes = client.upload_temp_media(b"x")
    wxgate.TokenManager("wx1", "secret", api_timeout="3")
'''

# The documented bots, annotated as a user of a typed wxgate would annotate them:
# (first line of the block, the page it is on, the annotations).
TYPED_BOTS = {
    "ackbot": ("# ackbot.py", "docs/handlers.md", {"def acknowledge(message):":
                               "def acknowledge(message: wxgate.Message) -> object:"}),
    "shopbot": ("# shopbot.py", "README.md", {"def on_message(message):":
                                 "def on_message(message: wxgate.Message) -> object:",
                                 "def send(message, text):":
                                 "def send(message: wxgate.Message, text: str) -> None:"}),
}

SIMULATOR_TEST = '''
import webtest
import wxgate


def test(config: wxgate.Config) -> None:
    wechat = wxgate.Simulator(config, "shop")
    push = wechat.push({"MsgType": "text", "Content": "人工", "FromUserName": "o_user"})
    resp = webtest.TestApp(wxgate.make_app(config)).post(push.url, push.body,
                                                          headers=push.headers)
    assert wechat.open_reply(resp.body)["MsgType"] == "transfer_customer_service"
'''


class Checked:
    """The output of one mypy run, by file."""

    def __init__(self, result, files):
        self.result, self.files = result, files
        self.output = result.stdout + result.stderr

    def errors(self, name):
        """The ``path:line: error: ...`` lines of the file ``name`` (a key of ``files``)."""
        path = str(self.files[name])
        return [line for line in self.result.stdout.splitlines()
                if line.startswith(f"{path}:") and ": error:" in line]


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """mypy, once, over wxgate.py, typed_usage.py, the misuses, the typed documented bots and a
    typed Simulator test. webtest ships no type information: only it is let go untyped, in a
    copy of setup.cfg's [mypy] that adds that one section."""
    directory = tmp_path_factory.mktemp("typed")
    files = {"wxgate": REPO / "wxgate.py", "typed_usage": REPO / "tests" / "typed_usage.py"}
    (directory / "misuse.py").write_text(MISUSES, "utf-8")
    files["misuse"] = directory / "misuse.py"
    for name, (first_line, page, typed) in TYPED_BOTS.items():
        source = code_block(first_line, page=page)
        for old, new in typed.items():
            assert old in source, (name, old)
            source = source.replace(old, new)
        files[name] = directory / f"typed_{name}.py"
        files[name].write_text(source, "utf-8")
    files["simulator_test"] = directory / "test_typed_simulator.py"
    files["simulator_test"].write_text(SIMULATOR_TEST, "utf-8")
    config = directory / "mypy.ini"
    config.write_text((REPO / "setup.cfg").read_text("utf-8") +
                      "\n[mypy-webtest.*]\nignore_missing_imports = True\n", "utf-8")
    result = mypy("--config-file", config, *files.values())
    checked = Checked(result, files)
    # The run itself worked (1: errors found, in the misuses) and checked every file.
    assert result.returncode in (0, 1), checked.output
    assert re.search(rf"\(checked {len(files)} source files\)|"
                     rf"Success: no issues found in {len(files)} source files",
                     result.stdout), checked.output
    return checked


def test_wxgate_and_its_typed_usage_pass_mypy(checked):
    assert checked.errors("wxgate") == [], checked.output
    assert checked.errors("typed_usage") == [], checked.output


def test_mypy_catches_misuse_of_the_public_names(checked):
    # The annotations must say something: each misuse here is one error.
    lines = checked.errors("misuse")
    assert [int(line.split(":")[1]) for line in lines] == [5, 6, 7, 9, 11, 12, 13], \
        checked.output


@pytest.mark.parametrize("bot", sorted(TYPED_BOTS))
def test_the_documented_handlers_typed_with_message_pass_mypy(checked, bot):
    # Typed public names, so editors complete and checkers check them. Annotate the documented
    # own bots with `message: wxgate.Message`: `message.client.send_text(message.from_user,
    # ...)`, the line every bot has, must pass (client is a WeChatClient, never None, and
    # from_user a str).
    assert checked.errors(bot) == [], checked.output


def test_a_typed_simulator_test_passes_mypy(checked):
    # `open_reply(body)["MsgType"]`, the README's own line, must type-check: open_reply()
    # returns a dict for a message reply, and its annotation must allow the index.
    assert checked.errors("simulator_test") == [], checked.output


# -- an installed wxgate, as a user's mypy sees it ---------------------------------------------

USER_CODE = '''
import wxgate

signature: int = wxgate.sign("token", "1", "2")
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A virtual environment with wxgate.py in its site-packages; its python's path."""
    venv = tmp_path_factory.mktemp("installed") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "wxgate.py").write_bytes((REPO / "wxgate.py").read_bytes())
    return python


def user_project(directory):
    project = directory / "project"
    project.mkdir()
    (project / "bot.py").write_text(USER_CODE, "utf-8")
    return project


def test_a_users_mypy_sees_the_types_of_an_installed_wxgate(tmp_path, installed):
    # wxgate installs as one module, which cannot carry PEP 561's py.typed marker: a user's
    # plain `mypy` says 'Skipping analyzing "wxgate": module is installed, but missing library
    # stubs or py.typed marker' and treats all of wxgate as Any. mypy >= 1.14 reads it with
    # follow_untyped_imports, and the handlers page must say so.
    project = user_project(tmp_path)
    result = mypy("--python-executable", installed, "--follow-untyped-imports", "bot.py",
                  cwd=project)
    assert 'Incompatible types in assignment (expression has type "str"' in result.stdout, \
        result.stdout + result.stderr
    advice = (REPO / "docs" / "handlers.md").read_text("utf-8")
    assert "follow_untyped_imports" in advice or "follow-untyped-imports" in advice


def test_the_documented_mypy_section_works_as_written(tmp_path, installed):
    # The handlers page's ini block, copied into a user's project, makes a plain `mypy` read an
    # installed wxgate (without it: "Skipping analyzing", and wxgate is Any).
    project = user_project(tmp_path)
    bare = mypy("--python-executable", installed, "bot.py", cwd=project)
    assert "Skipping analyzing" in bare.stdout, bare.stdout + bare.stderr
    (project / "mypy.ini").write_text(code_block("# mypy.ini", page="docs/handlers.md"),
                                         "utf-8")
    result = mypy("--python-executable", installed, "bot.py", cwd=project)
    assert 'Incompatible types in assignment (expression has type "str"' in result.stdout, \
        result.stdout + result.stderr
