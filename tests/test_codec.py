"""The message codec: format sniffing, XML/JSON parsing, Message, dedup keys, reply XML, and the
XML attack corpus.

Decisions pinned here:

* ``_sniff_format`` skips ASCII whitespace only. A UTF-8 byte order mark is not whitespace, and
  WeChat never sends one, so a body that starts with a BOM is refused as neither XML nor JSON
  (a clean MessageError, -40002, hence a 400), never guessed at.
* XML leaves stay strings whatever they look like (``<CreateTime>1</CreateTime>`` is ``"1"``):
  XML has no types, and MsgId must never go through a number.
* Small attributes are ignored (WeChat sends none); huge or numerous ones are refused, as an
  attack corpus would send them, and entity expansion needs a DOCTYPE, which is refused too.
"""

import builtins
import io
import os
import socket
import threading
import urllib.request
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import wxgate
from conftest import APPID, GH_ID, OPENID, event_message, text_message

MAX_BODY = wxgate.DEFAULT_MAX_BODY_BYTES


def message_error(function, *args):
    with pytest.raises(wxgate.MessageError) as info:
        function(*args)
    assert info.value.status == 400
    assert info.value.code == -40002
    return info.value


# -- _sniff_format --------------------------------------------------------------------------


@pytest.mark.parametrize("body, fmt", [
    (b"<xml></xml>", "xml"),
    (b'{"a": 1}', "json"),
    (b" \t\r\n<xml><a>1</a></xml>", "xml"),
    (b"\n\n   {}", "json"),
    (b"\x0b\x0c<xml/>", "xml"),
    (b'{"Content": "<xml>"}', "json"),
    (b"<xml><Content>{}</Content></xml>", "xml"),
])
def test_sniff_format(body, fmt):
    assert wxgate._sniff_format(body) == fmt


@pytest.mark.parametrize("body", [
    pytest.param(b"", id="empty"),
    pytest.param(b" \r\n\t", id="only whitespace"),
    pytest.param(b"hello", id="text"),
    pytest.param(b"[1, 2]", id="json array"),
    pytest.param(b'"string"', id="json string"),
    pytest.param(b"\xef\xbb\xbf<xml><a>1</a></xml>", id="utf-8 BOM before xml"),
    pytest.param(b'\xef\xbb\xbf{"a": 1}', id="utf-8 BOM before json"),
    pytest.param(b"\xff\xfe<\x00x\x00", id="utf-16 BOM"),
    pytest.param(b"\xc2\xa0<xml/>", id="no-break space is not whitespace"),
    pytest.param(b"\x00<xml/>", id="NUL"),
])
def test_sniff_format_refuses(body):
    message_error(wxgate._sniff_format, body)


# -- _parse_xml -----------------------------------------------------------------------------


def test_cdata_and_bare_text():
    fields = wxgate._parse_xml(
        b"<xml><ToUserName><![CDATA[gh_1]]></ToUserName><CreateTime>1714112445</CreateTime>"
        b"<Content><![CDATA[a < b & c]]></Content><MsgId>6054768590064713728</MsgId></xml>")
    assert fields == {"ToUserName": "gh_1", "CreateTime": "1714112445",
                      "Content": "a < b & c", "MsgId": "6054768590064713728"}


def test_text_cdata_entities_and_character_references_join():
    fields = wxgate._parse_xml(
        b"<xml><a>x<![CDATA[y]]>z</a><b>&lt;&amp;&gt;&quot;&apos;&#20320;&#x597D;</b>"
        b"<c><![CDATA[]]></c><d/><e></e></xml>")
    assert fields == {"a": "xyz", "b": "<&>\"'你好", "c": "", "d": "", "e": ""}


def test_utf8_text_is_kept():
    fields = wxgate._parse_xml("<xml><Content><![CDATA[你好 👋]]></Content></xml>".encode())
    assert fields == {"Content": "你好 👋"}


def test_nested_elements_become_dicts():
    fields = wxgate._parse_xml(
        b"<xml><MsgType><![CDATA[event]]></MsgType><result><suggest><![CDATA[risky]]></suggest>"
        b"<label>20001</label></result><detail><strategy><![CDATA[content_model]]></strategy>"
        b"<errcode>0</errcode></detail></xml>")
    assert fields == {"MsgType": "event", "result": {"suggest": "risky", "label": "20001"},
                      "detail": {"strategy": "content_model", "errcode": "0"}}


def test_repeated_elements_become_lists():
    fields = wxgate._parse_xml(
        b"<xml><a>1</a><b>x</b><a>2</a><a>3</a>"
        b"<detail><s>1</s></detail><detail><s>2</s></detail></xml>")
    assert fields == {"a": ["1", "2", "3"], "b": "x",
                      "detail": [{"s": "1"}, {"s": "2"}]}


def test_repeated_elements_inside_nested_elements():
    fields = wxgate._parse_xml(b"<xml><w><i>1</i><i>2</i></w><w><i>3</i></w></xml>")
    assert fields == {"w": [{"i": ["1", "2"]}, {"i": "3"}]}


