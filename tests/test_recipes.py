"""The documentation's code, run as written: the forwarding backends and the handler examples.

Each block is taken from its page (``tests/readme.py``), not copied here, so the pages cannot
drift from what passes:

- the Python and Node.js forwarding backends, each started as its own process on loopback and
  fed wxgate's real signed forwards (fresh and stale) and hostile requests (no headers, a
  forged signature, a non-numeric timestamp, a signed body that is not JSON in UTF-8, a body
  promised and never sent), each still serving afterwards, and started without the secret
  (refused, in one line); the Node one needs ``node`` (skipped, saying why, when it is
  missing; a failure under CI);
- the README's ``shopbot.py`` handler, against the fake WeChat API: a send that fails (45015)
  or times out is logged, and WeChat still gets ``success`` (a 500 would make it retry and
  re-send);
- the Cloud Hosting page's ini and ``bot.py``, against a fake 开放接口服务 sidecar;
- the payments page's ``paybot.py`` and its ini: WeChat's late retries deliver an order once.
"""

import hashlib
import hmac
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import webtest

import wxgate
from conftest import APPID, OPENID, TOKEN, AES_KEY, build_push, free_port, text_message
from fake_wechat import CUSTOM_SEND_PATH, FakeWeChat
from readme import code_block
from serving import require

FORWARD_SECRET = "recipe-forward-secret-0123456789"
APPSECRET = "0123456789abcdef0123456789abcdef"
BACKEND = "docs/backend.md"  # the pages whose recipes run here
HANDLERS = "docs/handlers.md"
CLOUD = "docs/cloud-hosting.md"
PAYMENTS = "docs/payments.md"


# -- the forwarding backends -----------------------------------------------------------------


def _backend_command(kind, tmp_path):
    """Write the backend page's backend to a file; return the command that runs it."""
    if kind == "node":
        node = shutil.which("node") or shutil.which("nodejs")
        require(node, "node is not installed (apt-get install nodejs): the Node.js backend "
                      "of docs/backend.md cannot be run")
        script, command = tmp_path / "backend.js", [node]
        script.write_text(code_block("// backend.js", page=BACKEND), "utf-8")
    else:
        script, command = tmp_path / "backend.py", [sys.executable]
        script.write_text(code_block("# backend.py", page=BACKEND), "utf-8")
    return [*command, str(script)]


def _start_backend(kind, tmp_path):
    """Run the backend page's backend; return ``(url, process)``."""
    port = free_port()
    log = open(tmp_path / f"{kind}.log", "wb")
    process = subprocess.Popen(
        _backend_command(kind, tmp_path), cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log,
        stderr=subprocess.STDOUT,
        env={"PATH": os.environ.get("PATH", ""), "PORT": str(port),
             "WXGATE_FORWARD_SECRET": FORWARD_SECRET})
    log.close()
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return f"http://127.0.0.1:{port}/wechat", process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                pytest.fail(f"the {kind} backend did not start:\n"
                            + (tmp_path / f"{kind}.log").read_text("utf-8", "replace"))
            time.sleep(0.05)


@pytest.fixture(params=["python", "node"])
def backend(request, tmp_path):
    url, process = _start_backend(request.param, tmp_path)
    yield url
    process.kill()
    process.wait()


def _gateway(tmp_path, url, **options):
    ini = tmp_path / "forward.ini"
    ini.write_text(f"""\
[app:shop]
path = /wechat
appid = {APPID}
token = {TOKEN}
encoding_aes_key = {AES_KEY}
mode = safe
forward = {url}
forward_secret = {FORWARD_SECRET}
forward_timeout = 5
""", "utf-8")
    return webtest.TestApp(wxgate.make_app(str(ini), **options), lint=True)


def _push(testapp, now, msg_id):
    query, body = build_push(text_message("hello", msg_id=str(msg_id)), timestamp=int(now))
    return testapp.post(f"/wechat?{query}", body, expect_errors=True)


def _raw(url, headers, body=b""):
    """One HTTP/1.0 request written by hand (no header added for us); the status, or None
    when the backend closed the connection without answering (it crashed on the request)."""
    port = int(url.split(":")[2].split("/")[0])
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"POST /wechat HTTP/1.0\r\nHost: 127.0.0.1\r\n{lines}\r\n".encode("latin-1")
                     + body)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    return int(answer.split()[1]) if answer.startswith(b"HTTP/") else None


