"""Simulator: pushes and handshakes as WeChat sends them, replies read as WeChat
reads them; FakeAPI for what a handler sends; the "收到" demo; wxgate push/handshake on it."""

import argparse
import dataclasses
import json
import logging
import re
import threading
import xml.etree.ElementTree as ET
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
import webtest

import wxgate
from conftest import (AES_KEY, APPID, NOW, TOKEN, Clock, Recorder, aes_decrypt, aes_encrypt,
                      make_config, sha1_sign)
from wxgate import FakeAPI, Simulator
from wxgate import _handshake_command as handshake_command
from wxgate import _push as push_command

MODES = [pytest.param(mode, fmt, id=f"{mode}-{fmt}") for mode in ("plain", "compat", "safe")
         for fmt in ("xml", "json")]


class Counter:
    """random_bytes that differ on each call but are the same on every run."""

    def __init__(self):
        self.n = 0

    def __call__(self, size):
        self.n += 1
        return self.n.to_bytes(size, "big")


def simulator(config, **options):
    options.setdefault("clock", Clock())
    return Simulator(config, "test", **options)


def parse(body, fmt):
    if fmt == "json":
        return json.loads(body)
    return {child.tag: child.text for child in ET.fromstring(body)}


# -- pushes, checked with the independent builder's primitives -------------------------------


@pytest.mark.parametrize("mode, fmt", MODES)
def test_push_is_signed_and_encrypted_as_wechat_does(tmp_path, mode, fmt):
    config = make_config(tmp_path, mode=mode, fmt=fmt)
    push = simulator(config).push({"MsgType": "text", "Content": "人工 ]]> <x>",
                                   "FromUserName": "o_1"})
    path, _, query_string = push.url.partition("?")
    assert path == "/wechat" and query_string == push.query_string
    query = dict(pair.split("=", 1) for pair in query_string.split("&"))
    assert query["timestamp"] == str(NOW) and query["openid"] == "o_1"
    assert query["signature"] == sha1_sign(TOKEN, str(NOW), query["nonce"])
    assert push.headers == {"Content-Type": "text/xml"}
    outer = parse(push.body, fmt)
    if mode == "plain":
        assert "msg_signature" not in query and "Encrypt" not in outer
        inner = push.body.decode()
    else:
        assert query["encrypt_type"] == "aes"
        assert query["msg_signature"] == sha1_sign(TOKEN, str(NOW), query["nonce"],
                                                   outer["Encrypt"])
        inner, appid = aes_decrypt(outer["Encrypt"])
        assert appid == APPID
        expected_outer = {"ToUserName", "Encrypt"} if mode == "safe" else \
            {"ToUserName", "FromUserName", "CreateTime", "MsgType", "Content", "MsgId", "Encrypt"}
        assert set(outer) == expected_outer
    fields = parse(inner.encode(), fmt)
    assert fields["Content"] == "人工 ]]> <x>" and fields["MsgType"] == "text"
    assert str(fields["CreateTime"]) == str(NOW) and fields["ToUserName"] == "gh_wxgatedemo"
    assert fields["MsgId"] == push.fields["MsgId"]


def test_fills_what_wechat_fills_unless_given(tmp_path):
    config = make_config(tmp_path, mode="plain", fmt="json")
    wechat = simulator(config, random_bytes=Counter())
    first = wechat.push({"MsgType": "text", "Content": "a"}).fields
    second = wechat.push({"MsgType": "text", "Content": "a"}).fields
    assert first["FromUserName"] == "o_wxgate_demo_user" and first["CreateTime"] == NOW
    assert first["MsgId"].isdigit() and first["MsgId"] != second["MsgId"]
    event = wechat.push({"MsgType": "event", "Event": "user_enter_tempsession"}).fields
    assert "MsgId" not in event
    given = {"MsgType": "text", "Content": "b", "MsgId": "49d72d67_1", "CreateTime": "17",
             "ToUserName": "gh_mine", "FromUserName": "o_me"}
    assert wechat.push(given).fields == given