@pytest.mark.parametrize("count", [1, 2, 3])
def test_subscribe_list_is_always_a_list(count):
    items = "".join(
        f"<List><TemplateId><![CDATA[T{n}]]></TemplateId><SubscribeStatusString><![CDATA["
        f"accept]]></SubscribeStatusString><PopupScene>0</PopupScene></List>"
        for n in range(count))
    fields = wxgate._parse_xml(
        f"<xml><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[subscribe_msg_popup_event]]>"
        f"</Event><SubscribeMsgPopupEvent>{items}</SubscribeMsgPopupEvent></xml>".encode())
    listed = fields["SubscribeMsgPopupEvent"]["List"]
    assert isinstance(listed, list) and len(listed) == count
    assert [item["TemplateId"] for item in listed] == [f"T{n}" for n in range(count)]
    assert listed[0] == {"TemplateId": "T0", "SubscribeStatusString": "accept",
                         "PopupScene": "0"}


def test_top_level_list_of_one_is_a_list_and_other_single_fields_are_not():
    fields = wxgate._parse_xml(b"<xml><List><TemplateId>T1</TemplateId></List><Content>x"
                               b"</Content><Wrapper><Item>1</Item></Wrapper></xml>")
    assert fields == {"List": [{"TemplateId": "T1"}], "Content": "x",
                      "Wrapper": {"Item": "1"}}


def test_whitespace_between_elements_is_ignored():
    pretty = b"""<xml>
        <ToUserName><![CDATA[gh_1]]></ToUserName>
        <SubscribeMsgChangeEvent>
            <List>
                <TemplateId><![CDATA[T1]]></TemplateId>
            </List>
        </SubscribeMsgChangeEvent>
    </xml>
    """
    compact = (b"<xml><ToUserName><![CDATA[gh_1]]></ToUserName><SubscribeMsgChangeEvent><List>"
               b"<TemplateId><![CDATA[T1]]></TemplateId></List></SubscribeMsgChangeEvent></xml>")
    assert wxgate._parse_xml(pretty) == wxgate._parse_xml(compact) == {
        "ToUserName": "gh_1", "SubscribeMsgChangeEvent": {"List": [{"TemplateId": "T1"}]}}


def test_attributes_are_ignored():
    fields = wxgate._parse_xml(b'<xml version="2"><Content type="text" x="y">hi</Content>'
                               b'<Empty a="b"/></xml>')
    assert fields == {"Content": "hi", "Empty": ""}


def test_xml_declaration_and_processing_instruction_are_harmless():
    fields = wxgate._parse_xml(b'<?xml version="1.0" encoding="utf-8"?>\n'
                               b'<?xml-stylesheet href="http://127.0.0.1:9/s.xsl"?>'
                               b"<xml><a>1</a></xml>\n")
    assert fields == {"a": "1"}


def test_nesting_up_to_the_limit_is_accepted():
    depth = wxgate.MAX_XML_DEPTH
    body = "<xml>" + "<a>" * (depth - 1) + "x" + "</a>" * (depth - 1) + "</xml>"
    fields = wxgate._parse_xml(body.encode())
    for _ in range(depth - 2):
        fields = fields["a"]
    assert fields == {"a": "x"}


@pytest.mark.parametrize("body", [
    pytest.param(b"<xml><a>\xff\xfe</a></xml>", id="invalid utf-8"),
    pytest.param("<xml><a>é</a></xml>".encode("latin-1"), id="latin-1"),
    pytest.param("<xml><a>你好</a></xml>".encode("gbk"), id="gbk"),
    pytest.param('<?xml version="1.0" encoding="ISO-8859-1"?><xml><a>é</a></xml>'
                 .encode("latin-1"), id="declared latin-1 is not honoured"),
    pytest.param('<?xml version="1.0" encoding="GBK"?><xml><a>你</a></xml>'.encode("gbk"),
                 id="declared gbk is not honoured"),
    pytest.param(b"<xml><a>\xed\xa0\x80</a></xml>", id="utf-8 encoded surrogate"),
    pytest.param(b"<xml><a>\x01</a></xml>", id="control character"),
])
def test_not_utf8_is_a_message_error(body):
    message_error(wxgate._parse_xml, body)


@pytest.mark.parametrize("body", [
    pytest.param(b"", id="empty"),
    pytest.param(b"<xml><a></xml>", id="mismatched tag"),
    pytest.param(b"<xml><a>1</a>", id="unclosed root"),
    pytest.param(b"<xml></xml><xml></xml>", id="two roots"),
    pytest.param(b"<xml><a>1</a></xml>junk", id="junk after root"),
    pytest.param(b"<xml><a>&nbsp;</a></xml>", id="undefined entity"),
    pytest.param(b"<xml/>", id="empty root"),
    pytest.param(b"<xml>just text</xml>", id="root with only text"),
    pytest.param(b"<xml><a b=1>x</a></xml>", id="unquoted attribute"),
    pytest.param(b" <?xml version='1.0'?><xml><a>1</a></xml>", id="declaration not at start"),
])
def test_malformed_xml_is_a_message_error(body):
    message_error(wxgate._parse_xml, body)


# -- _parse_json ----------------------------------------------------------------------------


