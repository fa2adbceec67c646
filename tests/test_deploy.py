"""Deployment, proven: wxgate under real servers on 127.0.0.1, configured as the README says.

- gunicorn ``wxgate:application`` with ``WXGATE_CONFIG``, sync and gthread workers;
- Apache httpd + mod_wsgi (Debian's ``apache2`` and ``libapache2-mod-wsgi-py3``, running Debian's
  own ``/usr/bin/python3``), mounted at ``/`` and under ``WSGIScriptAlias /wechat``;
- nginx in front of gunicorn: ``X-Forwarded-*``, ``X-Request-Id``, aligned body limits.

Each drives the console's handshake and real encrypted pushes (XML and JSON) over HTTP, with
the current clock, and decrypts the ``transfer_customer_service`` reply of ``demo_handler``.
Apache and nginx tests skip, saying why, when the server is not installed, except under CI
(``CI`` set), where they fail instead.
"""

import contextlib
import json
import os
import random
import secrets
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import APPID, GH_ID, OPENID, TOKEN, build_push, ini_text, open_reply, sha1_sign, \
    text_message
from serving import REPO, apache_binary, public_dir, require, start_apache, start_gunicorn, \
    start_nginx, stop

MAX_BODY = 65536  # max_body_bytes in the ini, client_max_body_size 64k, LimitRequestBody
ADMIN_SECRET = "deploy-admin-secret"
# The interpreter Debian's mod_wsgi embeds (libapache2-mod-wsgi-py3 links the system Python).
SYSTEM_PYTHON = "/usr/bin/python3"

# No http_proxy from the environment between the tests and loopback.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- helpers ---------------------------------------------------------------------------------


def http(method, url, body=None, headers=None, timeout=10):
    """``(status, headers, body)`` of one request; 4xx/5xx are answers, not exceptions."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with _opener.open(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers, exc.read()


def write_ini(directory, path="/wechat", extra_gateway="", more=""):
    ini_path = Path(directory) / "wxgate.ini"
    ini_path.write_text(ini_text(mode="safe", fmt="auto", path=path,
                                 extra_gateway=f"max_body_bytes = {MAX_BODY}\n{extra_gateway}")
                        + more, "utf-8")
    ini_path.chmod(0o644)  # a root-started Apache serves as www-data
    return ini_path


def handshake(base_url, path="/wechat", token=TOKEN):
    """The console's URL check with the current clock: ``(status, body, echostr)``."""
    timestamp, nonce, echostr = str(int(time.time())), secrets.token_hex(5), \
        secrets.token_urlsafe(16)
    query = urllib.parse.urlencode({"signature": sha1_sign(token, timestamp, nonce),
                                    "timestamp": timestamp, "nonce": nonce,
                                    "echostr": echostr})
    status, _, body = http("GET", f"{base_url}{path}?{query}")
    return status, body, echostr


def push(base_url, fmt, content="kf", path="/wechat", mode="safe", headers=None):
    """Send a text message as WeChat would (a fresh MsgId, the current timestamp)."""
    message = text_message(content, msg_id=str(random.randrange(10**18, 10**19)))
    query, body = build_push(message, mode=mode, fmt=fmt, timestamp=int(time.time()),
                             nonce=str(random.randrange(10**9)))
    # WeChat labels both formats text/xml; wxgate must not care.
    headers = {"Content-Type": "text/xml", **(headers or {})}
    return http("POST", f"{base_url}{path}?{query}", body, headers)


def parse(text, fmt):
    if fmt == "json":
        return json.loads(text)
    return {child.tag: child.text for child in ET.fromstring(text)}


def assert_transferred(answer, fmt, encrypted=True):
    """The answer is demo_handler's transfer_customer_service, encrypted and signed."""
    status, headers, body = answer
    assert status == 200, body
    if encrypted:
        plaintext, appid, _ = open_reply(body.decode("utf-8"), fmt)
        assert appid == APPID
    else:
        plaintext = body.decode("utf-8")
    reply = parse(plaintext, fmt)
    assert reply["MsgType"] == "transfer_customer_service"
    assert (reply["ToUserName"], reply["FromUserName"]) == (OPENID, GH_ID)
    assert abs(int(reply["CreateTime"]) - time.time()) < 60


