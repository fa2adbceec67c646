"""Review of issue 12 (Router, Simulator, FakeAPI, upload_temp_media, the 收到 demo, types).

Each test states a problem found in review and fails until it is fixed.
"""

import dataclasses
import email.parser
import email.policy
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import webtest

import wxgate
from conftest import APPID, TOKEN, aes_encrypt, make_config, sha1_sign
from readme import code_block

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
SEND = "/cgi-bin/message/custom/send"


def demo_gateway(tmp_path, api, appsecret):
    extra = "appsecret = any-secret-works" if appsecret else ""
    config = make_config(tmp_path, mode="safe", fmt="json", extra_app=extra)
    app = dataclasses.replace(config.apps["test"], handler_spec="wxgate:demo_handler",
                              handler=wxgate._resolve_handler("wxgate:demo_handler", "."))
    return api.configure(dataclasses.replace(config, apps={"test": app}))


# -- 1. the demo handler: a JSON MsgType that is not a string is a 500 and a traceback -------


@pytest.mark.parametrize("appsecret", [True, False], ids=["appsecret", "no-appsecret"])
@pytest.mark.parametrize("msg_type", [["text"], {"a": 1}], ids=["list", "object"])
def test_demo_handler_answers_success_when_msgtype_is_not_a_string(tmp_path, caplog,
                                                                     appsecret, msg_type):
    # Before issue 12 (08d7964) the demo answered such a push 200 "success"; the issue says
    # that without an AppSecret it "behaves as today". `msg_type in frozenset(...)` now raises
    # TypeError (unhashable), so the push gets 500, a traceback in the log, and WeChat's
    # retries run it again.
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


# -- 2. Message's attributes are not what their annotations say -------------------------------


@pytest.mark.parametrize("value", [["o_user"], {"id": "o_user"}, 12345],
                         ids=["list", "object", "number"])
def test_message_attributes_hold_what_their_annotations_say(value):
    # Message.msg_type, .event and .from_user are annotated `str | None`, and typed handlers
    # (and the Router, and demo_handler) trust that; from a JSON push they are whatever JSON
    # value the push holds.
    message = wxgate.Message({"MsgType": value, "Event": value, "FromUserName": value})
    assert message.msg_type is None or isinstance(message.msg_type, str)
    assert message.from_user is None or isinstance(message.from_user, str)
    event_push = wxgate.Message({"MsgType": "event", "Event": value})
    assert event_push.event is None or isinstance(event_push.event, str)


def test_demo_handler_never_sends_to_an_openid_that_is_not_a_string(tmp_path):
    # A JSON push whose FromUserName is an object made the demo POST {"touser": {...}} to
    # customerServiceMessage.send: the from_user annotation said str.
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


# -- 3. the typed API: what a user's type checker says about the documented code -------------


def mypy(*arguments, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", os.devnull,
         *map(str, arguments)], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("first_line, page, typed", [
    ("# ackbot.py", "docs/handlers.md",
     {"def acknowledge(message):": "def acknowledge(message: wxgate.Message) -> object:"}),
    ("# shopbot.py", "README.md",
     {"def on_message(message):": "def on_message(message: wxgate.Message) -> object:",
      "def send(message, text):": "def send(message: wxgate.Message, text: str) -> None:"}),
])
def test_the_documented_handlers_typed_with_message_pass_mypy(tmp_path, first_line, page,
                                                              typed):
    # Issue 12 part 5: typed public names so editors complete and checkers check them. Annotate
    # the documented bots with `message: wxgate.Message` and mypy reports
    #   Item "None" of "WeChatClient | None" has no attribute "send_text"
    #   Argument 1 to "send_text" ... has incompatible type "str | None"; expected "str"
    # on `message.client.send_text(message.from_user, ...)`, the line every bot has.
    pytest.importorskip("mypy")
    source = code_block(first_line, page=page)
    for old, new in typed.items():
        assert old in source
        source = source.replace(old, new)
    handler = tmp_path / "typed_handler.py"
    handler.write_text(source, "utf-8")
    result = mypy("--config-file", REPO / "setup.cfg", handler)
    assert result.returncode == 0, result.stdout + result.stderr


ISSUE_EXAMPLE = '''
import webtest
import wxgate


def test(config: wxgate.Config) -> None:
    wechat = wxgate.Simulator(config, "shop")
    push = wechat.push({"MsgType": "text", "Content": "人工", "FromUserName": "o_user"})
    resp = webtest.TestApp(wxgate.make_app(config)).post(push.url, push.body,
                                                          headers=push.headers)
    assert wechat.open_reply(resp.body)["MsgType"] == "transfer_customer_service"
'''


