"""The gateway tried as an attacker would: forged compat bodies, reused queries, a decryption
oracle, empty secrets, replays after the dedup window, descriptor leaks, passwords in URLs,
slow clients, and small leaks.
"""

import base64
import dataclasses
import http.client
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
import webtest
from Crypto.Cipher import AES

import wxgate
from backend import Backend
from conftest import (AES_KEY, APPID, NOW, OPENID, TOKEN, Recorder, build_push,
                      event_message, free_port, make_config, sha1_sign, text_message)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET_TEXT = "SECRETFRAGMENT"


def gateway_for(tmp_path, clock, handler, store=None, **kwargs):
    config = make_config(tmp_path, handler, **kwargs)
    options = {"clock": clock}
    if store is not None:
        options["store"] = store
    app = wxgate.make_app(config, **options)
    return app, webtest.TestApp(app, lint=True)


def post(testapp, query, body, status=200):
    return testapp.post(f"/wechat?{query}", body, content_type="text/xml", status=status)


def signed_query(nonce, timestamp=NOW, encrypt=None):
    """A query as WeChat signs it; with ``encrypt``, msg_signature too."""
    query = {"signature": sha1_sign(TOKEN, str(timestamp), nonce), "timestamp": str(timestamp),
             "nonce": nonce, "openid": OPENID}
    if encrypt is not None:
        query.update(encrypt_type="aes",
                     msg_signature=sha1_sign(TOKEN, str(timestamp), nonce, encrypt))
    return urllib.parse.urlencode(query)


# -- compat mode and the query-to-body bind ----------------------------------------------------


def test_compat_refuses_a_body_without_encrypt(tmp_path, clock):
    # The downgrade: a signed query from an access log, and a forged plaintext body.
    recorder = Recorder()
    _, testapp = gateway_for(tmp_path, clock, recorder, mode="compat")
    forged = event_message("user_enter_tempsession", SessionFrom="forged")
    response = post(testapp, *build_push(forged, mode="plain"), status=400)
    assert "compat mode refuses an unencrypted push" in response.text
    genuine = event_message("user_enter_tempsession", SessionFrom="genuine")
    assert post(testapp, *build_push(genuine, mode="compat")).body == b"success"
    assert [m["SessionFrom"] for m in recorder.messages] == ["genuine"]


def test_compat_push_without_msg_signature_is_refused(tmp_path, clock):
    recorder = Recorder()
    _, testapp = gateway_for(tmp_path, clock, recorder, mode="compat")
    query, body = build_push(text_message(), mode="compat")
    query = "&".join(p for p in query.split("&") if not p.startswith("msg_signature="))
    response = post(testapp, query, body, status=400)
    assert "msg_signature" in response.text and recorder.calls == 0


def test_forged_plain_body_cannot_claim_an_encrypted_pushs_key(tmp_path, clock, store_factory):
    # Mid-migration, one worker still has mode = plain (it reads clear fields) and another
    # compat; they share the store. A forged plain event with the victim's key must not make
    # the genuine encrypted event a "duplicate".
    plain_handler, compat_handler = Recorder(), Recorder()
    (tmp_path / "p").mkdir()
    (tmp_path / "c").mkdir()
    _, plain = gateway_for(tmp_path / "p", clock, plain_handler, mode="plain",
                           store=store_factory())
    _, compat = gateway_for(tmp_path / "c", clock, compat_handler, mode="compat",
                            store=store_factory())
    event = event_message("user_enter_tempsession", SessionFrom="x")
    assert post(plain, *build_push(event, mode="plain", nonce="1")).body == b"success"
    assert post(compat, *build_push(event, mode="compat", nonce="2")).body == b"success"
    assert plain_handler.calls == 1 and compat_handler.calls == 1
    assert compat_handler.messages[0].encrypted