def test_json_list_object_becomes_a_list_of_one():
    item = {"TemplateId": "T1", "SubscribeStatusString": "reject"}
    one = wxgate._parse_json(('{"MsgType": "event", "Event": "subscribe_msg_change_event", '
                              '"List": {"TemplateId": "T1", "SubscribeStatusString": "reject"}}'
                              ).encode())
    array = wxgate._parse_json(b'{"MsgType": "event", "Event": "subscribe_msg_change_event", '
                               b'"List": [{"TemplateId": "T1", '
                               b'"SubscribeStatusString": "reject"}]}')
    assert one == array
    assert one["List"] == [item]


def test_json_list_array_and_empty_list_stay_as_they_are():
    fields = wxgate._parse_json(b'{"List": [{"a": 1}, {"a": 2}], "Other": {"b": 1}}')
    assert fields == {"List": [{"a": 1}, {"a": 2}], "Other": {"b": 1}}
    assert wxgate._parse_json(b'{"List": []}') == {"List": []}
    assert "List" not in wxgate._parse_json(b'{"MsgType": "text"}')


def test_json_huge_integers_stay_exact():
    msg_id = 2 ** 64 + 1  # beyond any float's exact range
    fields = wxgate._parse_json(f'{{"MsgId": {msg_id}, "CreateTime": "1610969440",'
                                f' "Big": 123456789012345678901234567890}}'.encode())
    assert fields["MsgId"] == msg_id and type(fields["MsgId"]) is int
    assert fields["Big"] == 123456789012345678901234567890
    assert fields["CreateTime"] == "1610969440"


def test_json_utf8_text_is_kept():
    assert wxgate._parse_json('{"Content": "你好"}'.encode()) == {"Content": "你好"}
    assert wxgate._parse_json(b'{"Content": "\\u4f60"}') == {"Content": "你"}


@pytest.mark.parametrize("body", [
    pytest.param(b"[]", id="array"),
    pytest.param(b"[{}]", id="array of object"),
    pytest.param(b'"text"', id="string"),
    pytest.param(b"1", id="number"),
    pytest.param(b"null", id="null"),
    pytest.param(b"true", id="bool"),
])
def test_json_that_is_not_an_object_is_a_message_error(body):
    message_error(wxgate._parse_json, body)