def test_the_issues_simulator_example_passes_mypy(tmp_path):
    # open_reply() -> dict[str, Any] | str, so `open_reply(body)["MsgType"]`, the issue's and
    # the README's own line, is `Invalid index type "str" for "str"` under mypy.
    pytest.importorskip("mypy")
    example = tmp_path / "test_typed_example.py"
    example.write_text(ISSUE_EXAMPLE, "utf-8")
    result = mypy("--config-file", REPO / "setup.cfg", "--ignore-missing-imports", example)
    assert result.returncode == 0, result.stdout + result.stderr


USER_CODE = '''
import wxgate

signature: int = wxgate.sign("token", "1", "2")
'''


def test_a_users_mypy_sees_the_types_of_an_installed_wxgate(tmp_path):
    # wxgate installs as one module, which cannot carry PEP 561's py.typed marker: a user's
    # plain `mypy` says 'Skipping analyzing "wxgate": module is installed, but missing library
    # stubs or py.typed marker' and treats all of wxgate as Any, so none of issue 12's
    # annotations reach them. mypy >= 1.14 reads it with follow_untyped_imports; the docs
    # must say so (the README's Development section speaks only of checking wxgate itself).
    pytest.importorskip("mypy")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "wxgate.py").write_bytes((REPO / "wxgate.py").read_bytes())
    project = tmp_path / "project"
    project.mkdir()
    (project / "bot.py").write_text(USER_CODE, "utf-8")
    # What works: the handlers page's advice must be this flag or its ini form.
    result = mypy("--python-executable", python, "--follow-untyped-imports", "bot.py",
                  cwd=project)
    assert 'Incompatible types in assignment (expression has type "str"' in result.stdout, \
        result.stdout + result.stderr
    advice = (REPO / "docs" / "handlers.md").read_text("utf-8")
    assert "follow_untyped_imports" in advice or "follow-untyped-imports" in advice


# -- 4. upload_temp_media and FakeAPI ----------------------------------------------------------


def uploaded_part(call):
    """The multipart part ``media`` of a recorded upload, parsed as a server would."""
    head = f"Content-Type: {call_content_type(call)}\r\n\r\n".encode("ascii")
    parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + call.data)
    parts = [part for part in parsed.iter_parts() if part.get_param(
        "name", header="content-disposition") == "media"]
    assert len(parts) == 1
    return parts[0]


def call_content_type(call):
    # FakeAPI keeps the body, not the headers: the boundary is the body's first line.
    boundary = call.data.split(b"\r\n", 1)[0][2:].decode("ascii")
    return f"multipart/form-data; boundary={boundary}"


def test_an_upload_named_without_an_extension_gets_the_extension_of_its_bytes(tmp_path):
    # WeChat judges an upload's type by its file name's extension (community reports: 40004 /
    # 40113 "unsupported file type" for a name without one). A PNG from a temporary file or a
    # path without a suffix is sent as filename="tmpab12cd", though the bytes say .png and
    # wxgate already reads them to guess the content type.
    with wxgate.FakeAPI() as api:
        client = wxgate.WeChatClient(wxgate.TokenManager(APPID, "s", api_base=api.url))
        with tempfile.NamedTemporaryFile(dir=tmp_path) as file:
            file.write(PNG)
            file.flush()
            file.seek(0)
            client.upload_temp_media(file)
        bare = tmp_path / "poster"
        bare.write_bytes(PNG)
        client.upload_temp_media(bare)
        names = [uploaded_part(call).get_filename() for call in api.calls]
    assert [os.path.splitext(name)[1] for name in names] == [".png", ".png"], names


def test_fake_api_refuses_an_upload_without_a_media_file():
    # WeChat answers 41005 (media data missing) to an upload without the multipart field
    # `media`; FakeAPI hands out a media_id for any body, even none or JSON, so a user's test
    # passes with an upload production refuses.
    with wxgate.FakeAPI() as api:
        client = wxgate.WeChatClient(wxgate.TokenManager(APPID, "s", api_base=api.url))
        for body in ({"media": "not a file"}, None):
            with pytest.raises(wxgate.WeChatAPIError):
                client.call("POST", "/cgi-bin/media/upload", params={"type": "image"},
                            json=body)


# -- 5. open_reply: replies WeChat would refuse, accepted -------------------------------------


def envelope(plaintext, timestamp="1714000000", nonce="415670741"):
    encrypt = aes_encrypt(plaintext)
    return json.dumps({"Encrypt": encrypt, "MsgSignature": sha1_sign(TOKEN, timestamp, nonce,
                                                                       encrypt),
                       "TimeStamp": timestamp, "Nonce": nonce}).encode("utf-8")


ADDRESSED = {"ToUserName": "o_user", "FromUserName": "gh_1", "CreateTime": 1714000000}