def assert_serves(base_url, path="/wechat"):
    """Handshake, a forged handshake, XML and JSON safe-mode pushes, a plain 'success'."""
    status, body, echostr = handshake(base_url, path)
    assert (status, body) == (200, echostr.encode())
    status, _, _ = handshake(base_url, path, token="not-the-token")
    assert status == 403
    assert_transferred(push(base_url, "xml", path=path), "xml")
    assert_transferred(push(base_url, "json", path=path), "json")
    status, _, body = push(base_url, "xml", content="hello", path=path)
    assert (status, body) == (200, b"success")


@contextlib.contextmanager
def serving(process):
    """Stop the server afterwards; quote its log under a failed assertion (a bare 500 says
    nothing)."""
    try:
        yield
    except AssertionError as exc:
        stop(process)
        raise AssertionError(f"{exc}\n--- {process.log_path} (tail):\n"
                             f"{log_text(process)[-3000:]}") from None
    finally:
        stop(process)


def log_text(process):
    try:
        return Path(process.log_path).read_text("utf-8", "replace")
    except OSError:
        return ""


# -- gunicorn --------------------------------------------------------------------------------


@pytest.mark.parametrize("worker_args", [
    pytest.param((), id="sync"),
    pytest.param(("--worker-class", "gthread", "--threads", "4"), id="gthread"),
])
def test_gunicorn_serves_handshake_and_encrypted_pushes(tmp_path, worker_args):
    """``WXGATE_CONFIG=... gunicorn wxgate:application``, the README's first recipe."""
    base_url, process = start_gunicorn(write_ini(tmp_path), workers=2, extra_args=worker_args)
    with serving(process):
        assert_serves(base_url)
        # Concurrent pushes over both workers (and threads): every reply decrypts.
        answers = [None] * 12
        formats = ["xml", "json"] * 6

        def send(index):
            answers[index] = push(base_url, formats[index])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(answers))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        for answer, fmt in zip(answers, formats):
            assert answer is not None, "a push got no answer within 30 s"
            assert_transferred(answer, fmt)
    assert "cannot start" not in log_text(process)


# -- Apache httpd + mod_wsgi -----------------------------------------------------------------


def _require_apache():
    require(apache_binary() is not None,
            "apache2 or mod_wsgi is not installed "
            "(apt-get install apache2 libapache2-mod-wsgi-py3)")
    require(os.access(SYSTEM_PYTHON, os.X_OK), f"{SYSTEM_PYTHON} (mod_wsgi's Python) is absent")
    has_aes = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import importlib.util as u, sys; "
         "sys.exit(not (u.find_spec('Crypto') or u.find_spec('Cryptodome')))"],
        env={"PATH": "/usr/bin:/bin"}, check=False).returncode == 0
    require(has_aes, f"pycryptodome is not installed for {SYSTEM_PYTHON} "
                     "(apt-get install python3-pycryptodome)")


@pytest.fixture
def served_dir():
    """A world-readable directory for the server's config, ini and logs (tmp_path is 0700)."""
    directory = public_dir("wxgate-deploy-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_system_python_loads_an_encrypted_config(served_dir):
    """mod_wsgi runs Debian's /usr/bin/python3, whose python3-pycryptodome is ``Cryptodome``.

    wxgate must find AES there too, or every safe/compat app fails to load under Apache.
    """
    _require_apache()
    ini_path = write_ini(served_dir)
    result = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys, wxgate; "
         "print(wxgate.load_config(sys.argv[1], environ={}).apps['test'].mode)", str(ini_path)],
        cwd=REPO, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "safe"