def test_format_follows_the_app_and_can_be_chosen_for_auto(tmp_path):
    config = make_config(tmp_path, mode="plain", fmt="auto")
    wechat = simulator(config)
    assert wechat.push({"MsgType": "text"}).body.startswith(b"<xml>")
    assert wechat.push({"MsgType": "text"}, format="json").body.startswith(b"{")
    with pytest.raises(ValueError, match="format"):
        wechat.push({"MsgType": "text"}, format="yaml")


def test_name_is_needed_only_with_several_apps(tmp_path):
    config = make_config(tmp_path)
    assert Simulator(config).app.name == "test"
    assert Simulator(str(tmp_path / "wxgate.ini")).app.name == "test"  # a path works too
    with pytest.raises(wxgate.WxgateError, match=r"no \[app:shop\]"):
        Simulator(config, "shop")


# -- through the app ------------------------------------------------------------------------


@pytest.mark.parametrize("mode, fmt", MODES)
def test_round_trip_through_the_app(tmp_path, mode, fmt, clock):
    recorder = Recorder(reply={"MsgType": "transfer_customer_service"})
    config = make_config(tmp_path, handler=recorder, mode=mode, fmt=fmt)
    app = webtest.TestApp(wxgate.make_app(config, clock=clock))
    wechat = simulator(config, clock=clock)
    push = wechat.push({"MsgType": "text", "Content": "人工", "FromUserName": "o_user"})
    reply = wechat.open_reply(app.post(push.url, push.body, headers=push.headers).body)
    assert reply["MsgType"] == "transfer_customer_service"
    assert reply["ToUserName"] == "o_user" and reply["FromUserName"] == "gh_wxgatedemo"
    (message,) = recorder.messages
    sent = push.fields if fmt == "json" else {k: str(v) for k, v in push.fields.items()}
    assert dict(message) == sent and message.encrypted == (mode != "plain")
    # The same push again is a retry: same reply, handler not run again.
    again = app.post(push.url, push.body, headers=push.headers)
    assert wechat.open_reply(again.body)["MsgType"] == "transfer_customer_service"
    assert recorder.calls == 1


@pytest.mark.parametrize("reply, expected", [(None, "success"), ("", "")])
def test_open_reply_returns_the_text_of_success_and_empty(tmp_path, clock, reply, expected):
    config = make_config(tmp_path, handler=Recorder(reply=reply))
    app = webtest.TestApp(wxgate.make_app(config, clock=clock))
    wechat = simulator(config, clock=clock)
    push = wechat.push({"MsgType": "event", "Event": "user_enter_tempsession"})
    assert wechat.open_reply(app.post(push.url, push.body, headers=push.headers).body) == \
        expected


def test_handshake(tmp_path, clock):
    config = make_config(tmp_path)
    app = webtest.TestApp(wxgate.make_app(config, clock=clock))
    check = simulator(config, clock=clock).handshake()
    assert check.echostr.isdigit() and len(check.echostr) == 19
    response = app.get(check.url)
    assert response.body == check.expected == check.echostr.encode()
    wrong = dataclasses.replace(config.apps["test"], token="not-the-token")
    other = dataclasses.replace(config, apps={"test": wrong})
    assert app.get(simulator(other, clock=clock).handshake().url, status=403)


# -- open_reply refuses what WeChat would refuse ---------------------------------------------


def envelope(plaintext, fmt="xml", *, token=TOKEN, key=AES_KEY, appid=APPID, timestamp=NOW,
             nonce="123", extra=None, signature=None):
    """An encrypted reply built with the independent primitives of conftest."""
    encrypt = aes_encrypt(plaintext, key, appid)
    fields = {"Encrypt": encrypt,
              "MsgSignature": signature or sha1_sign(token, str(timestamp), nonce, encrypt),
              "TimeStamp": timestamp, "Nonce": nonce}
    fields.update(extra or {})
    if fmt == "json":
        return json.dumps(fields).encode()
    return ("<xml>" + "".join(f"<{k}><![CDATA[{v}]]></{k}>" if k != "TimeStamp" else
                              f"<{k}>{v}</{k}>" for k, v in fields.items()) + "</xml>").encode()


TRANSFER = ("<xml><ToUserName><![CDATA[o_1]]></ToUserName><FromUserName><![CDATA[gh_1]]>"
            "</FromUserName><CreateTime>1</CreateTime><MsgType><![CDATA[transfer_customer_"
            "service]]></MsgType></xml>")