@pytest.mark.parametrize("mode", ["plain", "compat", "safe"])
def test_one_signed_query_is_bound_to_one_body(tmp_path, clock, mode, caplog):
    recorder = Recorder()
    app, testapp = gateway_for(tmp_path, clock, recorder, mode=mode)
    query, body = build_push(text_message("real", msg_id="1"), mode=mode)
    assert post(testapp, query, body).body == b"success"
    if mode == "plain":
        _, other = build_push(text_message("forged", msg_id="2"), mode=mode)
    elif mode == "compat":  # same Encrypt, forged clear fields
        other = body.replace(b"real", b"forged", 1)
    else:  # same Encrypt, another envelope: still another body
        other = body.replace(b"<xml>", b"<xml> ", 1)
    assert other != body
    with caplog.at_level(logging.WARNING, "wxgate"):
        response = post(testapp, query, other, status=403)
    assert "reused with a different body" in response.text
    assert "reused with a different body" in caplog.text
    assert app.metrics.value("wxgate_query_reused_total", app="test") == 1
    # WeChat's retry resends the same bytes: a normal duplicate.
    with caplog.at_level(logging.INFO, "wxgate"):
        assert post(testapp, query, body).body == b"success"
    assert "outcome=duplicate" in caplog.text
    assert [m["Content"] for m in recorder.messages] == ["real"]


def test_query_bind_holds_across_workers(tmp_path, clock, store_factory):
    if store_factory.kind == "memory":
        pytest.skip("a memory store is one process's")
    recorder = Recorder()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, first = gateway_for(tmp_path / "a", clock, recorder, mode="plain", store=store_factory())
    _, second = gateway_for(tmp_path / "b", clock, recorder, mode="plain",
                            store=store_factory())
    query, body = build_push(text_message("real", msg_id="1"), mode="plain")
    post(first, query, body)
    _, forged = build_push(text_message("forged", msg_id="2"), mode="plain")
    post(second, query, forged, status=403)
    assert recorder.calls == 1


# -- no decryption oracle ----------------------------------------------------------------------

RAW_KEY = base64.b64decode(AES_KEY + "=")


def seal_raw(buffer):
    """AES-CBC over ``buffer`` as it is (the caller pads, or not)."""
    return base64.b64encode(AES.new(RAW_KEY, AES.MODE_CBC, RAW_KEY[:16]).encrypt(buffer)).decode()


def pad(buffer):
    count = 32 - len(buffer) % 32
    return buffer + bytes([count]) * count


def envelope(message, length=None, appid=APPID.encode()):
    length = len(message) if length is None else length
    return pad(b"0123456789abcdef" + struct.pack(">I", length) + message + appid)


SECRET_XML = f"<xml><Content>{SECRET_TEXT}</Content></xml>".encode()
ORACLE_PROBES = {
    "not base64": "!!!!" * 8,
    "length not a multiple of 32": base64.b64encode(b"x" * 48).decode(),
    "pad byte 0": seal_raw(b"a" * 63 + b"\x00"),
    "pad bytes differ": seal_raw(b"a" * 60 + b"\x01\x02\x03\x04"),
    "pad byte 33": seal_raw(b"a" * 63 + b"\x21"),
    "length past end": seal_raw(envelope(SECRET_XML, length=5000)),
    # A short length field turns the plaintext into the "appid" the old -40005 quoted.
    "appid mismatch quoting plaintext": seal_raw(envelope(SECRET_XML, length=0)),
    "wrong appid": seal_raw(envelope(SECRET_XML, appid=b"wxOTHER")),
    "not utf-8": seal_raw(envelope(b"\xff\xfe" + SECRET_TEXT.encode())),
    "neither xml nor json": seal_raw(envelope(SECRET_TEXT.encode())),
    "malformed xml": seal_raw(envelope(b"<xml><a>" + SECRET_TEXT.encode() + b"</xml>")),
    "xml app, json inside": seal_raw(envelope(b'{"Content": "' + SECRET_TEXT.encode() + b'"}')),
}


def test_every_failure_after_msg_signature_gets_one_answer(tmp_path, clock, caplog):
    recorder = Recorder()
    _, testapp = gateway_for(tmp_path, clock, recorder, fmt="xml")
    answers = {}
    for index, (name, encrypt) in enumerate(sorted(ORACLE_PROBES.items())):
        caplog.clear()
        body = f"<xml><ToUserName>gh</ToUserName><Encrypt>{encrypt}</Encrypt></xml>".encode()
        with caplog.at_level(logging.WARNING, "wxgate"):
            response = post(testapp, signed_query(str(index), encrypt=encrypt), body,
                            status="*")
        answers[name] = (response.status_int, response.body)
        assert "(WeChat -400" in caplog.text, name  # the log keeps the kind and the code
        assert SECRET_TEXT not in caplog.text, name
        assert "wxOTHER" not in caplog.text, name
    assert set(answers.values()) == {(400, wxgate.SEALED_REFUSAL.encode())}, answers
    assert recorder.calls == 0


