"""Replies sent exactly as given: ``wxgate.RawReply``, ``X-Wxgate-Reply: raw`` and a per-app
``dedup_ttl``.

Virtual payment pushes (``xpay_goods_deliver_notify`` ...) must be answered
``{"ErrCode":0,"ErrMsg":"success"}``, not encrypted even in safe mode, and are pushed again
for hours until they are.
https://developers.weixin.qq.com/minigame/dev/guide/open-ability/virtual-payment/message-push.md
"""

import dataclasses
import hashlib
import hmac
import http.server
import json
import logging
import threading

import pytest
import webtest

import wxgate
from conftest import (NOW, OPENID, Recorder, build_push, event_message, ini_text, make_config,
                      text_message)

MODES = ["plain", "compat", "safe"]
XPAY_OK = b'{"ErrCode":0,"ErrMsg":"success"}'
JSON_TYPE = "application/json; charset=utf-8"
SECRET = "raw-forward-secret"


def xpay_push(out_trade_no="wxg_20240425_0001", **extra):
    """A virtual-payment delivery push, with the fields XPAY-MG lists."""
    fields = event_message("xpay_goods_deliver_notify", OpenId=OPENID,
                           OutTradeNo=out_trade_no, Env=0,
                           WeChatPayInfo={"MchOrderNo": "mch_0001", "TransactionId": "4200001",
                                          "PaidTime": NOW},
                           GoodsInfo={"ProductId": "gold_100", "Quantity": 1,
                                      "OrigPrice": 600, "ActualPrice": 600, "Attach": ""})
    fields.update(extra)
    return fields


@pytest.fixture
def gateway(tmp_path, clock):
    made = []

    def factory(handler, **kwargs):
        kwargs.setdefault("extra_gateway", "timestamp_window = 0")
        app = wxgate.make_app(make_config(tmp_path, handler, **kwargs), clock=clock)
        made.append(app)
        return app, webtest.TestApp(app, lint=True)

    yield factory
    for app in made:
        app.close()


def post(testapp, fields, status=200, **options):
    query, body = build_push(fields, **options)
    return testapp.post(f"/wechat?{query}", body, content_type="text/xml", status=status)


# -- the handler's RawReply -----------------------------------------------------------------


def test_raw_reply_is_public():
    assert "RawReply" in wxgate.__all__


@pytest.mark.parametrize("body", [{"ErrCode": 0, "ErrMsg": "success"}, XPAY_OK.decode(),
                                  XPAY_OK], ids=["dict", "str", "bytes"])
def test_xpay_in_safe_json_is_answered_unencrypted(gateway, body):
    handler = Recorder(reply=lambda message: wxgate.RawReply(body))
    _, testapp = gateway(handler, mode="safe")
    response = post(testapp, xpay_push(), mode="safe", fmt="json")
    assert response.body == XPAY_OK
    assert response.headers["Content-Type"] == JSON_TYPE
    (message,) = handler.messages
    assert message.event == "xpay_goods_deliver_notify" and message.encrypted
    assert message["OutTradeNo"] == "wxg_20240425_0001"


@pytest.mark.parametrize("fmt", ["xml", "json"])
@pytest.mark.parametrize("mode", MODES)
def test_raw_reply_is_exact_in_every_mode(gateway, mode, fmt):
    body = "<xml><ok>1</ok></xml>]]>\n"  # not even well-formed: nothing may touch it
    handler = Recorder(reply=wxgate.RawReply(body, content_type="text/xml"))
    _, testapp = gateway(handler, mode=mode)
    response = post(testapp, text_message(), mode=mode, fmt=fmt)
    assert response.body == body.encode()
    assert response.headers["Content-Type"] == "text/xml"
    assert b"ToUserName" not in response.body and b"Encrypt" not in response.body


def test_dict_body_is_compact_utf8_json(gateway):
    handler = Recorder(reply=wxgate.RawReply({"result_code": 0, "result_info": "成功"}))
    _, testapp = gateway(handler, mode="safe")
    response = post(testapp, xpay_push(), fmt="json")
    assert response.body == '{"result_code":0,"result_info":"成功"}'.encode("utf-8")
    assert response.headers["Content-Type"] == JSON_TYPE


def test_a_duplicate_gets_the_same_raw_body(gateway):
    handler = Recorder(reply=wxgate.RawReply({"ErrCode": 0, "ErrMsg": "success"}))
    app, testapp = gateway(handler, mode="safe")
    first = post(testapp, xpay_push(), fmt="json")
    again = post(testapp, xpay_push(), fmt="json")
    assert first.body == again.body == XPAY_OK
    assert again.headers["Content-Type"] == JSON_TYPE
    assert handler.calls == 1
    assert app.metrics.value("wxgate_duplicates_total", app="test") == 1


def test_without_raw_reply_a_dict_is_still_filled_in_and_encrypted(gateway):
    # Without RawReply a dict is still a filled-in, encrypted reply.
    handler = Recorder(reply={"MsgType": "transfer_customer_service"})
    _, testapp = gateway(handler, mode="safe")
    response = post(testapp, text_message(), fmt="json")
    assert b"Encrypt" in response.body


