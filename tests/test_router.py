"""Router: one function per message type or event, itself a handler."""

import uuid

import pytest
import webtest

import wxgate
from conftest import APPID, AES_KEY, TOKEN, event_message, text_message
from wxgate import Router, Simulator


def message(fields):
    return wxgate.Message(fields, app="test")


def routed():
    router = Router()
    seen = []

    @router.message("text", "image")
    def on_content(msg):
        seen.append(("content", msg.msg_type))
        return {"MsgType": "transfer_customer_service"}

    @router.event("user_enter_tempsession")
    def on_enter(msg):
        seen.append(("enter", msg.event))
        return ""

    return router, seen, on_content, on_enter


# -- routing -------------------------------------------------------------------------------


def test_messages_and_events_reach_their_function_and_its_reply_is_returned():
    router, seen, _, _ = routed()
    assert router(message(text_message("hi"))) == {"MsgType": "transfer_customer_service"}
    assert router(message(dict(text_message(), MsgType="image"))) == \
        {"MsgType": "transfer_customer_service"}
    assert router(message(event_message("user_enter_tempsession"))) == ""
    assert seen == [("content", "text"), ("content", "image"),
                    ("enter", "user_enter_tempsession")]


def test_unrouted_pushes_get_success_without_a_default():
    router, seen, _, _ = routed()
    assert router(message(dict(text_message(), MsgType="miniprogrampage"))) == "success"
    assert router(message(event_message("wxa_media_check"))) == "success"
    assert seen == []


def test_default_takes_what_nothing_else_matches():
    router, seen, _, _ = routed()
    others = []

    @router.default
    def other(msg):
        others.append(msg.event or msg.msg_type)
        return None

    assert router(message(event_message("subscribe_msg_popup_event"))) is None
    assert router(message(dict(text_message(), MsgType="miniprogrampage"))) is None
    router(message(text_message()))
    assert others == ["subscribe_msg_popup_event", "miniprogrampage"]
    assert seen == [("content", "text")]


def test_an_event_name_wins_over_message_event_which_wins_over_default():
    router = Router()
    router.event("user_enter_tempsession")(lambda msg: "by name")
    router.message("event")(lambda msg: "any event")
    router.default(lambda msg: "default")
    assert router(message(event_message("user_enter_tempsession"))) == "by name"
    assert router(message(event_message("wxa_media_check"))) == "any event"
    assert router(message(text_message())) == "default"


def test_event_names_are_not_message_types():
    # "text" registered as an event name must not catch text messages, nor the reverse.
    router = Router()
    router.event("text")(lambda msg: "event named text")
    router.message("user_enter_tempsession")(lambda msg: "type named like an event")
    assert router(message(text_message())) == "success"
    assert router(message(event_message("user_enter_tempsession"))) == "success"


@pytest.mark.parametrize("fields", [
    pytest.param({"MsgType": {"a": 1}}, id="MsgType object"),
    pytest.param({"MsgType": ["text"]}, id="MsgType list"),
    pytest.param({"MsgType": "event", "Event": ["user_enter_tempsession"]}, id="Event list"),
    pytest.param({"MsgType": "event", "Event": {"x": 1}}, id="Event object"),
    pytest.param({}, id="no MsgType"),
])
def test_hostile_types_match_nothing_instead_of_crashing(fields):
    router, seen, _, _ = routed()
    router.default(lambda msg: "default")
    assert router(message(fields)) == "default"
    assert seen == []


def test_decorators_return_the_function_unchanged():
    router = Router()

    def on_text(msg):
        return "t"

    assert router.message("text")(on_text) is on_text
    assert router.event("a", "b")(on_text) is on_text
    assert router.default(on_text) is on_text


# -- mistakes fail when the module is imported -----------------------------------------------


def test_the_same_type_twice_is_an_error_naming_both_functions():
    router, _, on_content, _ = routed()

    def again(msg):
        return None

    with pytest.raises(ValueError, match=r"message 'text' is already routed to "
                                         r"test_router\.routed\.<locals>\.on_content"):
        router.message("text")(again)
    # Nothing of the failed registration stuck: "video" was not registered either.
    with pytest.raises(ValueError):
        router.message("video", "image")(again)
    assert router(message(dict(text_message(), MsgType="video"))) == "success"


