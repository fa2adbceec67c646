"""CGI, proven: wxgate as a program in ``cgi-bin/``, one process per request, under Apache's
real mod_cgid on 127.0.0.1, laid out and configured as the CGI recipe of docs/deployment.md says.

The CGI program is the page's own (taken from it as written), and the private folder holding
``wxgate.py``, the ini, the handler and the sqlite file sits under the web root behind the
page's ``.htaccess``, the layout of a host that lets you write nowhere else. Covered: the
console's handshake; pushes in plain, compat and safe mode, with the encrypted replies
decrypted here; a push retried three times, in a row and at once, running the handler once
(sqlite store, shared by the processes); and the private files refused to the web.
Skipped, saying why, when Apache or mod_cgid is missing, except under CI (``CI`` set).
"""

import os
import pwd
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import APPID, AES_KEY, TOKEN, build_push, text_message
from readme import code_block
from serving import _unprivileged_user, apache_cgi_binary, public_dir, require, start_apache
from test_deploy import SYSTEM_PYTHON, assert_transferred, handshake, http, log_text, serving

CGI_SHEBANG = "#!/usr/bin/python3\n# cgi-bin/wxgate.cgi"
DEPLOYMENT = "docs/deployment.md"  # the page holding the CGI recipe


def _require_cgi():
    require(apache_cgi_binary() is not None,
            "apache2 or mod_cgid is not installed (apt-get install apache2)")
    has_aes = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import importlib.util as u, sys; "
         "sys.exit(not (u.find_spec('Crypto') or u.find_spec('Cryptodome')))"],
        env={"PATH": "/usr/bin:/bin"}, check=False).returncode == 0
    require(has_aes, f"pycryptodome is not installed for {SYSTEM_PYTHON}, the CGI recipe's "
                     "program's interpreter (apt-get install python3-pycryptodome)")


# Counts its calls in a file (each CGI process is new: nothing in memory survives), and takes
# 0.5 s so that three copies of one push sent at once overlap in three processes.
COUNTING_HANDLER = '''\
import os, time
import wxgate

def on_message(message):
    with open(os.path.join(os.path.dirname(__file__), "calls.log"), "a") as calls:
        calls.write(message.dedup_key + "\\n")
    time.sleep(0.5)
    return wxgate.demo_handler(message)
'''


def cgi_site(root, repo_wxgate, store="sqlite"):
    """Lay out the deployment page's CGI recipe in ``root``; return the httpd.conf to serve it.

    ``root/public_html`` is the web root, ``cgi-bin/wxgate.cgi`` the page's program, and
    ``public_html/wxgate`` the private folder behind ``.htaccess``: wxgate.py, the ini (three
    apps: safe at /wechat, compat at /compat, plain at /plain), the counting handler.
    """
    docroot = root / "public_html"
    home = docroot / "wxgate"
    (docroot / "cgi-bin").mkdir(parents=True)
    home.mkdir()
    shutil.copy(repo_wxgate, home / "wxgate.py")
    (home / "counting.py").write_text(COUNTING_HANDLER, "utf-8")
    store_line = f"store = sqlite://{home}/wxgate.db" if store == "sqlite" else "store = memory"
    apps = "".join(f"""
[app:{mode}]
path = {path}
appid = {APPID}
token = {TOKEN}
encoding_aes_key = {AES_KEY}
mode = {mode}
handler = counting:on_message
""" for mode, path in (("safe", "/wechat"), ("compat", "/compat"), ("plain", "/plain")))
    (home / "wxgate.ini").write_text(f"[wxgate]\n{store_line}\n{apps}", "utf-8")
    htaccess = code_block("# ~/public_html/wxgate/.htaccess", page=DEPLOYMENT)
    (home / ".htaccess").write_text(htaccess, "utf-8")
    (home / "wxgate.db").write_bytes(b"")  # a stand-in to ask for before the first push
    program = docroot / "cgi-bin" / "wxgate.cgi"
    program.write_text(code_block(CGI_SHEBANG, page=DEPLOYMENT).replace(
        '"/home/you/wxgate"', repr(str(home))), "utf-8")
    # As the recipe says: the program 755, the private folder 700 and the ini 600, owned by
    # the user CGI runs as (here the server's user: a root-started Apache runs CGI as it).
    program.chmod(0o755)
    for path in (root, docroot, docroot / "cgi-bin"):
        path.chmod(0o755)
    owner = None
    if os.geteuid() == 0:
        owner = pwd.getpwnam(_unprivileged_user()[0])
    for path in [home, *home.iterdir()]:
        path.chmod(0o700 if path.is_dir() else 0o600)
        if path.name == ".htaccess":
            path.chmod(0o644)  # Apache itself reads it
        if owner is not None:
            os.chown(path, owner.pw_uid, owner.pw_gid)
    return f"""\
ScriptSock "{root}/cgid.sock"
DocumentRoot "{docroot}"
<Directory "{docroot}">
    AllowOverride AuthConfig
    Require all granted
</Directory>
ScriptAlias /cgi-bin/ "{docroot}/cgi-bin/"
""", home