def test_appid_mismatch_never_quotes_the_decrypted_bytes():
    encrypt = ORACLE_PROBES["appid mismatch quoting plaintext"]
    with pytest.raises(wxgate.DecryptError) as caught:
        wxgate.decrypt_message(encrypt, AES_KEY, APPID)
    assert caught.value.code == wxgate.VALIDATE_APPID_ERROR
    assert SECRET_TEXT not in str(caught.value) and "<xml>" not in str(caught.value)


# -- an empty ${VAR} ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "   "])
@pytest.mark.parametrize("section, option", [
    ("app", "token"), ("app", "appid"), ("app", "encoding_aes_key"), ("app", "appsecret"),
    ("app", "forward_secret"), ("wxgate", "admin_secret")])
def test_an_empty_variable_is_a_config_error(tmp_path, section, option, value):
    lines = {"wxgate": {"admin_secret": "s" * 32},
             "app": {"path": "/wechat", "appid": APPID, "token": TOKEN,
                     "encoding_aes_key": AES_KEY, "appsecret": "a" * 32,
                     "handler": "wxgate:demo_handler", "forward": "http://127.0.0.1:9/hook",
                     "forward_secret": "f" * 32}}
    lines[section][option] = "${WX_EMPTY}"
    text = "".join(f"[{'app:a' if name == 'app' else name}]\n" + "".join(
        f"{key} = {val}\n" for key, val in options.items()) for name, options in lines.items())
    source = tmp_path / "w.ini"
    source.write_text(text, "utf-8")
    with pytest.raises(wxgate.ConfigError) as caught:
        wxgate.load_config(source, environ={"WX_EMPTY": value})
    assert "WX_EMPTY" in str(caught.value) and "empty" in str(caught.value)
    assert caught.value.option == option


# -- replays after the dedup window; timestamps ahead of us ------------------------------------


def test_replay_after_dedup_ttl_inside_the_window_is_a_duplicate(tmp_path, clock, store_factory):
    recorder = Recorder()
    app, testapp = gateway_for(tmp_path, clock, recorder, store=store_factory(),
                               extra_gateway="dedup_ttl = 1\ntimestamp_window = 300")
    captured = build_push(text_message(msg_id="replayed"))
    post(testapp, *captured)
    if store_factory.kind == "redis":  # Redis expires keys on its own clock: ask it
        redis = app.store.primary._redis
        assert redis.pttl("wxgate:dedup:test:m:replayed") > 250_000
    clock.advance(200)  # dedup_ttl long gone, the timestamp still inside the window
    assert post(testapp, *captured).body == b"success"
    assert recorder.calls == 1


@pytest.mark.parametrize("ahead, status", [(60, 200), (61, 403), (299, 403)])
def test_a_timestamp_ahead_of_our_clock_is_bounded(tmp_path, clock, ahead, status):
    _, testapp = gateway_for(tmp_path, clock, Recorder())
    post(testapp, *build_push(text_message(), timestamp=NOW + ahead), status=status)


def test_window_zero_warns_at_start_and_in_check(tmp_path, clock, caplog, capsys):
    with caplog.at_level(logging.WARNING, "wxgate"):
        gateway_for(tmp_path, clock, Recorder(), extra_gateway="timestamp_window = 0")
    assert "timestamp_window = 0" in caplog.text
    assert wxgate.main(["check", str(tmp_path / "wxgate.ini")]) == 0
    assert "warning: timestamp_window = 0" in capsys.readouterr().out


# -- passwords in URLs -------------------------------------------------------------------------

