"""No value from a request can write a log line of its own.

A pushed ``MsgType``, ``MsgId``, ``FromUserName`` or ``Event``, a header, a path or a query
value that holds a line break must not start a new line (a forged ``ERROR`` line, say) in
whatever handler and formatter the deployer has: every record's ``getMessage()`` is free of
CR and LF (and of the other characters log readers break lines on), in plain mode, cloud mode
and the queue, under WebTest, ``wxgate serve`` and gunicorn.
"""

import dataclasses
import http.client
import io
import logging
import re
import socket
import subprocess
import sys
import time
import urllib.parse

import pytest
import webtest

import wxgate
from conftest import (APPID, NOW, REPO, TOKEN, Recorder, build_push, event_message,
                      free_port, make_config, render, text_message)
from test_cloud import HEADERS, cloud_config

FORGED = "2099-01-01 00:00:00,000 ERROR wxgate: INJECTED"
# Every character a log reader may start a new line at.
BREAKS = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028",
          "\u2029"]
LINE_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


def hostile_text(break_="\n"):
    """A text push whose every logged field carries a forged line."""
    fields = text_message(msg_id=f"6054{break_}{FORGED}", FromUserName=f"o{break_}{FORGED}")
    fields["MsgType"] = f"text{break_}{FORGED}"
    return fields


def hostile_event(break_="\n"):
    """An event (no MsgId: its key is sender, time and event name) carrying forged lines."""
    return event_message(f"user_enter_tempsession{break_}{FORGED}",
                         FromUserName=f"o{break_}{FORGED}")


@pytest.fixture
def records():
    """Every record of the ``wxgate`` logger at DEBUG, whatever else is configured."""
    caught = []

    class Keep(logging.Handler):
        def emit(self, record):
            caught.append(record)

    wxgate_logger = logging.getLogger("wxgate")
    handler, level = Keep(logging.DEBUG), wxgate_logger.level
    wxgate_logger.addHandler(handler)
    wxgate_logger.setLevel(logging.DEBUG)
    yield caught
    wxgate_logger.removeHandler(handler)
    wxgate_logger.setLevel(level)


def assert_one_line_each(records, *, expect="INJECTED"):
    """No record's message breaks a line, in text or in JSON; and the value was logged."""
    assert records
    text, as_json = wxgate._TextFormatter(), wxgate._JSONFormatter()
    for record in records:
        message = record.getMessage()
        assert "\n" not in message and "\r" not in message, message
        assert len(message.splitlines()) == 1, message
        # The whole message on the line's first line; a traceback, if any, follows it.
        assert text.format(record).splitlines()[0].endswith(message)
        assert len(as_json.format(record).splitlines()) == 1
        for name in ("dedup_key", "msg_type"):  # a deployer's format may show the fields
            value = getattr(record, name, None)
            assert value is None or len(str(value).splitlines()) == 1, value
    if expect:
        assert any(expect in record.getMessage() for record in records)


# -- the helper -------------------------------------------------------------------------------


@pytest.mark.parametrize("break_", BREAKS + ["\x00", "\x1b[31m", "\x7f", "\x9b"],
                         ids=lambda text: repr(text))
def test_loggable_escapes_what_breaks_or_rewrites_a_line(break_):
    shown = wxgate._loggable(f"text{break_}{FORGED}")
    assert len(shown.splitlines()) == 1 and shown.isprintable()
    assert shown.startswith("text\\") and shown.endswith(FORGED)


@pytest.mark.parametrize("value", ["text", "收到 人工", "o_user-1", "", "a\\nb", None, 42,
                                   ["a\nb"]], ids=repr)
def test_loggable_leaves_the_rest_alone(value):
    assert wxgate._loggable(value) is value


# -- plain mode -------------------------------------------------------------------------------


def plain_gateway(tmp_path, clock, handler=None, **kwargs):
    app = wxgate.make_app(make_config(tmp_path, handler, mode="plain", **kwargs), clock=clock)
    return app, webtest.TestApp(app, lint=True)


def post_plain(testapp, fields, fmt, status=200, **headers):
    query, body = build_push(fields, mode="plain", fmt=fmt)
    return testapp.post(f"/wechat?{query}", body, content_type="text/xml", headers=headers,
                        status=status)


