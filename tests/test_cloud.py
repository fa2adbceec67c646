"""WeChat Cloud Hosting (微信云托管): ``mode = cloud`` and ``token_grant = cloud``.

Cloud Hosting delivers pushes over WeChat's internal network with no signature and no
encryption; ``X-WX-SOURCE`` marks traffic that came through its gateway, and the console's
path check (``CheckContainerPath``) must get 200 ``success``. API calls go through the
开放接口服务 sidecar, which adds the credential itself.
https://developers.weixin.qq.com/miniprogram/dev/wxcloudservice/wxcloudrun/src/guide/weixin/push.md
"""

import dataclasses
import http.server
import json
import logging
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid

import pytest
import webtest

import wxgate
from conftest import (APPID, NOW, OPENID, REPO, Recorder, build_push, event_message, load_ini,
                      make_config, render, text_message)
from fake_wechat import SEQID_HEADER, FakeWeChat

CUSTOM_SEND = "/cgi-bin/message/custom/send"
SUBSCRIBE_SEND = "/cgi-bin/message/subscribe/send"
ENV_ID = "prod-7g3k2x1a9c0b4d5e"
UNIONID = "oUnion_8f3a2b1c0d9e"
# What Cloud Hosting's gateway adds to a request it passes to the container (its guide to
# WeChat's open abilities lists X-WX-SOURCE, X-WX-OPENID, X-WX-APPID, X-WX-ENV, X-WX-UNIONID).
HEADERS = {"X-WX-SOURCE": "wechat-push", "X-WX-OPENID": OPENID, "X-WX-APPID": APPID,
           "X-WX-ENV": ENV_ID, "X-WX-UNIONID": UNIONID}
EXPOSED = {"X-WX-OPENID": OPENID, "X-WX-APPID": APPID, "X-WX-ENV": ENV_ID,
           "X-WX-UNIONID": UNIONID}
PATH_CHECKS = {"json": b'{"action":"CheckContainerPath"}',
               "xml": b"<xml><action>CheckContainerPath</action></xml>"}


def cloud_ini(*, extra_app="", extra_gateway="", path="/wechat", fmt="auto",
              handler="wxgate:demo_handler", name="cloud"):
    """An ini with one cloud app: no token, no encoding_aes_key."""
    return "\n".join([
        "[wxgate]", "timestamp_window = 0", extra_gateway, "",
        f"[app:{name}]", f"path = {path}", f"appid = {APPID}", "mode = cloud",
        f"format = {fmt}", f"handler = {handler}", extra_app, ""])


def cloud_config(tmp_path, handler=None, **kwargs):
    return load_ini(tmp_path / "cloud.ini", cloud_ini(**kwargs), handler)


@pytest.fixture
def make_cloud(tmp_path, clock):
    """``make_cloud(handler, **ini options) -> (gateway, TestApp)``."""
    made = []

    def factory(handler=None, **kwargs):
        store = kwargs.pop("store", None)
        options = {"clock": clock}
        if store is not None:
            options["store"] = store
        app = wxgate.make_app(cloud_config(tmp_path, handler, **kwargs), **options)
        made.append(app)
        return app, webtest.TestApp(app, lint=True)

    yield factory
    for app in made:
        app.close()


def push(testapp, fields, fmt="json", *, headers=HEADERS, status=200, path="/wechat"):
    body = render(fields, fmt).encode("utf-8")
    content_type = "application/json" if fmt == "json" else "text/xml"
    return testapp.post(path, body, content_type=content_type, headers=dict(headers),
                        status=status)


@pytest.fixture
def records(caplog):
    caplog.set_level(logging.INFO, logger="wxgate")
    return caplog


# -- configuration ------------------------------------------------------------------------------


def test_cloud_app_needs_no_token_nor_key(tmp_path):
    config = cloud_config(tmp_path)
    app = config.apps["cloud"]
    assert app.mode == "cloud"
    assert app.cloud_source_check is True


@pytest.mark.parametrize("value, expected", [("yes", True), ("no", False)])
def test_cloud_source_check_option(tmp_path, value, expected):
    config = cloud_config(tmp_path, extra_app=f"cloud_source_check = {value}")
    assert config.apps["cloud"].cloud_source_check is expected


def test_cloud_source_check_bad_value_names_the_option(tmp_path):
    with pytest.raises(wxgate.ConfigError) as caught:
        cloud_config(tmp_path, extra_app="cloud_source_check = maybe")
    assert caught.value.option == "cloud_source_check"
    assert "maybe" in caught.value.message