@pytest.mark.parametrize("body", [
    # PROTOCOL §4: success and the empty reply are never encrypted, in any mode.
    pytest.param(envelope("success"), id="encrypted success"),
    pytest.param(envelope(""), id="encrypted empty"),
    # str.isdigit() takes Arabic-Indic and superscript digits as a TimeStamp.
    pytest.param(envelope(json.dumps(dict(ADDRESSED, MsgType="transfer_customer_service")),
                          timestamp="١٧١٤٠٠٠٠٠٠"), id="non-ASCII TimeStamp digits"),
    # The reply must be typed: a MsgType that is an object or a CreateTime that is not a
    # number of seconds is no reply WeChat reads.
    pytest.param(envelope(json.dumps(dict(ADDRESSED, MsgType={"a": 1}))),
                 id="MsgType an object"),
    pytest.param(envelope(json.dumps(dict(ADDRESSED, CreateTime="soon",
                                          MsgType="transfer_customer_service"))),
                 id="CreateTime not a number"),
])
def test_open_reply_refuses_what_wechat_would_refuse(tmp_path, body):
    config = make_config(tmp_path, mode="safe", fmt="json")
    with pytest.raises(wxgate.WxgateError):
        wxgate.Simulator(config, "test").open_reply(body)


# -- 6. Simulator.push's errors speak of a reply ----------------------------------------------


def test_a_push_with_a_bad_field_name_is_a_value_error_about_the_push(tmp_path):
    # push({"bad name": 1}) raises WxgateError "reply field 'bad name' is not a valid XML
    # element name (WeChat -40011)", status 500: it is the test's push, not a reply, and no
    # WeChat code applies. `format` already raises ValueError; a bad field should too.
    wechat = wxgate.Simulator(make_config(tmp_path, mode="safe", fmt="xml"), "test")
    with pytest.raises(ValueError) as caught:
        wechat.push({"MsgType": "text", "bad name": 1})
    assert "reply" not in str(caught.value)


# -- follow-ups, beside the findings above ---------------------------------------------------


def test_message_client_is_a_client_or_a_clear_error():
    # `client` is typed WeChatClient, so a handler calls it without a None check; a Message
    # built by hand without one says how to give it instead of AttributeError on None.
    with pytest.raises(wxgate.WxgateError, match=r"without a client: pass client=\.\.\."):
        wxgate.Message({"MsgType": "text"}).client
    client = wxgate.WeChatClient(wxgate.TokenManager(APPID, "s"))
    assert wxgate.Message({"MsgType": "text"}, client=client).client is client


def test_the_documented_mypy_section_works_as_written(tmp_path):
    # The handlers page's ini block, copied into a user's project, makes a plain `mypy` read an
    # installed wxgate (without it: "Skipping analyzing", and wxgate is Any).
    pytest.importorskip("mypy")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "wxgate.py").write_bytes((REPO / "wxgate.py").read_bytes())
    project = tmp_path / "project"
    project.mkdir()
    (project / "bot.py").write_text(USER_CODE, "utf-8")
    bare = mypy("--python-executable", python, "bot.py", cwd=project)
    assert "Skipping analyzing" in bare.stdout, bare.stdout + bare.stderr
    (project / "mypy.ini").write_text(code_block("# mypy.ini", page="docs/handlers.md"), "utf-8")
    result = mypy("--python-executable", python, "bot.py", cwd=project)
    assert 'Incompatible types in assignment (expression has type "str"' in result.stdout, \
        result.stdout + result.stderr


def test_fake_api_refuses_a_media_part_without_a_file_name():
    # What a client that forgot filename= would send: WeChat wants a file, not a field.
    with wxgate.FakeAPI() as api:
        client = wxgate.WeChatClient(wxgate.TokenManager(APPID, "s", api_base=api.url))
        body = wxgate._encode_multipart({"media": "abc"}, {}, "b1")
        with pytest.raises(wxgate.WeChatAPIError) as caught:
            client.call("POST", "/cgi-bin/media/upload", params={"type": "image"}, json=body)
        assert caught.value.errcode == 41005
        assert client.upload_temp_media(PNG).startswith("fake-media-")  # a real one passes


@pytest.mark.parametrize("fmt", ["xml", "json"])
def test_open_reply_still_takes_a_well_typed_reply(tmp_path, fmt):
    # XML carries CreateTime as text of digits, JSON as a number: both are whole seconds.
    config = make_config(tmp_path, mode="plain", fmt=fmt)
    wechat = wxgate.Simulator(config, "test")
    reply = dict(ADDRESSED, MsgType="transfer_customer_service")
    body = wxgate._dump_xml(reply) if fmt == "xml" else json.dumps(reply)
    assert wechat.open_reply(body)["MsgType"] == "transfer_customer_service"