@pytest.mark.parametrize("fmt", ["xml", "json"])
@pytest.mark.parametrize("break_", ["\n", "\r\n", "\x85", "\u2028"], ids=repr)
def test_plain_pushes_log_one_line_each(tmp_path, clock, records, fmt, break_):
    if fmt == "xml" and "\r" in break_:
        pytest.skip("XML turns CR LF into LF (the \\n case)")
    # The demo handler logs the sender and the type too.
    app, testapp = plain_gateway(tmp_path, clock)
    post_plain(testapp, hostile_text(break_), fmt)
    post_plain(testapp, hostile_text(break_), fmt)  # a retry: outcome=duplicate
    post_plain(testapp, hostile_event(break_), fmt)
    outcomes = [record.getMessage() for record in records
                if record.getMessage().startswith("push ")]
    assert len(outcomes) == 3 and "outcome=duplicate" in outcomes[1]
    assert_one_line_each(records)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_handler_errors_log_one_line_each(tmp_path, clock, records, log_format):
    recorder = Recorder()
    recorder.fail = 2
    app, testapp = plain_gateway(tmp_path, clock, recorder,
                                 extra_gateway=f"log_format = {log_format}")
    post_plain(testapp, hostile_text(), "json", status=500)
    post_plain(testapp, hostile_event(), "json", status=500)
    raised = [record for record in records if "raised on" in record.getMessage()]
    assert len(raised) == 2
    assert_one_line_each(records)


def test_a_failing_backend_logs_one_line(tmp_path, clock, records):
    closed = f"http://127.0.0.1:{free_port()}/hook"
    config = make_config(tmp_path, mode="plain",
                         extra_app=f"forward = {closed}\nforward_secret = {'f' * 32}")
    config = dataclasses.replace(config, apps={name: dataclasses.replace(
        app, handler=None, handler_spec="") for name, app in config.apps.items()})
    testapp = webtest.TestApp(wxgate.make_app(config, clock=clock), lint=True)
    post_plain(testapp, hostile_text(), "json", status=500)
    assert any("delivery of" in record.getMessage() for record in records)
    assert_one_line_each(records)


def test_query_values_and_headers_log_one_line_each(tmp_path, clock, records):
    app, testapp = plain_gateway(tmp_path, clock, Recorder(),
                                 extra_gateway="log_format = json")
    query, body = build_push(text_message(), mode="plain")
    forged_query = query.replace(f"timestamp={NOW}",
                                 "timestamp=" + urllib.parse.quote(f"1\n{FORGED}"))
    testapp.post(f"/wechat?{forged_query}", body, content_type="text/xml", status=400)
    forged_query = query.replace("nonce=", "nonce=" + urllib.parse.quote(f"\n{FORGED}"))
    testapp.post(f"/wechat?{forged_query}", body, content_type="text/xml", status=403)
    post_plain(testapp, text_message(msg_id="rid"), "xml",
               **{"X-Request-Id": f"abc\x85{FORGED}"})
    assert_one_line_each(records, expect="2099")  # the refusal quotes 20 characters
    pushed = [record for record in records if record.getMessage().startswith("push ")]
    assert pushed[0].getMessage().endswith("rid=-")
    assert "INJECTED" not in pushed[0].request_id


def test_a_length_header_that_is_no_number_logs_one_line(tmp_path, clock, records):
    app, _ = plain_gateway(tmp_path, clock, Recorder())
    query, body = build_push(text_message(), mode="plain")
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/wechat", "QUERY_STRING": query,
               "CONTENT_LENGTH": f"12\r\n{FORGED}", "wsgi.input": io.BytesIO(body)}
    statuses = []
    app(environ, lambda status, headers: statuses.append(status))
    assert statuses == ["400 Bad Request"]
    assert_one_line_each(records, expect="2099")


def test_an_internal_error_logs_the_path_on_one_line(tmp_path, clock, records):
    # A server that hands over a header that is not a string is outside WSGI: the gateway's
    # own bug line then names the path, which the client chose.
    app, _ = plain_gateway(tmp_path, clock, Recorder(),
                           extra_gateway=f"admin_secret = {'a' * 32}")
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": f"/_wxgate/token/test\n{FORGED}",
               "QUERY_STRING": "", "HTTP_AUTHORIZATION": None, "wsgi.input": io.BytesIO()}
    statuses = []
    app(environ, lambda status, headers: statuses.append(status))
    assert statuses == ["500 Internal Server Error"]
    assert any("internal error on" in record.getMessage() for record in records)
    assert_one_line_each(records)


def test_message_repr_is_one_line():
    message = wxgate.Message(hostile_text(), app="a")
    assert len(repr(message).splitlines()) == 1 and "\n" not in repr(message)


# -- the queue --------------------------------------------------------------------------------