@pytest.mark.parametrize("body, content_type, error", [
    (b"\xff\xfe", "text/plain", ValueError),
    ("\ud800", "text/plain", ValueError),
    (42, "text/plain", TypeError),
    (["ErrCode"], "text/plain", TypeError),
    ("ok", "text/plain\r\nSet-Cookie: x=1", ValueError),
    ("ok", "text/plain; 名", ValueError),
    ("ok", "", ValueError),
], ids=["not utf-8", "lone surrogate", "int", "list", "header split", "non-ascii type",
        "empty type"])
def test_raw_reply_refuses_what_it_cannot_send(body, content_type, error):
    with pytest.raises(error):
        wxgate.RawReply(body, content_type=content_type)


def test_raw_reply_keeps_the_bytes_given():
    reply = wxgate.RawReply(b'{"ErrCode":0}  \n', "application/json")
    assert reply.body == b'{"ErrCode":0}  \n' and reply.content_type == "application/json"
    assert "16 bytes" in repr(reply)


def test_a_queued_raw_reply_is_said_not_sent(tmp_path, clock, caplog):
    # delivery = queue answers success when the push is stored: the RawReply comes too late.
    caplog.set_level(logging.INFO, logger="wxgate")
    handler = Recorder(reply=wxgate.RawReply(XPAY_OK))
    config = make_config(tmp_path, handler, extra_app="delivery = queue",
                         extra_gateway=f"timestamp_window = 0\nstore = sqlite://{tmp_path}/q.db"
                         "\ndelivery_threads = 0")
    app = wxgate.make_app(config, clock=clock)
    testapp = webtest.TestApp(app, lint=True)
    for msg_id in ("1", "2"):
        assert post(testapp, xpay_push(MsgId=msg_id), fmt="json").body == b"success"
    worker = app.worker()
    while worker.run_once():
        pass
    assert handler.calls == 2
    said = [r.getMessage() for r in caplog.records if "RawReply" in r.getMessage()]
    assert len(said) == 1 and "delivery = sync" in said[0]
    app.close()


# -- a forward backend's X-Wxgate-Reply: raw ------------------------------------------------


class RawBackend:
    """A backend that checks wxgate's HMAC and answers with a chosen body and headers."""

    def __init__(self):
        self.received = []
        self.answer = (200, {"Content-Type": "application/json"}, XPAY_OK)
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                expected = hmac.new(SECRET.encode(), self.headers["X-Wxgate-Timestamp"]
                                    .encode() + raw, hashlib.sha256).hexdigest()
                assert hmac.compare_digest(expected, self.headers["X-Wxgate-Signature"])
                backend.received.append(json.loads(raw))
                status, headers, body = backend.answer
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/wechat"
        # A short poll interval: shutdown() waits for the serve loop (0.5 s by default).
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def raw_backend():
    backend = RawBackend()
    yield backend
    backend.close()


@pytest.fixture
def forward_gateway(tmp_path, clock):
    """``forward_gateway(backend, mode) -> (gateway, TestApp)``: forward only, no handler."""
    def factory(backend, mode="safe"):
        config = make_config(tmp_path, mode=mode, extra_gateway="timestamp_window = 0",
                             extra_app=f"forward = {backend.url}\nforward_secret = {SECRET}")
        apps = {name: dataclasses.replace(item, handler=None, handler_spec="")
                for name, item in config.apps.items()}
        app = wxgate.make_app(dataclasses.replace(config, apps=apps), clock=clock)
        return app, webtest.TestApp(app, lint=True)
    return factory


@pytest.mark.parametrize("mode", MODES)
def test_backend_raw_json_passes_through_exactly(forward_gateway, raw_backend, mode):
    raw_backend.answer = (200, {"Content-Type": "application/json", "X-Wxgate-Reply": "raw"},
                          XPAY_OK)
    app, testapp = forward_gateway(raw_backend, mode)
    response = post(testapp, xpay_push(), mode=mode, fmt="json")
    assert response.body == XPAY_OK
    assert response.headers["Content-Type"] == "application/json"
    assert raw_backend.received[0]["message"]["OutTradeNo"] == "wxg_20240425_0001"
    app.close()


def test_backend_raw_body_need_not_be_json(forward_gateway, raw_backend):
    raw_backend.answer = (200, {"Content-Type": "text/plain; charset=utf-8",
                                "X-Wxgate-Reply": "raw"}, "已收到 ok".encode())
    app, testapp = forward_gateway(raw_backend)
    response = post(testapp, text_message(), fmt="xml")
    assert response.body == "已收到 ok".encode()
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    app.close()


def test_backend_raw_reply_duplicate_gets_the_same_body(forward_gateway, raw_backend):
    raw_backend.answer = (200, {"Content-Type": "application/json", "X-Wxgate-Reply": "raw"},
                          XPAY_OK)
    app, testapp = forward_gateway(raw_backend)
    bodies = [post(testapp, xpay_push(), fmt="json") for _ in range(3)]
    assert {(r.body, r.headers["Content-Type"]) for r in bodies} == \
        {(XPAY_OK, "application/json")}
    assert len(raw_backend.received) == 1
    app.close()


