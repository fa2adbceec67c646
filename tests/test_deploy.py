"""Deployment, proven: wxgate under real servers on 127.0.0.1, configured as docs/deployment.md
says.

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
from fake_wechat import FakeWeChat
from readme import code_block
from serving import REPO, apache_binary, public_dir, require, start_apache, start_gunicorn, \
    start_nginx, stop

MAX_BODY = 65536  # max_body_bytes in the ini, client_max_body_size 64k, LimitRequestBody
ADMIN_SECRET = "deploy-admin-secret"
# The interpreter Debian's mod_wsgi embeds (libapache2-mod-wsgi-py3 links the system Python).
SYSTEM_PYTHON = "/usr/bin/python3"
DEPLOYMENT = "docs/deployment.md"  # the page whose recipes these tests run

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
    """``WXGATE_CONFIG=... gunicorn wxgate:application``, the deployment page's first recipe."""
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
    # wxgate's INFO lines reach Apache's error log, under mod_wsgi's [wsgi:error] tag (the
    # deployment page says so, and how to route them elsewhere).
    lines = [line for line in log.splitlines() if "push app=test type=text" in line]
    assert lines and all("[wsgi:error]" in line and " INFO wxgate: " in line for line in lines)


def test_apache_mod_wsgi_mounted_under_wechat_shared_hosting_layout(served_dir):
    """``WSGIScriptAlias /wechat .../passenger_wsgi.py``: SCRIPT_NAME=/wechat, and the ini's
    ``path = /wechat`` (and ``/wechat/shop`` below it) still match.

    The layout is the shared-hosting recipe, its entry file taken from docs/deployment.md: only
    ``wxgate.py`` copied into a directory beside the ini, and nothing else: no ``SetEnv``, no
    install, and no ``python-path`` (a host that puts nothing on ``sys.path``), so the entry
    file itself must make the copy importable.
    """
    _require_apache()
    site = served_dir / "site"
    site.mkdir(mode=0o755)
    site.chmod(0o755)
    # The copy says who it is on stderr (Apache's error log), so the test knows which
    # wxgate.py was served.
    source = (REPO / "wxgate.py").read_text("utf-8")
    (site / "wxgate.py").write_text(
        source + "\nprint('wxgate loaded from', __file__, file=sys.stderr, flush=True)\n",
        "utf-8")
    shop = ("\n[app:shop]\npath = /wechat/shop\nappid = wx0000000000000001\n"
            f"token = {TOKEN}\nmode = plain\nhandler = wxgate:demo_handler\n")
    write_ini(site, more=shop)
    script = site / "passenger_wsgi.py"
    script.write_text(code_block("# passenger_wsgi.py", page=DEPLOYMENT), "utf-8")
    for path in site.iterdir():
        path.chmod(0o644)
    base_url, process = start_apache(served_dir, None, mount="/wechat", script=script,
                                     python_path=None)
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
    assert "to path" not in log  # mod_wsgi added no python-path
    assert f"wxgate loaded from {site / 'wxgate.py'}" in log  # the copy was served


APPSECRET = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("how", ["envvars", "setenv"])
def test_apache_mod_wsgi_secrets_from_apaches_environment(served_dir, how):
    """``appsecret = ${WX_APPSECRET}`` under mod_wsgi, the deployment page's way: a root-only
    secrets file sourced by Apache's envvars (here, as apache2ctl does, by the shell that execs
    apache2) reaches the daemon's os.environ, so the token endpoint works. ``SetEnv`` alone
    does not: the app cannot start, and the log names the variable, not a value."""
    _require_apache()
    with FakeWeChat(APPID, APPSECRET) as wechat:
        ini_path = write_ini(served_dir, extra_gateway=f"api_base = {wechat.url}\n"
                                                       f"admin_secret = {ADMIN_SECRET}\n")
        with open(ini_path, "a", encoding="utf-8") as ini:
            ini.write("appsecret = ${WX_APPSECRET}\n")  # the [app:test] section is last
        secrets_env = served_dir / "secrets.env"
        secrets_env.write_text(f"WX_APPSECRET={APPSECRET}\n", "utf-8")
        secrets_env.chmod(0o600)  # root-only: read before Apache drops to www-data
        envvars, extra_conf = None, ""
        if how == "envvars":
            envvars = served_dir / "envvars"
            lines = [line for line in code_block("# as root", page=DEPLOYMENT).splitlines()
                     if line.startswith("set -a;")]
            assert len(lines) == 1
            envvars.write_text(lines[0].replace("/etc/wxgate/secrets.env", str(secrets_env))
                               + "\n", "utf-8")
        else:
            extra_conf = f"SetEnv WX_APPSECRET {APPSECRET}"
        base_url, process = start_apache(served_dir, ini_path, envvars=envvars,
                                         extra_conf=extra_conf)
        with serving(process):
            status, _, body = http("GET", f"{base_url}/_wxgate/token/test",
                                   headers={"Authorization": f"Bearer {ADMIN_SECRET}"})
            if how == "envvars":
                assert status == 200, body
                assert json.loads(body)["access_token"] == wechat.current_stable_token(APPID)
                assert_serves(base_url)
            else:
                assert status == 500
    log = log_text(process)
    assert APPSECRET not in log
    if how == "setenv":
        assert "cannot start" in log and "WX_APPSECRET" in log


def test_apache_mod_wsgi_log_routed_to_a_file(served_dir):
    """The deployment page's ``wxgate.wsgi`` entry file configures logging before importing
    wxgate: wxgate's lines go to that file, not to Apache's error log as ``[wsgi:error]``."""
    _require_apache()
    ini_path = write_ini(served_dir)
    logs = served_dir / "logs"
    logs.mkdir()
    if os.geteuid() == 0:  # the daemon runs as www-data (or nobody): let it write there
        import pwd
        from serving import _unprivileged_user
        entry = pwd.getpwnam(_unprivileged_user()[0])
        os.chown(logs, entry.pw_uid, entry.pw_gid)
    script = served_dir / "wxgate.wsgi"
    script.write_text(code_block("# /srv/wxgate/wxgate.wsgi", page=DEPLOYMENT).replace(
        "/var/log/wxgate/wxgate.log", str(logs / "wxgate.log")), "utf-8")
    script.chmod(0o644)
    base_url, process = start_apache(served_dir, ini_path, script=script)
    with serving(process):
        assert_serves(base_url)
    routed = (logs / "wxgate.log").read_text("utf-8")
    assert " INFO wxgate: push app=test type=text" in routed
    assert "push app=" not in log_text(process)


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
    # The nginx recipe's log_format puts the same id in nginx's access log: the two lines match.
    access_log = Path(proxied["nginx"].log_path).with_name("access.log")
    deadline = time.monotonic() + 5
    while f"rid={request_id}" not in access_log.read_text("utf-8") \
            and time.monotonic() < deadline:
        time.sleep(0.05)  # nginx writes the line after the response
    lines = [line for line in access_log.read_text("utf-8").splitlines()
             if line.endswith(f"rid={request_id}")]
    assert len(lines) == 1 and '"POST /wechat?' in lines[0] and " 200 " in lines[0], lines
    assert TOKEN not in log_text(proxied["gunicorn"])  # logs never carry secrets
    assert ADMIN_SECRET not in log_text(proxied["gunicorn"])