REDACTION_TABLE = [
    ("redis://default:Pa/ssw0rd@host/0", "redis://***@host/0", "Pa/ssw0rd"),
    ("redis://:p@ss/w0rd@host:6379/0", "redis://***@host:6379/0", "p@ss/w0rd"),
    ("redis://user:p#ss@host:6379/1", "redis://***@host:6379/1", "p#ss"),
    ("redis://user:pa:ss@host/0", "redis://***@host/0", "pa:ss"),
    ("rediss://:a/b@c#d:e@redis.example:6380/0", "rediss://***@redis.example:6380/0",
     "a/b@c#d:e"),
    ("https://bob:s3cr/t@backend.example/hook?key=v", "https://***@backend.example/hook",
     "s3cr/t"),
    ("http://backend.example:8000/hook?token=abc#x", "http://backend.example:8000/hook", "abc"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0", None),
    ("unix://:pw/x@/run/redis.sock?db=0", "unix://***@/run/redis.sock", "pw/x"),
]


@pytest.mark.parametrize("url, shown, secret", REDACTION_TABLE,
                         ids=[row[0] for row in REDACTION_TABLE])
def test_redact_url_table(url, shown, secret):
    assert wxgate._redact_url(url) == shown
    if secret:
        assert secret not in wxgate._redact_url(url)


PASSWORD_URL = "redis://default:Pa/ssw0rd@127.0.0.1:1/0"
ENCODED_URL = "redis://default:Pa%2Fssw0rd@127.0.0.1:1/0"  # the form that loads


@pytest.mark.parametrize("url", [PASSWORD_URL, ENCODED_URL], ids=["raw", "percent-encoded"])
def test_check_and_token_never_print_a_store_password(tmp_path, capsys, url):
    pytest.importorskip("redis")
    source = tmp_path / "w.ini"
    source.write_text(f"[wxgate]\nstore = {url}\napi_base = https://u:Pa/ssw0rd@"
                      f"api.example\n[app:a]\npath = /wechat\nappid = {APPID}\nappsecret = x\n"
                      f"token = {TOKEN}\nmode = plain\nhandler = wxgate:demo_handler\n", "utf-8")
    wxgate.main(["check", str(source)])
    wxgate.main(["token", str(source)])
    out, err = capsys.readouterr()
    assert "ssw0rd" not in out + err and "default:Pa" not in out + err
    assert "redis://***@127.0.0.1:1/0" in out + err


@pytest.mark.parametrize("option, url", [("forward", "https://bob:Pa/ssw0rd@x y/"),
                                         ("api_base", "ftp://bob:Pa/ssw0rd@x/")])
def test_config_errors_for_urls_hide_the_password(tmp_path, option, url):
    source = tmp_path / "w.ini"
    gateway = f"api_base = {url}\n" if option == "api_base" else ""
    app = f"forward = {url}\nforward_secret = {'f' * 32}\n" if option == "forward" else ""
    source.write_text(f"[wxgate]\n{gateway}[app:a]\npath = /wechat\nappid = {APPID}\n"
                      f"token = {TOKEN}\nmode = plain\nhandler = wxgate:demo_handler\n{app}",
                      "utf-8")
    with pytest.raises(wxgate.ConfigError) as caught:
        wxgate.load_config(source, environ={})
    assert "Pa/ssw0rd" not in str(caught.value) and "***@" in str(caught.value)


def test_a_gateway_that_cannot_start_logs_no_password(tmp_path, monkeypatch, caplog):
    pytest.importorskip("redis")
    source = tmp_path / "w.ini"
    source.write_text(f"[wxgate]\nstore = {PASSWORD_URL}\n[app:a]\n"
                      f"path = /wechat\nappid = {APPID}\ntoken = {TOKEN}\nmode = plain\n"
                      "handler = wxgate:demo_handler\n", "utf-8")
    monkeypatch.setenv("WXGATE_CONFIG", str(source))
    application = wxgate._LazyApplication()
    with caplog.at_level(logging.DEBUG, "wxgate"):
        webtest.TestApp(application).get("/_wxgate/healthz", status="*")
    assert "cannot start" in caplog.text  # the raw password is refused at load
    assert "ssw0rd" not in caplog.text and "default:Pa" not in caplog.text


# -- `wxgate serve`: descriptors and slow clients ----------------------------------------------


@pytest.fixture
def serve(tmp_path):
    """Start ``wxgate serve`` on a sqlite store; yield ``(port, process)``."""
    processes = []

    def start(*extra):
        port = free_port()
        source = tmp_path / "serve.ini"
        source.write_text(f"[wxgate]\nstore = sqlite://{tmp_path}/w.db\nlisten = 127.0.0.1:"
                          f"{port}\n[app:a]\npath = /wechat\nappid = {APPID}\ntoken = {TOKEN}\n"
                          "mode = plain\nhandler = wxgate:demo_handler\n", "utf-8")
        with open(tmp_path / "serve.log", "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "wxgate", "serve", str(source),
                                        *extra], cwd=REPO, stdout=subprocess.DEVNULL,
                                       stderr=log)
        processes.append(process)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return port, process
            time.sleep(0.05)
        raise AssertionError("wxgate serve did not listen")

    yield start
    for process in processes:
        process.kill()
        process.wait(10)


