"""Push verification, reply rendering and key rotation as plain values in and out, and the
line between wxgate's core and its optional parts.

The functions here see no environ, clock, store or random source: a test hands them strings,
bytes and a time, and reads back a verified push, a reply text or a refusal.
"""

import ast
import io
import re
import sys
import types
import urllib.parse

import pytest

import wxgate
from conftest import (AES_KEY, APPID, NOW, REPO, TOKEN, aes_decrypt, build_push, make_config,
                      open_reply, text_message)

OTHER_KEY = "zyxwvutsrqponmlkjihgfedcba9876543210ZYXWVUT"


class Binds:
    """A bind callable that remembers each query's body, refusing a second body."""

    def __init__(self):
        self.bodies = {}

    def __call__(self, app, timestamp, nonce, body):
        bound = self.bodies.setdefault((app.name, timestamp, nonce), body)
        if bound != body:
            raise wxgate.SignatureError("reused", code=None)


def verify(app, query_string, body, *, headers=None, now=NOW, window=300, bind=None):
    query = dict(urllib.parse.parse_qsl(query_string, keep_blank_values=True))
    return wxgate._verify_push(app, query, headers or {}, lambda: body, now, window,
                               bind or Binds())


# -- push verification ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["plain", "compat", "safe"])
@pytest.mark.parametrize("fmt", ["xml", "json"])
def test_a_genuine_push_verifies_to_its_fields(tmp_path, mode, fmt):
    app = make_config(tmp_path, mode=mode).apps["test"]
    query, body = build_push(text_message("plain values"), mode=mode, fmt=fmt)
    verified = verify(app, query, body)
    assert verified.fields["Content"] == "plain values"
    assert verified.format == fmt and verified.encrypted == (mode != "plain")
    assert verified.aes_key == (wxgate._decode_aes_key(AES_KEY) if mode != "plain" else None)
    assert not verified.previous_key


@pytest.mark.parametrize("change, status, words", [
    pytest.param(lambda q, b: (q.replace("msg_signature=", "msg_signature=0"), b), 403,
                 "msg_signature does not match", id="msg_signature altered"),
    pytest.param(lambda q, b: (q.replace(f"timestamp={NOW}", f"timestamp={NOW - 301}"), b),
                 403, "beyond timestamp_window", id="timestamp past the window"),
    pytest.param(lambda q, b: (q, b"{}"), 415, "the body is json, but the app expects xml",
                 id="format the app does not take"),
    pytest.param(lambda q, b: (q, b"   "), 400, "empty body", id="empty body"),
])
def test_a_refused_push_names_its_refusal(tmp_path, change, status, words):
    app = make_config(tmp_path, mode="safe", fmt="xml").apps["test"]
    query, body = change(*build_push(text_message(), mode="safe", fmt="xml"))
    with pytest.raises(wxgate.WxgateError) as caught:
        verify(app, query, body)
    assert caught.value.status == status and words in caught.value.message


def test_every_failure_past_msg_signature_is_the_one_sealed_refusal(tmp_path):
    app = make_config(tmp_path, mode="safe").apps["test"]
    refusals = set()
    for fields in (text_message(), text_message("other")):
        for key, appid in ((OTHER_KEY, APPID), (AES_KEY, "wx0000000000000000")):
            query, body = build_push(fields, key=key, appid=appid)
            with pytest.raises(wxgate.DecryptError) as caught:
                verify(app, query, body)
            refusals.add((caught.value.status, caught.value.public))
    assert refusals == {(400, wxgate.SEALED_REFUSAL)}


def test_a_signed_query_binds_only_once_its_signature_passed(tmp_path):
    app = make_config(tmp_path, mode="safe").apps["test"]
    query, body = build_push(text_message())
    binds = Binds()
    forged = body.replace(b"<Encrypt>", b"<Encrypt>A")
    with pytest.raises(wxgate.SignatureError):
        verify(app, query, forged, bind=binds)
    assert binds.bodies == {}  # the forgery did not occupy the query
    assert verify(app, query, body, bind=binds).fields["Content"] == "hello"
    assert list(binds.bodies.values()) == [body]


def test_a_plain_push_binds_before_its_body_is_read(tmp_path):
    app = make_config(tmp_path, mode="plain", fmt="json").apps["test"]
    query, body = build_push(text_message(), mode="plain", fmt="xml")
    binds = Binds()
    with pytest.raises(wxgate.MessageError) as caught:
        verify(app, query, body, bind=binds)
    assert caught.value.status == 415 and caught.value.signed
    assert list(binds.bodies.values()) == [body]


def test_the_body_is_not_read_before_a_plain_signature_passed(tmp_path):
    app = make_config(tmp_path, mode="plain").apps["test"]
    query, _ = build_push(text_message(), mode="plain")
    reads = []
    with pytest.raises(wxgate.SignatureError):
        wxgate._verify_push(app, dict(urllib.parse.parse_qsl(query.replace(
            "signature=", "signature=0", 1))), {}, lambda: reads.append(1) or b"", NOW, 300,
            Binds())
    assert reads == []