def test_backend_accepts_a_fresh_forward(backend, tmp_path):
    """wxgate's own forward, signed now: the backend's 204 becomes WeChat's ``success``."""
    answer = _push(_gateway(tmp_path, backend), time.time(), 6054768590064713001)
    assert (answer.status_int, answer.body) == (200, b"success")


def test_backend_rejects_a_stale_forward(backend, tmp_path):
    """A validly signed forward 1000 s old (wxgate's clock behind): 401, so wxgate answers
    500 and WeChat would retry."""
    past = time.time() - 1000
    answer = _push(_gateway(tmp_path, backend, clock=lambda: past), past, 6054768590064713002)
    assert answer.status_int == 500
    # The same backend still takes a fresh one: the refusal was the timestamp, not the secret.
    answer = _push(_gateway(tmp_path, backend), time.time(), 6054768590064713003)
    assert (answer.status_int, answer.body) == (200, b"success")


def test_backend_refuses_hostile_requests_and_keeps_serving(backend, tmp_path):
    body = b'{"app":"shop","dedup_key":"k","format":"xml","message":{}}'
    now = str(int(time.time()))
    good = hmac.new(FORWARD_SECRET.encode(), now.encode() + body, hashlib.sha256).hexdigest()
    length = {"Content-Length": str(len(body))}
    assert _raw(backend, {}) == 400  # no X-Wxgate-* headers, no body
    assert _raw(backend, length, body) == 400  # a body, but no headers
    assert _raw(backend, {**length, "X-Wxgate-Timestamp": now,
                          "X-Wxgate-Signature": "0" * 64}, body) == 401  # forged
    assert _raw(backend, {**length, "X-Wxgate-Timestamp": now,
                          "X-Wxgate-Signature": good[:-1]}, body) == 401  # truncated
    assert _raw(backend, {**length, "X-Wxgate-Timestamp": "soon",
                          "X-Wxgate-Signature": good}, body) == 400  # not a timestamp
    assert _raw(backend, {**length, "X-Wxgate-Timestamp": now,
                          "X-Wxgate-Signature": good}, body) == 204  # the genuine article
    answer = _push(_gateway(tmp_path, backend), time.time(), 6054768590064713004)
    assert (answer.status_int, answer.body) == (200, b"success")


def _signed(body, *, secret=FORWARD_SECRET):
    """The headers wxgate sends with ``body``, signed now as wxgate signs a forward: hex
    HMAC-SHA256 of the timestamp's ASCII digits followed by the raw body."""
    now = str(int(time.time()))
    signature = hmac.new(secret.encode("utf-8"), now.encode("ascii") + body,
                         hashlib.sha256).hexdigest()
    return {"Content-Length": str(len(body)), "Content-Type": "application/json; charset=utf-8",
            "X-Wxgate-Timestamp": now, "X-Wxgate-Signature": signature}


@pytest.mark.parametrize("body", [b"<xml>not json</xml>", b'{"app":"shop","message":{',
                                  b'{"app":"sh\xffop"}', "{}".encode("utf-16")],
                         ids=["not-json", "cut-short", "not-utf8", "utf16"])
def test_backend_answers_400_to_a_signed_body_that_is_not_json_and_keeps_serving(
        backend, tmp_path, body):
    """Only a holder of forward_secret can get this far, but a bug on that side must cost
    one 400, not a dropped connection (Python) or the whole process (Node)."""
    assert _raw(backend, _signed(body), body) == 400
    assert _raw(backend, _signed(body), body) == 400  # the same process, still there
    answer = _push(_gateway(tmp_path, backend), time.time(), 6054768590064713005)
    assert (answer.status_int, answer.body) == (200, b"success")


