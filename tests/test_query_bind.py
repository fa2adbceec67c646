"""When a signed query is bound to its body: only once what signs the body has passed.

WeChat's URL ``signature`` covers the token, timestamp and nonce, never the body; in safe and
compat modes ``msg_signature`` covers ``Encrypt``. Whoever sees a push's query before WeChat's
request arrives (a proxy's access log, a shared log pipeline) could send it first with a
garbage body: if that bound the query, the genuine push and all its retries would be refused.
"""

import logging

import pytest
import webtest

import wxgate
from conftest import Recorder, aes_encrypt, build_push, make_config, sha1_sign, text_message


def gateway_for(tmp_path, clock, handler, store=None, **kwargs):
    options = {"clock": clock}
    if store is not None:
        options["store"] = store
    app = wxgate.make_app(make_config(tmp_path, handler, **kwargs), **options)
    return app, webtest.TestApp(app, lint=True)


def post(testapp, query, body, status=200):
    return testapp.post(f"/wechat?{query}", body, content_type="text/xml", status=status)


def with_wrong_msg_signature(query):
    """The captured query with a msg_signature that is not WeChat's (a forger has no token)."""
    parts = dict(part.split("=", 1) for part in query.split("&"))
    parts["msg_signature"] = sha1_sign("notTheToken", parts["timestamp"], parts["nonce"], "x")
    return "&".join(f"{name}={value}" for name, value in parts.items())


# What a forger holding only the captured query can send first, and what it gets.
GARBAGE = {
    "not xml nor json": (b"garbage", 400),
    "empty": (b"", 400),
    "no Encrypt": (b"<xml><MsgType><![CDATA[text]]></MsgType></xml>", 400),
    "Encrypt of its own": (f"<xml><ToUserName>gh</ToUserName><Encrypt>"
                           f"{aes_encrypt('<xml><Content>forged</Content></xml>')}"
                           "</Encrypt></xml>".encode(), 403),
}


@pytest.mark.parametrize("mode", ["safe", "compat"])
@pytest.mark.parametrize("garbage", sorted(GARBAGE))
def test_a_captured_query_sent_first_with_garbage_cannot_block_the_push(
        tmp_path, clock, store_factory, mode, garbage):
    recorder = Recorder()
    app, testapp = gateway_for(tmp_path, clock, recorder, store=store_factory(), mode=mode)
    query, body = build_push(text_message("genuine", msg_id="1"), mode=mode)
    forged, status = GARBAGE[garbage]
    post(testapp, query, forged, status=status)
    # The genuine push, then WeChat's retries of it: one handled, the rest duplicates.
    assert post(testapp, query, body).body == b"success"
    for _ in range(2):
        assert post(testapp, query, body).body == b"success"
    assert [message["Content"] for message in recorder.messages] == ["genuine"]
    assert app.metrics.value("wxgate_query_reused_total", app="test") == 0
    assert app.metrics.value("wxgate_duplicates_total", app="test") == 2
    app.close()


@pytest.mark.parametrize("mode", ["safe", "compat"])
def test_a_wrong_msg_signature_binds_nothing(tmp_path, clock, mode):
    # The forger's body holds the genuine Encrypt, but its msg_signature is not WeChat's:
    # the same query with another msg_signature must not take the bind either.
    recorder = Recorder()
    app, testapp = gateway_for(tmp_path, clock, recorder, mode=mode)
    query, body = build_push(text_message("genuine", msg_id="2"), mode=mode)
    other = body.replace(b"<xml>", b"<xml> ", 1)
    post(testapp, with_wrong_msg_signature(query), other, status=403)
    assert post(testapp, query, body).body == b"success"
    assert recorder.calls == 1


@pytest.mark.parametrize("mode", ["safe", "compat"])
def test_once_verified_the_query_still_carries_no_other_body(tmp_path, clock, mode, caplog):
    recorder = Recorder()
    app, testapp = gateway_for(tmp_path, clock, recorder, mode=mode)
    query, body = build_push(text_message("genuine", msg_id="3"), mode=mode)
    assert post(testapp, query, body).body == b"success"
    with caplog.at_level(logging.WARNING, "wxgate"):
        post(testapp, query, body.replace(b"<xml>", b"<xml> ", 1), status=403)
    assert "reused with a different body" in caplog.text
    assert app.metrics.value("wxgate_query_reused_total", app="test") == 1


def test_plain_mode_binds_on_the_url_signature_as_before(tmp_path, clock):
    # A plain push has nothing but the URL signature: its first body binds the query, and
    # that is the plain mode's documented weakness (the README: use safe).
    recorder = Recorder()
    app, testapp = gateway_for(tmp_path, clock, recorder, mode="plain")
    query, body = build_push(text_message("genuine", msg_id="4"), mode="plain")
    post(testapp, query, b"garbage", status=400)
    post(testapp, query, body, status=403)
    assert recorder.calls == 0