def test_open_reply_reads_an_independently_built_envelope(tmp_path):
    wechat = simulator(make_config(tmp_path, fmt="xml"))
    assert wechat.open_reply(envelope(TRANSFER)) == {
        "ToUserName": "o_1", "FromUserName": "gh_1", "CreateTime": "1",
        "MsgType": "transfer_customer_service"}
    json_app = simulator(make_config(tmp_path, fmt="json"))
    reply = json.dumps({"ToUserName": "o_1", "FromUserName": "gh_1", "CreateTime": 1,
                        "MsgType": "transfer_customer_service"})
    assert json_app.open_reply(envelope(reply, "json"))["CreateTime"] == 1


@pytest.mark.parametrize("body, error, match", [
    pytest.param(envelope(TRANSFER, signature="0" * 40), wxgate.SignatureError,
                 "reply MsgSignature does not match", id="bad signature"),
    pytest.param(envelope(TRANSFER, token="other"), wxgate.SignatureError,
                 "-40001", id="signed with another token"),
    pytest.param(envelope(TRANSFER, appid="wx0000000000000000"), wxgate.DecryptError,
                 "-40005", id="another appid"),
    pytest.param(envelope(TRANSFER, key="B" * 43), wxgate.DecryptError, "-4000",
                 id="another key"),
    pytest.param(envelope(TRANSFER, extra={"ToUserName": "o_1"}), wxgate.MessageError,
                 "envelope has fields", id="fifth field"),
    pytest.param(envelope(TRANSFER, timestamp="soon"), wxgate.MessageError,
                 "TimeStamp 'soon'", id="TimeStamp not a number"),
    pytest.param(TRANSFER.encode(), wxgate.MessageError, "not encrypted.*safe mode",
                 id="clear reply in safe mode"),
    pytest.param(envelope("<xml><MsgType>text</MsgType></xml>"), wxgate.MessageError,
                 "reply lacks ToUserName, FromUserName, CreateTime", id="unaddressed"),
    pytest.param(envelope("hello"), wxgate.MessageError, "neither XML nor JSON",
                 id="text, not XML"),
    pytest.param(b"success\n", wxgate.MessageError, "neither XML nor JSON",
                 id="success with a newline"),
    pytest.param(b'{"MsgType": "x"}', wxgate.MessageError, "is json.*format = xml",
                 id="JSON to an XML app"),
])
def test_open_reply_raises_on_a_wrong_reply(tmp_path, body, error, match):
    wechat = simulator(make_config(tmp_path, fmt="xml"))
    with pytest.raises(error, match=match):
        wechat.open_reply(body)


# -- replies sent as given: the fixed JSON some pushes are answered with --------------------

PAID = {"ErrCode": 0, "ErrMsg": "success"}


@pytest.mark.parametrize("mode", ["safe", "compat", "plain"])
def test_open_reply_reads_a_payment_pushs_fixed_reply(tmp_path, clock, mode):
    # The README's payment handler answers RawReply({"ErrCode":0,"ErrMsg":"success"}), in
    # the clear even in safe mode ("回复微信服务器的消息不需要加密"). open_reply raised
    # "reply is not encrypted ... WeChat would refuse it", so the handler could not be tested.
    handler = Recorder(reply=wxgate.RawReply(PAID))
    config = make_config(tmp_path, handler=handler, mode=mode, fmt="json")
    app = webtest.TestApp(wxgate.make_app(config, clock=clock))
    wechat = simulator(config, clock=clock)
    push = wechat.push({"MsgType": "event", "Event": "xpay_goods_deliver_notify",
                        "OpenId": "o_1", "OutTradeNo": "order-1", "Env": 0})
    response = app.post(push.url, push.body, headers=push.headers)
    assert response.body == b'{"ErrCode":0,"ErrMsg":"success"}'
    assert wechat.open_reply(response.body) == PAID
    assert wechat.open_reply(response.body.decode()) == PAID