def test_queued_pushes_log_one_line_each(tmp_path, clock, records):
    recorder = Recorder()
    app, testapp = plain_gateway(
        tmp_path, clock, recorder, extra_app="delivery = queue",
        extra_gateway=f"store = sqlite://{tmp_path}/q.db\ndelivery_threads = 0")
    post_plain(testapp, hostile_text(), "json")
    post_plain(testapp, hostile_event(), "json")
    recorder.fail = 1
    worker = app.worker()
    while worker.run_once():
        pass
    clock.advance(3600)
    while worker.run_once():
        pass
    assert recorder.calls == 3  # one failed attempt, retried
    assert sum("attempt 1 failed" in record.getMessage() for record in records) == 1
    assert sum(record.getMessage().startswith("queue ") for record in records) == 2
    assert_one_line_each(records)
    app.close()


# -- cloud mode -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["xml", "json"])
def test_cloud_pushes_log_one_line_each(tmp_path, clock, records, fmt):
    content_type = "application/json" if fmt == "json" else "text/xml"
    (tmp_path / "demo").mkdir()
    (tmp_path / "failing").mkdir()
    demo = wxgate.make_app(cloud_config(tmp_path / "demo"), clock=clock)
    for fields in (hostile_text(), hostile_text(), hostile_event()):
        webtest.TestApp(demo, lint=True).post("/wechat", render(fields, fmt).encode(),
                                              content_type=content_type, headers=HEADERS)
    recorder = Recorder()
    recorder.fail = 1
    failing = wxgate.make_app(cloud_config(tmp_path / "failing", recorder), clock=clock)
    webtest.TestApp(failing, lint=True).post(
        "/wechat", render(hostile_text(), fmt).encode(), content_type=content_type,
        headers=HEADERS, status=500)
    assert sum("raised on" in record.getMessage() for record in records) == 1
    assert_one_line_each(records)
    demo.close()
    failing.close()


# -- real servers -----------------------------------------------------------------------------


def plain_ini(tmp_path, port):
    source = tmp_path / "plain.ini"
    source.write_text(f"[wxgate]\ntimestamp_window = 0\nlisten = 127.0.0.1:{port}\n"
                      f"[app:a]\npath = /wechat\nappid = {APPID}\ntoken = {TOKEN}\n"
                      "mode = plain\nhandler = wxgate:demo_handler\n", "utf-8")
    return source


def send(port, method, target, body=b"", headers=()):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        return connection.getresponse().status
    finally:
        connection.close()


def raw_request(port, line):
    """Send a request line as bytes, whatever http.client would allow; return the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(line + b"\r\nHost: x\r\n\r\n")
        return sock.recv(4096)


def wait_listening(process, port, log_path):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError("the server did not listen")


def hostile_requests(port):
    """A hostile push in each format, and request lines whose path holds a CR or a NEL."""
    for fields, fmt in ((hostile_text(), "json"), (hostile_text(), "xml"),
                        (hostile_event(), "json")):
        query, body = build_push(fields, mode="plain", fmt=fmt)
        assert send(port, "POST", f"/wechat?{query}", body,
                    [("Content-Type", "text/xml")]) == 200
    for line in (b"GET /wechat\rINJECTED HTTP/1.1", b"GET /wechat\x85INJECTED HTTP/1.1",
                 b"GET /wechat?x=\x85" + FORGED.encode() + b" HTTP/1.1"):
        raw_request(port, line)


def test_wxgate_serve_writes_one_line_per_record(tmp_path):
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "wxgate", "-v", "serve",
                                    str(plain_ini(tmp_path, port))], cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_listening(process, port, log_path)
        hostile_requests(port)
    finally:
        process.terminate()
        process.wait(10)
    text = log_path.read_text("utf-8")
    assert "INJECTED" in text and "outcome=handled" in text
    for line in text.splitlines():  # str.splitlines breaks at NEL and U+2028 as well
        assert LINE_START.match(line), line


def test_gunicorn_writes_one_line_per_record(tmp_path):
    from serving import start_gunicorn, stop
    source = plain_ini(tmp_path, free_port())
    base_url, process = start_gunicorn(source, workers=1)
    try:
        hostile_requests(int(base_url.rsplit(":", 1)[1]))
    finally:
        stop(process)
    text = process.log_path.read_text("utf-8")
    assert "outcome=handled" in text and "INJECTED" in text
    for line in text.splitlines():
        # gunicorn's own lines start with "[date]"; wxgate's with its date, never 2099's.
        assert line.startswith("[") or LINE_START.match(line), line
        assert not line.startswith("2099-01-01"), line