def test_token_grant_cloud_needs_no_appsecret(tmp_path):
    config = cloud_config(tmp_path, extra_app="token_grant = cloud",
                          extra_gateway="api_base = http://api.weixin.qq.com")
    assert config.apps["cloud"].token_grant == "cloud"
    assert config.api_base == "http://api.weixin.qq.com"


# -- pushes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "xml"])
@pytest.mark.parametrize("fields", [text_message("云托管 <b>&amp;"),
                                    event_message("user_enter_tempsession", SessionFrom="b")],
                         ids=["text", "event"])
def test_push_in_both_formats_reaches_the_handler(make_cloud, fmt, fields):
    handler = Recorder()
    _, testapp = make_cloud(handler)
    response = push(testapp, fields, fmt)
    assert response.body == b"success"
    (message,) = handler.messages
    assert message["MsgType"] == fields["MsgType"]
    assert message.from_user == OPENID
    assert message.format == fmt
    assert message.encrypted is False
    if "Content" in fields:
        assert message["Content"] == fields["Content"]


def test_push_needs_no_query_string_and_ignores_a_signature(make_cloud):
    # No token exists to sign with: whatever the query says, nothing is checked against it.
    handler = Recorder()
    _, testapp = make_cloud(handler)
    push(testapp, text_message(msg_id="1"), path="/wechat")
    push(testapp, text_message(msg_id="2"),
         path="/wechat?signature=" + "0" * 40 + "&timestamp=1&nonce=1")
    assert handler.calls == 2


def test_message_cloud_exposes_the_gateway_headers_read_only(make_cloud):
    handler = Recorder()
    _, testapp = make_cloud(handler)
    push(testapp, text_message())
    cloud = handler.messages[0].cloud
    assert dict(cloud) == EXPOSED
    with pytest.raises(TypeError):
        cloud["X-WX-OPENID"] = "someone else"


def test_message_cloud_holds_only_the_headers_sent(make_cloud):
    handler = Recorder()
    _, testapp = make_cloud(handler)
    push(testapp, text_message(), headers={"X-WX-SOURCE": "x", "X-WX-OPENID": OPENID})
    assert dict(handler.messages[0].cloud) == {"X-WX-OPENID": OPENID}


def test_message_cloud_is_empty_outside_cloud_mode(tmp_path, clock):
    handler = Recorder()
    app = wxgate.make_app(make_config(tmp_path, handler, mode="safe"), clock=clock)
    query, body = build_push(text_message())
    webtest.TestApp(app, lint=True).post(f"/wechat?{query}", body, content_type="text/xml",
                                         headers=dict(HEADERS))
    assert dict(handler.messages[0].cloud) == {}
    app.close()


# -- the source check -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_push_without_x_wx_source_is_403_logged_and_counted(make_cloud, records, fmt):
    handler = Recorder()
    app, testapp = make_cloud(handler)
    headers = {name: value for name, value in HEADERS.items() if name != "X-WX-SOURCE"}
    response = push(testapp, text_message(msg_id="forged"), fmt, headers=headers, status=403)
    assert "X-WX-SOURCE" in response.text
    assert handler.calls == 0
    refused = [r for r in records.records if r.levelno >= logging.WARNING
               and "403" in r.getMessage()]
    assert len(refused) == 1, [r.getMessage() for r in records.records]
    assert app.metrics.value("wxgate_refused_total", app="cloud", status=403, code="") == 1
    # The next genuine push still goes through, and the refused one was not remembered.
    assert push(testapp, text_message(msg_id="forged"), fmt).body == b"success"
    assert handler.calls == 1


@pytest.mark.parametrize("environ_name", ["HTTP_X_WX_SOURCE", "HTTP_X_WX_SOURCES"])
def test_either_spelling_of_the_source_header_passes(make_cloud, environ_name):
    # The current docs say X-WX-SOURCE, an older copy x-wx-sources (unverified): accept both.
    # Header names are case-insensitive: the server folds them into the same environ key.
    handler = Recorder()
    _, testapp = make_cloud(handler)
    body = render(text_message(), "json").encode()
    testapp.post("/wechat", body, content_type="application/json",
                 extra_environ={environ_name: "wechat-push"})
    assert handler.calls == 1


def test_source_check_off_lets_a_bare_request_in(make_cloud):
    handler = Recorder()
    _, testapp = make_cloud(handler, extra_app="cloud_source_check = no")
    assert push(testapp, text_message(), headers={}).body == b"success"
    assert handler.calls == 1
    assert dict(handler.messages[0].cloud) == {}