def test_open_reply_reads_the_ios_refund_querys_fixed_reply(tmp_path):
    wechat = simulator(make_config(tmp_path, mode="safe", fmt="json"))
    body = {"result_code": 0, "result_info": "ok", "evidence": "paid on 1 May"}
    assert wechat.open_reply(json.dumps(body)) == body


def test_open_reply_reads_an_encrypted_fixed_reply_too(tmp_path):
    # One community answer says a Mini Program must encrypt it in safe mode: the handler
    # chooses, and either arrives whole.
    wechat = simulator(make_config(tmp_path, mode="safe", fmt="json"))
    assert wechat.open_reply(envelope(json.dumps(PAID), "json")) == PAID


@pytest.mark.parametrize("body, match", [
    pytest.param(b'{"ErrCode": "0", "ErrMsg": "success"}', "not encrypted.*safe mode",
                 id="ErrCode a string"),
    pytest.param(b'{"ErrCode": true, "ErrMsg": "success"}', "not encrypted.*safe mode",
                 id="ErrCode a boolean"),
    pytest.param(b'{"ErrMsg": "success"}', "not encrypted.*safe mode", id="no ErrCode"),
    pytest.param(b'{"result_code": 0}', "not encrypted.*safe mode", id="no result_info"),
    pytest.param(b'{"MsgType": "text", "Content": "hi"}', "not encrypted.*safe mode",
                 id="a clear passive reply"),
    pytest.param(b'[{"ErrCode": 0, "ErrMsg": "success"}]', "neither XML nor JSON",
                 id="a JSON array"),
])
def test_open_reply_still_refuses_what_is_no_fixed_reply(tmp_path, body, match):
    wechat = simulator(make_config(tmp_path, mode="safe", fmt="json"))
    with pytest.raises(wxgate.MessageError, match=match):
        wechat.open_reply(body)


def test_an_unaddressed_reply_is_still_refused_in_plain_mode(tmp_path):
    wechat = simulator(make_config(tmp_path, mode="plain", fmt="json"))
    assert wechat.open_reply(json.dumps(PAID)) == PAID
    with pytest.raises(wxgate.MessageError, match="reply lacks ToUserName"):
        wechat.open_reply(b'{"ErrCode": 0, "Message": "success"}')


def test_plain_mode_refuses_an_encrypted_reply_and_compat_takes_both(tmp_path):
    plain = simulator(make_config(tmp_path, mode="plain", fmt="xml"))
    with pytest.raises(wxgate.MessageError, match="encrypted.*plain mode"):
        plain.open_reply(envelope(TRANSFER))
    assert plain.open_reply(TRANSFER)["MsgType"] == "transfer_customer_service"
    compat = simulator(make_config(tmp_path, mode="compat", fmt="xml"))
    assert compat.open_reply(TRANSFER) == compat.open_reply(envelope(TRANSFER))


# -- FakeAPI and the "收到" demo ---------------------------------------------------------------


def demo_config(tmp_path, api, appsecret=True):
    extra = "appsecret = any-secret-works" if appsecret else ""
    config = make_config(tmp_path, extra_app=extra)
    app = dataclasses.replace(config.apps["test"], handler_spec="wxgate:demo_handler",
                              handler=wxgate._resolve_handler("wxgate:demo_handler", "."))
    return api.configure(dataclasses.replace(config, apps={"test": app}))


def post(app, wechat, fields):
    push = wechat.push(fields)
    return wechat.open_reply(app.post(push.url, push.body, headers=push.headers).body)


@pytest.mark.parametrize("kind", ["text", "image", "miniprogrampage"])
def test_demo_with_an_appsecret_acknowledges_each_user_message(tmp_path, kind):
    with FakeAPI() as api:
        config = demo_config(tmp_path, api)
        gateway = wxgate.make_app(config)
        app, wechat = webtest.TestApp(gateway), Simulator(config, "test")
        try:
            assert post(app, wechat, {"MsgType": kind, "FromUserName": "o_u"}) == "success"
            assert post(app, wechat, {"MsgType": "event", "FromUserName": "o_u",
                                      "Event": "user_enter_tempsession"}) == "success"
        finally:
            gateway.close()
        assert api.sent == [{"touser": "o_u", "msgtype": "text", "text": {"content": "收到"}}]
        assert api.calls[0].query["access_token"] == FakeAPI.TOKEN