@pytest.mark.parametrize("body", [
    pytest.param(b"", id="empty"),
    pytest.param(b'{"a": ', id="truncated"),
    pytest.param(b"{'a': 1}", id="single quotes"),
    pytest.param(b'{"a": 1} {"b": 2}', id="two documents"),
    pytest.param(b'{"a": "\xff"}', id="invalid utf-8"),
    pytest.param(b'{"a": 1' + b"0" * 5000 + b"}", id="5000-digit number"),
    pytest.param(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", id="deep arrays"),
    pytest.param(b'{"a": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001, id="deep objects"),
])
def test_malformed_json_is_a_message_error(body):
    message_error(wxgate._parse_json, body)


# -- Message --------------------------------------------------------------------------------


def test_message_is_a_read_only_mapping():
    fields = text_message(content="hi", msg_id="77")
    message = wxgate.Message(fields, app="demo", format="json", encrypted=True)
    assert message["Content"] == "hi" and message.get("Nope") is None
    assert "MsgId" in message and len(message) == len(fields)
    assert dict(message) == fields and list(message) == list(fields)
    with pytest.raises(TypeError):
        message["Content"] = "changed"
    with pytest.raises(TypeError):
        del message["Content"]
    assert not hasattr(message, "update") and not hasattr(message, "pop")
    assert message["Content"] == "hi"
    assert (message.app, message.format, message.encrypted) == ("demo", "json", True)


def test_message_attributes_of_a_text_message():
    message = wxgate.Message(text_message(msg_id="6054768590064713728"), app="demo")
    assert message.msg_type == "text"
    assert message.event is None
    assert message.from_user == OPENID
    assert message.dedup_key == "demo:m:6054768590064713728"


def test_message_attributes_of_an_event():
    message = wxgate.Message(event_message("user_enter_tempsession", SessionFrom="x"), app="demo")
    assert message.msg_type == "event"
    assert message.event == "user_enter_tempsession"
    assert message.from_user == OPENID
    assert message.dedup_key is not None and message.dedup_key.startswith("demo:e:")


def test_event_is_none_for_non_events_even_with_an_event_field():
    message = wxgate.Message(text_message(Event="user_enter_tempsession"), app="demo")
    assert message.event is None


def test_message_without_type_or_sender():
    # from_user is a str, "" when absent, so a typed handler passes it on without a check.
    message = wxgate.Message({"ToUserName": GH_ID}, app="demo")
    assert (message.msg_type, message.event, message.from_user, message.dedup_key) == (
        None, None, "", None)


def test_message_items_list_is_the_same_for_xml_and_json():
    xml_fields = wxgate._parse_xml(
        b"<xml><MsgType>event</MsgType><SubscribeMsgSentEvent><List><TemplateId>T1</TemplateId>"
        b"</List></SubscribeMsgSentEvent></xml>")
    json_fields = wxgate._parse_json(b'{"MsgType": "event", "List": {"TemplateId": "T1"}}')
    assert wxgate.Message(xml_fields).items_list == wxgate.Message(json_fields).items_list == [
        {"TemplateId": "T1"}]
    assert wxgate.Message(text_message()).items_list == []


# -- _dedup_key -----------------------------------------------------------------------------


def test_dedup_key_uses_msgid_for_messages():
    assert wxgate._dedup_key("demo", text_message(msg_id="123")) == wxgate._dedup_key(
        "demo", text_message(msg_id="123", CreateTime=1, FromUserName="other", Content="x"))
    assert wxgate._dedup_key("demo", text_message(msg_id="123")) != wxgate._dedup_key(
        "demo", text_message(msg_id="124"))


def test_dedup_key_msgid_is_exact_and_opaque():
    big = "18446744073709551617"
    assert big in wxgate._dedup_key("demo", {"MsgId": int(big)})
    assert wxgate._dedup_key("demo", {"MsgId": int(big)}) != wxgate._dedup_key(
        "demo", {"MsgId": int(big) - 1})
    opaque = "49d72d67b16d115e7935ac386f2f0fa41535298877_1555684067"
    assert opaque in wxgate._dedup_key("demo", {"MsgId": opaque})


def test_dedup_key_of_an_event_covers_everything_it_carries():
    base = wxgate._dedup_key("demo", event_message("user_enter_tempsession", SessionFrom="a"))
    assert base is not None
    assert wxgate._dedup_key("demo", event_message("user_enter_tempsession",
                                                   SessionFrom="a")) == base
    for other in (event_message("user_enter_tempsession", SessionFrom="b"),
                  event_message("user_enter_tempsession"),
                  event_message("debug_demo", SessionFrom="a"),
                  event_message("user_enter_tempsession", SessionFrom="a",
                                FromUserName="o_other"),
                  event_message("user_enter_tempsession", SessionFrom="a", CreateTime=1)):
        assert wxgate._dedup_key("demo", other) != base, other


def test_dedup_key_tells_two_payments_of_one_second_apart():
    def pay(order):
        return event_message("xpay_goods_deliver_notify", OpenId=OPENID, OutTradeNo=order,
                             Env=0, GoodsInfo={"ProductId": "gold", "Quantity": 1})
    assert wxgate._dedup_key("demo", pay("o-1")) != wxgate._dedup_key("demo", pay("o-2"))
    assert wxgate._dedup_key("demo", pay("o-1")) == wxgate._dedup_key("demo", pay("o-1"))


POPUP_XML = (b"<xml><ToUserName><![CDATA[gh_1]]></ToUserName><FromUserName><![CDATA[o_1]]>"
             b"</FromUserName><CreateTime>1610969440</CreateTime><MsgType><![CDATA[event]]>"
             b"</MsgType><Event><![CDATA[subscribe_msg_popup_event]]></Event>"
             b"<SubscribeMsgPopupEvent><List><TemplateId><![CDATA[T1]]></TemplateId>"
             b"<SubscribeStatusString><![CDATA[accept]]></SubscribeStatusString>"
             b"<PopupScene>0</PopupScene></List></SubscribeMsgPopupEvent></xml>")
POPUP_JSON = (b'{"ToUserName": "gh_1", "FromUserName": "o_1", "CreateTime": 1610969440,'
              b' "MsgType": "event", "Event": "subscribe_msg_popup_event", "List": [{'
              b'"TemplateId": "T1", "SubscribeStatusString": "accept", "PopupScene": 0}]}')


def test_dedup_key_of_an_event_is_the_same_in_xml_json_and_any_layout():
    # The console can switch a push's format; a retry must still be recognised.
    key = wxgate._dedup_key("demo", wxgate._parse_xml(POPUP_XML))
    assert key == wxgate._dedup_key("demo", wxgate._parse_json(POPUP_JSON))
    pretty = POPUP_XML.replace(b"><", b">\n  <")
    assert wxgate._dedup_key("demo", wxgate._parse_xml(pretty)) == key
    compact = POPUP_JSON.replace(b", ", b",").replace(b": ", b":").replace(b"[{", b"{"). \
        replace(b"}]", b"}")  # List as an object: one item
    assert wxgate._dedup_key("demo", wxgate._parse_json(compact)) == key
    accepted_twice = POPUP_XML.replace(b"</List>", b"</List><List><TemplateId>T2</TemplateId>"
                                       b"<SubscribeStatusString>reject</SubscribeStatusString>"
                                       b"<PopupScene>0</PopupScene></List>", 1)
    assert wxgate._dedup_key("demo", wxgate._parse_xml(accepted_twice)) != key


def test_dedup_key_of_list_items_keeps_their_order_and_pairing():
    def change(*items):
        return event_message("subscribe_msg_change_event", List=[
            {"TemplateId": template, "SubscribeStatusString": status}
            for template, status in items])
    one = wxgate._dedup_key("demo", change(("T1", "accept"), ("T2", "reject")))
    assert one != wxgate._dedup_key("demo", change(("T1", "reject"), ("T2", "accept")))
    assert one != wxgate._dedup_key("demo", change(("T2", "reject"), ("T1", "accept")))


@pytest.mark.parametrize("value", [
    pytest.param(wxgate._parse_json(POPUP_JSON), id="subscribe event"),
    pytest.param({"b": [1, {"x": None, "y": [True]}, " s "], "a": {"é\"": 1.5, "k": []}},
                 id="every kind of value"),
])
def test_canonical_text_is_the_same_by_either_path(value):
    # Pushes nested deeper than WeChat's take the stack-free path: same rules, same text.
    assert wxgate._canonical_json_deep(value) == wxgate._canonical_dumps(
        wxgate._canonical(value, 0))


def test_dedup_key_of_a_deeply_nested_json_push_is_computed():
    # As deep as this Python's json parser takes, whatever the call stack above the key.
    for depth in (100_000, 10_000, 2_000, 900):
        deep = b'{"FromUserName": "o", "CreateTime": 1, "x": ' + b"[" * depth + \
            b"]" * depth + b"}"
        try:
            fields = wxgate._parse_json(deep)
            break
        except wxgate.MessageError:
            continue
    assert wxgate._dedup_key("demo", fields).startswith("demo:e:")


def test_dedup_key_create_time_string_or_number():
    as_number = wxgate._dedup_key("demo", event_message("debug_demo", CreateTime=1610969440))
    as_string = wxgate._dedup_key("demo", event_message("debug_demo", CreateTime="1610969440"))
    assert as_number == as_string is not None


def test_dedup_key_trace_id_distinguishes_media_checks_in_one_second():
    first = event_message("wxa_media_check", trace_id="967e945cd8a3e458f3c74dcb886068e9",
                          appid="wx1", version=2)
    second = dict(first, trace_id="2e945cd8a3e458f3c74dcb886068e9aa")
    assert wxgate._dedup_key("demo", first) != wxgate._dedup_key("demo", second)
    assert wxgate._dedup_key("demo", first) == wxgate._dedup_key("demo", dict(first))
    with_id = dict(first, MsgId="1")
    assert first["trace_id"] in wxgate._dedup_key("demo", with_id)
    assert wxgate._dedup_key("demo", with_id) != wxgate._dedup_key(
        "demo", dict(second, MsgId="1"))


@pytest.mark.parametrize("fields", [
    pytest.param({"MsgId": "9" * 60_000}, id="60 KB MsgId"),
    pytest.param({"MsgId": "1", "trace_id": "t" * 30_000}, id="30 KB trace_id"),
    pytest.param({"MsgId": "a:b\r\nc"}, id="MsgId with a colon and CRLF"),
    pytest.param({"MsgId": ["x"] * 10_000}, id="MsgId a list"),
    pytest.param(event_message("debug_demo", FromUserName="o" * 30_000,
                               debug_str="d" * 30_000), id="30 KB sender and field"),
])
def test_dedup_key_is_short_and_plain_whatever_the_push_carries(fields):
    key = wxgate._dedup_key("demo", fields)
    assert len(key) <= 150 and key.isprintable() and "\n" not in key
    assert key != wxgate._dedup_key("demo", dict(fields, MsgId="other"))


def test_dedup_key_differs_between_apps():
    for fields in (text_message(msg_id="1"), event_message("debug_demo")):
        assert wxgate._dedup_key("a", fields) != wxgate._dedup_key("b", fields)


@pytest.mark.parametrize("fields", [
    pytest.param({}, id="empty"),
    pytest.param({"ToUserName": GH_ID, "MsgType": "event", "Event": "x"}, id="no sender"),
    pytest.param({"FromUserName": OPENID, "MsgType": "event", "Event": "x"}, id="no time"),
    pytest.param({"FromUserName": "", "CreateTime": 1}, id="empty sender"),
    pytest.param({"FromUserName": OPENID, "CreateTime": ""}, id="empty time"),
    pytest.param({"MsgId": "", "CreateTime": 1}, id="empty msgid, no sender"),
])
def test_dedup_key_is_none_when_nothing_identifies_the_push(fields):
    assert wxgate._dedup_key("demo", fields) is None


def test_dedup_key_empty_msgid_falls_back_to_the_event_key():
    key = wxgate._dedup_key("demo", event_message("debug_demo", MsgId=""))
    assert key is not None and key.startswith("demo:e:")
    assert key == wxgate._dedup_key("demo", event_message("debug_demo", MsgId=""))


# -- _dump_xml ------------------------------------------------------------------------------


def test_dump_xml_strings_in_cdata_numbers_bare_dicts_nested_lists_repeated():
    text = wxgate._dump_xml({
        "ToUserName": OPENID, "CreateTime": 1714112445, "Score": 0.5,
        "Result": {"suggest": "pass", "label": 100},
        "List": [{"TemplateId": "T1"}, {"TemplateId": "T2"}], "N": [1, "2"]})
    assert text == (
        f"<xml><ToUserName><![CDATA[{OPENID}]]></ToUserName><CreateTime>1714112445</CreateTime>"
        "<Score>0.5</Score><Result><suggest><![CDATA[pass]]></suggest><label>100</label>"
        "</Result><List><TemplateId><![CDATA[T1]]></TemplateId></List><List><TemplateId>"
        "<![CDATA[T2]]></TemplateId></List><N>1</N><N><![CDATA[2]]></N></xml>")


def test_dump_xml_round_trips_through_parse_xml():
    fields = {"ToUserName": OPENID, "FromUserName": GH_ID, "CreateTime": "1714112445",
              "MsgType": "transfer_customer_service", "Content": "a]]>b <c> & 你好",
              "Nested": {"Deep": {"Leaf": "x"}}, "Repeated": ["1", "2"],
              "List": [{"TemplateId": "T1"}]}
    assert wxgate._parse_xml(wxgate._dump_xml(fields).encode()) == fields


CDATA_HOSTILE = [
    "]]>", "]]>]]>", "a]]>b]]>c", "]]", "]", "x]]", "]]]]>", "]]]>", "<![CDATA[", "]]><![CDATA[",
    "]]></Content><MsgType>text</MsgType><Content><![CDATA[",
    "]]><MsgType><![CDATA[text]]></MsgType><![CDATA[", "&lt;", "<!DOCTYPE x>", "</xml>",
]


@pytest.mark.parametrize("value", CDATA_HOSTILE)
def test_dump_xml_cdata_cannot_be_escaped(value):
    text = wxgate._dump_xml({"MsgType": "transfer_customer_service", "Content": value})
    root = ET.fromstring(text)
    assert [child.tag for child in root] == ["MsgType", "Content"]
    assert root.find("Content").text == value
    assert root.find("MsgType").text == "transfer_customer_service"
    assert list(root.find("Content")) == []


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("]]>[<!CDATA&;/x 你\n\t\"'")), max_size=40))
def test_dump_xml_cdata_round_trips_any_text(value):
    root = ET.fromstring(wxgate._dump_xml({"Content": value, "Tail": "t"}))
    assert [child.tag for child in root] == ["Content", "Tail"]
    assert (root[0].text or "") == value
    assert root[1].text == "t"