# -- the path check -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_path_check_answers_success_and_touches_neither_handler_nor_store(make_cloud, fmt):
    handler = Recorder()
    store = wxgate.MemoryStore()
    _, testapp = make_cloud(handler, store=store)
    content_type = "application/json" if fmt == "json" else "text/xml"
    for _ in range(2):  # the console may check twice; both must pass
        response = testapp.post("/wechat", PATH_CHECKS[fmt], content_type=content_type,
                                headers=dict(HEADERS))
        assert response.status_int == 200
        assert response.body == b"success"
    assert handler.calls == 0
    assert len(store) == 0


def test_path_check_is_not_queued(tmp_path, make_cloud):
    handler = Recorder()
    app, testapp = make_cloud(handler, extra_app="delivery = queue",
                              extra_gateway=f"store = sqlite://{tmp_path}/q.db")
    response = testapp.post("/wechat", PATH_CHECKS["json"], content_type="application/json",
                            headers=dict(HEADERS))
    assert response.body == b"success"
    assert app.queue.stats(NOW)["pending"] == 0
    assert handler.calls == 0


# -- dedup, replies, forward, queue ---------------------------------------------------------


@pytest.mark.parametrize("fields", [text_message(msg_id="77"),
                                    event_message("user_enter_tempsession")],
                         ids=["message", "event"])
def test_retries_are_answered_from_the_dedup_store(make_cloud, fields):
    handler = Recorder()
    app, testapp = make_cloud(handler)
    for _ in range(3):
        assert push(testapp, fields).body == b"success"
    assert handler.calls == 1
    assert app.metrics.value("wxgate_duplicates_total", app="cloud") == 2


def test_handler_error_is_500_and_the_retry_runs_it_again(make_cloud):
    handler = Recorder()
    handler.fail = 1
    _, testapp = make_cloud(handler)
    push(testapp, text_message(msg_id="5"), status=500)
    assert push(testapp, text_message(msg_id="5")).body == b"success"
    assert handler.calls == 2


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_dict_reply_is_dropped_with_one_log_line_and_success(make_cloud, records, fmt):
    # Passive replies work only for Official Accounts on Cloud Hosting (the push guide above).
    handler = Recorder(reply={"MsgType": "transfer_customer_service"})
    _, testapp = make_cloud(handler)
    for msg_id in ("1", "2", "3"):
        response = push(testapp, text_message(msg_id=msg_id), fmt)
        assert response.body == b"success"
        assert b"transfer_customer_service" not in response.body
    dropped = [r for r in records.records if r.levelno >= logging.WARNING
               and "dropped" in r.getMessage()]
    assert len(dropped) == 1, [r.getMessage() for r in records.records]
    assert "cloud" in dropped[0].getMessage()


def test_dict_reply_log_is_once_per_app(tmp_path, clock, records):
    handler = Recorder(reply={"MsgType": "transfer_customer_service"})
    text = cloud_ini(name="one", path="/one") + cloud_ini(name="two", path="/two").split(
        "\n", 3)[3]
    (tmp_path / "two.ini").write_text(text, "utf-8")
    config = wxgate.load_config(tmp_path / "two.ini", environ={})
    config = dataclasses.replace(config, apps={
        name: dataclasses.replace(app, handler=handler, handler_spec="test:handler")
        for name, app in config.apps.items()})
    app = wxgate.make_app(config, clock=clock)
    testapp = webtest.TestApp(app, lint=True)
    for path in ("/one", "/two", "/one", "/two"):
        push(testapp, text_message(msg_id=uuid.uuid4().hex), path=path)
    dropped = [r.getMessage() for r in records.records if "dropped" in r.getMessage()]
    assert len(dropped) == 2, dropped
    assert any("one" in line for line in dropped) and any("two" in line for line in dropped)
    app.close()


def test_forward_in_cloud_mode(tmp_path, clock):
    from backend import Backend
    with Backend("cloud-forward-secret") as backend:
        backend.reply = lambda body: {"MsgType": "transfer_customer_service"}
        source = tmp_path / "fwd.ini"
        source.write_text(cloud_ini(handler="").replace("handler = \n", "") +
                          f"forward = {backend.url}\nforward_secret = cloud-forward-secret\n",
                          "utf-8")
        app = wxgate.make_app(str(source), clock=clock)
        testapp = webtest.TestApp(app, lint=True)
        for _ in range(2):
            assert push(testapp, text_message(msg_id="f1")).body == b"success"
        (body,) = backend.received
        assert body["format"] == "json" and body["dedup_key"] == "cloud:m:f1"
        assert body["message"]["FromUserName"] == OPENID
        app.close()


