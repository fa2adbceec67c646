"""Issue 15, the code points a newcomer met (5, 9, 10, 11, 12), through the real CLI.

Every test runs ``python -m wxgate`` as a subprocess against real servers on 127.0.0.1 (a
``wxgate serve``, the fake WeChat API, or a bare HTTP server answering a fixed status), and
asserts the behaviour issue 15 asks for; each failed before its fix (they were strict xfails).
Others pin what already worked and must keep working (e.g. ``wxgate serve`` still refuses a
missing secret). The last test is a bug found on the way: the README's ``except
wxgate.WeChatAPIError`` did not catch under ``python -m wxgate serve`` (two copies of wxgate).
"""

import contextlib
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import uuid

import pytest

from conftest import REPO, VECTORS, free_port
from fake_wechat import CUSTOM_SEND_PATH, DEFAULT_APPID, DEFAULT_SECRET, FakeWeChat
from test_cli import ADMIN_SECRET, AES_KEY, APPSECRET, SECRETS, TOKEN, app_section, \
    assert_failed, replies, wait_for_port, write_ini


def run(*args, env=None, timeout=30):
    return subprocess.run([sys.executable, "-m", "wxgate", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def environment(*unset, **extra):
    """This process's environment without the ``unset`` variables, plus ``extra``."""
    env = {name: value for name, value in os.environ.items() if name not in unset}
    env.update(extra)
    return env


@contextlib.contextmanager
def serving(source, port, *, env=None, launcher=("-m", "wxgate")):
    """``wxgate serve SOURCE`` (which must listen on ``port``); yields its stderr log's path.

    :param launcher: how Python starts wxgate (``-m wxgate``, as :func:`run` does).
    """
    log = source.with_name(f"serve-{port}.log")
    with open(log, "wb") as stderr:
        process = subprocess.Popen([sys.executable, *launcher, "serve", str(source)],
                                   cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for_port(port, process)
        yield log
    finally:
        process.kill()
        process.wait(10)


@contextlib.contextmanager
def answering(status):
    """A real HTTP server on loopback answering every GET and POST with ``status``, no body:
    what a proxy in front of the gateway, or a backend refusing wxgate, would send."""

    class Fixed(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_GET

        def log_message(self, format, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Fixed)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def output(result):
    return result.stdout + result.stderr


# -- point 5: commands that need only the token or key ----------------------------------------
# The systemd recipe keeps the secrets in the unit's EnvironmentFile, so a shell on the host has
# neither ${WX_APPSECRET} nor ${WXGATE_ADMIN_SECRET}.

ENV_SECRETS = {"WX_APPSECRET": APPSECRET, "WXGATE_ADMIN_SECRET": ADMIN_SECRET}
UNSET = [pytest.param(names, id="-".join(names) + "-unset")
         for names in (("WX_APPSECRET",), ("WXGATE_ADMIN_SECRET",),
                       ("WX_APPSECRET", "WXGATE_ADMIN_SECRET"))]


def without(*unset):
    """The environment with the ``unset`` secrets missing and the other ones set."""
    return environment(*unset, **{name: value for name, value in ENV_SECRETS.items()
                                  if name not in unset})


def env_ini(path, port=None, *, appid="wx2c2769f8efd9abc2", token=TOKEN, key=AES_KEY):
    """An ini whose AppSecret and admin secret come from the environment, as in the README."""
    listen = f"listen = 127.0.0.1:{port}\n" if port else ""
    return write_ini(path, gateway=f"{listen}admin_secret = ${{WXGATE_ADMIN_SECRET}}", apps=[
        app_section("main", appid=appid, token=token, key=key,
                    extra="appsecret = ${WX_APPSECRET}")])


@pytest.fixture(scope="module")
def env_served(tmp_path_factory):
    """A gateway started WITH both secrets in its environment, as systemd starts it."""
    directory = tmp_path_factory.mktemp("env_served")
    port = free_port()
    source = env_ini(directory / "wxgate.ini", port)
    with serving(source, port, env=environment(**ENV_SECRETS)):
        yield source


@pytest.mark.parametrize("unset", UNSET)
def test_handshake_without_the_unrelated_secrets(env_served, unset):
    result = run("handshake", env_served, env=without(*unset))
    assert result.returncode == 0, output(result)
    assert result.stdout.startswith("PASS"), output(result)


@pytest.mark.parametrize("unset", UNSET)
def test_push_without_the_unrelated_secrets(env_served, unset):
    result = run("push", env_served, "--text", "hi", env=without(*unset))
    assert result.returncode == 0, output(result)
    assert [(status, shown) for _, status, _, shown in replies(result.stdout)] == [
        (200, "'success'")]


DOC = next(case for case in VECTORS if case["id"] == "mp_doc_safe_push_json")


@pytest.mark.parametrize("unset", UNSET)
def test_decrypt_without_the_unrelated_secrets(tmp_path, unset):
    source = env_ini(tmp_path / "doc.ini", appid=DOC["appid"], token=DOC["token"],
                     key=DOC["encoding_aes_key"])
    result = run("decrypt", source, DOC["encrypt"], "--timestamp", DOC["timestamp"],
                 "--nonce", DOC["nonce"], "--msg-signature", DOC["msg_signature"],
                 env=without(*unset))
    assert result.returncode == 0, output(result)
    assert result.stdout == DOC["plaintext"] + "\n"
    assert "msg_signature ok" in result.stderr


@pytest.mark.parametrize("unset", UNSET)
def test_check_offline_without_the_secrets_says_which_are_unset(tmp_path, unset):
    result = run("check", env_ini(tmp_path / "wxgate.ini"), env=without(*unset))
    assert result.returncode == 0, output(result)
    assert "[app:main] /wechat" in result.stdout
    # It still tells the user what serve will need: each unset variable is named.
    for name in unset:
        assert name in output(result), output(result)


def test_sign_needs_no_config_and_no_secret():
    # sign takes the token on the command line and reads no ini: it already works anywhere.
    result = run("sign", TOKEN, "1714000000", "123", env=environment(*ENV_SECRETS))
    assert result.returncode == 0, output(result)
    assert re.fullmatch(r"[0-9a-f]{40}\n", result.stdout)


def test_token_still_refuses_without_the_appsecret(tmp_path):
    source = env_ini(tmp_path / "wxgate.ini")
    result = run("token", source, env=without("WX_APPSECRET"))
    assert_failed(result, str(source), "[app:main]", "appsecret:", "WX_APPSECRET")


@pytest.mark.parametrize("missing", sorted(ENV_SECRETS))
def test_serve_still_refuses_without_a_secret(tmp_path, missing):
    port = free_port()
    source = env_ini(tmp_path / "wxgate.ini", port)
    result = run("serve", source, env=without(missing), timeout=20)
    assert_failed(result, str(source), missing)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # it did not start serving


# -- point 9: serve's bind errors -------------------------------------------------------------


def assert_one_line_exit_2(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    for secret in SECRETS:
        assert secret not in result.stdout + result.stderr


@pytest.fixture
def occupied():
    """A loopback port some other program already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("where", ["--port", "listen"])
def test_serve_port_in_use_is_one_line(tmp_path, occupied, where):
    listen = f"listen = 127.0.0.1:{occupied}" if where == "listen" else ""
    source = write_ini(tmp_path / "wxgate.ini", gateway=listen, apps=[app_section("main")])
    args = ["--port", occupied] if where == "--port" else []
    assert_one_line_exit_2(run("serve", source, *args, timeout=20), str(occupied))


def test_serve_port_above_65535_is_one_line(tmp_path):
    source = write_ini(tmp_path / "wxgate.ini", apps=[app_section("main")])
    assert_one_line_exit_2(run("serve", source, "--port", "70000", timeout=20), "70000")


@pytest.mark.parametrize("where", ["--host", "listen"])
@pytest.mark.parametrize("host", ["203.0.113.1", "192.0.2.1"])  # TEST-NET: never ours
def test_serve_unassignable_host_is_one_line(tmp_path, where, host):
    listen = f"listen = {host}:{free_port()}" if where == "listen" else ""
    source = write_ini(tmp_path / "wxgate.ini", gateway=listen, apps=[app_section("main")])
    args = ["--host", host] if where == "--host" else []
    assert_one_line_exit_2(run("serve", source, *args, timeout=20), host)


# -- point 10: handshake as the console would do it --------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``wxgate serve`` of one app, with the demo handler, on plain http on loopback."""
    directory = tmp_path_factory.mktemp("served")
    port = free_port()
    source = write_ini(directory / "wxgate.ini", gateway=f"listen = 127.0.0.1:{port}",
                       apps=[app_section("main")])
    with serving(source, port):
        yield source, f"http://127.0.0.1:{port}/wechat"


def test_handshake_with_the_consoles_token_when_it_matches(served):
    source, url = served
    result = run("handshake", source, "--token", TOKEN)
    assert result.returncode == 0, output(result)
    assert result.stdout.startswith("PASS"), output(result)


def test_handshake_with_a_different_consoles_token_fails(served):
    source, url = served
    console = "consoleTokenValue9d2e"
    result = run("handshake", source, "--token", console)
    assert result.returncode == 1, output(result)
    text = output(result)
    assert "FAIL" in text and "403" in text
    assert "Traceback" not in result.stderr
    # The hint: the console's token (the one given) is not the one in the ini.
    assert "console" in text.lower(), text
    assert "ini" in text.lower() or "[app:main]" in text, text
    assert console not in text and TOKEN not in text


@pytest.mark.parametrize("status, hints", [
    (404, ("path", "/wechat")),  # the URL's path must be the ini's path
    (500, ("log",)),  # the server's own log says why
    (403, ("token", "clock")),  # the signature: the token, or a clock far off
])
def test_handshake_fail_hint_fits_the_status(tmp_path, status, hints):
    source = write_ini(tmp_path / "wxgate.ini", apps=[app_section("main")])
    with answering(status) as base:
        result = run("handshake", source, "--url", f"{base}/elsewhere")
    assert result.returncode == 1, output(result)
    text = output(result)
    assert "FAIL" in text and str(status) in text, text
    assert "Traceback" not in result.stderr
    for hint in hints:
        assert hint in text.lower(), (hint, text)
    assert TOKEN not in text


def test_handshake_pass_on_a_url_the_console_refuses_says_so(served):
    source, url = served
    result = run("handshake", source)
    assert result.returncode == 0, output(result)
    assert result.stdout.startswith("PASS"), output(result)
    # The note, outside the URL itself (whose random port might contain 443).
    note = output(result).replace(url, "<url>")
    assert "https" in note and "443" in note, note


# -- point 11: smaller messages ---------------------------------------------------------------


def test_decrypt_a_missing_file_says_no_such_file(tmp_path):
    source = write_ini(tmp_path / "wxgate.ini", apps=[app_section("main")])
    missing = tmp_path / "no" / "such" / "push.xml"
    result = run("decrypt", source, missing)
    assert result.returncode == 2, output(result)
    assert "no such file" in result.stderr.lower(), result.stderr
    assert str(missing) in result.stderr
    assert "Base64" not in result.stderr and "Traceback" not in result.stderr


def test_an_ini_starting_with_a_bom_loads(tmp_path):
    source = tmp_path / "bom.ini"
    source.write_bytes(b"\xef\xbb\xbf" + write_ini(
        tmp_path / "plain.ini", apps=[app_section("main")]).read_bytes())
    result = run("check", source)
    assert result.returncode == 0, output(result)
    assert "[app:main] /wechat" in result.stdout


@pytest.mark.parametrize("written, value", [
    pytest.param(f'"{TOKEN}"', TOKEN, id="double-quotes"),
    pytest.param(f"'{TOKEN}'", TOKEN, id="single-quotes"),
    pytest.param("cliToken SecretValue7f3a", "SecretValue7f3a", id="space-inside"),
    pytest.param("cliToken-SecretValue7f3a", "SecretValue7f3a", id="dash-inside"),
    pytest.param("cliTokenSecretValue7f3a0123456789", TOKEN, id="33-characters"),
    pytest.param("ab", None, id="2-characters"),
])
def test_a_token_wechat_would_not_take_is_refused(tmp_path, written, value):
    source = write_ini(tmp_path / "wxgate.ini", apps=[app_section("main", token=written)])
    result = run("check", source)
    lineno = source.read_text("utf-8").splitlines().index(f"token = {written}") + 1
    assert_failed(result, f"{source}:{lineno}", "[app:main]", "token:")
    if value is not None:  # never echo the token, or a part of it
        assert value not in output(result)


@pytest.mark.parametrize("written", [
    pytest.param(f'"{AES_KEY}"', id="double-quotes"),
    pytest.param(f"{AES_KEY[:20]} {AES_KEY[21:]}", id="space-inside"),
])
def test_an_encoding_aes_key_in_quotes_or_with_a_space_is_refused(tmp_path, written):
    # Already refused today (length or alphabet); kept so the token's fix keeps it so.
    source = write_ini(tmp_path / "wxgate.ini", apps=[app_section("main", key=written)])
    result = run("check", source)
    assert_failed(result, str(source), "[app:main]", "encoding_aes_key:")
    assert AES_KEY[21:] not in output(result)


FORWARD_SECRET = "fwdSecretValue5b8c1e"


@pytest.mark.parametrize("delivery", ["sync", "queue"])
def test_check_shows_the_forward_url_and_the_delivery_mode(tmp_path, delivery):
    forward = "http://hookuser:HookPassw0rdValue@127.0.0.1:9/wx/hook?sig=QuerySecretValue"
    source = write_ini(
        tmp_path / "wxgate.ini", gateway="store = sqlite://wxgate.db", apps=[app_section(
            "main", handler="", extra=f"forward = {forward}\nforward_secret = {FORWARD_SECRET}"
            f"\ndelivery = {delivery}")])
    result = run("check", source)
    assert result.returncode == 0, output(result)
    (line,) = [line for line in result.stdout.splitlines() if "[app:main]" in line]
    assert "http://***@127.0.0.1:9/wx/hook" in line, line
    assert re.search(rf"\b{delivery}\b", line), line
    for secret in ("HookPassw0rdValue", "QuerySecretValue", FORWARD_SECRET) + SECRETS:
        assert secret not in output(result)


def test_token_fetch_that_cannot_connect_names_the_url(tmp_path):
    port = free_port()  # nothing listens there
    source = write_ini(tmp_path / "wxgate.ini", gateway=f"api_base = http://127.0.0.1:{port}",
                       apps=[app_section("main", extra=f"appsecret = {APPSECRET}")])
    result = run("token", source)
    assert_failed(result, f"127.0.0.1:{port}/cgi-bin/stable_token")


HANDLER_SENDS = '''
ERRORS = {errors!r}


def handle(message):
    try:
        message.client.send_text(message["FromUserName"], "pong")
    # Any exception: the test reads whatever the send raised, expected or not.
    except Exception as exc:
        with open(ERRORS, "a", encoding="utf-8") as file:
            file.write(getattr(exc, "message", repr(exc)) + "\\n")
    return None
'''


def test_a_send_cut_by_the_push_window_does_not_blame_api_timeout(tmp_path):
    module = f"sends_{uuid.uuid4().hex[:12]}"
    errors = tmp_path / "errors.txt"
    (tmp_path / f"{module}.py").write_text(HANDLER_SENDS.format(errors=str(errors)), "utf-8")
    port = free_port()
    with FakeWeChat() as wechat:
        # api_timeout alone would wait 30 s: the push window (5 s) is what cuts the send.
        source = write_ini(
            tmp_path / "wxgate.ini",
            gateway=f"listen = 127.0.0.1:{port}\napi_base = {wechat.url}\napi_timeout = 30",
            apps=[app_section("main", appid=DEFAULT_APPID, handler=f"{module}:handle",
                              extra=f"appsecret = {DEFAULT_SECRET}")])
        wechat.hang(CUSTOM_SEND_PATH, 8)
        with serving(source, port) as log:
            result = run("push", source, "--text", "ping")
        served_log = log.read_text("utf-8")
    assert [status for _, status, _, _ in replies(result.stdout)] == [200], served_log
    (message,) = errors.read_text("utf-8").splitlines()
    assert "api_timeout" not in message, message
    assert "push window" in message, message


def test_a_forward_answering_401_logs_one_line_with_a_hint(tmp_path):
    port = free_port()
    with answering(401) as backend:
        source = write_ini(tmp_path / "wxgate.ini", gateway=f"listen = 127.0.0.1:{port}", apps=[
            app_section("main", handler="", extra=f"forward = {backend}/wx/hook\n"
                        f"forward_secret = {FORWARD_SECRET}")])
        with serving(source, port) as log:
            result = run("push", source, "--text", "hi")
            assert [status for _, status, _, _ in replies(result.stdout)] == [500], \
                output(result)
        text = log.read_text("utf-8")
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines()
             if re.search(r"\b401\b", line) and "outcome=" not in line]
    assert len(lines) == 1, text
    assert "forward_secret" in lines[0], lines[0]
    for secret in (FORWARD_SECRET,) + SECRETS:
        assert secret not in text


# -- point 12: a handler module that configures logging ---------------------------------------

HANDLER_LOGS = '''
import logging

logging.basicConfig({arguments})
log = logging.getLogger("userbot")
log.info("userbot imported")


def handle(message):
    log.info("userbot got %s", message["Content"])
    return None
'''


def serve_with_logging(tmp_path, arguments):
    """Serve a handler module calling ``logging.basicConfig(arguments)``; push once; return
    the server's stderr."""
    module = f"logs_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{module}.py").write_text(HANDLER_LOGS.format(arguments=arguments), "utf-8")
    port = free_port()
    source = write_ini(tmp_path / "wxgate.ini", gateway=f"listen = 127.0.0.1:{port}",
                       apps=[app_section("main", handler=f"{module}:handle")])
    with serving(source, port) as log:
        result = run("push", source, "--text", "marco")
        assert result.returncode == 0, output(result)
    return log.read_text("utf-8")


def assert_wxgate_lines_show(text):
    assert text.count("serving app main") == 1, text  # shown, and not twice
    assert len(re.findall(r"push app=main .*outcome=handled", text)) == 1, text


def test_basicconfig_at_info_shows_every_line(tmp_path):
    # Works today: the root logger at INFO passes wxgate's lines to the user's handler.
    text = serve_with_logging(tmp_path, "level=logging.INFO")
    assert_wxgate_lines_show(text)
    assert "userbot imported" in text and "userbot got marco" in text


def test_bare_basicconfig_shows_every_line(tmp_path):
    text = serve_with_logging(tmp_path, "")
    assert_wxgate_lines_show(text)
    # The common case just works: no level asked for, so serve's INFO applies to theirs too.
    assert "userbot imported" in text and "userbot got marco" in text


def test_basicconfig_at_warning_still_shows_wxgates_lines(tmp_path):
    text = serve_with_logging(tmp_path, "level=logging.WARNING")
    assert_wxgate_lines_show(text)
    # The user's explicit level wins for their own logger.
    assert "userbot imported" not in text and "userbot got marco" not in text


# -- found on the way: the README's handler pattern under `python -m wxgate serve` -------------
# The README's send() catches wxgate.WeChatAPIError. Started as `python -m wxgate` (or `python
# wxgate.py`), wxgate runs as __main__, and the handler's `import wxgate` loads a second copy:
# the client raises __main__.WeChatAPIError, which `except wxgate.WeChatAPIError` does not catch,
# so the push answers 500 and WeChat retries. The console script imports wxgate once.

HANDLER_README = '''
import wxgate


def handle(message):
    try:
        message.client.send_text(message.from_user, "pong")
    except (wxgate.WeChatAPIError, wxgate.WeChatConnectionError):
        pass  # the README's send(): log it, still answer success
    return None
'''


@pytest.mark.parametrize("launcher", [
    pytest.param(("-c", "import sys, wxgate; sys.exit(wxgate.main())"), id="console-script"),
    pytest.param(("-m", "wxgate"), id="python-m-wxgate"),
    pytest.param(("wxgate.py",), id="python-wxgate.py"),
])
def test_the_readmes_except_wechatapierror_catches_under_every_launcher(tmp_path, launcher):
    module = f"readme_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{module}.py").write_text(HANDLER_README, "utf-8")
    port = free_port()
    with FakeWeChat() as wechat:
        source = write_ini(
            tmp_path / "wxgate.ini",
            gateway=f"listen = 127.0.0.1:{port}\napi_base = {wechat.url}",
            apps=[app_section("main", appid=DEFAULT_APPID, handler=f"{module}:handle",
                              extra=f"appsecret = {DEFAULT_SECRET}")])
        wechat.fail_next(CUSTOM_SEND_PATH, 45015, "response out of time limit")
        with serving(source, port, launcher=launcher) as log:
            result = run("push", source, "--text", "late")
        served_log = log.read_text("utf-8")
    assert wechat.calls[CUSTOM_SEND_PATH] == 1  # the send was tried, and refused
    assert [(status, shown) for _, status, _, shown in replies(result.stdout)] == [
        (200, "'success'")], served_log
    assert "outcome=handled" in served_log and "Traceback" not in served_log