@pytest.mark.parametrize("value", ["\x00", "a\x01b", "\x1b[31m", "\ufffe", "\x0c"])
def test_dump_xml_never_emits_malformed_xml(value):
    # Characters XML 1.0 cannot carry, even in CDATA: refuse (-40011) rather than send WeChat
    # a reply it cannot parse.
    try:
        text = wxgate._dump_xml({"Content": value})
    except wxgate.WxgateError as exc:
        assert exc.code == -40011
    else:
        ET.fromstring(text)


@pytest.mark.parametrize("name", ["", "1abc", "a b", "a<b", "a>b", "x/y", "a&b", "a:b:c!",
                                  "Content\n", "-x", ".x", 5, None, ("a",)])
def test_dump_xml_refuses_invalid_element_names(name):
    with pytest.raises(wxgate.WxgateError) as info:
        wxgate._dump_xml({name: "x"})
    assert info.value.code == -40011
    assert "-40011" in str(info.value)
    assert not isinstance(info.value, wxgate.MessageError)


def test_dump_xml_refuses_invalid_names_when_nested():
    for fields in ({"Outer": {"bad name": "x"}}, {"Outer": [{"ok": 1}, {"<x>": 2}]}):
        with pytest.raises(wxgate.WxgateError) as info:
            wxgate._dump_xml(fields)
        assert info.value.code == -40011