@pytest.fixture(scope="module")
def cgi_server():
    _require_cgi()
    root = public_dir("wxgate-cgi-")
    try:
        conf, home = cgi_site(root, Path(__file__).resolve().parents[1] / "wxgate.py")
        base_url, process = start_apache(root, None, wsgi=False, modules=("cgid", "alias"),
                                         extra_conf=conf)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    with serving(process):
        yield {"url": f"{base_url}/cgi-bin/wxgate.cgi", "base": base_url, "home": home,
               "process": process}
    shutil.rmtree(root, ignore_errors=True)


def _calls(home):
    try:
        return (home / "calls.log").read_text("utf-8").splitlines()
    except FileNotFoundError:
        return []


def test_cgi_handshake(cgi_server):
    status, body, echostr = handshake(cgi_server["url"], "/wechat")
    assert (status, body) == (200, echostr.encode())
    status, _, _ = handshake(cgi_server["url"], "/wechat", token="not-the-token")
    assert status == 403


@pytest.mark.parametrize("mode,path", [("safe", "/wechat"), ("compat", "/compat"),
                                       ("plain", "/plain")])
@pytest.mark.parametrize("fmt", ["xml", "json"])
def test_cgi_pushes_in_every_mode(cgi_server, mode, path, fmt):
    """A ``kf`` text gets demo_handler's transfer reply: encrypted, signed and decrypted here
    in safe and compat mode (the push was encrypted), plain in plain mode."""
    message = text_message("kf", msg_id=str(time.time_ns()))
    query, body = build_push(message, mode=mode, fmt=fmt, timestamp=int(time.time()))
    answer = http("POST", f"{cgi_server['url']}{path}?{query}", body,
                  {"Content-Type": "text/xml"})
    assert_transferred(answer, fmt, encrypted=mode != "plain")
    assert [line for line in _calls(cgi_server["home"]) if line.endswith(message["MsgId"])]


def test_cgi_retries_run_the_handler_once(cgi_server):
    """WeChat's retries, each in its own CGI process: in a row, the handler ran once and each
    retry gets the first reply; at once, the copies wait for the first (sqlite claims)."""
    home = cgi_server["home"]
    for label in ("in a row", "at once"):
        message = text_message("kf", msg_id=str(time.time_ns()))
        query, body = build_push(message, fmt="xml", timestamp=int(time.time()))
        url = f"{cgi_server['url']}/wechat?{query}"
        answers = [None] * 3

        def send(index):
            answers[index] = http("POST", url, body, {"Content-Type": "text/xml"}, timeout=20)

        if label == "in a row":
            for index in range(3):
                send(index)
        else:
            threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
        for answer in answers:
            assert_transferred(answer, "xml")
        assert len({answer[2] for answer in answers}) == 1, label  # the same reply bytes
        runs = [line for line in _calls(home) if line.endswith(message["MsgId"])]
        assert len(runs) == 1, f"{label}: the handler ran {len(runs)} times"


def test_cgi_private_folder_is_not_served(cgi_server):
    """The recipe's .htaccess: the ini, the sqlite file and wxgate.py are refused to the web."""
    base = cgi_server["base"]
    for name in ("wxgate.ini", "wxgate.db", "wxgate.py", "counting.py", ""):
        status, _, body = http("GET", f"{base}/wxgate/{name}")
        assert status == 403, (name, body[:200])
        assert TOKEN.encode() not in body and AES_KEY.encode() not in body


def test_cgi_logs_reach_apaches_error_log(cgi_server):
    """What the program writes on stderr lands in Apache's error log: wxgate's push line."""
    message = text_message("hello", msg_id=str(time.time_ns()))
    query, body = build_push(message, fmt="xml", timestamp=int(time.time()))
    status, _, reply = http("POST", f"{cgi_server['url']}/wechat?{query}", body)
    assert (status, reply) == (200, b"success")
    key = f"key=safe:m:{message['MsgId']} outcome=handled"
    deadline = time.monotonic() + 5
    while key not in log_text(cgi_server["process"]) and time.monotonic() < deadline:
        time.sleep(0.05)  # Apache copies the program's stderr after the response
    log = log_text(cgi_server["process"])
    assert key in log, log[-3000:]
    assert "cannot start" not in log and AES_KEY not in log