@pytest.mark.parametrize("headers, status", [
    pytest.param({}, 403, id="no X-WX-SOURCE"),
    pytest.param({"X-WX-SOURCE": " "}, 403, id="empty X-WX-SOURCE"),
    pytest.param({"X-WX-SOURCE": "wx", "X-WX-OPENID": "a,b"}, 400, id="identity twice"),
])
def test_cloud_refusals(tmp_path, headers, status):
    app = make_config(tmp_path, mode="cloud", extra_app="cloud_source_check = yes"
                      ).apps["test"]
    with pytest.raises(wxgate.WxgateError) as caught:
        verify(app, "", b'{"MsgType": "text"}', headers=headers)
    assert caught.value.status == status


def test_cloud_push_and_path_check(tmp_path):
    app = make_config(tmp_path, mode="cloud").apps["test"]
    headers = {"X-WX-SOURCE": "wx", "X-WX-OPENID": "o1", "X-Other": "dropped"}
    assert verify(app, "", b'{"action": "CheckContainerPath"}', headers=headers) is None
    verified = verify(app, "", b'{"MsgType": "text", "Content": "hi"}', headers=headers)
    assert verified.cloud == {"X-WX-OPENID": "o1"} and verified.fields["Content"] == "hi"


def test_handshake_answers_echostr_and_binds_the_empty_body(tmp_path):
    app = make_config(tmp_path, mode="safe").apps["test"]
    query = {"signature": wxgate.sign(TOKEN, NOW, "7"), "timestamp": str(NOW), "nonce": "7",
             "echostr": "1234"}
    binds = Binds()
    assert wxgate._verify_handshake(app, query, NOW, 300, binds) == "1234"
    assert binds.bodies == {("test", str(NOW), "7"): b""}


# -- the key-rotation rule -------------------------------------------------------------------


def encrypt(key, appid=APPID):
    return wxgate.encrypt_message("<xml><A>1</A></xml>", key, appid,
                                  random_prefix=b"0123456789abcdef")


@pytest.mark.parametrize("sealed, current, previous", [
    pytest.param(AES_KEY, AES_KEY, None, id="current key, no rotation"),
    pytest.param(AES_KEY, AES_KEY, OTHER_KEY, id="current key during a rotation"),
    pytest.param(OTHER_KEY, AES_KEY, OTHER_KEY, id="previous key during a rotation"),
])
def test_the_rotation_rule_opens_with_the_current_then_the_previous_key(sealed, current,
                                                                        previous):
    text, key = wxgate._open_encrypt(encrypt(sealed), current, previous, APPID)
    assert text == "<xml><A>1</A></xml>" and key == sealed


@pytest.mark.parametrize("encrypted, code", [
    pytest.param(lambda: encrypt(AES_KEY), wxgate.ILLEGAL_BUFFER, id="a third key"),
    pytest.param(lambda: "not base64!", wxgate.DECODE_BASE64_ERROR, id="not Base64"),
    pytest.param(lambda: "QUJD", wxgate.DECRYPT_AES_ERROR, id="not a multiple of 32"),
])
def test_the_rotation_rule_reports_what_the_current_key_said(encrypted, code):
    keys = [wxgate._decode_aes_key(key) for key in (OTHER_KEY, "Qm9vZ2llV29vZ2llU2VjcmV0S2V5"
                                                    "MDEyMzQ1Njc4OWE")]
    with pytest.raises(wxgate.DecryptError) as caught:
        wxgate._open_encrypt(encrypted(), keys[0], keys[1], APPID)
    assert caught.value.code == code


def test_a_wrong_appid_under_both_keys_reports_the_current_keys_code():
    # -40005 under the current key may be a wrong key that unpadded by chance, so the previous
    # key is tried; it fails too, and the answer stays the current key's -40005.
    with pytest.raises(wxgate.DecryptError) as caught:
        wxgate._open_encrypt(encrypt(AES_KEY, "wx0000000000000000"), AES_KEY, OTHER_KEY, APPID)
    assert caught.value.code == wxgate.VALIDATE_APPID_ERROR


# -- the reply on the wire ---------------------------------------------------------------------


def message(tmp_path, mode="safe", fmt="xml"):
    app = make_config(tmp_path, mode=mode).apps["test"]
    return app, wxgate.Message(text_message(), app="test", format=fmt,
                               encrypted=mode in ("safe", "compat"))


def render(app, msg, reply, **options):
    options = {"nonce": "5", "aes_key": None, "now": NOW + 7,
               "random_prefix": b"0123456789abcdef", **options}
    return wxgate._render_reply(app, msg, reply, **options)