def healthz(port):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/_wxgate/healthz")
        return connection.getresponse().status
    finally:
        connection.close()


def open_fds(process):
    return len(os.listdir(f"/proc/{process.pid}/fd"))


def plain_push(port, index):
    """One plain push over a fresh connection (so a fresh request thread); its status.

    A connection reset is tried again, as WeChat would: under a burst, `wxgate serve`'s listen
    backlog (socketserver's 5) may reset a connection before any thread of it sees it.
    """
    query, body = build_push(text_message(f"n{index}", msg_id=f"fd-{index}"), mode="plain",
                             timestamp=int(time.time()))
    for attempt in range(3):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("POST", f"/wechat?{query}", body, {"Content-Type": "text/xml"})
            return connection.getresponse().status
        except ConnectionResetError:
            if attempt == 2:
                raise
        finally:
            connection.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_sqlite_descriptors_stay_bounded_under_wxgate_serve(serve):
    # `wxgate serve` starts a thread per request. Each push below claims and records its key
    # in sqlite (healthz writes at most once a second, so pushes, not health checks, are what
    # use the store on every request). A connection tied to each request thread and never
    # closed would leak its 3 descriptors (db, -wal, -shm) per request: +180 here; a pool
    # that kept every connection it ever opened, 3 per request that ran at once.
    port, process = serve()
    for index in range(5):
        assert plain_push(port, index) == 200
    assert healthz(port) == 200
    before = open_fds(process)
    statuses = []

    def client(index):
        statuses.append(plain_push(port, index))

    for wave in range(6):  # 6 waves of 10 client threads at once: 60 requests
        threads = [threading.Thread(target=client, args=(1000 + 100 * wave + number,))
                   for number in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert statuses == [200] * 60
    assert healthz(port) == 200
    after = open_fds(process)
    print(f"wxgate serve descriptors: {before} before, {after} after 60 pushes")
    # A pool of at most 4 idle connections (3 descriptors each: db, -wal, -shm).
    assert after <= before + 16, (before, after)


def test_a_slow_body_cannot_hold_wxgate_serve(serve, tmp_path):
    port, process = serve("--read-timeout", "1")
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    query, body = build_push(text_message(), mode="plain", timestamp=int(time.time()))
    slow.sendall(f"POST /wechat?{query} HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\n"
                 f"Content-Length: 200\r\n\r\n".encode())
    closed = False
    for _ in range(200):  # a byte every 0.05 s: 10 s for the whole body
        try:
            slow.sendall(b"<")
            slow.settimeout(0.05)
            if slow.recv(4096) is not None:  # an answer, or b"" for a closed connection
                closed = True
                break
        except socket.timeout:
            continue
        except OSError:  # reset by the server
            closed = True
            break
    slow.close()
    assert closed, "wxgate serve kept reading a slow body for 10 s"
    # The server still serves.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("POST", f"/wechat?{query}", body, {"Content-Type": "text/xml"})
    assert connection.getresponse().status == 200
    assert process.poll() is None
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


# -- smaller leaks -----------------------------------------------------------------------------


def test_decrypt_on_a_non_utf8_file_is_one_line_and_exit_2(tmp_path):
    source = tmp_path / "w.ini"
    source.write_text(f"[app:a]\npath = /wechat\nappid = {APPID}\ntoken = {TOKEN}\n"
                      f"encoding_aes_key = {AES_KEY}\nhandler = wxgate:demo_handler\n", "utf-8")
    captured = tmp_path / "push.bin"
    captured.write_bytes(b"\xff\xfe\x00binary")
    result = subprocess.run([sys.executable, "-m", "wxgate", "decrypt", str(source),
                             str(captured)], cwd=REPO, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "not UTF-8" in result.stderr


def test_code_none_means_no_code():
    error = wxgate.MessageError("query is missing msg_signature", code=None)
    assert error.code is None and "(WeChat" not in str(error)
    assert wxgate.MessageError("bad").code == wxgate.PARSE_ERROR  # the class default stays


@pytest.mark.parametrize("case", ["missing msg_signature", "safe refuses plain", "415"])
def test_codeless_refusals_carry_no_wechat_code(tmp_path, clock, caplog, case):
    recorder = Recorder()
    app, testapp = gateway_for(tmp_path, clock, recorder, mode="safe",
                               fmt="json" if case == "415" else "auto")
    if case == "missing msg_signature":
        query, body = build_push(text_message())
        query = "&".join(p for p in query.split("&") if not p.startswith("msg_signature="))
        status = 400
    elif case == "safe refuses plain":
        query, body = build_push(text_message(), mode="plain")
        status = 400
    else:
        query, body = build_push(text_message(), fmt="xml")
        status = 415
    with caplog.at_level(logging.WARNING, "wxgate"):
        response = post(testapp, query, body, status=status)
    assert "WeChat" not in response.text and "-40002" not in caplog.text
    metrics = app.metrics.render()
    assert "-40002" not in metrics and f'code="",status="{status}"' in metrics


# -- secrets in a forward URL and in the command line's --url ----------------------------------

FORWARD_SECRET = "forward-secret-of-the-url-tests"
URL_SECRET = "Pa55w0rdInUrl"


@pytest.mark.parametrize("shape", ["query", "userinfo"])
def test_a_failing_forward_never_logs_its_url_secret(tmp_path, clock, caplog, shape):
    # `forward = https://backend/hook?key=...` is how many webhooks take their secret, and
    # _redact_url drops the query for that reason; the 500's log line when the backend fails
    # must not print the forward URL as written either.
    with Backend(FORWARD_SECRET) as backend:
        backend.status = 503  # the backend is down: the push answers 500 so WeChat retries
        split = urllib.parse.urlsplit(backend.url)
        if shape == "query":
            forward = f"{backend.url}?key={URL_SECRET}"
        else:
            forward = f"{split.scheme}://bob:{URL_SECRET}@{split.netloc}{split.path}"
        config = make_config(tmp_path, mode="plain", extra_app=(
            f"forward = {forward}\nforward_secret = {FORWARD_SECRET}"))
        apps = {name: dataclasses.replace(app, handler=None, handler_spec="")
                for name, app in config.apps.items()}
        app = wxgate.make_app(dataclasses.replace(config, apps=apps), clock=clock)
        testapp = webtest.TestApp(app, lint=True)
        with caplog.at_level(logging.DEBUG, "wxgate"):
            post(testapp, *build_push(text_message(), mode="plain"), status=500)
    assert "handler-error" in caplog.text
    assert URL_SECRET not in caplog.text


@pytest.mark.parametrize("command", ["handshake", "push"])
def test_cli_url_with_a_password_is_one_line_without_the_password(tmp_path, command):
    # `--url http://bob:PASSWORD@host/wechat` (no port): urllib raises http.client.InvalidURL
    # ("nonnumeric port: 'PASSWORD@host'"), which must not become a traceback on stderr
    # quoting the password.
    source = tmp_path / "w.ini"
    source.write_text(f"[app:a]\npath = /wechat\nappid = {APPID}\ntoken = {TOKEN}\n"
                      "mode = plain\nhandler = wxgate:demo_handler\n", "utf-8")
    url = f"http://bob:{URL_SECRET}@127.0.0.1/wechat"
    extra = ["--text", "hi"] if command == "push" else []
    result = subprocess.run([sys.executable, "-m", "wxgate", command, str(source), "--url", url,
                             *extra], cwd=REPO, capture_output=True, text=True, timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Traceback" not in output
    assert URL_SECRET not in output


# -- signed queries that are never bound to a body ---------------------------------------------


def forged_text():
    return text_message("forged", msg_id="forged-1")


def test_a_handshake_query_cannot_carry_a_forged_plain_push(tmp_path, clock):
    # The console's URL check is a GET with signature, timestamp and nonce, written to the
    # access log like every push. Its signature is exactly a plain push's: unless the
    # handshake binds its query too, for timestamp_window seconds that logged query carries
    # any forged body.
    recorder = Recorder()
    app = wxgate.make_app(make_config(tmp_path, recorder, mode="plain"), clock=clock)
    testapp = webtest.TestApp(app, lint=True)
    nonce, timestamp = "771234", str(NOW)
    query = urllib.parse.urlencode({"signature": sha1_sign(TOKEN, timestamp, nonce),
                                    "timestamp": timestamp, "nonce": nonce})
    assert testapp.get(f"/wechat?{query}&echostr=42").text == "42"
    _, body = build_push(forged_text(), mode="plain")
    post(testapp, f"{query}&openid={OPENID}", body, status=403)
    assert recorder.calls == 0


def test_going_back_to_plain_a_compat_query_cannot_carry_a_forged_body(tmp_path, clock,
                                                                        store_factory):
    # README, "Going back": the ini goes compat -> plain first, the console second. A compat
    # push's query holds a valid plain `signature` too (WeChat signs token, timestamp and
    # nonce in every mode); were it bound under msg_signature only, once the app runs
    # mode = plain that logged query would carry a forged plain body for the rest of its
    # window.
    if store_factory.kind == "memory":
        pytest.skip("a reload empties a memory store anyway")
    (tmp_path / "compat").mkdir()
    (tmp_path / "plain").mkdir()
    compat_handler, plain_handler = Recorder(), Recorder()
    compat = webtest.TestApp(wxgate.make_app(
        make_config(tmp_path / "compat", compat_handler, mode="compat"), clock=clock,
        store=store_factory()), lint=True)
    query, body = build_push(text_message("genuine", msg_id="g-1"), mode="compat")
    assert post(compat, query, body).body == b"success"
    # The reload to mode = plain, 30 s later: same app, same store.
    clock.advance(30)
    plain = webtest.TestApp(wxgate.make_app(
        make_config(tmp_path / "plain", plain_handler, mode="plain"), clock=clock,
        store=store_factory()), lint=True)
    _, forged = build_push(forged_text(), mode="plain")
    post(plain, query, forged, status=403)
    assert plain_handler.calls == 0


def test_a_genuine_plain_push_refused_before_the_bind_still_binds_its_query(tmp_path, clock):
    # Plain mode checks `signature`, reads the body, then refuses a format mismatch (415).
    # The genuine body is refused and its query is in the access log: were nothing bound,
    # the same query would then carry a forged body in the format the app wants. README:
    # "binds each signed query to the first body it arrives with".
    recorder = Recorder()
    app = wxgate.make_app(make_config(tmp_path, recorder, mode="plain", fmt="json"),
                          clock=clock)
    testapp = webtest.TestApp(app, lint=True)
    query, genuine = build_push(text_message("genuine"), mode="plain", fmt="xml")
    post(testapp, query, genuine, status=415)  # the console still says XML
    _, forged = build_push(forged_text(), mode="plain", fmt="json")
    testapp.post(f"/wechat?{query}", forged, content_type="application/json", status=403)
    assert recorder.calls == 0


# -- remembered until the window ends: the memory store's LRU ----------------------------------


def test_memory_store_sized_per_the_readme_still_remembers_until_the_window_ends(tmp_path,
                                                                                  clock):
    # README: keep dedup_size "well above the pushes of dedup_ttl seconds". Each push takes
    # two LRU entries (its query bind and its dedup record), so a store sized that way (here
    # 12 entries for 7 pushes) must still not evict the oldest push inside its window, or
    # its captured copy is handled again.
    recorder = Recorder()
    app = wxgate.make_app(make_config(tmp_path, recorder, mode="safe",
                                      extra_gateway="dedup_size = 12"), clock=clock)
    testapp = webtest.TestApp(app, lint=True)
    pushes = [build_push(text_message(f"m{index}", msg_id=f"lru-{index}"))
              for index in range(7)]
    for push in pushes:
        assert post(testapp, *push).body == b"success"
    clock.advance(60)  # the first push's timestamp is still well inside the window
    post(testapp, *pushes[0])
    assert recorder.calls == 7