def test_queue_mode_delivers_once_with_the_cloud_headers(tmp_path, make_cloud):
    handler = Recorder()
    app, testapp = make_cloud(handler, extra_app="delivery = queue",
                              extra_gateway=f"store = sqlite://{tmp_path}/q.db\n"
                              "delivery_threads = 0")
    for _ in range(2):
        assert push(testapp, text_message(msg_id="q1")).body == b"success"
    assert handler.calls == 0
    worker = app.worker()
    while worker.run_once():
        pass
    (message,) = handler.messages
    assert message["MsgId"] == "q1" and message.encrypted is False
    assert dict(message.cloud) == EXPOSED


# -- API calls through 开放接口服务 ------------------------------------------------------------


@pytest.fixture
def sidecar():
    with FakeWeChat() as wechat:
        wechat.act_as_cloud_sidecar([CUSTOM_SEND])
        yield wechat


def test_fake_sidecar_behaves_as_documented(sidecar):
    # The fake itself, first: these are the behaviours the wxgate tests below rely on.
    def call(path, query=""):
        body = json.dumps({"touser": OPENID, "msgtype": "text",
                           "text": {"content": "hi"}}).encode()
        request = urllib.request.Request(f"{sidecar.url}{path}{query}", data=body,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()

    status, headers, body = call(CUSTOM_SEND)
    assert status == 200 and json.loads(body)["errcode"] == 0
    assert headers[SEQID_HEADER] == sidecar.seqids[-1]
    status, headers, _ = call(SUBSCRIBE_SEND)
    assert status == 502 and SEQID_HEADER not in headers
    _, _, body = call(CUSTOM_SEND, "?access_token=anything")
    assert json.loads(body)["errcode"] == 40001
    sidecar.act_as_cloud_sidecar([CUSTOM_SEND], enabled=False)
    _, _, body = call(CUSTOM_SEND)
    assert json.loads(body) == {"errcode": 41001, "errmsg": "access_token missing"}
    assert sidecar.token_fetches == 0


def grant_gateway(tmp_path, clock, wechat, handler=None):
    config = cloud_config(tmp_path, handler, extra_app="token_grant = cloud",
                          extra_gateway=f"api_base = {wechat.url}")
    return wxgate.make_app(config, clock=clock)


def test_client_calls_without_an_access_token_and_never_fetches_one(tmp_path, clock, sidecar):
    app = grant_gateway(tmp_path, clock, sidecar)
    answer = app.client("cloud").send_text(OPENID, "你好")
    assert answer["errcode"] == 0
    assert sidecar.token_fetches == 0
    (request,) = sidecar.requests
    assert request.path == CUSTOM_SEND and "access_token" not in request.query
    assert sidecar.custom_messages[0]["text"]["content"] == "你好"
    app.close()


def test_handler_reaches_the_api_through_message_client(tmp_path, clock, sidecar):
    handler = Recorder(reply=lambda message: message.client.send_text(
        message.from_user, "got it") and None)
    app = grant_gateway(tmp_path, clock, sidecar, handler)
    assert push(webtest.TestApp(app, lint=True), text_message()).body == b"success"
    assert [m["touser"] for m in sidecar.custom_messages] == [OPENID]
    assert sidecar.token_fetches == 0
    app.close()


def test_api_off_the_whitelist_says_to_add_it_and_rebuild(tmp_path, clock, sidecar):
    app = grant_gateway(tmp_path, clock, sidecar)
    with pytest.raises(wxgate.WeChatAPIError) as caught:
        app.client("cloud").send_subscribe_message(OPENID, "T1", {"thing1": "x"})
    message = str(caught.value)
    for needle in (SUBSCRIBE_SEND, "开放接口服务", "whitelist", "rebuild"):
        assert needle in message, message
    assert sidecar.token_fetches == 0
    app.close()


def test_access_token_missing_means_the_switch_is_off_or_not_rebuilt(tmp_path, clock, sidecar):
    sidecar.act_as_cloud_sidecar([CUSTOM_SEND], enabled=False)
    app = grant_gateway(tmp_path, clock, sidecar)
    with pytest.raises(wxgate.WeChatAPIError) as caught:
        app.client("cloud").send_text(OPENID, "hi")
    assert caught.value.errcode == 41001
    message = str(caught.value)
    for needle in (CUSTOM_SEND, "开放接口服务", "whitelist", "rebuild"):
        assert needle in message, message
    # 41001 is not a token rejection to retry with a new token: one call, no fetch.
    assert sidecar.calls[CUSTOM_SEND] == 1 and sidecar.token_fetches == 0
    app.close()


# -- the command line, and a real gunicorn ----------------------------------------------------

HANDLER_SOURCE = '''
import json

LOG = {log!r}


def handle(message):
    with open(LOG, "a", encoding="utf-8") as file:
        file.write(json.dumps({{"fields": dict(message), "cloud": dict(message.cloud)}},
                              ensure_ascii=False, default=str) + "\\n")
    return None
'''


def run(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "wxgate", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


class HeaderRecorder:
    """A stand-in container on 127.0.0.1 that records each request and answers success."""

    def __init__(self):
        self.requests = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                recorder.requests.append((self.path, dict(self.headers), body))
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", "7")
                self.end_headers()
                self.wfile.write(b"success")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        # A short poll interval: shutdown() waits for the serve loop (0.5 s by default).
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_cli_push_sends_the_cloud_headers(tmp_path):
    source = tmp_path / "cli.ini"
    source.write_text(cloud_ini(path="/"), "utf-8")
    container = HeaderRecorder()
    try:
        result = run("push", source, "--url", container.url, "--text", "hi", "--format",
                     "json", "--openid", "o_cli_user")
    finally:
        container.close()
    assert result.returncode == 0, (result.stdout, result.stderr)
    (path, headers, body) = container.requests[0]
    headers = {name.lower(): value for name, value in headers.items()}
    assert headers.get("x-wx-source")
    assert headers["x-wx-openid"] == "o_cli_user"
    assert headers["x-wx-appid"] == APPID
    assert "signature" not in path and "Encrypt" not in body.decode()
    assert json.loads(body)["Content"] == "hi"
    assert "'success'" in result.stdout


def test_cli_check_explains_a_cloud_app(tmp_path):
    source = tmp_path / "check.ini"
    source.write_text(cloud_ini(), "utf-8")
    result = run("check", source)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "cloud" in result.stdout and "X-WX-SOURCE" in result.stdout
    source.write_text(cloud_ini(extra_app="cloud_source_check = no"), "utf-8")
    result = run("check", source)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "public access" in result.stdout  # the trade-off of turning the check off


def test_cli_check_online_fetches_no_token_for_token_grant_cloud(tmp_path):
    with FakeWeChat() as wechat:
        wechat.act_as_cloud_sidecar([CUSTOM_SEND])
        source = tmp_path / "online.ini"
        source.write_text(cloud_ini(extra_app="token_grant = cloud",
                                    extra_gateway=f"api_base = {wechat.url}"), "utf-8")
        result = run("check", source, "--online")
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert wechat.token_fetches == 0
        assert "开放接口服务" in result.stdout


def test_under_real_gunicorn(tmp_path):
    from serving import start_gunicorn, stop
    module = f"cloudmod_{uuid.uuid4().hex[:12]}"
    calls = tmp_path / "calls.jsonl"
    (tmp_path / f"{module}.py").write_text(HANDLER_SOURCE.format(log=str(calls)), "utf-8")
    source = tmp_path / "gunicorn.ini"
    source.write_text(cloud_ini(path="/", handler=f"{module}:handle",
                                extra_gateway=f"store = sqlite://{tmp_path}/wxgate.db"), "utf-8")
    base_url, process = start_gunicorn(source, workers=2)
    try:
        def post(body, headers):
            request = urllib.request.Request(base_url + "/", data=body, method="POST",
                                             headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        json_headers = {"Content-Type": "application/json"}
        assert post(PATH_CHECKS["json"], dict(json_headers, **HEADERS)) == (200, b"success")
        assert post(PATH_CHECKS["xml"], dict(HEADERS, **{"Content-Type": "text/xml"})) == \
            (200, b"success")
        body = render(text_message(msg_id="g1"), "json").encode()
        status, _ = post(body, json_headers)  # no X-WX-SOURCE
        assert status == 403
        for _ in range(4):  # WeChat's retries, spread over both workers
            assert post(body, dict(json_headers, **HEADERS)) == (200, b"success")
        result = run("push", source, "--url", base_url + "/", "--text", "from the cli",
                     "--format", "xml", "--repeat", "2")
        assert result.returncode == 0, (result.stdout, result.stderr)
        lines = [json.loads(line) for line in calls.read_text("utf-8").splitlines()]
        assert [line["fields"].get("MsgId") for line in lines].count("g1") == 1
        assert lines[0]["cloud"]["X-WX-OPENID"] == OPENID
        cli = [line for line in lines if line["fields"].get("Content") == "from the cli"]
        assert len(cli) == 1 and cli[0]["cloud"]["X-WX-APPID"] == APPID
    finally:
        stop(process)


# -- what else a cloud app meets -------------------------------------------------------------


def test_get_is_405_no_handshake_in_cloud_mode(make_cloud):
    _, testapp = make_cloud(Recorder())
    response = testapp.get("/wechat?signature=x&timestamp=1&nonce=1&echostr=1",
                           headers=dict(HEADERS), status=405)
    assert "healthz" in response.text


def test_an_encrypted_body_is_refused_in_cloud_mode(make_cloud):
    handler = Recorder()
    _, testapp = make_cloud(handler)
    _, body = build_push(text_message(), fmt="json")
    response = testapp.post("/wechat", body, content_type="application/json",
                            headers=dict(HEADERS), status=400)
    assert "mode" in response.text and handler.calls == 0


def test_simulator_builds_cloud_pushes(tmp_path, clock):
    handler = Recorder()
    config = cloud_config(tmp_path, handler)
    app = wxgate.make_app(config, clock=clock)
    wechat = wxgate.Simulator(config, clock=clock)
    push_ = wechat.push({"MsgType": "text", "Content": "模拟", "FromUserName": "o_sim"},
                        format="json")
    assert push_.url == "/wechat" and push_.query_string == ""
    assert push_.headers["X-WX-OPENID"] == "o_sim" and push_.headers["X-WX-APPID"] == APPID
    response = webtest.TestApp(app, lint=True).post(push_.url, push_.body,
                                                    headers=push_.headers)
    assert wechat.open_reply(response.body) == "success"
    assert handler.messages[0].cloud["X-WX-OPENID"] == "o_sim"
    with pytest.raises(wxgate.WxgateError, match="no URL handshake"):
        wechat.handshake()
    app.close()


def test_forward_body_carries_the_cloud_headers(tmp_path, clock):
    from backend import Backend
    with Backend("cloud-forward-secret") as backend:
        source = tmp_path / "fwd.ini"
        source.write_text(cloud_ini(handler="").replace("handler = \n", "") +
                          f"forward = {backend.url}\nforward_secret = cloud-forward-secret\n",
                          "utf-8")
        app = wxgate.make_app(str(source), clock=clock)
        push(webtest.TestApp(app, lint=True), text_message(msg_id="c1"))
        (body,) = backend.received
        assert body["cloud"] == EXPOSED
        app.close()


def test_token_grant_cloud_holds_no_token(tmp_path, clock, sidecar):
    app = grant_gateway(tmp_path, clock, sidecar)
    with pytest.raises(wxgate.WxgateError, match="开放接口服务"):
        app.client("cloud").tokens.get_token()
    assert sidecar.token_fetches == 0
    app.close()


def test_cli_handshake_on_a_cloud_app_says_why_not(tmp_path):
    source = tmp_path / "hs.ini"
    source.write_text(cloud_ini(), "utf-8")
    result = run("handshake", source, "--url", "http://127.0.0.1:9/wechat")
    assert result.returncode == 1 and "no URL handshake" in result.stderr
    assert "Traceback" not in result.stderr


# -- the X-WX-SOURCE check and the console's path check, at their edges ------------------------


def test_empty_x_wx_source_is_refused_like_a_missing_one(make_cloud):
    # A request without X-WX-SOURCE is refused; a present-but-empty header carries no
    # source at all, so it is refused too rather than passed to the handler.
    handler = Recorder()
    _, testapp = make_cloud(handler)
    headers = dict(HEADERS, **{"X-WX-SOURCE": ""})
    push(testapp, text_message(msg_id="empty-source"), headers=headers, status=403)
    assert handler.calls == 0


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_a_push_carrying_an_action_field_is_not_swallowed_as_the_path_check(make_cloud, fmt):
    # The console's probe is exactly {"action":"CheckContainerPath"}. A real message that
    # also has MsgType/MsgId (or any extra field) must be handled and deduplicated, not
    # answered success as the probe: the path check matches the probe's shape, not one field.
    handler = Recorder()
    _, testapp = make_cloud(handler)
    fields = dict(text_message(msg_id="77"), action="CheckContainerPath")
    push(testapp, fields, fmt)
    assert handler.calls == 1