def test_backend_keeps_serving_while_a_client_stalls_mid_body(backend, tmp_path):
    """Anyone who reaches the port can promise a body and never send it: that request waits,
    the others do not (a single-threaded Python server would hang on it for ever)."""
    port = int(backend.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as stalled:
        stalled.sendall(b"POST /wechat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n"
                        b"X-Wxgate-Timestamp: 1\r\nX-Wxgate-Signature: 0\r\n\r\n{")
        time.sleep(0.2)  # the backend is now reading the body
        answer = _push(_gateway(tmp_path, backend), time.time(), 6054768590064713006)
        assert (answer.status_int, answer.body) == (200, b"success")


@pytest.mark.parametrize("kind", ["python", "node"])
@pytest.mark.parametrize("secret", [None, ""], ids=["unset", "empty"])
def test_backend_refuses_to_start_without_a_secret(kind, secret, tmp_path):
    """Without WXGATE_FORWARD_SECRET the backend exits at once with one line saying so,
    rather than listening and then crashing (or checking HMACs keyed with nothing)."""
    env = {"PATH": os.environ.get("PATH", ""), "PORT": str(free_port())}
    if secret is not None:
        env["WXGATE_FORWARD_SECRET"] = secret
    try:
        done = subprocess.run(_backend_command(kind, tmp_path), cwd=tmp_path, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {kind} backend started without a secret")
    assert done.returncode != 0
    assert done.stdout == b""
    lines = done.stderr.decode("utf-8", "replace").splitlines()
    assert len(lines) == 1 and "WXGATE_FORWARD_SECRET" in lines[0], lines


# -- the handler example ---------------------------------------------------------------------


@pytest.fixture
def shopbot(tmp_path, monkeypatch):
    """The README's ini shape and ``shopbot.py``, against the fake WeChat API."""
    (tmp_path / "shopbot.py").write_text(code_block("# shopbot.py", page="README.md"), "utf-8")
    with FakeWeChat(APPID, APPSECRET) as wechat:
        ini = tmp_path / "wxgate.ini"
        ini.write_text(f"""\
[wxgate]
api_base = {wechat.url}
api_timeout = 1

[app:shop]
path = /wechat
appid = {APPID}
appsecret = ${{WX_APPSECRET}}
token = {TOKEN}
encoding_aes_key = {AES_KEY}
mode = safe
format = auto
handler = shopbot:on_message
""", "utf-8")
        monkeypatch.setenv("WX_APPSECRET", APPSECRET)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, "shopbot", raising=False)
        yield webtest.TestApp(wxgate.make_app(str(ini)), lint=True), wechat


def _text(testapp, content, msg_id):
    query, body = build_push(text_message(content, msg_id=str(msg_id)),
                             timestamp=int(time.time()))
    return testapp.post(f"/wechat?{query}", body, expect_errors=True)


def test_handler_example_sends_the_reply(shopbot):
    testapp, wechat = shopbot
    answer = _text(testapp, "hello", 6054768590064714001)
    assert (answer.status_int, answer.body) == (200, b"success")
    assert [(m["touser"], m["text"]["content"]) for m in wechat.custom_messages] == \
        [(OPENID, "收到: hello")]


@pytest.mark.parametrize("failure", ["45015", "timeout"])
def test_handler_example_logs_a_failed_send_and_still_answers_success(shopbot, failure,
                                                                       caplog):
    testapp, wechat = shopbot
    if failure == "timeout":
        wechat.hang(CUSTOM_SEND_PATH, 3)  # longer than api_timeout = 1
    else:
        wechat.fail_next(CUSTOM_SEND_PATH, 45015)
    with caplog.at_level(logging.WARNING, logger="shopbot"):
        answer = _text(testapp, "hello", 6054768590064714002)
    assert (answer.status_int, answer.body) == (200, b"success")  # no 500, so no retry
    warnings = [r.getMessage() for r in caplog.records if r.name == "shopbot"]
    assert len(warnings) == 1 and warnings[0].startswith(f"reply to {OPENID} not sent")
    assert ("45015" in warnings[0]) == (failure == "45015")
    assert APPSECRET not in caplog.text


@pytest.mark.parametrize("block, page, handler, log", [
    ("# shopbot.py", "README.md", "shopbot:on_message", "shopbot"),
    ("# ackbot.py", HANDLERS, "ackbot:router", "ackbot"),
])
def test_handler_examples_log_a_send_without_an_appsecret_and_still_answer_success(
        tmp_path, monkeypatch, caplog, block, page, handler, log):
    # An app without an appsecret cannot fetch a token: the send raises a plain WxgateError
    # (no WeChatAPIError, no WeChatConnectionError). The documented bots catch the base class,
    # so the push is still answered success instead of a 500 and WeChat's retries.
    module = handler.split(":")[0]
    (tmp_path / f"{module}.py").write_text(code_block(block, page=page), "utf-8")
    ini = tmp_path / "wxgate.ini"
    ini.write_text(f"""\
[app:shop]
path = /wechat
appid = {APPID}
token = {TOKEN}
encoding_aes_key = {AES_KEY}
mode = safe
handler = {handler}
""", "utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    testapp = webtest.TestApp(wxgate.make_app(str(ini)), lint=True)
    with caplog.at_level(logging.WARNING, logger=log):
        answer = _text(testapp, "hello", 6054768590064714004)
    assert (answer.status_int, answer.body) == (200, b"success")
    warnings = [r.getMessage() for r in caplog.records if r.name == log]
    assert len(warnings) == 1 and "has no appsecret" in warnings[0], warnings


def test_handler_example_transfers_to_an_agent(shopbot):
    testapp, wechat = shopbot
    answer = _text(testapp, "转人工", 6054768590064714003)
    assert answer.status_int == 200 and answer.body != b"success"  # the encrypted reply
    assert wechat.custom_messages == []


# -- Cloud Hosting: the page's ini and bot.py ------------------------------------------------


@pytest.fixture
def cloud_bot(tmp_path, monkeypatch):
    """The Cloud Hosting page's ini and ``bot.py``, its API host pointed at a fake sidecar."""
    ini = code_block("# wxgate.ini, beside bot.py", page=CLOUD)
    assert "\napi_base = http://api.weixin.qq.com\n" in ini
    (tmp_path / "bot.py").write_text(code_block("# bot.py", page=CLOUD), "utf-8")
    monkeypatch.delitem(sys.modules, "bot", raising=False)
    with FakeWeChat() as sidecar:
        sidecar.act_as_cloud_sidecar(["/cgi-bin/message/custom/send"])
        source = tmp_path / "wxgate.ini"
        source.write_text(ini.replace("http://api.weixin.qq.com", sidecar.url), "utf-8")
        config = wxgate.load_config(source, environ={})
        gateway = wxgate.make_app(config)
        try:
            yield webtest.TestApp(gateway, lint=True), wxgate.Simulator(config, "bot"), sidecar
        finally:
            gateway.close()
            sys.modules.pop("bot", None)


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_cloud_bot_acknowledges_each_message_through_the_sidecar(cloud_bot, fmt):
    testapp, wechat, sidecar = cloud_bot
    for fields in ({"MsgType": "text", "Content": "你好", "FromUserName": OPENID},
                   {"MsgType": "image", "PicUrl": "http://x/y.jpg", "MediaId": "m1",
                    "FromUserName": OPENID},
                   {"MsgType": "event", "Event": "user_enter_tempsession",
                    "FromUserName": OPENID}):
        push = wechat.push(fields, format=fmt)
        assert testapp.post(push.url, push.body, headers=push.headers).body == b"success"
    # One 收到 per user message, none for the event; no token was ever fetched.
    assert [(m["touser"], m["text"]["content"]) for m in sidecar.custom_messages] == \
        [(OPENID, "收到"), (OPENID, "收到")]
    assert sidecar.token_fetches == 0


def test_cloud_bot_logs_a_send_off_the_whitelist_and_still_answers_success(cloud_bot, caplog):
    testapp, wechat, sidecar = cloud_bot
    sidecar.act_as_cloud_sidecar([])  # the send's path is not on the whitelist: HTTP 502
    push = wechat.push({"MsgType": "text", "Content": "hi", "FromUserName": OPENID})
    with caplog.at_level(logging.WARNING, logger="bot"):
        answer = testapp.post(push.url, push.body, headers=push.headers)
    assert answer.body == b"success"  # no 500, so no retry
    warnings = [r.getMessage() for r in caplog.records if r.name == "bot"]
    assert len(warnings) == 1 and "502" in warnings[0], warnings


def test_cloud_ini_refuses_a_push_that_did_not_come_through_the_gateway(cloud_bot):
    testapp, wechat, sidecar = cloud_bot
    push = wechat.push({"MsgType": "text", "Content": "forged", "FromUserName": OPENID})
    headers = {name: value for name, value in push.headers.items()
               if name.upper() != "X-WX-SOURCE"}
    testapp.post(push.url, push.body, headers=headers, status=403)
    check = testapp.post("/", b'{"action":"CheckContainerPath"}',
                         headers={"X-WX-SOURCE": "console", "Content-Type": "application/json"})
    assert check.body == b"success"
    assert sidecar.custom_messages == []


# -- payments: the page's paybot.py and its ini ----------------------------------------------


XPAY_OK = b'{"ErrCode":0,"ErrMsg":"success"}'


@pytest.fixture
def paybot(tmp_path, monkeypatch):
    """The payments page's ``paybot.py`` (its orders in ``tmp_path``) and ``pay.ini``."""
    source = code_block("# paybot.py", page=PAYMENTS)
    assert 'ORDERS = "/var/lib/paybot/orders.db"' in source
    orders = tmp_path / "orders.db"
    (tmp_path / "paybot.py").write_text(
        source.replace('"/var/lib/paybot/orders.db"', repr(str(orders))), "utf-8")
    (tmp_path / "pay.ini").write_text(code_block("; pay.ini", page=PAYMENTS), "utf-8")
    monkeypatch.delitem(sys.modules, "paybot", raising=False)
    config = wxgate.load_config(tmp_path / "pay.ini",
                                environ={"WX_TOKEN": TOKEN, "WX_AES_KEY": AES_KEY})
    yield config
    sys.modules.pop("paybot", None)


def _order_push(wechat, out_trade_no):
    # Every copy of one order carries the same fields, as WeChat's retries do.
    return wechat.push({"MsgType": "event", "Event": "xpay_goods_deliver_notify",
                        "FromUserName": OPENID, "CreateTime": 1_700_000_000, "OpenId": OPENID,
                        "OutTradeNo": out_trade_no, "Env": 0,
                        "GoodsInfo": {"ProductId": "gold_100", "Quantity": 1}})


def test_payment_handler_delivers_an_order_once_through_late_retries(paybot, caplog):
    assert paybot.apps["pay"].dedup_ttl == 90000
    wechat = wxgate.Simulator(paybot, "pay")
    answers = []
    with caplog.at_level(logging.INFO, logger="paybot"):
        for _ in range(3):  # each gateway a fresh memory store: a retry past the dedup window
            gateway = wxgate.make_app(paybot)
            try:
                testapp = webtest.TestApp(gateway, lint=True)
                for _ in range(2):  # and a retry inside it
                    push = _order_push(wechat, "wxg_0001")
                    answers.append(testapp.post(push.url, push.body, headers=push.headers))
            finally:
                gateway.close()
    # The raw body, unencrypted in safe mode, every time; the goods delivered once.
    assert [(a.status_int, a.body) for a in answers] == [(200, XPAY_OK)] * 6
    delivered = [r.getMessage() for r in caplog.records if r.name == "paybot"]
    assert delivered == [f'delivered {{"ProductId": "gold_100", "Quantity": 1}} to {OPENID}']


def test_payment_handler_whose_delivery_fails_delivers_on_the_retry(paybot, caplog, monkeypatch):
    wechat = wxgate.Simulator(paybot, "pay")
    gateway = wxgate.make_app(paybot)
    try:
        testapp = webtest.TestApp(gateway, lint=True)
        module = sys.modules["paybot"]
        deliver = module.deliver

        def broken(openid, goods):
            raise RuntimeError("the game's server is down")

        monkeypatch.setattr(module, "deliver", broken)
        push = _order_push(wechat, "wxg_0002")
        with caplog.at_level(logging.CRITICAL, logger="wxgate"):
            testapp.post(push.url, push.body, headers=push.headers, status=500)
        monkeypatch.setattr(module, "deliver", deliver)
        with caplog.at_level(logging.INFO, logger="paybot"):
            push = _order_push(wechat, "wxg_0002")
            answer = testapp.post(push.url, push.body, headers=push.headers)
    finally:
        gateway.close()
    # The failed delivery left no record behind, so WeChat's retry delivered the order.
    assert answer.body == XPAY_OK
    assert [r.getMessage() for r in caplog.records if r.name == "paybot"] == \
        [f'delivered {{"ProductId": "gold_100", "Quantity": 1}} to {OPENID}']