def test_demo_still_hands_kf_chats_to_an_agent_and_survives_a_failed_send(tmp_path, caplog):
    with FakeAPI() as api:
        config = demo_config(tmp_path, api)
        gateway = wxgate.make_app(config)
        app, wechat = webtest.TestApp(gateway), Simulator(config, "test")
        api.answer("/cgi-bin/message/custom/send", {"errcode": 45015, "errmsg": "out of time"})
        try:
            with caplog.at_level(logging.WARNING, logger="wxgate"):
                reply = post(app, wechat, {"MsgType": "text", "Content": "转人工"})
        finally:
            gateway.close()
        assert reply["MsgType"] == "transfer_customer_service"
        assert len(api.sent) == 1  # tried once, answered 45015, not retried by WeChat
        assert "could not send '收到'" in caplog.text and "45015" in caplog.text
        assert "any-secret-works" not in caplog.text


def test_demo_without_an_appsecret_behaves_as_before(tmp_path):
    with FakeAPI() as api:
        config = demo_config(tmp_path, api, appsecret=False)
        gateway = wxgate.make_app(config)
        app, wechat = webtest.TestApp(gateway), Simulator(config, "test")
        try:
            assert post(app, wechat, {"MsgType": "text", "Content": "hi"}) == "success"
            assert post(app, wechat, {"MsgType": "text", "Content": "KF"})["MsgType"] == \
                "transfer_customer_service"
        finally:
            gateway.close()
        assert api.calls == []


def test_fake_api_requires_its_token_and_queues_answers():
    with FakeAPI() as api:
        tokens = wxgate.TokenManager(APPID, "s", api_base=api.url)
        client = wxgate.WeChatClient(tokens)
        assert client.call("POST", "/wxa/anything", json={"a": 1}) == \
            {"errcode": 0, "errmsg": "ok"}
        api.answer("/wxa/anything", {"errcode": 47001, "errmsg": "data format error"})
        with pytest.raises(wxgate.WeChatAPIError) as caught:
            client.call("POST", "/wxa/anything", json={"a": 2})
        assert caught.value.errcode == 47001
        forged = wxgate._http_json("POST", api.url + "/wxa/anything",
                                   params={"access_token": "forged"}, body={})
        assert forged["errcode"] == 40001  # a token it did not issue
        assert [call.json for call in api.calls] == [{"a": 1}, {"a": 2}, {}]
    with pytest.raises(RuntimeError, match="not started"):
        api.url


# -- wxgate push / handshake, built on the simulator -----------------------------------------


class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """The app of make_config, served by wsgiref on 127.0.0.1 in a thread; yields its ini."""
    recorder = Recorder(reply=lambda m: {"MsgType": "transfer_customer_service"}
                        if m.get("Content") == "kf" else None)
    config = make_config(tmp_path, handler=recorder, fmt="xml")
    gateway = wxgate.make_app(config)
    server = make_server("127.0.0.1", 0, gateway, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield argparse.Namespace(
            config=str(tmp_path / "wxgate.ini"), app=None, format=None, openid="o_cli",
            url=f"http://127.0.0.1:{server.server_port}/wechat", text=None, event=None,
            json=None, xml=None, field=None, repeat=1, token=None), recorder
    finally:
        server.shutdown()
        server.server_close()
        gateway.close()


def test_push_command_shows_the_decrypted_reply_and_dedups_repeats(served, capsys):
    args, recorder = served
    assert push_command(argparse.Namespace(**dict(vars(args), text="kf", repeat=2))) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"POST {args.url} (safe mode, xml): text\n")
    lines = out.splitlines()[1:]
    assert [line.split(" in ")[0] for line in lines] == ["[1] 200", "[2] 200"]
    assert all("<MsgType><![CDATA[transfer_customer_service]]></MsgType>" in line
               and "Encrypt" not in line for line in lines)
    assert recorder.calls == 1 and recorder.messages[0].from_user == "o_cli"


def test_push_command_event_with_fields(served, capsys):
    args, recorder = served
    args = argparse.Namespace(**dict(vars(args), event="user_enter_tempsession",
                                     field=["SessionFrom=cart"]))
    assert push_command(args) == 0
    assert "POST" in capsys.readouterr().out
    assert recorder.messages[0]["SessionFrom"] == "cart"
    assert recorder.messages[0].event == "user_enter_tempsession"