@pytest.mark.parametrize("reply, expected", [
    pytest.param(None, ("text/plain; charset=utf-8", "success"), id="None"),
    pytest.param("success", ("text/plain; charset=utf-8", "success"), id="success"),
    pytest.param(b"", ("text/plain; charset=utf-8", ""), id="empty bytes"),
    pytest.param(wxgate.RawReply({"ErrCode": 0, "ErrMsg": "success"}),
                 ("application/json; charset=utf-8", '{"ErrCode":0,"ErrMsg":"success"}'),
                 id="RawReply, in the clear even in safe mode"),
])
def test_replies_that_are_never_encrypted(tmp_path, reply, expected):
    app, msg = message(tmp_path)
    assert render(app, msg, reply) == expected


def test_an_encrypted_reply_is_reproducible_from_its_arguments(tmp_path):
    app, msg = message(tmp_path)
    first = render(app, msg, {"MsgType": "transfer_customer_service"})
    assert first == render(app, msg, {"MsgType": "transfer_customer_service"})
    assert first[0] == "text/xml; charset=utf-8"
    plaintext, appid, envelope = open_reply(first[1].encode(), "xml")
    assert appid == APPID and envelope["Nonce"] == "5" and envelope["TimeStamp"] == str(NOW + 7)
    assert f"<CreateTime>{NOW + 7}</CreateTime>" in plaintext
    assert aes_decrypt(envelope["Encrypt"])[0] == plaintext


def test_a_reply_is_sealed_with_the_key_that_opened_the_push(tmp_path):
    app, msg = message(tmp_path)
    _, body = render(app, msg, "<xml/>", aes_key=wxgate._decode_aes_key(OTHER_KEY))
    assert open_reply(body.encode(), "xml", key=OTHER_KEY)[0] == "<xml/>"
    with pytest.raises(Exception):  # not under the app's current key
        open_reply(body.encode(), "xml")


def test_a_cloud_apps_dict_reply_becomes_success(tmp_path):
    app, msg = message(tmp_path, mode="cloud")
    assert render(app, msg, {"MsgType": "text"}) == ("text/plain; charset=utf-8", "success")
    assert wxgate._reply_dropped(app, {"MsgType": "text"})
    assert not wxgate._reply_dropped(app, "text")


def test_an_unknown_reply_type_names_the_business_code(tmp_path):
    app, msg = message(tmp_path, mode="plain")
    with pytest.raises(TypeError, match="wxgate:demo_handler returned int"):
        render(app, msg, 3)


# -- the boundary between the core and the optional parts ---------------------------------------

SOURCE = (REPO / "wxgate.py").read_text("utf-8")
BOUNDARY = re.search(r"^# BOUNDARY.*$", SOURCE, re.M).start()
CORE, OPTIONAL = SOURCE[:BOUNDARY], SOURCE[BOUNDARY:]


def defined_names(tree):
    return {node.name for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))} | {
        target.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)}


def test_the_core_alone_imports_and_answers_a_push(tmp_path, monkeypatch):
    core = types.ModuleType("wxgate_core")
    monkeypatch.setitem(sys.modules, "wxgate_core", core)  # dataclasses look their module up
    exec(compile(CORE, "wxgate_core.py", "exec"), core.__dict__)
    below = defined_names(ast.parse(OPTIONAL))
    assert "WeChatClient" in below and not below & set(vars(core))
    handled = []  # a handler that never calls WeChat's API: the core needs nothing else
    config = make_config(tmp_path, handler=handled.append, mode="plain")
    gateway = core.Gateway(config, clock=lambda: NOW)
    query, body = build_push(text_message(), mode="plain")
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/wechat", "QUERY_STRING": query,
               "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}
    answers = []
    assert gateway(environ, lambda status, headers: answers.append(status)) == [b"success"]
    assert answers == ["200 OK"] and handled[0]["Content"] == "hello"
    gateway.close()


def test_the_core_names_the_optional_part_only_inside_functions():
    below = defined_names(ast.parse(OPTIONAL))
    tree = ast.parse(CORE)
    at_import = set()
    for node in tree.body:  # what runs at import: module statements, class bodies, defaults
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            parts = node.args.defaults + node.args.kw_defaults + node.decorator_list
        elif isinstance(node, ast.ClassDef):
            parts = [part for part in node.body if not isinstance(part, ast.FunctionDef)]
            parts += [default for part in node.body if isinstance(part, ast.FunctionDef)
                      for default in part.args.defaults + part.args.kw_defaults]
        else:
            parts = [node]
        for part in parts:
            if part is None:
                continue
            at_import |= {name.id for name in ast.walk(part) if isinstance(name, ast.Name)}
    assert not at_import & below


def test_no_object_reads_another_objects_private_attributes():
    modules = {"sys", "os", "json", "logging", "time", "threading", "collections", "types",
               "re", "functools", "socket", "urllib", "http", "io", "hashlib", "base64"}
    reads = []
    for node in ast.walk(ast.parse(SOURCE)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and \
                not node.attr.startswith("__"):
            owner = node.value
            if isinstance(owner, ast.Name) and (owner.id in ("self", "cls") or
                                                owner.id in modules or owner.id == "_AES"):
                continue
            reads.append(f"{ast.unparse(node)} (line {node.lineno})")
    assert reads == []