def test_apache_mod_wsgi_at_the_root(served_dir):
    """``WSGIScriptAlias / /srv/wxgate/wxgate.py`` + ``SetEnv WXGATE_CONFIG``: the module itself
    is the WSGI script, and Apache's LimitRequestBody matches max_body_bytes."""
    _require_apache()
    ini_path = write_ini(served_dir)
    base_url, process = start_apache(served_dir, ini_path, mount="/",
                                     extra_conf=f"LimitRequestBody {MAX_BODY}")
    with serving(process):
        assert_serves(base_url)
        status, _, body = http("GET", f"{base_url}/_wxgate/healthz")
        assert status == 200 and json.loads(body)["apps"] == ["test"]
        # Apache passes REMOTE_ADDR 127.0.0.1 with no X-Forwarded-For: a loopback scrape.
        status, _, body = http("GET", f"{base_url}/_wxgate/metrics")
        assert status == 200
        assert 'wxgate_pushes_total{app="test"' in body.decode()
        query, _ = build_push(text_message("big"), timestamp=int(time.time()))
        status, _, _ = http("POST", f"{base_url}/wechat?{query}", b"x" * (MAX_BODY + 1),
                            {"Content-Type": "text/xml"})
        assert status == 413
    log = log_text(process)
    assert "cannot start" not in log, log[-3000:]
    assert "push app=test type=text" in log  # wxgate's log lines reach Apache's error log


def test_apache_mod_wsgi_mounted_under_wechat_shared_hosting_layout(served_dir):
    """``WSGIScriptAlias /wechat .../wxgate.wsgi``: SCRIPT_NAME=/wechat, and the ini's
    ``path = /wechat`` (and ``/wechat/shop`` below it) still match.

    The layout is the README's shared-hosting recipe: only ``wxgate.py`` copied into a
    directory beside the ini, and an entry script that sets ``WXGATE_CONFIG`` itself (no
    ``SetEnv``, no install, the repository not on the path).
    """
    _require_apache()
    site = served_dir / "site"
    site.mkdir(mode=0o755)
    site.chmod(0o755)
    shutil.copy(REPO / "wxgate.py", site / "wxgate.py")
    shop = ("\n[app:shop]\npath = /wechat/shop\nappid = wx0000000000000001\n"
            f"token = {TOKEN}\nmode = plain\nhandler = wxgate:demo_handler\n")
    write_ini(site, more=shop)
    script = site / "wxgate.wsgi"
    script.write_text(
        "import os\n"
        "os.environ.setdefault('WXGATE_CONFIG',\n"
        "                      os.path.join(os.path.dirname(__file__), 'wxgate.ini'))\n"
        "from wxgate import application\n", "utf-8")
    for path in site.iterdir():
        path.chmod(0o644)
    base_url, process = start_apache(served_dir, None, mount="/wechat", script=script,
                                     python_path=site)
    with serving(process):
        assert_serves(base_url, "/wechat")
        status, body, echostr = handshake(base_url, "/wechat/shop")
        assert (status, body) == (200, echostr.encode())
        assert_transferred(push(base_url, "xml", path="/wechat/shop", mode="plain"), "xml",
                           encrypted=False)
        status, _, body = http("GET", f"{base_url}/wechat/nothing-here")
        assert status == 404 and b"no wxgate app" in body  # wxgate's 404, inside the mount
        status, _, body = http("GET", f"{base_url}/elsewhere")
        assert status == 404 and b"no wxgate app" not in body  # Apache's own, outside it
    log = log_text(process)
    assert "cannot start" not in log, log[-3000:]
    assert f"Adding '{site}' to path" in log  # the copy was served, not the repository


# -- nginx in front of gunicorn --------------------------------------------------------------