def test_push_command_fails_on_a_reply_wechat_would_refuse(tmp_path, served, capsys):
    args, recorder = served
    recorder.reply = "hello"  # sent as is, encrypted: not a reply WeChat can read
    assert push_command(argparse.Namespace(**dict(vars(args), text="x"))) == 1
    assert "reply does not verify: reply content is neither XML nor JSON" in \
        capsys.readouterr().out


def test_push_command_to_a_closed_port(served, capsys):
    args, _ = served
    from conftest import free_port
    args = argparse.Namespace(**dict(vars(args), text="x",
                                     url=f"http://127.0.0.1:{free_port()}/wechat"))
    assert push_command(args) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_handshake_command_passes_and_fails(served, tmp_path, capsys):
    args, _ = served
    assert handshake_command(args) == 0
    assert capsys.readouterr().out.startswith(f"PASS: {args.url} echoed")
    wrong = tmp_path / "wrong.ini"
    wrong.write_text((tmp_path / "wxgate.ini").read_text("utf-8").replace(
        f"token = {TOKEN}", "token = notTheToken"), "utf-8")
    assert handshake_command(argparse.Namespace(**dict(vars(args), config=str(wrong)))) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL:") and " 403 " in out and "notTheToken" not in out


# -- the "收到" demo on pushes whose fields are not strings -----------------------------------


def demo_gateway(tmp_path, api, appsecret):
    extra = "appsecret = any-secret-works" if appsecret else ""
    config = make_config(tmp_path, mode="safe", fmt="json", extra_app=extra)
    app = dataclasses.replace(config.apps["test"], handler_spec="wxgate:demo_handler",
                              handler=wxgate._resolve_handler("wxgate:demo_handler", "."))
    return api.configure(dataclasses.replace(config, apps={"test": app}))


@pytest.mark.parametrize("appsecret", [True, False], ids=["appsecret", "no-appsecret"])
@pytest.mark.parametrize("msg_type", [["text"], {"a": 1}], ids=["list", "object"])
def test_demo_handler_answers_success_when_msgtype_is_not_a_string(tmp_path, caplog,
                                                                     appsecret, msg_type):
    # Without an AppSecret the demo answers such a push 200 "success", and so it must with
    # one: a lookup of an unhashable MsgType in a set would raise TypeError, a 500 and a
    # traceback in the log, and WeChat's retries would run it again.
    with wxgate.FakeAPI() as api:
        config = demo_gateway(tmp_path, api, appsecret)
        gateway = wxgate.make_app(config)
        wechat = wxgate.Simulator(config, "test")
        push = wechat.push({"MsgType": msg_type, "FromUserName": "o_user"})
        try:
            with caplog.at_level(logging.INFO, logger="wxgate"):
                response = webtest.TestApp(gateway).post(push.url, push.body,
                                                         headers=push.headers,
                                                         expect_errors=True)
        finally:
            gateway.close()
    assert response.status_int == 200, response.status
    assert wechat.open_reply(response.body) == "success"
    assert "Traceback" not in caplog.text


def test_demo_handler_never_sends_to_an_openid_that_is_not_a_string(tmp_path):
    # A JSON push whose FromUserName is an object must not make the demo POST
    # {"touser": {...}} to customerServiceMessage.send.
    with wxgate.FakeAPI() as api:
        config = demo_gateway(tmp_path, api, appsecret=True)
        gateway = wxgate.make_app(config)
        wechat = wxgate.Simulator(config, "test")
        app = webtest.TestApp(gateway)
        try:
            for sender in ({"id": "o_user"}, ["o_user"], 12345):
                push = wechat.push({"MsgType": "text", "Content": "hi", "FromUserName": sender})
                app.post(push.url, push.body, headers=push.headers)
        finally:
            gateway.close()
        assert [sent["touser"] for sent in api.sent
                if not isinstance(sent["touser"], str)] == []


# -- open_reply: replies WeChat would refuse, and replies it takes ---------------------------


