"""The WSGI application: handshake, every mode x format x message kind, replies, hostile input."""

import json
import logging
import xml.etree.ElementTree as ET

import pytest
import webtest

import wxgate
from conftest import (APPID, GH_ID, NOW, OPENID, TOKEN, Recorder, build_push, event_message,
                      make_config, open_reply, sha1_sign, text_message, vectors)

MODES = ["plain", "compat", "safe"]
FORMATS = ["xml", "json"]


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def make_testapp(tmp_path, clock):
    def factory(handler, **kwargs):
        config = make_config(tmp_path, handler, **kwargs)
        random_bytes = kwargs.pop("random_bytes", None)
        options = {"clock": clock}
        if random_bytes:
            options["random_bytes"] = random_bytes
        return webtest.TestApp(wxgate.make_app(config, **options), lint=True)
    return factory


def post(testapp, query, body, status=200):
    return testapp.post(f"/wechat?{query}", body, content_type="text/xml", status=status)


# -- handshake ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_handshake_echoes_echostr_exactly(make_testapp, recorder, mode):
    testapp = make_testapp(recorder, mode=mode)
    query = {"signature": sha1_sign(TOKEN, str(NOW), "123"), "timestamp": str(NOW),
             "nonce": "123", "echostr": "4375120948345356249"}
    response = testapp.get("/wechat", query)
    assert response.body == b"4375120948345356249"
    assert response.content_type == "text/plain"
    assert recorder.calls == 0


@pytest.mark.parametrize("case", vectors("url_signature"))
def test_handshake_official_vector(tmp_path, case):
    source = tmp_path / "w.ini"
    source.write_text(f"[wxgate]\ntimestamp_window = 0\n[app:a]\npath = /wechat\n"
                      f"appid = {APPID}\ntoken = {case['token']}\nmode = plain\n"
                      "handler = wxgate:demo_handler\n")
    testapp = webtest.TestApp(wxgate.make_app(str(source)), lint=True)
    echostr = case.get("echostr", "12345")
    response = testapp.get("/wechat", {"signature": case["signature"],
                                       "timestamp": case["timestamp"],
                                       "nonce": case["nonce"], "echostr": echostr})
    assert response.text == echostr


@pytest.mark.parametrize("missing", ["signature", "timestamp", "nonce", "echostr"])
def test_handshake_missing_parameter_is_400(make_testapp, recorder, missing):
    testapp = make_testapp(recorder)
    query = {"signature": sha1_sign(TOKEN, str(NOW), "1"), "timestamp": str(NOW),
             "nonce": "1", "echostr": "e"}
    del query[missing]
    response = testapp.get("/wechat", query, status=400)
    assert missing in response.text


def test_handshake_wrong_signature_is_403(make_testapp, recorder):
    testapp = make_testapp(recorder)
    response = testapp.get("/wechat", {"signature": "0" * 40, "timestamp": str(NOW),
                                       "nonce": "1", "echostr": "e"}, status=403)
    assert "-40001" in response.text
    assert TOKEN not in response.text


def test_handshake_ignores_msg_signature_and_encrypt_type(make_testapp, recorder):
    testapp = make_testapp(recorder)
    query = {"signature": sha1_sign(TOKEN, str(NOW), "1"), "timestamp": str(NOW), "nonce": "1",
             "echostr": "abc", "encrypt_type": "aes", "msg_signature": "nonsense"}
    assert testapp.get("/wechat", query).text == "abc"


# -- every mode x format x message kind -----------------------------------------------------