@pytest.fixture(scope="module")
def proxied():
    """gunicorn (gthread) behind nginx; JSON logs, an admin secret, 64k limits on both."""
    require(shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"),
            "nginx is not installed (apt-get install nginx)")
    directory = public_dir("wxgate-nginx-")
    ini_path = write_ini(directory, extra_gateway=f"log_format = json\n"
                                                  f"admin_secret = {ADMIN_SECRET}\n")
    upstream, gunicorn = start_gunicorn(ini_path, workers=1,
                                        extra_args=("--worker-class", "gthread", "--threads", "4"))
    try:
        base_url, nginx = start_nginx(directory, upstream, client_max_body_size="64k")
    except BaseException:
        stop(gunicorn)
        shutil.rmtree(directory, ignore_errors=True)
        raise
    yield {"url": base_url, "upstream": upstream, "gunicorn": gunicorn, "nginx": nginx}
    stop(nginx)
    stop(gunicorn)
    shutil.rmtree(directory, ignore_errors=True)


def test_nginx_proxies_handshake_and_encrypted_pushes(proxied):
    assert_serves(proxied["url"])
    status, headers, _ = push(proxied["url"], "xml")
    assert status == 200 and headers.get("Server", "").startswith("nginx")


def test_nginx_and_wxgate_body_limits_are_aligned(proxied):
    query, _ = build_push(text_message("big"), timestamp=int(time.time()))
    url = f"{proxied['url']}/wechat?{query}"
    # One byte over: nginx refuses it before gunicorn sees it.
    status, headers, body = http("POST", url, b"<" * (MAX_BODY + 1), {"Content-Type": "text/xml"})
    assert status == 413 and b"nginx" in body
    # Exactly the limit: nginx lets it through and wxgate reads it (and refuses it as XML).
    status, _, body = http("POST", url, b"<" * MAX_BODY, {"Content-Type": "text/xml"})
    assert status == 400, body
    assert b"nginx" not in body
    # wxgate alone enforces the same limit (a proxy with a larger one would hit this).
    status, _, _ = http("POST", f"{proxied['upstream']}/wechat?{query}", b"<" * (MAX_BODY + 1),
                        {"Content-Type": "text/xml"})
    assert status == 413


def test_metrics_through_nginx_need_the_secret(proxied):
    """nginx connects from 127.0.0.1, but its X-Forwarded-For says the client is elsewhere."""
    # Give the scrape something real to render: a push, a -40002 refusal, a code-less 413.
    assert push(proxied["url"], "xml")[0] == 200
    query, _ = build_push(text_message("bad"), timestamp=int(time.time()))
    assert http("POST", f"{proxied['url']}/wechat?{query}", b"<")[0] == 400
    assert http("POST", f"{proxied['upstream']}/wechat?{query}", b"<" * (MAX_BODY + 1))[0] == 413
    status, headers, _ = http("GET", f"{proxied['url']}/_wxgate/metrics")
    assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
    status, _, body = http("GET", f"{proxied['url']}/_wxgate/metrics",
                           headers={"Authorization": f"Bearer {ADMIN_SECRET}"})
    assert status == 200, log_text(proxied["gunicorn"])[-3000:]
    assert b'code="-40002"' in body and b"wxgate_pushes_total{" in body
    status, _, body = http("GET", f"{proxied['upstream']}/_wxgate/metrics")
    assert status == 200, log_text(proxied["gunicorn"])[-3000:]
    assert b"wxgate_pushes_total{" in body
    # healthz stays open through the proxy.
    status, _, body = http("GET", f"{proxied['url']}/_wxgate/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_nginx_request_id_reaches_wxgate_json_log(proxied):
    status, headers, _ = push(proxied["url"], "json")
    assert status == 200
    request_id = headers["X-Request-Id"]
    assert len(request_id) == 32  # nginx's $request_id
    deadline = time.monotonic() + 5
    while True:
        records = [json.loads(line) for line in log_text(proxied["gunicorn"]).splitlines()
                   if line.startswith("{")]
        matching = [r for r in records if r.get("request_id") == request_id]
        if matching or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert matching, f"no JSON log line with request_id {request_id}: {records[-5:]}"
    assert matching[-1]["outcome"] == "handled" and matching[-1]["app"] == "test"
    assert TOKEN not in log_text(proxied["gunicorn"])  # logs never carry secrets
    assert ADMIN_SECRET not in log_text(proxied["gunicorn"])
