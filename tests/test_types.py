"""The public API's annotations, checked by mypy (issue 12 part 5) with setup.cfg's [mypy]."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("mypy", reason="mypy is in the test extra: pip install '.[test]'")


def mypy(*paths):
    # No cache: nothing stale read from one, and no .mypy_cache left in the checkout.
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", os.devnull,
         "--config-file", str(REPO / "setup.cfg"), *map(str, paths)],
        cwd=REPO, capture_output=True, text=True, timeout=600)


def test_wxgate_and_its_typed_usage_pass_mypy():
    result = mypy(REPO / "wxgate.py", REPO / "tests" / "typed_usage.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found in 2 source files" in result.stdout


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


def test_mypy_catches_misuse_of_the_public_names(tmp_path):
    # The annotations must say something: each misuse here is one error.
    misuse = tmp_path / "misuse.py"
    misuse.write_text(MISUSES, "utf-8")
    result = mypy(misuse)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert [int(line.split(":")[1]) for line in lines] == [5, 6, 7, 9, 11, 12, 13], \
        result.stdout