def test_the_same_event_twice_and_a_second_default_are_errors():
    router, _, _, _ = routed()
    with pytest.raises(ValueError, match="event 'user_enter_tempsession' is already routed"):
        router.event("user_enter_tempsession")(lambda msg: None)
    router.default(lambda msg: None)
    with pytest.raises(ValueError, match="router.default is already"):
        router.default(lambda msg: None)
    with pytest.raises(ValueError, match="same name twice"):
        router.message("text2", "text2")


@pytest.mark.parametrize("call, match", [
    pytest.param(lambda r: r.message(), "at least one name", id="no types"),
    pytest.param(lambda r: r.event(), "at least one name", id="no events"),
    pytest.param(lambda r: r.message(lambda msg: None), "in parentheses", id="no parentheses"),
    pytest.param(lambda r: r.message(""), "as strings", id="empty name"),
    pytest.param(lambda r: r.message("text")("not callable"), "decorates a function",
                 id="not callable"),
    pytest.param(lambda r: r.default("text"), "without parentheses", id="default('text')"),
])
def test_misuse_is_a_type_error_that_says_how(call, match):
    with pytest.raises(TypeError, match=match):
        call(Router())


# -- through the real app -------------------------------------------------------------------

SHOPBOT = '''
import wxgate

router = wxgate.Router()
CALLS = []


@router.message("text")
def on_text(message):
    CALLS.append(("text", message["Content"]))
    if "人工" in message["Content"]:
        return {"MsgType": "transfer_customer_service"}
    return None


@router.event("user_enter_tempsession")
def on_enter(message):
    CALLS.append(("enter", message["SessionFrom"]))
    return ""
'''


def write_app(tmp_path, source, mode="safe", fmt="auto"):
    module = f"shopbot_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{module}.py").write_text(source, "utf-8")
    (tmp_path / "wxgate.ini").write_text("\n".join([
        "[app:shop]", "path = /wechat", f"appid = {APPID}", f"token = {TOKEN}",
        f"encoding_aes_key = {AES_KEY}", f"mode = {mode}", f"format = {fmt}",
        f"handler = {module}:router", ""]), "utf-8")
    return module


@pytest.mark.parametrize("mode, fmt", [("safe", "xml"), ("safe", "json"), ("compat", "xml"),
                                       ("plain", "json")])
def test_handler_module_colon_router_works_through_the_app(tmp_path, mode, fmt):
    import sys
    module = write_app(tmp_path, SHOPBOT, mode, fmt)
    config = wxgate.load_config(tmp_path / "wxgate.ini", environ={})
    assert config.apps["shop"].handler is sys.modules[module].router
    gateway = wxgate.make_app(config)
    app = webtest.TestApp(gateway)
    wechat = Simulator(config, "shop")
    try:
        push = wechat.push({"MsgType": "text", "Content": "转人工", "FromUserName": "o_1"})
        reply = wechat.open_reply(app.post(push.url, push.body, headers=push.headers).body)
        assert reply["MsgType"] == "transfer_customer_service"
        assert reply["ToUserName"] == "o_1"
        push = wechat.push({"MsgType": "event", "Event": "user_enter_tempsession",
                            "SessionFrom": "cart"})
        assert app.post(push.url, push.body, headers=push.headers).body == b""
        push = wechat.push({"MsgType": "image", "PicUrl": "http://x/y", "MediaId": "m"})
        assert app.post(push.url, push.body, headers=push.headers).body == b"success"
        assert sys.modules[module].CALLS == [("text", "转人工"), ("enter", "cart")]
    finally:
        gateway.close()


def test_a_router_with_a_duplicate_fails_when_the_config_loads(tmp_path):
    write_app(tmp_path, SHOPBOT + '''

@router.message("text")
def on_text_again(message):
    return None
''')
    with pytest.raises(wxgate.ConfigError) as caught:
        wxgate.load_config(tmp_path / "wxgate.ini", environ={})
    text = str(caught.value)
    assert "[app:shop] handler:" in text and "ValueError" in text
    assert "message 'text' is already routed to" in text and "on_text_again" in text