KINDS = {
    "text": (text_message("你好 <b>&amp;"), {"Content": "你好 <b>&amp;"}),
    "image": ({"ToUserName": GH_ID, "FromUserName": OPENID, "CreateTime": NOW,
               "MsgType": "image", "PicUrl": "http://mmbiz.qpic.cn/x", "MediaId": "media1",
               "MsgId": "6054768590064713729"}, {"MediaId": "media1"}),
    "miniprogrampage": ({"ToUserName": GH_ID, "FromUserName": OPENID, "CreateTime": NOW,
                         "MsgType": "miniprogrampage", "MsgId": "6054768590064713730",
                         "Title": "a card", "AppId": APPID, "PagePath": "pages/index?x=1",
                         "ThumbUrl": "http://x/y", "ThumbMediaId": "thumb"},
                        {"PagePath": "pages/index?x=1"}),
    "user_enter_tempsession": (event_message("user_enter_tempsession", SessionFrom="btn"),
                               {"SessionFrom": "btn"}),
    "debug_demo": (event_message("debug_demo", debug_str="hello world"),
                   {"debug_str": "hello world"}),
    "wxa_media_check": (event_message(
        "wxa_media_check", appid=APPID, trace_id="trace-1", version=2,
        result={"suggest": "risky", "label": 20001}, errcode=0, errmsg="ok"),
        {"trace_id": "trace-1"}),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_reaches_the_handler(make_testapp, recorder, mode, fmt, kind):
    fields, expected = KINDS[kind]
    testapp = make_testapp(recorder, mode=mode)
    response = post(testapp, *build_push(fields, mode=mode, fmt=fmt))
    assert response.body == b"success"
    assert recorder.calls == 1
    message = recorder.messages[0]
    for name, value in expected.items():
        assert message[name] == value
    assert message["MsgType"] == fields["MsgType"]
    assert message.msg_type == fields["MsgType"]
    assert message.event == fields.get("Event")
    assert message.from_user == OPENID
    assert message.format == fmt
    assert message.encrypted is (mode != "plain")
    assert message.app == "test"
    assert "Encrypt" not in message


@pytest.mark.parametrize("fmt", FORMATS)
def test_wxa_media_check_nested_fields(make_testapp, recorder, fmt):
    testapp = make_testapp(recorder)
    fields, _ = KINDS["wxa_media_check"]
    post(testapp, *build_push(fields, fmt=fmt))
    result = recorder.messages[0]["result"]
    assert result["suggest"] == "risky"
    assert str(result["label"]) == "20001"


def popup_fields(items, fmt):
    base = event_message("subscribe_msg_popup_event")
    if fmt == "xml":
        base["SubscribeMsgPopupEvent"] = {"List": items}
    else:
        base["List"] = items[0] if len(items) == 1 else items
    return base


ITEMS = [{"TemplateId": "T1", "SubscribeStatusString": "accept", "PopupScene": "0"},
         {"TemplateId": "T2", "SubscribeStatusString": "reject", "PopupScene": "0"}]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("count", [1, 2])
def test_subscribe_popup_list_is_always_a_list(make_testapp, recorder, fmt, count):
    testapp = make_testapp(recorder)
    post(testapp, *build_push(popup_fields(ITEMS[:count], fmt), fmt=fmt))
    message = recorder.messages[0]
    items = (message["SubscribeMsgPopupEvent"]["List"] if fmt == "xml" else message["List"])
    assert isinstance(items, list)
    assert [item["TemplateId"] for item in items] == ["T1", "T2"][:count]
    assert message.items_list == items


def test_json_list_as_object_and_array_give_the_same_shape(make_testapp, recorder):
    testapp = make_testapp(recorder)
    one = dict(event_message("subscribe_msg_change_event"),
               List={"TemplateId": "T1", "SubscribeStatusString": "reject"})
    post(testapp, *build_push(one, fmt="json"))
    arr = dict(one, CreateTime=NOW + 1,
               List=[{"TemplateId": "T1", "SubscribeStatusString": "reject"}])
    post(testapp, *build_push(arr, fmt="json"))
    assert recorder.messages[0]["List"] == recorder.messages[1]["List"]


def test_msgid_beyond_float_precision_stays_exact(make_testapp, recorder):
    testapp = make_testapp(recorder, mode="plain")
    query, body = build_push(text_message(msg_id="x"), mode="plain", fmt="json")
    body = body.replace(b'"x"', b"18446744073709551615")
    post(testapp, query, body)
    assert recorder.messages[0]["MsgId"] == 18446744073709551615


# -- replies ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", MODES)
def test_transfer_customer_service_reply(make_testapp, clock, mode, fmt):
    handler = Recorder(reply={"MsgType": "transfer_customer_service"})
    testapp = make_testapp(handler, mode=mode)
    clock.advance(7)
    response = post(testapp, *build_push(text_message(), mode=mode, fmt=fmt, nonce="415670741"))
    if mode == "plain":
        plaintext = response.text
    else:
        plaintext, appid, envelope = open_reply(response.body, fmt)
        assert appid == APPID
        assert int(envelope["TimeStamp"]) == NOW + 7
        assert envelope["Nonce"] == "415670741"
    if fmt == "json":
        reply = json.loads(plaintext)
    else:
        reply = {child.tag: child.text for child in ET.fromstring(plaintext)}
    assert reply == {"ToUserName": OPENID, "FromUserName": GH_ID,
                     "CreateTime": NOW + 7 if fmt == "json" else str(NOW + 7),
                     "MsgType": "transfer_customer_service"}
    assert response.content_type == ("application/json" if fmt == "json" else "text/xml")


def test_reply_in_the_mode_of_each_request_in_plain(make_testapp):
    # The WeRoBot pitfall: after one encrypted push, plaintext pushes got encrypted replies.
    # A plain app reads a compat push's clear fields (the console moved first) and replies
    # in plaintext, as to a plain push.
    handler = Recorder(reply={"MsgType": "transfer_customer_service"})
    testapp = make_testapp(handler, mode="plain")
    compat = post(testapp, *build_push(text_message(msg_id="1"), mode="compat"))
    assert b"<Encrypt>" not in compat.body and b"transfer_customer_service" in compat.body
    plain = post(testapp, *build_push(text_message(msg_id="2"), mode="plain"))
    assert b"<Encrypt>" not in plain.body and b"transfer_customer_service" in plain.body
    assert [m.encrypted for m in handler.messages] == [False, False]


def test_official_reply_vector_byte_exact_through_the_app(tmp_path):
    case = next(c for c in wxgate_vectors() if c["id"] == "mp_doc_safe_reply_json")
    source = tmp_path / "w.ini"
    source.write_text(f"[wxgate]\ntimestamp_window = 0\n[app:a]\npath = /wechat\n"
                      f"appid = {case['appid']}\ntoken = {case['token']}\n"
                      f"encoding_aes_key = {case['encoding_aes_key']}\n"
                      "handler = wxgate:demo_handler\n")
    config = wxgate.load_config(source)
    import dataclasses
    app_config = dataclasses.replace(config.apps["a"], handler=lambda m: case["plaintext"])
    config = dataclasses.replace(config, apps={"a": app_config})
    app = wxgate.make_app(config, clock=lambda: float(case["timestamp"]),
                          random_bytes=lambda n: bytes.fromhex(case["random"]))
    testapp = webtest.TestApp(app, lint=True)
    query, body = build_push(event_message("debug_demo"), mode="safe", fmt="json",
                             timestamp=case["timestamp"], nonce=case["nonce"],
                             token=case["token"], key=case["encoding_aes_key"],
                             appid=case["appid"])
    reply = json.loads(testapp.post(f"/wechat?{query}", body, content_type="text/xml").body)
    assert reply == {"Encrypt": case["encrypt"], "MsgSignature": case["msg_signature"],
                     "TimeStamp": int(case["timestamp"]), "Nonce": case["nonce"]}


def wxgate_vectors():
    from conftest import VECTORS
    return VECTORS


@pytest.mark.parametrize("reply, body", [(None, b"success"), ("success", b"success"),
                                         ("", b"")])
@pytest.mark.parametrize("mode", MODES)
def test_success_and_empty_replies_are_never_encrypted(make_testapp, mode, reply, body):
    testapp = make_testapp(Recorder(reply=reply), mode=mode)
    assert post(testapp, *build_push(text_message(), mode=mode)).body == body


def test_cdata_injection_in_reply_values_is_neutralised(make_testapp):
    evil = "x]]></Content><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[y"
    testapp = make_testapp(Recorder(reply={"MsgType": "transfer_customer_service",
                                           "Note": evil}), mode="plain")
    body = post(testapp, *build_push(text_message(), mode="plain")).body
    root = ET.fromstring(body)
    assert [child.tag for child in root].count("MsgType") == 1
    assert root.find("Note").text == evil


def test_handler_returning_nonsense_is_a_500_then_recovers(make_testapp):
    handler = Recorder(reply=lambda m: 42 if m["MsgId"] == "1" else None)
    testapp = make_testapp(handler)
    post(testapp, *build_push(text_message(msg_id="1")), status=500)
    assert post(testapp, *build_push(text_message(msg_id="2"))).body == b"success"


# -- refusals -----------------------------------------------------------------------------


def test_safe_mode_refuses_plaintext_push(make_testapp, recorder):
    testapp = make_testapp(recorder, mode="safe")
    response = post(testapp, *build_push(text_message(), mode="plain"), status=400)
    assert "safe mode" in response.text
    assert recorder.calls == 0


def test_compat_trusts_only_the_decrypted_content(make_testapp, recorder):
    testapp = make_testapp(recorder, mode="compat")
    query, body = build_push(text_message("real"), mode="compat", fmt="xml")
    body = body.replace(b"<Content><![CDATA[real]]>", b"<Content><![CDATA[forged]]>", 1)
    assert b"forged" in body
    post(testapp, query, body)
    assert recorder.messages[0]["Content"] == "real"


def test_wrong_msg_signature_is_403_before_decryption(make_testapp, recorder, caplog):
    testapp = make_testapp(recorder)
    query, body = build_push(text_message())
    query = query.replace("msg_signature=", "msg_signature=0")
    with caplog.at_level(logging.WARNING, "wxgate"):
        response = post(testapp, query, body, status=403)
    assert "-40001" in response.text and "-40001" in caplog.text
    assert recorder.calls == 0


@pytest.mark.parametrize("sent", ["plain", "compat"])
def test_wrong_url_signature_is_403(make_testapp, recorder, sent):
    testapp = make_testapp(recorder, mode="plain")
    query, body = build_push(text_message(), mode=sent)
    post(testapp, query.replace("signature=", "signature=1", 1), body, status=403)
    assert recorder.calls == 0


def test_wrong_appid_inside_the_buffer_is_40005_in_the_log_only(make_testapp, recorder, caplog):
    testapp = make_testapp(recorder)
    with caplog.at_level(logging.WARNING, "wxgate"):
        response = post(testapp, *build_push(text_message(), appid="wxOTHER"), status=400)
    assert response.text == wxgate.SEALED_REFUSAL
    assert "-40005" in caplog.text and "wxOTHER" not in caplog.text
    assert recorder.calls == 0


def test_wrong_key_is_a_4xx_decrypt_error(make_testapp, recorder, caplog):
    testapp = make_testapp(recorder)
    with caplog.at_level(logging.WARNING, "wxgate"):
        response = post(testapp, *build_push(text_message(), key="B" * 43), status=400)
    assert response.text == wxgate.SEALED_REFUSAL and "-4000" in caplog.text


@pytest.mark.parametrize("offset", [-400, 400])
def test_timestamp_outside_the_window_is_403(make_testapp, recorder, offset):
    testapp = make_testapp(recorder)
    post(testapp, *build_push(text_message(), timestamp=NOW + offset), status=403)
    assert recorder.calls == 0


def test_window_zero_turns_the_replay_check_off(make_testapp, recorder):
    testapp = make_testapp(recorder, extra_gateway="timestamp_window = 0")
    assert post(testapp, *build_push(text_message(), timestamp=NOW - 10**6)).body == b"success"


@pytest.mark.parametrize("setting, sent", [("xml", "json"), ("json", "xml")])
def test_configured_format_refuses_the_other_with_415(make_testapp, recorder, setting, sent):
    testapp = make_testapp(recorder, fmt=setting)
    post(testapp, *build_push(text_message(), fmt=sent), status=415)
    assert recorder.calls == 0


def test_json_labelled_text_xml_is_read_as_json(make_testapp, recorder):
    testapp = make_testapp(recorder, fmt="json")
    post(testapp, *build_push(text_message(), fmt="json"))  # post() labels it text/xml
    assert recorder.messages[0].format == "json"


HOSTILE_BODIES = {
    "doctype": b'<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY a "aaaa">]><xml><a>&a;</a></xml>',
    "external entity": b'<!DOCTYPE xml [<!ENTITY x SYSTEM "file:///etc/passwd">]><xml>&x;</xml>',
    "malformed xml": b"<xml><a></xml>",
    "malformed json": b'{"ToUserName": ',
    "json array": b"[1, 2]",
    "neither": b"hello",
    "empty": b"",
    "deep xml": b"<xml>" + b"<a>" * 200 + b"</a>" * 200 + b"</xml>",
    "deep json": b"{" + b'"a":[' * 5000 + b"]" * 5000 + b"}",
    "not utf-8": b"<xml><a>\xff\xfe</a></xml>",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
@pytest.mark.parametrize("mode", MODES)
def test_hostile_bodies_get_400_and_the_app_survives(make_testapp, recorder, mode, name):
    testapp = make_testapp(recorder, mode=mode)
    # Its own nonce: a plain query is bound to the first body it comes with, hostile or not.
    query, _ = build_push(text_message(), mode="plain", nonce="1")
    response = post(testapp, query, HOSTILE_BODIES[name], status=400)
    assert response.text
    assert recorder.calls == 0
    assert post(testapp, *build_push(text_message(), mode=mode)).body == b"success"


def test_body_over_the_limit_is_413(make_testapp, recorder):
    testapp = make_testapp(recorder, extra_gateway="max_body_bytes = 2048")
    query, _ = build_push(text_message(), mode="plain")
    post(testapp, query, b"<xml>" + b"a" * 5000 + b"</xml>", status=413)


def test_lying_content_length_reads_at_most_limit_plus_one(tmp_path, clock, recorder):
    import io

    class CountingInput(io.BytesIO):
        asked = []

        def read(self, size=-1):
            self.asked.append(size)
            return super().read(size)

    app = wxgate.make_app(make_config(tmp_path, recorder, mode="plain",
                                      extra_gateway="max_body_bytes = 2048"), clock=clock)
    query, _ = build_push(text_message(), mode="plain")
    stream = CountingInput(b"<xml>" + b"a" * 10_000 + b"</xml>")
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/wechat", "QUERY_STRING": query,
               "wsgi.input": stream, "wsgi.input_terminated": True}
    statuses = []
    app(environ, lambda status, headers: statuses.append(status))
    assert statuses == ["413 Payload Too Large"]
    assert stream.asked == [2049]


@pytest.mark.parametrize("method", ["PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"])
def test_other_methods_are_405_with_allow(make_testapp, recorder, method):
    testapp = make_testapp(recorder)
    response = testapp.request("/wechat", method=method, status=405)
    assert response.headers["Allow"] == "GET, POST"


def test_unknown_path_is_404(make_testapp, recorder):
    make_testapp(recorder).get("/nope", status=404)


def test_non_ascii_signature_is_403_not_a_crash(make_testapp, recorder):
    testapp = make_testapp(recorder)
    testapp.get(f"/wechat?signature=%E4%BD%A0&timestamp={NOW}&nonce=1&echostr=e", status=403)


def test_secrets_never_in_responses_or_logs(make_testapp, recorder, caplog):
    testapp = make_testapp(recorder)
    with caplog.at_level(logging.DEBUG, "wxgate"):
        # Its own nonce: a signed query is bound to its first body, whatever the key was.
        bodies = [post(testapp, *build_push(text_message(), key="B" * 43, nonce="1"),
                       status=400).body,
                  post(testapp, *build_push(text_message(), token="other"), status=403).body,
                  post(testapp, *build_push(text_message())).body]
    for secret in (TOKEN, "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"):
        assert all(secret.encode() not in body for body in bodies)
        assert secret not in caplog.text


def test_one_log_line_per_push(make_testapp, recorder, caplog):
    testapp = make_testapp(recorder)
    with caplog.at_level(logging.INFO, "wxgate"):
        post(testapp, *build_push(text_message(msg_id="77")))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("push ")]
    assert len(lines) == 1
    assert "app=test" in lines[0] and "type=text" in lines[0] and "test:m:77" in lines[0]
    assert "outcome=handled" in lines[0] and "ms=" in lines[0]


@pytest.mark.parametrize("script_name, path_info", [("/wechat", ""), ("/wechat", "/"),
                                                    ("", "/wechat")])
def test_app_path_matches_under_a_mount_prefix(make_testapp, recorder, script_name, path_info):
    testapp = make_testapp(recorder)
    query, body = build_push(text_message())
    response = testapp.post(f"{path_info or '/'}?{query}", body, content_type="text/xml",
                            extra_environ={"SCRIPT_NAME": script_name, "PATH_INFO": path_info})
    assert response.body == b"success" and recorder.calls == 1
