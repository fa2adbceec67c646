"""What wxgate takes from a forward backend's answer, tried against a real HTTP server.

A redirect is never followed (urllib would follow a 302 as a GET, carrying the push's
``X-Wxgate-*`` headers, and hand that server's answer to WeChat); an answer over the size
limit is the backend's error, logged once and never sent cut; a raw reply's Content-Type is
bounded; every reply goes out with ``X-Content-Type-Options: nosniff``.
"""

import dataclasses
import hashlib
import hmac
import http.server
import logging
import threading

import pytest
import webtest

import wxgate
from conftest import Recorder, build_push, make_config, text_message

SECRET = "forward-backend-secret-0123456789"
LIMIT = 1 << 20  # 1 MiB: what a backend may answer
RAW = {"X-Wxgate-Reply": "raw", "Content-Type": "text/plain; charset=utf-8"}


class Backend:
    """``POST /wechat`` answers :attr:`answer` to a request with wxgate's valid HMAC;
    ``/elsewhere`` (where a redirect points) counts every request it gets and answers a reply
    WeChat must never see."""

    def __init__(self):
        self.answer = (204, {}, b"")
        self.received = 0
        self.elsewhere = []
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.startswith("/elsewhere"):
                    return self.elsewhere()
                expected = hmac.new(SECRET.encode(), self.headers["X-Wxgate-Timestamp"]
                                    .encode() + raw, hashlib.sha256).hexdigest()
                assert hmac.compare_digest(expected, self.headers["X-Wxgate-Signature"])
                backend.received += 1
                status, headers, body = backend.answer
                self.send(status, headers, body)

            def do_GET(self):
                self.elsewhere()

            def elsewhere(self):
                backend.elsewhere.append((self.command, dict(self.headers)))
                self.send(200, dict(RAW), b"STOLEN")

            def send(self, status, headers, body):
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        # A query of the backend's own: wxgate must never log it.
        self.url = f"{self.base}/wechat?key=QUERYSECRET"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def backend():
    made = Backend()
    yield made
    made.close()


@pytest.fixture
def gateway(tmp_path, clock, backend):
    """A plain app that forwards to ``backend`` (and has no handler of its own)."""
    config = make_config(tmp_path, mode="plain",
                         extra_app=f"forward = {backend.url}\nforward_secret = {SECRET}")
    config = dataclasses.replace(config, apps={name: dataclasses.replace(
        app, handler=None, handler_spec="") for name, app in config.apps.items()})
    app = wxgate.make_app(config, clock=clock)
    yield app, webtest.TestApp(app, lint=True)
    app.close()


@pytest.fixture
def errors(caplog):
    caplog.set_level(logging.INFO, logger="wxgate")
    return lambda: [record.getMessage() for record in caplog.records
                    if record.levelno >= logging.WARNING]


def post(testapp, msg_id, status="*"):
    query, body = build_push(text_message(msg_id=msg_id), mode="plain")
    return testapp.post(f"/wechat?{query}", body, content_type="text/xml", status=status)


# -- redirects --------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_backend_error_never_followed(gateway, backend, errors, code):
    _, testapp = gateway
    backend.answer = (code, {"Location": f"{backend.base}/elsewhere?token=LOCATIONSECRET"},
                      b"")
    response = post(testapp, "redirected")
    assert response.status_int == 500 and response.body == b""
    assert backend.elsewhere == []  # nothing went to the redirect's target
    (line,) = errors()
    assert f"answered HTTP {code}" in line and "never follows" in line
    assert f"{backend.base}/wechat" in line  # the forward URL, redacted
    assert "QUERYSECRET" not in line and "LOCATIONSECRET" not in line
    # The backend, fixed, gets WeChat's retry: it was never told the push was handled.
    backend.answer = (204, {}, b"")
    assert post(testapp, "redirected").body == b"success"
    assert backend.received == 2


# -- size -------------------------------------------------------------------------------------


OVERSIZE = {
    "3 MiB raw": (RAW, b"a" * (3 << 20)),
    "raw cut inside a character": (RAW, b"a" * (LIMIT - 1) + "好".encode() + b"b"),
    "JSON over the limit": ({"Content-Type": "application/json"},
                            b'"' + b"a" * LIMIT + b'"'),
}


@pytest.mark.parametrize("case", sorted(OVERSIZE))
def test_an_answer_over_the_limit_is_an_error_logged_once(gateway, backend, errors, case):
    _, testapp = gateway
    headers, body = OVERSIZE[case]
    backend.answer = (200, headers, body)
    response = post(testapp, "big")
    # The backend's error, as any: 500 so that WeChat retries; never the first MiB.
    assert response.status_int == 500 and response.body == b""
    (line,) = errors()
    assert f"more than {LIMIT} bytes" in line and "never sent cut" in line
    assert "UTF-8" not in line and "not JSON" not in line


def test_an_answer_of_exactly_the_limit_is_sent_whole(gateway, backend):
    _, testapp = gateway
    body = "好".encode() * (LIMIT // 3) + b"a" * (LIMIT % 3)
    assert len(body) == LIMIT
    backend.answer = (200, RAW, body)
    response = post(testapp, "whole")
    assert response.status_int == 200 and response.body == body


# -- Content-Type -----------------------------------------------------------------------------


def test_a_content_type_over_256_characters_is_refused(gateway, backend, errors):
    _, testapp = gateway
    backend.answer = (200, {"X-Wxgate-Reply": "raw",
                            "Content-Type": "text/plain; x=" + "y" * 10000}, b"ok")
    response = post(testapp, "long-type")
    assert response.status_int == 500 and "Content-Type" not in response.headers.get(
        "Content-Type", "")
    (line,) = errors()
    assert "raw reply refused" in line and "over 256" in line
    assert len(line) < 1000  # the type itself is not quoted whole


def test_a_content_type_of_256_characters_is_passed_on(gateway, backend):
    _, testapp = gateway
    content_type = "text/plain; x=" + "y" * (256 - len("text/plain; x="))
    backend.answer = (200, {"X-Wxgate-Reply": "raw", "Content-Type": content_type}, b"ok")
    response = post(testapp, "type-256")
    assert response.status_int == 200 and response.headers["Content-Type"] == content_type


def test_raw_reply_refuses_a_long_content_type():
    with pytest.raises(ValueError, match="over 256"):
        wxgate.RawReply("ok", content_type="text/plain; x=" + "y" * 300)
    assert wxgate.RawReply("ok", "a/" + "b" * 254).content_type == "a/" + "b" * 254


# -- nosniff ----------------------------------------------------------------------------------


def test_raw_replies_carry_nosniff_and_so_do_their_retries(gateway, backend):
    _, testapp = gateway
    backend.answer = (200, {"X-Wxgate-Reply": "raw", "Content-Type": "text/html"},
                      b"<script>alert(1)</script>")
    first, retry = post(testapp, "html"), post(testapp, "html")
    for response in (first, retry):
        assert response.status_int == 200 and response.headers["Content-Type"] == "text/html"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert backend.received == 1


def test_a_handlers_raw_reply_carries_nosniff(tmp_path, clock):
    handler = Recorder(reply=wxgate.RawReply("<b>ok</b>", content_type="text/html"))
    app = wxgate.make_app(make_config(tmp_path, handler, mode="safe"), clock=clock)
    query, body = build_push(text_message())
    response = webtest.TestApp(app, lint=True).post(f"/wechat?{query}", body,
                                                    content_type="text/xml")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.body == b"<b>ok</b>"
