"""Refusals of requests that proved nothing are logged at a bounded rate, and counted exactly.

Anyone can send a forged push, a forged Cloud Hosting push or a wrong admin secret, and each
refusal made one WARNING line: 20,000 such requests wrote 18,000 lines. At most a few lines
per app and minute now go out, the next line says how many were held back, and
``wxgate_refused_total`` still counts every one. A refusal of a signed push (only WeChat, or
the one body a captured query can carry, gets that far) is logged every time.
"""

import logging
import urllib.parse

import pytest
import webtest

import wxgate
from conftest import (APPID, NOW, TOKEN, Recorder, build_push, load_ini, make_config, render,
                      sha1_sign, text_message)
from test_cloud import cloud_config

BURST, WINDOW = 10, 60.0  # lines per app, seconds: what the documentation promises


@pytest.fixture
def lines(caplog):
    """The refusal lines logged so far (WARNING, "refused")."""
    caplog.set_level(logging.INFO, logger="wxgate")
    return lambda: [record.getMessage() for record in caplog.records
                    if record.levelno == logging.WARNING and "refused" in record.getMessage()]


def forged(testapp, nonce, path="/wechat", status=403):
    query = f"signature={'0' * 40}&timestamp={NOW}&nonce={nonce}"
    return testapp.post(f"{path}?{query}", b"<xml/>", content_type="text/xml", status=status)


def refused(app, name="test", status=403, code=wxgate.VALIDATE_SIGNATURE_ERROR):
    return app.metrics.value("wxgate_refused_total", app=name, status=status, code=code)


def test_forged_pushes_are_counted_all_and_logged_a_few(tmp_path, clock, lines):
    app = wxgate.make_app(make_config(tmp_path, Recorder(), mode="plain"), clock=clock)
    testapp = webtest.TestApp(app, lint=True)
    for nonce in range(200):
        forged(testapp, nonce)
    assert refused(app) == 200
    logged = lines()
    assert len(logged) == BURST
    assert all("signature does not match" in line for line in logged)
    assert "counted in wxgate_refused_total, not logged" in logged[-1]
    # A window later the next refusal is logged, and says what was held back.
    clock.advance(WINDOW)
    forged(testapp, "later")
    assert len(lines()) == BURST + 1
    assert f"({200 - BURST} more refusals not logged)" in lines()[-1]
    assert refused(app) == 201
    # A genuine push is still answered.
    query, body = build_push(text_message(), mode="plain")
    testapp.post(f"/wechat?{query}", body, content_type="text/xml", status=200)


def test_a_flood_on_one_app_does_not_hide_another_apps_refusals(tmp_path, clock, lines):
    text = "\n".join([f"[app:{name}]\npath = /{name}\nappid = {APPID}\ntoken = {TOKEN}\n"
                      "mode = plain\nhandler = wxgate:demo_handler\n" for name in ("a", "b")])
    app = wxgate.make_app(load_ini(tmp_path / "two.ini", text), clock=clock)
    testapp = webtest.TestApp(app, lint=True)
    for nonce in range(50):
        forged(testapp, nonce, path="/a")
    forged(testapp, "b1", path="/b")
    assert sum(line.startswith("app=b ") for line in lines()) == 1
    assert refused(app, "a") == 50 and refused(app, "b") == 1


def test_every_handshake_and_query_refusal_counts(tmp_path, clock, lines):
    app = wxgate.make_app(make_config(tmp_path, Recorder(), mode="safe"), clock=clock)
    testapp = webtest.TestApp(app, lint=True)
    for nonce in range(30):
        testapp.get(f"/wechat?signature={'0' * 40}&timestamp={NOW}&nonce={nonce}&echostr=e",
                    status=403)
        testapp.post("/wechat?timestamp=x", b"", content_type="text/xml", status=400)
    assert refused(app) == 30
    assert refused(app, status=400, code="") == 30
    assert len(lines()) == BURST


def test_signed_pushes_refusals_are_all_logged(tmp_path, clock, lines):
    # Past the signature, each refusal is WeChat's push or a captured query's one body: the
    # operator must see each, however many forged ones came before.
    app = wxgate.make_app(make_config(tmp_path, Recorder(), mode="plain", fmt="json"),
                          clock=clock)
    testapp = webtest.TestApp(app, lint=True)
    for nonce in range(50):
        forged(testapp, nonce)
    for index in range(15):
        query, body = build_push(text_message(msg_id=str(index)), mode="plain", fmt="xml")
        testapp.post(f"/wechat?{query}", body, content_type="text/xml", status=415)
    assert sum("app expects json" in line for line in lines()) == 15
    assert app.metrics.value("wxgate_refused_total", app="test", status=415, code="") == 15


def test_sealed_refusals_are_all_logged(tmp_path, clock, lines):
    app = wxgate.make_app(make_config(tmp_path, Recorder(), mode="safe"), clock=clock)
    testapp = webtest.TestApp(app, lint=True)
    for nonce in range(50):  # safe mode reads the body before any signature: 400
        forged(testapp, nonce, status=400)
    encrypt = "!!!!" * 8  # msg_signature is valid, Base64 is not
    for index in range(15):
        nonce = f"sealed{index}"
        query = urllib.parse.urlencode({
            "signature": sha1_sign(TOKEN, str(NOW), nonce), "timestamp": NOW, "nonce": nonce,
            "encrypt_type": "aes", "msg_signature": sha1_sign(TOKEN, str(NOW), nonce, encrypt)})
        body = f"<xml><ToUserName>gh</ToUserName><Encrypt>{encrypt}</Encrypt></xml>"
        testapp.post(f"/wechat?{query}", body.encode(), content_type="text/xml", status=400)
    assert sum(wxgate.SEALED_REFUSAL in line for line in lines()) == 15


def test_forged_cloud_pushes_are_logged_a_few(tmp_path, clock, lines):
    app = wxgate.make_app(cloud_config(tmp_path, Recorder()), clock=clock)
    testapp = webtest.TestApp(app, lint=True)
    body = render(text_message(), "json").encode()
    for _ in range(100):
        testapp.post("/wechat", body, content_type="application/json", status=403)
    assert refused(app, "cloud", code="") == 100
    assert len(lines()) == BURST


def test_wrong_admin_secrets_are_logged_a_few(tmp_path, clock, lines):
    config = make_config(tmp_path, Recorder(), extra_gateway=f"admin_secret = {'a' * 32}")
    testapp = webtest.TestApp(wxgate.make_app(config, clock=clock), lint=True)
    for attempt in range(100):
        testapp.get("/_wxgate/token/test", headers={"Authorization": f"Bearer {attempt}"},
                    status=401)
    logged = [line for line in lines() if line.startswith("admin token request refused")]
    assert len(logged) == BURST
    clock.advance(WINDOW)
    testapp.get("/_wxgate/token/test", status=401)
    assert f"({100 - BURST} more refusals not logged)" in lines()[-1]


def test_line_limit_holds_back_past_the_burst_and_reports_it(clock):
    limit = wxgate._LineLimit(3, 60, clock)
    assert [limit.allow("a") for _ in range(5)] == [(0, False), (0, False), (0, True), None,
                                                   None]
    assert limit.allow("b") == (0, False)  # another key has its own window
    clock.advance(59.9)
    assert limit.allow("a") is None
    clock.advance(0.1)
    assert limit.allow("a") == (3, False)
    clock.advance(-3600)  # a clock set back starts a new window, not a stuck one
    assert limit.allow("a") == (0, False)
