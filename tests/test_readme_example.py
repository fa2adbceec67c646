"""The README's handler-testing and routing examples, run as written: the test of "Testing
your handler" in a fresh directory with pytest in a subprocess, as a user runs it, and the
router of "Routing pushes" against each push its field table names, in both formats."""

import logging
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import webtest

import wxgate
from conftest import AES_KEY, APPID, TOKEN
from readme import code_block

REPO = Path(__file__).resolve().parents[1]
PYTHON_BLOCKS = ("# shopbot_routes.py", "# send_examples.py", "# ackbot.py", "# test_ackbot.py")


@pytest.mark.parametrize("first_line", PYTHON_BLOCKS)
def test_the_python_blocks_compile(first_line):
    compile(code_block(first_line), first_line[2:], "exec")


def run_pytest(directory):
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         str(directory)], cwd=directory, env=environ, capture_output=True, text=True,
        timeout=120)


def write_example(directory, bot=None):
    (directory / "wxgate.ini").write_text(code_block("; wxgate.ini"), "utf-8")
    (directory / "ackbot.py").write_text(bot or code_block("# ackbot.py"), "utf-8")
    (directory / "test_ackbot.py").write_text(code_block("# test_ackbot.py"), "utf-8")


def test_the_testing_example_passes_as_written(tmp_path):
    write_example(tmp_path)
    result = run_pytest(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b5 passed\b", result.stdout), result.stdout


@pytest.mark.parametrize("broken", ["收到", "transfer_customer_service", "except"])
def test_the_example_catches_a_broken_bot(tmp_path, broken):
    # The example must be able to fail: a bot that says something else, never transfers, or
    # lets a failed send raise (a 500, so WeChat pushes again and the user gets two 收到).
    bot = code_block("# ackbot.py")
    if broken == "except":
        bot = bot.replace("except wxgate.WxgateError", "except ZeroDivisionError")
    else:
        bot = bot.replace(broken, "x")
    assert bot != code_block("# ackbot.py")
    write_example(tmp_path, bot)
    result = run_pytest(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"\b1 failed, 4 passed\b", result.stdout), result.stdout


# -- the routing example, against each push of its field table ------------------------------

ITEMS = {
    "subscribe_msg_popup_event": ("SubscribeMsgPopupEvent", [
        {"TemplateId": "T1", "SubscribeStatusString": "accept", "PopupScene": 0},
        {"TemplateId": "T2", "SubscribeStatusString": "reject", "PopupScene": "0"}]),
    "subscribe_msg_change_event": ("SubscribeMsgChangeEvent", [
        {"TemplateId": "T3", "SubscribeStatusString": "reject"}]),
    "subscribe_msg_sent_event": ("SubscribeMsgSentEvent", [
        {"TemplateId": "T4", "MsgID": "1700000000", "ErrorCode": 0, "ErrorStatus": "success"}]),
}
MEDIA_CHECK = {"MsgType": "event", "Event": "wxa_media_check", "appid": APPID,
               "trace_id": "trace-1", "version": 2, "errcode": 0, "errmsg": "ok",
               "result": {"suggest": "risky", "label": 20002},
               "detail": [{"strategy": "content_model", "errcode": 0, "suggest": "risky",
                           "label": 20002, "prob": 90}]}


def subscription(event, fmt):
    wrapper, items = ITEMS[event]
    # JSON carries List at the top; XML wraps the repeated List elements.
    if fmt == "json":
        return {"MsgType": "event", "Event": event, "List": items}
    return {"MsgType": "event", "Event": event, wrapper: {"List": items}}


@pytest.mark.parametrize("fmt", ["xml", "json"])
def test_the_routing_example_reads_the_fields_its_table_names(tmp_path, fmt, caplog):
    module = f"routes_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{module}.py").write_text(code_block("# shopbot_routes.py"), "utf-8")
    (tmp_path / "wxgate.ini").write_text("\n".join([
        "[app:shop]", "path = /wechat", f"appid = {APPID}", f"token = {TOKEN}",
        f"encoding_aes_key = {AES_KEY}", "mode = safe", f"format = {fmt}",
        f"handler = {module}:router", ""]), "utf-8")
    config = wxgate.load_config(tmp_path / "wxgate.ini", environ={})
    gateway = wxgate.make_app(config)
    app, wechat = webtest.TestApp(gateway), wxgate.Simulator(config, "shop")

    def post(fields):
        push = wechat.push(dict(fields, FromUserName="o_user"))
        return wechat.open_reply(app.post(push.url, push.body, headers=push.headers).body)

    try:
        with caplog.at_level(logging.INFO, logger="shopbot"):
            assert post({"MsgType": "text", "Content": "转人工"})["MsgType"] == \
                "transfer_customer_service"
            assert post({"MsgType": "text", "Content": "hi"}) == "success"
            assert post({"MsgType": "image", "PicUrl": "http://x/y.jpg", "MediaId": "m1"}) \
                == "success"
            assert post({"MsgType": "miniprogrampage", "Title": "t", "AppId": APPID,
                         "PagePath": "pages/a", "ThumbUrl": "http://x/t.jpg",
                         "ThumbMediaId": "m2"}) == "success"
            assert post({"MsgType": "event", "Event": "user_enter_tempsession",
                         "SessionFrom": "cart"}) == "success"
            for event in ITEMS:
                assert post(subscription(event, fmt)) == "success"
            assert post(MEDIA_CHECK) == "success"
            assert post({"MsgType": "event", "Event": "debug_demo"}) == "success"
    finally:
        gateway.close()
    lines = [record.getMessage() for record in caplog.records if record.name == "shopbot"]
    assert lines == [
        "o_user sent image m1", "o_user sent miniprogrampage None",
        "o_user opened the chat from 'cart'",
        "subscribe_msg_popup_event T1 accept", "subscribe_msg_popup_event T2 reject",
        "subscribe_msg_change_event T3 reject", "subscribe_msg_sent_event T4 success",
        "hide the media of check trace-1"]