# -- the XML attack corpus ------------------------------------------------------------------

SENTINEL = "SENTINEL-FILE-CONTENT-7f3a9c"


class _CountingHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.hits.append(self.path)
        body = f'<!ENTITY leak "{SENTINEL}">'.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def bait_server():
    """A loopback HTTP server that records every request an entity or DTD might make."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    server.hits = []
    # A short poll interval: shutdown() waits for the serve loop (0.5 s by default).
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def bait_file(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text(SENTINEL, "utf-8")
    return path


@pytest.fixture
def no_io(monkeypatch):
    """Record (and refuse) any file open or socket connection made while parsing."""
    attempts = []

    def refuse(what):
        def refused(*args, **kwargs):
            attempts.append((what, args[:2]))
            raise OSError(f"{what} refused by the test")
        return refused

    def parse(function, body):
        with monkeypatch.context() as patch:
            for target, name in [(builtins, "open"), (io, "open"), (os, "open"),
                                 (socket.socket, "connect"), (socket.socket, "connect_ex"),
                                 (socket, "create_connection"), (urllib.request, "urlopen")]:
                patch.setattr(target, name, refuse(f"{getattr(target, '__name__', target)}."
                                                   f"{name}"))
            return function(body)

    parse.attempts = attempts
    return parse


def _lol(levels=9):
    entities = ['<!ENTITY lol0 "lol">'] + [
        f'<!ENTITY lol{n} "{f"&lol{n - 1};" * 10}">' for n in range(1, levels + 1)]
    return ('<?xml version="1.0"?><!DOCTYPE xml [' + "".join(entities) + "]>"
            f"<xml><Content>&lol{levels};</Content></xml>")


def attack_corpus(url, file_url):
    big = "A" * 30_000
    return {
        "billion laughs": _lol(),
        "quadratic blowup": (f'<!DOCTYPE xml [<!ENTITY a "{big}">]><xml><Content>'
                             + "&a;" * 8_000 + "</Content></xml>"),
        "external entity file": (f'<!DOCTYPE xml [<!ENTITY e SYSTEM "{file_url}">]>'
                                 "<xml><Content>&e;</Content></xml>"),
        "external entity url": (f'<!DOCTYPE xml [<!ENTITY e SYSTEM "{url}/entity">]>'
                                "<xml><Content>&e;</Content></xml>"),
        "external entity public": (f'<!DOCTYPE xml [<!ENTITY e PUBLIC "-//X//EN" "{url}/pub">]>'
                                   "<xml><Content>&e;</Content></xml>"),
        "dtd retrieval system": f'<!DOCTYPE xml SYSTEM "{url}/x.dtd"><xml><a>1</a></xml>',
        "dtd retrieval public": (f'<!DOCTYPE xml PUBLIC "-//X//DTD X//EN" "{url}/p.dtd">'
                                 "<xml><a>1</a></xml>"),
        "dtd retrieval file": f'<!DOCTYPE xml SYSTEM "{file_url}"><xml><a>1</a></xml>',
        "parameter entity internal": ("<!DOCTYPE xml [<!ENTITY % p \"<!ENTITY i 'x'>\"> %p;]>"
                                      "<xml><Content>&i;</Content></xml>"),
        "parameter entity external": (f'<!DOCTYPE xml [<!ENTITY % p SYSTEM "{url}/param"> %p;]>'
                                      "<xml><Content>&leak;</Content></xml>"),
        "parameter entity file": (f'<!DOCTYPE xml [<!ENTITY % p SYSTEM "{file_url}"> %p;]>'
                                  "<xml><a>1</a></xml>"),
        "empty doctype": "<!DOCTYPE xml><xml><a>1</a></xml>",
        "internal subset only": "<!DOCTYPE xml [<!ELEMENT xml ANY>]><xml><a>1</a></xml>",
        "doctype after declaration": ('<?xml version="1.0" encoding="utf-8"?>\n'
                                      "<!DOCTYPE xml []><xml><a>1</a></xml>"),
        "undeclared entity reference": "<xml><Content>&xxe;</Content></xml>",
        "entity expanded in attribute": (f'<!DOCTYPE xml [<!ENTITY a "{"A" * 1000}">]>'
                                         '<xml><Content b="' + "&a;" * 5_000
                                         + '">x</Content></xml>'),
        "deeply nested 9000": "<xml>" + "<a>" * 9_000 + "</a>" * 9_000 + "</xml>",
        "nested one past the limit": ("<xml>" + "<a>" * wxgate.MAX_XML_DEPTH + "x"
                                      + "</a>" * wxgate.MAX_XML_DEPTH + "</xml>"),
    }


def test_the_bait_detects_io(bait_server, bait_file, no_io):
    # The negative checks below mean something only if these traps do fire.
    before = len(bait_server.hits)
    with urllib.request.urlopen(f"http://127.0.0.1:{bait_server.server_port}/probe") as reply:
        assert SENTINEL in reply.read().decode()
    assert bait_server.hits[before:] == ["/probe"]
    with pytest.raises(OSError):
        no_io(lambda path: open(path).read(), bait_file)
    assert no_io.attempts and "open" in no_io.attempts[0][0]


ATTACKS = sorted(attack_corpus("http://127.0.0.1:1", "file:///x"))


@pytest.mark.parametrize("name", ATTACKS)
def test_xml_attack_is_refused_without_io(name, bait_server, bait_file, no_io):
    url = f"http://127.0.0.1:{bait_server.server_port}"
    body = attack_corpus(url, bait_file.as_uri())[name].encode("utf-8")
    assert len(body) <= MAX_BODY  # so the parser, not the body limit, is what refuses it
    before = len(bait_server.hits)
    with pytest.raises(wxgate.MessageError) as info:
        no_io(wxgate._parse_xml, body)
    assert info.value.status == 400 and info.value.code == -40002
    assert SENTINEL not in str(info.value)
    assert no_io.attempts == []
    assert bait_server.hits[before:] == []


def test_ten_thousand_levels_of_nesting_are_refused():
    body = ("<xml>" + "<a>" * 10_000 + "</a>" * 10_000 + "</xml>").encode()
    error = message_error(wxgate._parse_xml, body)
    assert "nested" in str(error)


def test_xinclude_is_not_processed(bait_server, bait_file, no_io):
    url = f"http://127.0.0.1:{bait_server.server_port}/xi"
    before = len(bait_server.hits)
    body = (f'<xml xmlns:xi="http://www.w3.org/2001/XInclude"><a>1</a>'
            f'<xi:include href="{bait_file.as_uri()}" parse="text"/>'
            f'<xi:include href="{url}" parse="text"/></xml>').encode()
    fields = no_io(wxgate._parse_xml, body)
    assert fields["a"] == "1"
    assert SENTINEL not in repr(fields)
    assert no_io.attempts == [] and bait_server.hits[before:] == []


def test_huge_attribute_inside_the_body_limit_is_refused(no_io):
    value = "A" * (MAX_BODY - 200)
    body = (f'<xml><ToUserName><![CDATA[{GH_ID}]]></ToUserName>'
            f'<Content b="{value}">hi</Content></xml>').encode()
    assert len(body) <= MAX_BODY
    with pytest.raises(wxgate.MessageError, match="attributes"):
        no_io(wxgate._parse_xml, body)
    assert no_io.attempts == []


def test_many_attributes_are_refused():
    attributes = " ".join(f'a{n}="{n}"' for n in range(5_000))
    body = f"<xml><Content {attributes}>hi</Content></xml>".encode()
    assert len(body) <= MAX_BODY
    with pytest.raises(wxgate.MessageError, match="attributes"):
        wxgate._parse_xml(body)


def test_attributes_at_the_limits_are_still_ignored():
    attributes = " ".join(f'a{n}="{"v" * wxgate.MAX_XML_ATTRIBUTE_CHARS}"'
                          for n in range(wxgate.MAX_XML_ATTRIBUTES))
    assert wxgate._parse_xml(f"<xml><Content {attributes}>hi</Content></xml>".encode()) == \
        {"Content": "hi"}


def test_parser_still_works_after_an_attack():
    message_error(wxgate._parse_xml, _lol().encode())
    assert wxgate._parse_xml(b"<xml><a>1</a></xml>") == {"a": "1"}


# -- the fast path for flat documents agrees with expat ----------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_NAMES = st.sampled_from(["ToUserName", "FromUserName", "CreateTime", "MsgType", "Content",
                          "MsgId", "List", "a", "_b", "x1", "Encrypt"])
_TEXTS = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FFF), max_size=12)
_SPACES = st.sampled_from(["", " ", "\n", "\r\n", "\t", "\x0b", "\x0c"])


@st.composite
def flat_documents(draw):
    parts = [draw(_SPACES), "<xml>"]
    for _ in range(draw(st.integers(0, 6))):
        name, text = draw(_NAMES), draw(_TEXTS)
        body = draw(st.sampled_from([f"<![CDATA[{text}]]>", text, ""]))
        parts += [draw(_SPACES), f"<{name}>{body}</{name}>"]
    parts += [draw(_SPACES), "</xml>", draw(_SPACES)]
    return "".join(parts).encode("utf-8", "surrogatepass")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flat_documents())
def test_flat_fast_path_gives_what_expat_gives(data):
    fast = wxgate._parse_flat_xml(data)
    try:
        slow = wxgate._parse_xml(data)
    except wxgate.MessageError:
        slow = None
    if fast is not None:  # when the fast path answers, it must be expat's answer
        assert fast == slow


def test_flat_fast_path_takes_the_usual_pushes():
    push = (b"<xml><ToUserName><![CDATA[gh_1]]></ToUserName>\n<FromUserName><![CDATA[o1]]>"
            b"</FromUserName>\n<CreateTime>1409735668</CreateTime>\n<MsgType><![CDATA[text]]>"
            b"</MsgType>\n<Content><![CDATA[\xe4\xbd\xa0]]></Content>\n<MsgId>1</MsgId>\n</xml>")
    assert wxgate._parse_flat_xml(push) == wxgate._parse_xml(push)
    envelope = b"<xml><ToUserName><![CDATA[gh_1]]></ToUserName><Encrypt><![CDATA[ab+/=]]></Encrypt></xml>"
    assert wxgate._parse_flat_xml(envelope) == {"ToUserName": "gh_1", "Encrypt": "ab+/="}
    # Shapes it leaves to expat: repeats, List, nesting, entities, a declaration.
    for other in (b"<xml><a>1</a><a>2</a></xml>", b"<xml><List>1</List></xml>",
                  b"<xml><a><b>1</b></a></xml>", b"<xml><a>&amp;</a></xml>",
                  b'<?xml version="1.0"?><xml><a>1</a></xml>', b"<xml></xml>"):
        assert wxgate._parse_flat_xml(other) is None


# -- Message's attributes hold what their annotations say ------------------------------------


@pytest.mark.parametrize("value", [["o_user"], {"id": "o_user"}, 12345],
                         ids=["list", "object", "number"])
def test_message_attributes_hold_what_their_annotations_say(value):
    # Message.msg_type, .event and .from_user are annotated `str | None`, and typed handlers
    # (and the Router, and demo_handler) trust that; a JSON push may hold any JSON value
    # there.
    message = wxgate.Message({"MsgType": value, "Event": value, "FromUserName": value})
    assert message.msg_type is None or isinstance(message.msg_type, str)
    assert message.from_user is None or isinstance(message.from_user, str)
    event_push = wxgate.Message({"MsgType": "event", "Event": value})
    assert event_push.event is None or isinstance(event_push.event, str)


def test_message_client_is_a_client_or_a_clear_error():
    # `client` is typed WeChatClient, so a handler calls it without a None check; a Message
    # built by hand without one says how to give it instead of AttributeError on None.
    with pytest.raises(wxgate.WxgateError, match=r"without a client: pass client=\.\.\."):
        wxgate.Message({"MsgType": "text"}).client
    client = wxgate.WeChatClient(wxgate.TokenManager(APPID, "s"))
    assert wxgate.Message({"MsgType": "text"}, client=client).client is client


def test_a_reply_value_keeps_exactly_the_characters_xml_allows():
    # XML 1.0's Char production, https://www.w3.org/TR/xml/#charsets, over every code point:
    # those it allows stay in the reply, the others are dropped.
    def allowed(point):
        return point in (0x9, 0xA, 0xD) or 0x20 <= point <= 0xD7FF or \
            0xE000 <= point <= 0xFFFD or 0x10000 <= point <= 0x10FFFF

    every = "".join(map(chr, range(0x110000)))
    kept = "".join(char for char in every if allowed(ord(char)))
    expected = "<![CDATA[" + kept.replace("]]>", "]]]]><![CDATA[>") + "]]>"
    assert wxgate._cdata(every) == expected
    assert len(every) - len(kept) == 2079  # C0 controls but tab, LF, CR; surrogates; FFFE-F