def test_backend_without_the_header_keeps_the_old_contract(forward_gateway, raw_backend):
    # A non-JSON body without X-Wxgate-Reply: raw is still a failed delivery (500, retried).
    raw_backend.answer = (200, {"Content-Type": "text/plain"}, b"ok")
    app, testapp = forward_gateway(raw_backend)
    post(testapp, text_message(), fmt="xml", status=500)
    app.close()


def test_backend_raw_body_not_utf8_is_a_failed_delivery(forward_gateway, raw_backend):
    raw_backend.answer = (200, {"Content-Type": "application/octet-stream",
                                "X-Wxgate-Reply": "raw"}, b"\xff\x00")
    app, testapp = forward_gateway(raw_backend)
    post(testapp, text_message(), fmt="xml", status=500)
    raw_backend.answer = (200, {"X-Wxgate-Reply": "RAW"}, XPAY_OK)
    response = post(testapp, text_message(msg_id="2"), fmt="xml")
    assert response.body == XPAY_OK
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    app.close()


# -- per-app dedup_ttl -----------------------------------------------------------------------

# WeChat's retry schedule for an unacknowledged virtual-payment push.
# https://developers.weixin.qq.com/minigame/introduction/commercialization/virtual-payment/goods.html
XPAY_RETRIES = (15, 15, 30, 180, 600, 1200, 1800, 1800, 1800, 3600, 10800, 10800, 10800,
                21600, 21600)


def test_app_dedup_ttl_outlives_the_gateway_default(gateway, clock):
    handler = Recorder(reply=wxgate.RawReply(XPAY_OK))
    # The schedule adds up to 24 h 4 min: a day is not quite enough, two days are.
    assert 86400 < sum(XPAY_RETRIES) < 172800
    _, testapp = gateway(handler, extra_gateway="timestamp_window = 0\ndedup_ttl = 300",
                         extra_app="dedup_ttl = 172800")
    assert post(testapp, xpay_push(), fmt="json").body == XPAY_OK
    for delay in XPAY_RETRIES:  # a retry that crossed our answer, hours later
        clock.advance(delay)
        assert post(testapp, xpay_push(), fmt="json").body == XPAY_OK
    assert handler.calls == 1


def test_without_the_app_option_the_gateway_window_applies(gateway, clock):
    handler = Recorder(reply=wxgate.RawReply(XPAY_OK))
    _, testapp = gateway(handler, extra_gateway="timestamp_window = 0\ndedup_ttl = 300")
    post(testapp, xpay_push(), fmt="json")
    clock.advance(301)
    post(testapp, xpay_push(), fmt="json")
    assert handler.calls == 2  # why the handler must be idempotent on OutTradeNo


def test_app_dedup_ttl_applies_to_the_queue_marker(tmp_path, clock):
    config = make_config(tmp_path, Recorder(), extra_app="dedup_ttl = 86400\ndelivery = queue",
                         extra_gateway=f"timestamp_window = 0\ndedup_ttl = 300\n"
                         f"store = sqlite://{tmp_path}/q.db\ndelivery_threads = 0")
    app = wxgate.make_app(config, clock=clock)
    testapp = webtest.TestApp(app, lint=True)
    post(testapp, xpay_push(), fmt="json")
    clock.advance(3600)
    post(testapp, xpay_push(), fmt="json")
    assert app.queue.stats(clock())["pending"] == 1
    app.close()


@pytest.mark.parametrize("value", ["0", "soon"])
def test_app_dedup_ttl_is_checked(tmp_path, value):
    source = tmp_path / "bad.ini"
    source.write_text(ini_text(extra_app=f"dedup_ttl = {value}"), "utf-8")
    with pytest.raises(wxgate.ConfigError) as caught:
        wxgate.load_config(source, environ={})
    assert caught.value.option == "dedup_ttl" and caught.value.section == "app:test"


# -- RawReply in cloud mode ------------------------------------------


CLOUD_INI = ("[wxgate]\ntimestamp_window = 0\n[app:cloud]\npath = /\n"
             "appid = wxb1a2c3d4e5f60718\nmode = cloud\nhandler = wxgate:demo_handler\n")


def test_raw_reply_in_cloud_mode(tmp_path, clock):
    source = tmp_path / "cloud.ini"
    source.write_text(CLOUD_INI, "utf-8")
    config = wxgate.load_config(source, environ={})
    handler = Recorder(reply=wxgate.RawReply({"ErrCode": 0, "ErrMsg": "success"}))
    config = dataclasses.replace(config, apps={"cloud": dataclasses.replace(
        config.apps["cloud"], handler=handler, handler_spec="test:handler")})
    app = wxgate.make_app(config, clock=clock)
    body = json.dumps(xpay_push()).encode()
    response = webtest.TestApp(app, lint=True).post(
        "/", body, content_type="application/json", headers={"X-WX-SOURCE": "wechat"})
    assert response.body == XPAY_OK and handler.calls == 1
    app.close()