def sealed_reply(plaintext, timestamp="1714000000", nonce="415670741"):
    """A JSON reply envelope around ``plaintext``, sealed with conftest's own AES."""
    encrypt = aes_encrypt(plaintext)
    return json.dumps({"Encrypt": encrypt, "MsgSignature": sha1_sign(TOKEN, timestamp, nonce,
                                                                       encrypt),
                       "TimeStamp": timestamp, "Nonce": nonce}).encode("utf-8")


ADDRESSED = {"ToUserName": "o_user", "FromUserName": "gh_1", "CreateTime": 1714000000}


@pytest.mark.parametrize("body", [
    # "success" and the empty reply are never encrypted, in any mode (WeChat reads them as
    # they are).
    pytest.param(sealed_reply("success"), id="encrypted success"),
    pytest.param(sealed_reply(""), id="encrypted empty"),
    # str.isdigit() takes Arabic-Indic and superscript digits as a TimeStamp.
    pytest.param(sealed_reply(json.dumps(dict(ADDRESSED, MsgType="transfer_customer_service")),
                              timestamp="١٧١٤٠٠٠٠٠٠"), id="non-ASCII TimeStamp digits"),
    # The reply must be typed: a MsgType that is an object or a CreateTime that is not a
    # number of seconds is no reply WeChat reads.
    pytest.param(sealed_reply(json.dumps(dict(ADDRESSED, MsgType={"a": 1}))),
                 id="MsgType an object"),
    pytest.param(sealed_reply(json.dumps(dict(ADDRESSED, CreateTime="soon",
                                              MsgType="transfer_customer_service"))),
                 id="CreateTime not a number"),
])
def test_open_reply_refuses_what_wechat_would_refuse(tmp_path, body):
    config = make_config(tmp_path, mode="safe", fmt="json")
    with pytest.raises(wxgate.WxgateError):
        wxgate.Simulator(config, "test").open_reply(body)


@pytest.mark.parametrize("fmt", ["xml", "json"])
def test_open_reply_still_takes_a_well_typed_reply(tmp_path, fmt):
    # XML carries CreateTime as text of digits, JSON as a number: both are whole seconds.
    config = make_config(tmp_path, mode="plain", fmt=fmt)
    wechat = wxgate.Simulator(config, "test")
    reply = dict(ADDRESSED, MsgType="transfer_customer_service")
    body = wxgate._dump_xml(reply) if fmt == "xml" else json.dumps(reply)
    assert wechat.open_reply(body)["MsgType"] == "transfer_customer_service"


# -- push: errors about the push, and MsgIds that never collide ------------------------------


def test_a_push_with_a_bad_field_name_is_a_value_error_about_the_push(tmp_path):
    # push({"bad name": 1}) is the test's push, not a reply, and no WeChat code applies: a
    # ValueError, as for a bad `format`, never a WxgateError about "reply field ... -40011".
    wechat = wxgate.Simulator(make_config(tmp_path, mode="safe", fmt="xml"), "test")
    with pytest.raises(ValueError) as caught:
        wechat.push({"MsgType": "text", "bad name": 1})
    assert "reply" not in str(caught.value)


def test_pushes_in_one_second_get_distinct_msgids_and_are_all_handled(tmp_path):
    # `wxgate push` builds its push with the Simulator. MsgIds made as now * 1000 plus a
    # number below 1000 would collide for sure within 1001 pushes of one second (and once in
    # 1000 for two): the second push would then be answered as a duplicate, its handler
    # never run.
    clock = Clock()
    recorder = Recorder()
    config = make_config(tmp_path, recorder)
    wechat = wxgate.Simulator(config, "test", clock=clock)
    ids = [wechat.push({"MsgType": "text", "Content": str(i)}).fields["MsgId"]
           for i in range(1001)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9]{1,19}", msg_id) for msg_id in ids)  # WeChat's shape
    testapp = webtest.TestApp(wxgate.make_app(config, clock=clock), lint=True)
    for content in ("kf please", "hi"):
        push = wechat.push({"MsgType": "text", "Content": content})
        assert testapp.post(push.url, push.body, headers=push.headers).body == b"success"
    assert [message["Content"] for message in recorder.messages] == ["kf please", "hi"]
