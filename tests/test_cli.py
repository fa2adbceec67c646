"""The ``wxgate`` command line, run as a real subprocess: exit codes, output, secrets kept.

Exit codes: 0 done, 1 failed (the reason on stderr, never a secret), 2 usage error.
The end-to-end tests start ``wxgate serve`` once for the module and drive it with
``wxgate push`` and ``wxgate handshake``, as the README's demo does.
"""

import contextlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

import wxgate
from conftest import REPO, VECTORS, free_port
from fake_wechat import CUSTOM_SEND_PATH, DEFAULT_APPID, DEFAULT_SECRET, FakeWeChat

COMMANDS = ["serve", "genkey", "sign", "check", "token", "push", "handshake", "decrypt",
            "worker", "queue"]

# Secrets of the test inis: long and distinctive, so a leak cannot hide behind a short match.
TOKEN = "cliTokenSecretValue7f3a"
AES_KEY = "Qm9vZ2llV29vZ2llU2VjcmV0S2V5MDEyMzQ1Njc4OWE"  # 43 characters
APPSECRET = "cliAppSecretValue0123456789abcdef"
ADMIN_SECRET = "cliAdminSecretValue42xyz"
SECRETS = (TOKEN, AES_KEY, APPSECRET, ADMIN_SECRET)


def run(*args, timeout=30, cwd=REPO, env=None):
    return subprocess.run([sys.executable, "-m", "wxgate", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def assert_failed(result, *needles, secrets=SECRETS):
    """Exit 1, a one-line-ish reason on stderr (no traceback), no secret anywhere."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip(), "a failure must say why on stderr"
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    for secret in secrets:
        assert secret not in result.stdout + result.stderr


def write_ini(path, *, apps, gateway=""):
    path.write_text(f"[wxgate]\n{gateway}\n\n" + "\n".join(apps), "utf-8")
    return path


def app_section(name, *, path="/wechat", appid="wx2c2769f8efd9abc2", token=TOKEN, key=AES_KEY,
                mode="safe", fmt="auto", handler="wxgate:demo_handler", extra=""):
    lines = [f"[app:{name}]", f"path = {path}", f"appid = {appid}", f"token = {token}",
             f"mode = {mode}", f"format = {fmt}", f"handler = {handler}"]
    if key:
        lines.append(f"encoding_aes_key = {key}")
    return "\n".join(lines + [extra, ""])


# -- help and usage ----------------------------------------------------------------------------


def test_top_level_help_via_the_file_itself():
    result = subprocess.run([sys.executable, "wxgate.py", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: wxgate")
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: wxgate {command}")
    assert result.stderr == ""


@pytest.mark.parametrize("args", [
    [],
    ["nosuchcommand"],
    ["sign", "onlytoken"],
    ["push", "x.ini"],  # none of --text/--event/--json/--xml
    ["push", "x.ini", "--text", "a", "--event", "b"],  # mutually exclusive
    ["push", "x.ini", "--text", "a", "--repeat", "many"],
    ["push", "x.ini", "--text", "a", "--format", "yaml"],
    ["queue", "x.ini", "explode"],
    ["check"],
    ["decrypt", "x.ini"],
    ["serve", "x.ini", "--port", "eighty"],
], ids=lambda a: " ".join(a) or "nothing")
def test_usage_errors_exit_2(args):
    result = run(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "usage: wxgate" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("repeat", ["0", "-1"])
def test_push_repeat_below_one_is_a_usage_error(repeat):
    # Sending a push zero times and reporting success would hide a typo in a script.
    result = run("push", "x.ini", "--text", "a", "--repeat", repeat)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "usage: wxgate" in result.stderr


# -- genkey and sign ---------------------------------------------------------------------------


def genkey():
    result = run("genkey")
    assert result.returncode == 0, result.stderr
    values = dict(re.findall(r"^(\w+) = (\S+)$", result.stdout, re.M))
    assert set(values) == {"encoding_aes_key", "token"}, result.stdout
    return values


def test_genkey_prints_a_valid_key_and_token_and_each_run_differs():
    first, second = genkey(), genkey()
    for values in (first, second):
        key = values["encoding_aes_key"]
        assert len(key) == 43 and key.isascii() and key.isalnum()
        assert len(wxgate._decode_aes_key(key)) == 32
        # WeChat's console takes a 3-32 character token of letters and digits.
        assert 3 <= len(values["token"]) <= 32 and values["token"].isalnum()
    assert first["encoding_aes_key"] != second["encoding_aes_key"]
    assert first["token"] != second["token"]


SIGNED = [pytest.param(case, id=case["id"]) for case in VECTORS
          if "signature" in case or "msg_signature" in case]


@pytest.mark.parametrize("case", SIGNED)
def test_sign_reproduces_official_vectors(case):
    if "signature" in case:
        result = run("sign", case["token"], case["timestamp"], case["nonce"])
        assert result.returncode == 0, result.stderr
        assert result.stdout == case["signature"] + "\n"
    if "msg_signature" in case:
        result = run("sign", case["token"], case["timestamp"], case["nonce"], case["encrypt"])
        assert result.returncode == 0, result.stderr
        assert result.stdout == case["msg_signature"] + "\n"


def test_sign_has_the_two_official_vectors():
    ids = {case.values[0]["id"] for case in SIGNED}
    assert {"mp_doc_handshake", "mp_doc_safe_push_json"} <= ids


# -- decrypt -----------------------------------------------------------------------------------

DOC = next(case for case in VECTORS if case["id"] == "mp_doc_safe_push_json")
DECRYPT_CASES = [pytest.param(case, id=case["id"]) for case in VECTORS
                 if case["kind"] == "decrypt"]


def vector_ini(tmp_path, case, *, appid=None, mode="safe", name="vector.ini"):
    return write_ini(tmp_path / name, apps=[app_section(
        "doc", appid=appid or case["appid"], token=case["token"],
        key=case["encoding_aes_key"] if mode != "plain" else "", mode=mode)])


def signed(case, nonce=None):
    return ["--timestamp", case["timestamp"], "--nonce", nonce or case["nonce"],
            "--msg-signature", case["msg_signature"]]


def test_decrypt_the_official_json_push(tmp_path):
    body = json.dumps({"ToUserName": DOC["to_user_name"], "Encrypt": DOC["encrypt"]})
    result = run("decrypt", vector_ini(tmp_path, DOC), body, *signed(DOC))
    assert result.returncode == 0, result.stderr
    assert result.stdout == DOC["plaintext"] + "\n"
    assert "msg_signature ok" in result.stderr


@pytest.mark.parametrize("case", DECRYPT_CASES)
@pytest.mark.parametrize("form", ["json-file", "xml-file", "xml-argument", "bare-encrypt"])
def test_decrypt_body_forms(tmp_path, case, form):
    fields = {"ToUserName": case.get("to_user_name", "gh_x"), "Encrypt": case["encrypt"]}
    if form == "json-file":
        (tmp_path / "push.json").write_text(json.dumps(fields), "utf-8")
        body = tmp_path / "push.json"
    elif form == "xml-file":
        (tmp_path / "push.xml").write_text(
            "<xml>" + "".join(f"<{k}><![CDATA[{v}]]></{k}>" for k, v in fields.items())
            + "</xml>\n", "utf-8")
        body = tmp_path / "push.xml"
    elif form == "xml-argument":
        body = "".join(f"<{k}><![CDATA[{v}]]></{k}>" for k, v in fields.items())
        body = f"<xml>{body}</xml>"
    else:
        body = case["encrypt"]
    result = run("decrypt", vector_ini(tmp_path, case), body, *signed(case))
    assert result.returncode == 0, result.stderr
    assert result.stdout == case["plaintext"] + "\n"


def test_decrypt_wrong_nonce_is_40001(tmp_path):
    body = json.dumps({"ToUserName": DOC["to_user_name"], "Encrypt": DOC["encrypt"]})
    result = run("decrypt", vector_ini(tmp_path, DOC), body, *signed(DOC, nonce="415670742"))
    assert_failed(result, "-40001", secrets=(DOC["token"], DOC["encoding_aes_key"]))
    assert DOC["plaintext"] not in result.stdout
    assert "debug_demo" not in result.stdout  # nothing decrypted before the signature passed


def test_decrypt_wrong_appid_is_40005(tmp_path):
    source = vector_ini(tmp_path, DOC, appid="wx0000000000000000")
    body = json.dumps({"ToUserName": DOC["to_user_name"], "Encrypt": DOC["encrypt"]})
    result = run("decrypt", source, body, *signed(DOC))
    assert_failed(result, "-40005", secrets=(DOC["token"], DOC["encoding_aes_key"]))
    assert "debug_demo" not in result.stdout


def test_decrypt_body_without_encrypt_fails_plainly(tmp_path):
    result = run("decrypt", vector_ini(tmp_path, DOC), '{"ToUserName": "gh_x"}')
    assert_failed(result, "Encrypt")


def test_decrypt_for_a_plain_mode_app_fails_plainly(tmp_path):
    # A plain-mode app has no EncodingAESKey: say so, do not crash with a traceback.
    source = vector_ini(tmp_path, DOC, mode="plain")
    result = run("decrypt", source, DOC["encrypt"], *signed(DOC))
    assert_failed(result, secrets=(DOC["token"],))


# -- check -------------------------------------------------------------------------------------


def full_ini(tmp_path, gateway="", **app):
    return write_ini(tmp_path / "full.ini", gateway=f"admin_secret = {ADMIN_SECRET}\n{gateway}",
                     apps=[app_section("main", extra=f"appsecret = {APPSECRET}", **app),
                           app_section("second", path="/other", mode="plain", key="",
                                       token=TOKEN + "2")])


def test_check_prints_each_app_with_secrets_redacted(tmp_path):
    result = run("check", full_ini(tmp_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[app:main] /wechat" in out and "[app:second] /other" in out
    assert "wx2c2769f8efd9abc2" in out and "safe mode" in out and "plain mode" in out
    assert f"token <{len(TOKEN)} chars>" in out
    assert f"token <{len(TOKEN) + 1} chars>" in out
    assert f"encoding_aes_key <{len(AES_KEY)} chars>" in out
    assert f"appsecret <{len(APPSECRET)} chars>" in out
    assert f"admin_secret <{len(ADMIN_SECRET)} chars>" in out
    for secret in SECRETS:
        assert secret not in out + result.stderr


def test_check_hides_a_store_password(tmp_path):
    source = full_ini(tmp_path, gateway="store = redis://:RedisPassw0rdValue@127.0.0.1:1/0")
    result = run("check", source)
    assert result.returncode == 0, result.stderr
    assert "RedisPassw0rdValue" not in result.stdout + result.stderr
    assert "127.0.0.1:1/0" in result.stdout


@pytest.mark.parametrize("broken, section, option", [
    ("mode = sometimes", "app:main", "mode"),
    ("format = yaml", "app:main", "format"),
    ("bogus_option = 1", "app:main", "bogus_option"),
])
def test_check_broken_ini_names_file_section_and_option(tmp_path, broken, section, option):
    text = app_section("main", extra=f"appsecret = {APPSECRET}")
    if option in ("mode", "format"):
        text = re.sub(rf"^{option} = .*$", broken, text, count=1, flags=re.M)
    else:
        text += broken + "\n"
    source = write_ini(tmp_path / "broken.ini", gateway=f"admin_secret = {ADMIN_SECRET}",
                       apps=[text])
    lines = source.read_text("utf-8").splitlines()
    lineno = lines.index(broken) + 1
    result = run("check", source)
    assert_failed(result, str(source), f"[{section}]", f"{option}:", f":{lineno}")


def test_check_missing_required_option(tmp_path):
    source = write_ini(tmp_path / "notoken.ini",
                       apps=[app_section("main").replace(f"token = {TOKEN}\n", "")])
    assert_failed(run("check", source), str(source), "[app:main]", "token:", "required")


def test_check_missing_file(tmp_path):
    assert_failed(run("check", tmp_path / "absent.ini"), str(tmp_path / "absent.ini"))


@pytest.mark.parametrize("layout", ["before-any-section", "line-without-equals"])
def test_check_unparsable_ini_does_not_quote_a_secret(tmp_path, layout):
    # A pasted secret outside any section (or on a line without "=") makes the file unparsable;
    # the error must point at the line, not print the line's content.
    source = tmp_path / f"{layout}.ini"
    if layout == "before-any-section":
        source.write_text(f"appsecret = {APPSECRET}\n" + app_section("main"), "utf-8")
        lineno = 1
    else:
        text = "[wxgate]\n" + app_section("main") + f"{APPSECRET}\n"
        source.write_text(text, "utf-8")
        lineno = text.splitlines().index(APPSECRET) + 1
    assert_failed(run("check", source), f"{source}:{lineno}")


# -- check --online and token against a fake WeChat --------------------------------------------


@pytest.fixture
def wechat():
    with FakeWeChat() as fake:
        yield fake


def online_ini(tmp_path, wechat, secret=DEFAULT_SECRET):
    return write_ini(tmp_path / "online.ini", gateway=f"api_base = {wechat.url}",
                     apps=[app_section("live", appid=DEFAULT_APPID,
                                       extra=f"appsecret = {secret}")])


def test_check_online_fetches_one_token(tmp_path, wechat):
    result = run("check", online_ini(tmp_path, wechat), "--online")
    assert result.returncode == 0, result.stderr
    assert "token fetched" in result.stdout
    assert wechat.token_fetches == 1
    token = wechat.current_stable_token()
    assert token and token not in result.stdout + result.stderr
    assert DEFAULT_SECRET not in result.stdout + result.stderr


def test_check_online_with_a_wrong_secret_says_40001(tmp_path, wechat):
    wrong = "ffffffffffffffffffffffffffffffff"
    result = run("check", online_ini(tmp_path, wechat, secret=wrong), "--online")
    assert_failed(result, "40001", secrets=(wrong, DEFAULT_SECRET, TOKEN, AES_KEY))
    assert "token fetched" not in result.stdout
    assert wechat.token_fetches == 1  # a credential error is not retried


def test_token_prints_the_fakes_token(tmp_path, wechat):
    result = run("token", online_ini(tmp_path, wechat))
    assert result.returncode == 0, result.stderr
    assert result.stdout == wechat.current_stable_token() + "\n"
    assert DEFAULT_SECRET not in result.stdout + result.stderr


def test_token_needs_an_app_choice_when_there_are_several(tmp_path):
    result = run("token", full_ini(tmp_path))
    assert_failed(result, "--app", "main", "second")


def test_token_without_an_appsecret_fails_plainly(tmp_path):
    result = run("token", full_ini(tmp_path), "--app", "second")
    assert_failed(result, "appsecret")


# -- serve, push, handshake end to end ---------------------------------------------------------

HANDLER_SOURCE = '''
import json

import wxgate

LOG = {log!r}


def handle(message):
    with open(LOG, "a", encoding="utf-8") as file:
        file.write(json.dumps(dict(message, _app=message.app), ensure_ascii=False,
                              default=str) + "\\n")
    if message.event == "xpay_goods_deliver_notify":  # the README's payment answer
        return wxgate.RawReply({{"ErrCode": 0, "ErrMsg": "success"}})
    return None
'''


def wait_for_port(port, process, timeout=20):
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "wxgate serve exited"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise AssertionError("wxgate serve did not listen")


class Served:
    def __init__(self, directory, port, process, log, calls):
        self.directory, self.port, self.process = directory, port, process
        self.log, self.calls_file = log, calls
        self.source = directory / "served.ini"

    def calls(self):
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text("utf-8").splitlines()]

    def server_log(self):
        return self.log.read_text("utf-8")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    directory = tmp_path_factory.mktemp("served")
    module = f"mymod_{uuid.uuid4().hex[:12]}"
    calls = directory / "calls.jsonl"
    (directory / f"{module}.py").write_text(HANDLER_SOURCE.format(log=str(calls)), "utf-8")
    port = free_port()
    handler = f"{module}:handle"
    write_ini(directory / "served.ini", gateway=f"listen = 127.0.0.1:{port}", apps=[
        app_section("json", path="/json", fmt="json", handler=handler),
        app_section("xml", path="/xml", fmt="xml", handler=handler),
        app_section("plain", path="/plain", mode="plain", key="", handler=handler),
        app_section("kf", path="/kf", fmt="xml"),  # wxgate:demo_handler
    ])
    log = directory / "server.log"
    with open(log, "wb") as stderr:
        # Started from the repository, not the ini's directory: the handler module is found
        # because the ini's directory is searched.
        process = subprocess.Popen(
            [sys.executable, "-m", "wxgate", "serve", str(directory / "served.ini"),
             "--port", str(port)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for_port(port, process)
        yield Served(directory, port, process, log, calls)
    finally:
        process.kill()
        process.wait(10)


REPLY_LINE = re.compile(r"^\[(\d+)\] (\d{3}) in (\d+\.\d) ms: (.*)$", re.M)


def replies(stdout):
    return [(int(n), int(status), float(ms), shown)
            for n, status, ms, shown in REPLY_LINE.findall(stdout)]


@pytest.mark.parametrize("app", ["json", "xml", "plain"])
def test_push_text_repeated_runs_the_handler_once(served, app):
    result = run("push", served.source, "--app", app, "--text", "hi", "--repeat", "3")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.startswith(f"POST http://127.0.0.1:{served.port}/{app} ")
    lines = replies(result.stdout)
    assert [(n, status, shown) for n, status, _, shown in lines] == [
        (1, 200, "'success'"), (2, 200, "'success'"), (3, 200, "'success'")]
    mine = [call for call in served.calls() if call["_app"] == app and call["Content"] == "hi"]
    assert len(mine) == 1, mine
    assert mine[0]["MsgType"] == "text" and mine[0]["FromUserName"] == "o_wxgate_demo_user"
    key = f"key={app}:m:{mine[0]['MsgId']} "
    log = served.server_log()
    assert log.count(f"{key}outcome=handled") == 1, log
    assert log.count(f"{key}outcome=duplicate") == 2, log


def test_the_readmes_two_demo_pushes_each_run_the_handler(served):
    # The README's demo: "kf please", then "hi" three times. Each `wxgate push` draws a fresh
    # 63-bit MsgId; the old now * 1000 + randbelow(1000) collided once in 1000 pushes of one
    # second, and "hi" was then answered as a duplicate of "kf please" without running.
    tag = uuid.uuid4().hex[:8]
    first = run("push", served.source, "--app", "json", "--text", f"kf please {tag}")
    second = run("push", served.source, "--app", "json", "--text", f"hi {tag}",
                 "--repeat", "3")
    for result in (first, second):
        assert result.returncode == 0, (result.stdout, result.stderr)
    assert [status for _, status, _, _ in replies(second.stdout)] == [200, 200, 200]
    mine = [call for call in served.calls() if call["_app"] == "json" and
            call["Content"] in (f"kf please {tag}", f"hi {tag}")]
    assert sorted(call["Content"] for call in mine) == [f"hi {tag}", f"kf please {tag}"]
    assert mine[0]["MsgId"] != mine[1]["MsgId"]
    assert all(re.fullmatch(r"[0-9]{1,19}", str(call["MsgId"])) for call in mine), mine


def test_push_event_with_fields(served):
    result = run("push", served.source, "--app", "json", "--event", "user_enter_tempsession",
                 "--field", "SessionFrom=x", "--openid", "o_event_user")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert [line[1] for line in replies(result.stdout)] == [200]
    (call,) = [c for c in served.calls() if c["FromUserName"] == "o_event_user"]
    assert call["_app"] == "json" and call["MsgType"] == "event"
    assert call["Event"] == "user_enter_tempsession" and call["SessionFrom"] == "x"


def test_push_two_events_of_one_user_in_one_second_are_both_handled(served):
    # Two contact buttons tapped in one second: same user, same CreateTime, same Event,
    # another SessionFrom. `wxgate push` printed 200 'success' for both while the gateway
    # answered the second as a duplicate and its handler never ran.
    tag = uuid.uuid4().hex[:8]
    logged = len(served.server_log())
    for source in ("button-a", "button-b"):
        result = run("push", served.source, "--app", "json", "--event",
                     "user_enter_tempsession", "--openid", f"o_{tag}", "--field",
                     f"SessionFrom={source}", "--field", "CreateTime=1714000000")
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert [line[1:4:2] for line in replies(result.stdout)] == [(200, "'success'")]
    mine = [call for call in served.calls() if call["FromUserName"] == f"o_{tag}"]
    assert sorted(call["SessionFrom"] for call in mine) == ["button-a", "button-b"]
    log = served.server_log()[logged:]
    assert log.count("type=user_enter_tempsession") == 2, log
    assert "outcome=duplicate" not in log, log


def test_push_accepts_a_payment_pushs_fixed_reply(served):
    # A safe-mode app whose handler answers the README's RawReply({"ErrCode":0,...}): the
    # reply is sent in the clear, as WeChat wants it, and `wxgate push` said "reply does not
    # verify: reply is not encrypted ... WeChat would refuse it" and exited 1.
    tag = uuid.uuid4().hex[:8]
    result = run("push", served.source, "--app", "json", "--event",
                 "xpay_goods_deliver_notify", "--field", f"OutTradeNo=order-{tag}",
                 "--field", "OpenId=o_payer", "--field", "Env=0", "--repeat", "2")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert [(n, status, shown) for n, status, _, shown in replies(result.stdout)] == [
        (1, 200, """'{"ErrCode":0,"ErrMsg":"success"}'"""),
        (2, 200, """'{"ErrCode":0,"ErrMsg":"success"}'""")]
    assert [c["OutTradeNo"] for c in served.calls() if c.get("OutTradeNo") == f"order-{tag}"] \
        == [f"order-{tag}"]


def test_push_json_file(served, tmp_path):
    trace = f"trace-{uuid.uuid4().hex[:8]}"
    fields = {"ToUserName": "gh_file", "FromUserName": "o_file_user", "CreateTime": 1714000000,
              "MsgType": "event", "Event": "wxa_media_check", "trace_id": trace,
              "result": {"suggest": "pass", "label": 100}}
    (tmp_path / "push.json").write_text(json.dumps(fields), "utf-8")
    result = run("push", served.source, "--app", "xml", "--json", tmp_path / "push.json")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert [line[1] for line in replies(result.stdout)] == [200]
    (call,) = [c for c in served.calls() if c.get("trace_id") == trace]
    assert call["_app"] == "xml" and call["Event"] == "wxa_media_check"
    assert call["result"]["suggest"] == "pass"


def test_push_xml_file_to_a_json_app(served, tmp_path):
    trace = f"trace-{uuid.uuid4().hex[:8]}"
    (tmp_path / "push.xml").write_text(
        "<xml><ToUserName><![CDATA[gh_file]]></ToUserName><FromUserName><![CDATA[o_xml_user]]>"
        "</FromUserName><CreateTime>1714000000</CreateTime><MsgType><![CDATA[event]]></MsgType>"
        f"<Event><![CDATA[wxa_media_check]]></Event><trace_id><![CDATA[{trace}]]></trace_id>"
        "</xml>", "utf-8")
    result = run("push", served.source, "--app", "json", "--xml", tmp_path / "push.xml")
    assert result.returncode == 0, (result.stdout, result.stderr)
    (call,) = [c for c in served.calls() if c.get("trace_id") == trace]
    assert call["_app"] == "json" and call["FromUserName"] == "o_xml_user"


def test_push_missing_json_file_fails_plainly(served, tmp_path):
    result = run("push", served.source, "--app", "json", "--json", tmp_path / "absent.json")
    assert_failed(result, "absent.json")


def test_push_shows_the_decrypted_transfer_reply(served):
    result = run("push", served.source, "--app", "kf", "--text", "kf")
    assert result.returncode == 0, (result.stdout, result.stderr)
    ((n, status, _, shown),) = replies(result.stdout)
    assert status == 200
    assert "<MsgType><![CDATA[transfer_customer_service]]></MsgType>" in shown
    assert "<ToUserName><![CDATA[o_wxgate_demo_user]]></ToUserName>" in shown
    assert "Encrypt" not in shown and "MsgSignature" not in shown  # opened, not the envelope
    assert TOKEN not in result.stdout + result.stderr


def test_push_needs_app_when_several(served):
    assert_failed(run("push", served.source, "--text", "hi"), "--app")


@pytest.mark.parametrize("app", ["json", "xml", "plain"])
def test_handshake_passes(served, app):
    result = run("handshake", served.source, "--app", app)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.startswith("PASS")
    assert f"http://127.0.0.1:{served.port}/{app}" in result.stdout


def test_handshake_with_the_wrong_token_fails(served):
    wrong = served.directory / f"wrong-{uuid.uuid4().hex[:8]}.ini"  # beside the handler
    wrong.write_text(served.source.read_text("utf-8").replace(
        f"token = {TOKEN}", "token = notTheServersToken"), "utf-8")
    result = run("handshake", wrong, "--app", "json")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "FAIL" in result.stdout + result.stderr
    assert "403" in result.stdout + result.stderr
    assert TOKEN not in result.stdout + result.stderr


def test_push_with_the_wrong_token_is_refused_and_exits_1(served):
    wrong = served.directory / f"wrong-{uuid.uuid4().hex[:8]}.ini"  # beside the handler
    wrong.write_text(served.source.read_text("utf-8").replace(
        f"token = {TOKEN}", "token = notTheServersToken"), "utf-8")
    result = run("push", wrong, "--app", "json", "--text", "nope")
    assert result.returncode == 1, (result.stdout, result.stderr)
    ((_, status, _, shown),) = replies(result.stdout)
    assert status == 403 and "-40001" in shown


def test_push_to_a_closed_port_says_so(tmp_path):
    port = free_port()
    source = write_ini(tmp_path / "closed.ini", gateway=f"listen = 127.0.0.1:{port}",
                       apps=[app_section("only")])
    result = run("push", source, "--text", "hi")
    assert_failed(result, f"127.0.0.1:{port}", "cannot reach", "wxgate serve")
    assert replies(result.stdout) == []
    result = run("handshake", source)
    assert result.returncode == 1
    assert "FAIL" in output(result) and "cannot reach" in output(result)
    assert "Traceback" not in result.stderr


# -- helpers of the tests below: environments, servers, a fixed-status HTTP server -------------


def environment(*unset, **extra):
    """This process's environment without the ``unset`` variables, plus ``extra``."""
    env = {name: value for name, value in os.environ.items() if name not in unset}
    env.update(extra)
    return env


@contextlib.contextmanager
def serving(source, port, *, env=None, launcher=("-m", "wxgate")):
    """``wxgate serve SOURCE`` (which must listen on ``port``); yields its stderr log's path.

    :param launcher: how Python starts wxgate (``-m wxgate``, as :func:`run` does).
    """
    log = source.with_name(f"serve-{port}.log")
    with open(log, "wb") as stderr:
        process = subprocess.Popen([sys.executable, *launcher, "serve", str(source)],
                                   cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for_port(port, process)
        yield log
    finally:
        process.kill()
        process.wait(10)


@contextlib.contextmanager
def answering(status):
    """A real HTTP server on loopback answering every GET and POST with ``status``, no body:
    what a proxy in front of the gateway, or a backend refusing wxgate, would send."""

    class Fixed(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_GET

        def log_message(self, format, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Fixed)
    server.daemon_threads = True
    # A short poll interval: shutdown() waits for the serve loop (0.5 s by default).
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def output(result):
    return result.stdout + result.stderr


# -- commands that need only the token or the key ----------------------------------------------
# The systemd recipe keeps the secrets in the unit's EnvironmentFile, so a shell on the host has
# neither ${WX_APPSECRET} nor ${WXGATE_ADMIN_SECRET}.

ENV_SECRETS = {"WX_APPSECRET": APPSECRET, "WXGATE_ADMIN_SECRET": ADMIN_SECRET}
UNSET = [pytest.param(names, id="-".join(names) + "-unset")
         for names in (("WX_APPSECRET",), ("WXGATE_ADMIN_SECRET",),
                       ("WX_APPSECRET", "WXGATE_ADMIN_SECRET"))]


def without(*unset):
    """The environment with the ``unset`` secrets missing and the other ones set."""
    return environment(*unset, **{name: value for name, value in ENV_SECRETS.items()
                                  if name not in unset})


def env_ini(path, port=None, *, appid="wx2c2769f8efd9abc2", token=TOKEN, key=AES_KEY):
    """An ini whose AppSecret and admin secret come from the environment, as in the README."""
    listen = f"listen = 127.0.0.1:{port}\n" if port else ""
    return write_ini(path, gateway=f"{listen}admin_secret = ${{WXGATE_ADMIN_SECRET}}", apps=[
        app_section("main", appid=appid, token=token, key=key,
                    extra="appsecret = ${WX_APPSECRET}")])


@pytest.fixture(scope="module")
def env_served(tmp_path_factory):
    """A gateway started WITH both secrets in its environment, as systemd starts it."""
    directory = tmp_path_factory.mktemp("env_served")
    port = free_port()
    source = env_ini(directory / "wxgate.ini", port)
    with serving(source, port, env=environment(**ENV_SECRETS)):
        yield source


@pytest.mark.parametrize("unset", UNSET)
def test_handshake_without_the_unrelated_secrets(env_served, unset):
    result = run("handshake", env_served, env=without(*unset))
    assert result.returncode == 0, output(result)
    assert result.stdout.startswith("PASS"), output(result)


@pytest.mark.parametrize("unset", UNSET)
def test_push_without_the_unrelated_secrets(env_served, unset):
    result = run("push", env_served, "--text", "hi", env=without(*unset))
    assert result.returncode == 0, output(result)
    assert [(status, shown) for _, status, _, shown in replies(result.stdout)] == [
        (200, "'success'")]


@pytest.mark.parametrize("unset", UNSET)
def test_decrypt_without_the_unrelated_secrets(tmp_path, unset):
    source = env_ini(tmp_path / "doc.ini", appid=DOC["appid"], token=DOC["token"],
                     key=DOC["encoding_aes_key"])
    result = run("decrypt", source, DOC["encrypt"], "--timestamp", DOC["timestamp"],
                 "--nonce", DOC["nonce"], "--msg-signature", DOC["msg_signature"],
                 env=without(*unset))
    assert result.returncode == 0, output(result)
    assert result.stdout == DOC["plaintext"] + "\n"
    assert "msg_signature ok" in result.stderr


@pytest.mark.parametrize("unset", UNSET)
def test_check_offline_without_the_secrets_says_which_are_unset(tmp_path, unset):
    result = run("check", env_ini(tmp_path / "wxgate.ini"), env=without(*unset))
    assert result.returncode == 0, output(result)
    assert "[app:main] /wechat" in result.stdout
    # It still tells the user what serve will need: each unset variable is named.
    for name in unset:
        assert name in output(result), output(result)


def test_sign_needs_no_config_and_no_secret():
    # sign takes the token on the command line and reads no ini: it already works anywhere.
    result = run("sign", TOKEN, "1714000000", "123", env=environment(*ENV_SECRETS))
    assert result.returncode == 0, output(result)
    assert re.fullmatch(r"[0-9a-f]{40}\n", result.stdout)


def test_token_still_refuses_without_the_appsecret(tmp_path):
    source = env_ini(tmp_path / "wxgate.ini")
    result = run("token", source, env=without("WX_APPSECRET"))
    assert_failed(result, str(source), "[app:main]", "appsecret:", "WX_APPSECRET")


@pytest.mark.parametrize("missing", sorted(ENV_SECRETS))
def test_serve_still_refuses_without_a_secret(tmp_path, missing):
    port = free_port()
    source = env_ini(tmp_path / "wxgate.ini", port)
    result = run("serve", source, env=without(missing), timeout=20)
    assert_failed(result, str(source), missing)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # it did not start serving


# -- serve's bind errors -----------------------------------------------------------------------


def assert_one_line_exit_2(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    for secret in SECRETS:
        assert secret not in result.stdout + result.stderr


@pytest.fixture
def occupied():
    """A loopback port some other program already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("where", ["--port", "listen"])
def test_serve_port_in_use_is_one_line(tmp_path, occupied, where):
    listen = f"listen = 127.0.0.1:{occupied}" if where == "listen" else ""
    source = write_ini(tmp_path / "wxgate.ini", gateway=listen, apps=[app_section("main")])
    args = ["--port", occupied] if where == "--port" else []
    assert_one_line_exit_2(run("serve", source, *args, timeout=20), str(occupied))


def test_serve_port_above_65535_is_one_line(tmp_path):
    source = write_ini(tmp_path / "wxgate.ini", apps=[app_section("main")])
    assert_one_line_exit_2(run("serve", source, "--port", "70000", timeout=20), "70000")


@pytest.mark.parametrize("where", ["--host", "listen"])
@pytest.mark.parametrize("host", ["203.0.113.1", "192.0.2.1"])  # TEST-NET: never ours
def test_serve_unassignable_host_is_one_line(tmp_path, where, host):
    listen = f"listen = {host}:{free_port()}" if where == "listen" else ""
    source = write_ini(tmp_path / "wxgate.ini", gateway=listen, apps=[app_section("main")])
    args = ["--host", host] if where == "--host" else []
    assert_one_line_exit_2(run("serve", source, *args, timeout=20), host)


# -- handshake as the console would do it ------------------------------------------------------


@pytest.fixture(scope="module")
def served_main(tmp_path_factory):
    """``wxgate serve`` of one app, with the demo handler, on plain http on loopback."""
    directory = tmp_path_factory.mktemp("served_main")
    port = free_port()
    source = write_ini(directory / "wxgate.ini", gateway=f"listen = 127.0.0.1:{port}",
                       apps=[app_section("main")])
    with serving(source, port):
        yield source, f"http://127.0.0.1:{port}/wechat"


def test_handshake_with_the_consoles_token_when_it_matches(served_main):
    source, url = served_main
    result = run("handshake", source, "--token", TOKEN)
    assert result.returncode == 0, output(result)
    assert result.stdout.startswith("PASS"), output(result)


def test_handshake_with_a_different_consoles_token_fails(served_main):
    source, url = served_main
    console = "consoleTokenValue9d2e"
    result = run("handshake", source, "--token", console)
    assert result.returncode == 1, output(result)
    text = output(result)
    assert "FAIL" in text and "403" in text
    assert "Traceback" not in result.stderr
    # The hint: the console's token (the one given) is not the one in the ini.
    assert "console" in text.lower(), text
    assert "ini" in text.lower() or "[app:main]" in text, text
    assert console not in text and TOKEN not in text


@pytest.mark.parametrize("status, hints", [
    (404, ("path", "/wechat")),  # the URL's path must be the ini's path
    (500, ("log",)),  # the server's own log says why
    (403, ("token", "clock")),  # the signature: the token, or a clock far off
])
def test_handshake_fail_hint_fits_the_status(tmp_path, status, hints):
    source = write_ini(tmp_path / "wxgate.ini", apps=[app_section("main")])
    with answering(status) as base:
        result = run("handshake", source, "--url", f"{base}/elsewhere")
    assert result.returncode == 1, output(result)
    text = output(result)
    assert "FAIL" in text and str(status) in text, text
    assert "Traceback" not in result.stderr
    for hint in hints:
        assert hint in text.lower(), (hint, text)
    assert TOKEN not in text


def test_handshake_pass_on_a_url_the_console_refuses_says_so(served_main):
    source, url = served_main
    result = run("handshake", source)
    assert result.returncode == 0, output(result)
    assert result.stdout.startswith("PASS"), output(result)
    # The note, outside the URL itself (whose random port might contain 443).
    note = output(result).replace(url, "<url>")
    assert "https" in note and "443" in note, note


# -- short messages that lead to the fix -------------------------------------------------------


def test_decrypt_a_missing_file_says_no_such_file(tmp_path):
    source = write_ini(tmp_path / "wxgate.ini", apps=[app_section("main")])
    missing = tmp_path / "no" / "such" / "push.xml"
    result = run("decrypt", source, missing)
    assert result.returncode == 2, output(result)
    assert "no such file" in result.stderr.lower(), result.stderr
    assert str(missing) in result.stderr
    assert "Base64" not in result.stderr and "Traceback" not in result.stderr


FORWARD_SECRET = "fwdSecretValue5b8c1e"


@pytest.mark.parametrize("delivery", ["sync", "queue"])
def test_check_shows_the_forward_url_and_the_delivery_mode(tmp_path, delivery):
    forward = "http://hookuser:HookPassw0rdValue@127.0.0.1:9/wx/hook?sig=QuerySecretValue"
    source = write_ini(
        tmp_path / "wxgate.ini", gateway="store = sqlite://wxgate.db", apps=[app_section(
            "main", handler="", extra=f"forward = {forward}\nforward_secret = {FORWARD_SECRET}"
            f"\ndelivery = {delivery}")])
    result = run("check", source)
    assert result.returncode == 0, output(result)
    (line,) = [line for line in result.stdout.splitlines() if "[app:main]" in line]
    assert "http://***@127.0.0.1:9/wx/hook" in line, line
    assert re.search(rf"\b{delivery}\b", line), line
    for secret in ("HookPassw0rdValue", "QuerySecretValue", FORWARD_SECRET) + SECRETS:
        assert secret not in output(result)


def test_token_fetch_that_cannot_connect_names_the_url(tmp_path):
    port = free_port()  # nothing listens there
    source = write_ini(tmp_path / "wxgate.ini", gateway=f"api_base = http://127.0.0.1:{port}",
                       apps=[app_section("main", extra=f"appsecret = {APPSECRET}")])
    result = run("token", source)
    assert_failed(result, f"127.0.0.1:{port}/cgi-bin/stable_token")


def test_a_forward_answering_401_logs_one_line_with_a_hint(tmp_path):
    port = free_port()
    with answering(401) as backend:
        source = write_ini(tmp_path / "wxgate.ini", gateway=f"listen = 127.0.0.1:{port}", apps=[
            app_section("main", handler="", extra=f"forward = {backend}/wx/hook\n"
                        f"forward_secret = {FORWARD_SECRET}")])
        with serving(source, port) as log:
            result = run("push", source, "--text", "hi")
            assert [status for _, status, _, _ in replies(result.stdout)] == [500], \
                output(result)
        text = log.read_text("utf-8")
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines()
             if re.search(r"\b401\b", line) and "outcome=" not in line]
    assert len(lines) == 1, text
    # The app's own section, not a literal "[app:...]".
    assert "[app:main] forward_secret" in lines[0], lines[0]
    for secret in (FORWARD_SECRET,) + SECRETS:
        assert secret not in text


# -- a handler module that configures logging, or sets none up ---------------------------------

HANDLER_LOGS = '''
import logging

logging.basicConfig({arguments})
log = logging.getLogger("userbot")
log.info("userbot imported")


def handle(message):
    log.info("userbot got %s", message["Content"])
    return None
'''


def serve_with_logging(tmp_path, arguments):
    """Serve a handler module calling ``logging.basicConfig(arguments)``; push once; return
    the server's stderr."""
    module = f"logs_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{module}.py").write_text(HANDLER_LOGS.format(arguments=arguments), "utf-8")
    port = free_port()
    source = write_ini(tmp_path / "wxgate.ini", gateway=f"listen = 127.0.0.1:{port}",
                       apps=[app_section("main", handler=f"{module}:handle")])
    with serving(source, port) as log:
        result = run("push", source, "--text", "marco")
        assert result.returncode == 0, output(result)
    return log.read_text("utf-8")


def assert_wxgate_lines_show(text):
    assert text.count("serving app main") == 1, text  # shown, and not twice
    assert len(re.findall(r"push app=main .*outcome=handled", text)) == 1, text


def test_basicconfig_at_info_shows_every_line(tmp_path):
    # The root logger at INFO passes wxgate's lines to the user's handler.
    text = serve_with_logging(tmp_path, "level=logging.INFO")
    assert_wxgate_lines_show(text)
    assert "userbot imported" in text and "userbot got marco" in text


def test_bare_basicconfig_shows_every_line(tmp_path):
    text = serve_with_logging(tmp_path, "")
    assert_wxgate_lines_show(text)
    # The common case just works: no level asked for, so serve's INFO applies to theirs too.
    assert "userbot imported" in text and "userbot got marco" in text


def test_basicconfig_at_warning_still_shows_wxgates_lines(tmp_path):
    text = serve_with_logging(tmp_path, "level=logging.WARNING")
    assert_wxgate_lines_show(text)
    # The user's explicit level wins for their own logger.
    assert "userbot imported" not in text and "userbot got marco" not in text


HANDLER_BARE = '''
import logging

log = logging.getLogger("barebot")
log.info("barebot imported")
log.warning("barebot warns on import")


def handle(message):
    log.info("barebot got %s", message["Content"])
    log.warning("barebot warns about %s", message["Content"])
    return None
'''
# wxgate's text format: "2024-04-25 10:00:00,123 INFO name: message".
LINE = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} %s %s: %s$"


def assert_formatted(text, level, name, message):
    assert re.search(LINE % (level, name, re.escape(message)), text, re.M), (message, text)


def bare_module(directory):
    """A handler module that logs at INFO and WARNING, on import and per push, and sets
    no logging up (the README's example does not): its name, as ``module:handle``."""
    module = f"bare_{uuid.uuid4().hex[:12]}"
    (directory / f"{module}.py").write_text(HANDLER_BARE, "utf-8")
    return f"{module}:handle"


def test_a_handler_that_sets_no_logging_up_logs_as_wxgate_does_under_serve(tmp_path):
    port = free_port()
    source = write_ini(tmp_path / "wxgate.ini", gateway=f"listen = 127.0.0.1:{port}",
                       apps=[app_section("main", handler=bare_module(tmp_path))])
    with serving(source, port) as log:
        result = run("push", source, "--text", "marco")
        assert result.returncode == 0, output(result)
    text = log.read_text("utf-8")
    # Each line formatted as wxgate's: not the WARNING lines bare (Python's last resort)
    # and the INFO lines dropped.
    for level, message in (("INFO", "barebot imported"),
                           ("WARNING", "barebot warns on import"),
                           ("INFO", "barebot got marco"),
                           ("WARNING", "barebot warns about marco")):
        assert_formatted(text, level, "barebot", message)
    assert_wxgate_lines_show(text)
    assert_formatted(text, "INFO", "wxgate", "serving app main (safe mode, auto) on "
                     f"http://127.0.0.1:{port}/wechat")


def test_a_handler_that_sets_no_logging_up_logs_as_wxgate_does_under_worker(tmp_path):
    port = free_port()
    source = write_ini(
        tmp_path / "wxgate.ini",
        gateway=f"listen = 127.0.0.1:{port}\nstore = sqlite://wxgate.db\ndelivery_threads = 0",
        apps=[app_section("main", handler=bare_module(tmp_path), extra="delivery = queue")])
    log = tmp_path / "worker.log"
    with serving(source, port), open(log, "wb") as stderr:
        worker = subprocess.Popen([sys.executable, "-m", "wxgate", "worker", str(source)],
                                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            result = run("push", source, "--text", "polo")
            assert result.returncode == 0, output(result)
            deadline = time.monotonic() + 30
            while "barebot warns about polo" not in log.read_text("utf-8"):
                assert worker.poll() is None and time.monotonic() < deadline, \
                    log.read_text("utf-8")
                time.sleep(0.05)
        finally:
            worker.terminate()
            worker.wait(10)
    text = log.read_text("utf-8")
    for level, message in (("INFO", "barebot imported"), ("WARNING", "barebot warns on import"),
                           ("INFO", "barebot got polo"), ("WARNING", "barebot warns about polo")):
        assert_formatted(text, level, "barebot", message)
    assert text.count("delivery worker started") == 1, text


def test_library_use_still_configures_no_logging(tmp_path):
    # make_app in the user's own process: no handler anywhere, Python's last resort kept.
    code = ("import logging, sys, wxgate\n"
            "last = logging.lastResort\n"
            f"wxgate.make_app(wxgate.load_config({str(tmp_path / 'wxgate.ini')!r}))\n"
            "assert logging.lastResort is last, 'last resort replaced'\n"
            "assert not logging.getLogger().handlers, logging.getLogger().handlers\n"
            "assert not logging.getLogger('wxgate').handlers\n")
    write_ini(tmp_path / "wxgate.ini", apps=[app_section("main", handler=bare_module(tmp_path))])
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, output(result)
    assert "barebot imported" not in result.stderr  # the root is still at WARNING


# -- the README's handler pattern under `python -m wxgate serve` -------------------------------
# The README's send() catches wxgate.WeChatAPIError. Started as `python -m wxgate` (or `python
# wxgate.py`), wxgate runs as __main__, and a handler's `import wxgate` could load a second
# copy whose WeChatAPIError `except wxgate.WeChatAPIError` would not catch: the push would
# answer 500 and WeChat retry. Under every launcher, it must be caught.

HANDLER_README = '''
import wxgate


def handle(message):
    try:
        message.client.send_text(message.from_user, "pong")
    except (wxgate.WeChatAPIError, wxgate.WeChatConnectionError):
        pass  # the README's send(): log it, still answer success
    return None
'''


@pytest.mark.parametrize("launcher", [
    pytest.param(("-c", "import sys, wxgate; sys.exit(wxgate.main())"), id="console-script"),
    pytest.param(("-m", "wxgate"), id="python-m-wxgate"),
    pytest.param(("wxgate.py",), id="python-wxgate.py"),
])
def test_the_readmes_except_wechatapierror_catches_under_every_launcher(tmp_path, launcher):
    module = f"readme_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{module}.py").write_text(HANDLER_README, "utf-8")
    port = free_port()
    with FakeWeChat() as wechat:
        source = write_ini(
            tmp_path / "wxgate.ini",
            gateway=f"listen = 127.0.0.1:{port}\napi_base = {wechat.url}",
            apps=[app_section("main", appid=DEFAULT_APPID, handler=f"{module}:handle",
                              extra=f"appsecret = {DEFAULT_SECRET}")])
        wechat.fail_next(CUSTOM_SEND_PATH, 45015, "response out of time limit")
        with serving(source, port, launcher=launcher) as log:
            result = run("push", source, "--text", "late")
        served_log = log.read_text("utf-8")
    assert wechat.calls[CUSTOM_SEND_PATH] == 1  # the send was tried, and refused
    assert [(status, shown) for _, status, _, shown in replies(result.stdout)] == [
        (200, "'success'")], served_log
    assert "outcome=handled" in served_log and "Traceback" not in served_log


# -- queue commands, a --url with a query, --read-timeout, hosts that do not resolve -----------


@pytest.mark.parametrize("action", ["stats", "list-dead", "retry-dead", "purge-dead"])
@pytest.mark.parametrize("unset", UNSET)
def test_queue_commands_without_the_unrelated_secrets(tmp_path, action, unset):
    source = write_ini(
        tmp_path / "wxgate.ini",
        gateway="store = sqlite://wxgate.db\nadmin_secret = ${WXGATE_ADMIN_SECRET}",
        apps=[app_section("main", extra="appsecret = ${WX_APPSECRET}\ndelivery = queue")])
    result = run("queue", source, action, env=without(*unset))
    assert result.returncode == 0, output(result)
    if action == "stats":
        assert json.loads(result.stdout) == {"pending": 0, "in_flight": 0, "dead": 0}
    for secret in SECRETS:
        assert secret not in output(result)


def test_handshake_and_push_to_a_url_with_a_query_of_its_own(served_main):
    source, url = served_main
    # Not "/wechat?x=1?signature=...", which the gateway would read as
    # x = "1?signature=...".
    result = run("handshake", source, "--url", f"{url}?x=1")
    assert result.returncode == 0, output(result)
    assert result.stdout.startswith("PASS"), output(result)
    result = run("push", source, "--url", f"{url}?x=1", "--text", "hi")
    assert [status for _, status, _, _ in replies(result.stdout)] == [200], output(result)


def test_the_query_is_joined_with_an_ampersand_exactly_once():
    join = wxgate._with_query
    assert join("http://h/wechat", "a=1") == "http://h/wechat?a=1"
    assert join("http://h/wechat?x=1", "a=1") == "http://h/wechat?x=1&a=1"
    assert join("http://h/wechat?", "a=1") == "http://h/wechat?a=1"
    assert join("http://h/wechat?x=1&", "a=1") == "http://h/wechat?x=1&a=1"
    assert join("http://h/wechat#top", "a=1") == "http://h/wechat?a=1#top"


@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "inf"])
def test_serve_refuses_a_read_timeout_that_is_not_above_0(tmp_path, seconds):
    # Accepted, such a value would drop every request ("connection dropped").
    port = free_port()
    source = write_ini(tmp_path / "wxgate.ini", gateway=f"listen = 127.0.0.1:{port}",
                       apps=[app_section("main")])
    assert_one_line_exit_2(run("serve", source, "--read-timeout", seconds, timeout=20),
                           "--read-timeout", seconds)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # it did not start serving


UNRESOLVABLE = "http://no-such-host.invalid"  # .invalid never resolves (RFC 6761)


def test_a_token_fetch_from_a_host_that_does_not_resolve_says_so(tmp_path):
    source = write_ini(tmp_path / "wxgate.ini", gateway=f"api_base = {UNRESOLVABLE}",
                       apps=[app_section("main", extra=f"appsecret = {APPSECRET}")])
    result = run("token", source)
    # Not "stable_token unreachable at http://...: gaierror", which names no cause.
    assert_failed(result, "cannot resolve the host",
                  f"{UNRESOLVABLE}/cgi-bin/stable_token", "api_base")
    assert "gaierror" not in result.stderr


def test_the_wrong_token_hint_names_the_consoles_page_and_button(served_main):
    source, url = served_main
    result = run("handshake", source, "--token", "consoleTokenValue9d2e")
    assert result.returncode == 1, output(result)
    # Not "click the console's button", naming neither; the README says "Press 提交".
    assert "消息推送" in result.stdout and "提交" in result.stdout, result.stdout
    assert "[app:main] token" in result.stdout, result.stdout


# -- serve on a busy port, and push or handshake to a gateway that is not this ini's -----------


@pytest.mark.parametrize("given_port", [False, True], ids=["listen", "--port"])
def test_serve_on_a_busy_port_names_port_and_listen_as_the_fix(tmp_path, given_port):
    import socket
    with socket.socket() as holder:  # another server on the port
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        source = write_ini(tmp_path / "busy.ini", gateway=f"listen = 127.0.0.1:{port}",
                           apps=[app_section("only")])
        result = run("serve", source, *(("--port", port) if given_port else ()))
    # Before: "wxgate: cannot listen on 127.0.0.1:PORT: Address already in use", no more.
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for needle in (f"127.0.0.1:{port}", "Address already in use", "--port",
                   f"[wxgate] listen in {source}", "--url"):
        assert needle in result.stderr, (needle, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


OTHER_TOKEN = "anotherDemosToken9e1"  # the ini's token; the served gateway holds TOKEN
OTHER_KEY = "YVxEHWeyPcHcaXNNcNtfdEJtVYvIrdIxOmuubr7QkO2"  # another valid 43-character key


def test_push_and_handshake_to_another_gateway_on_listen_say_so(served, tmp_path):
    # Two demos: `served` holds the ini's listen port with another token for the same path,
    # and this ini's own gateway was started with --port elsewhere.
    source = write_ini(tmp_path / "mine.ini", gateway=f"listen = 127.0.0.1:{served.port}",
                       apps=[app_section("mine", path="/xml", token=OTHER_TOKEN)])
    own_port = free_port()
    with open(tmp_path / "own.log", "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "wxgate", "serve", str(source), "--port", str(own_port)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for_port(own_port, process)
        listen_url, own_url = (f"http://127.0.0.1:{port}/xml" for port in (served.port,
                                                                            own_port))
        log = (tmp_path / "own.log").read_text("utf-8")
        assert f"give wxgate push and handshake --url {own_url}" in log, log

        push = run("push", source, "--text", "to the wrong demo")
        # Before: the 403 and its "check the app's token (WeChat -40001)", no more.
        assert push.returncode == 1, (push.stdout, push.stderr)
        assert push.stdout.startswith(f"POST {listen_url} (safe mode, xml; the ini's listen")
        assert [status for _, status, _, _ in replies(push.stdout)] == [403]
        handshake = run("handshake", source)
        assert handshake.returncode == 1, (handshake.stdout, handshake.stderr)
        assert handshake.stderr.startswith(f"GET {listen_url} (the console's URL check")
        assert handshake.stdout.startswith(f"FAIL: {listen_url} answered 403")
        for text in (push.stderr, handshake.stdout):
            for needle in (f"the wxgate gateway at http://127.0.0.1:{served.port} refuses a "
                           f"signature made with {source} [app:mine] token",
                           f"is not the one serving {source}", f"listen's port {served.port}",
                           "--url", "restart it"):
                assert needle in text, (needle, text)
            assert "Traceback" not in text and OTHER_TOKEN not in text and TOKEN not in text

        push = run("push", source, "--text", "to my own", "--url", own_url)
        assert push.returncode == 0, (push.stdout, push.stderr)
        assert push.stdout.startswith(f"POST {own_url} (safe mode, xml): text")
        assert push.stderr == ""
        handshake = run("handshake", source, "--url", own_url)
        assert handshake.returncode == 0 and handshake.stdout.startswith("PASS")
        assert handshake.stderr.startswith(f"GET {own_url} ")
    finally:
        process.kill()
        process.wait(10)


def test_push_to_a_gateway_with_no_app_at_the_path_says_it_may_not_serve_this_ini(served,
                                                                                   tmp_path):
    source = write_ini(tmp_path / "mine.ini", gateway=f"listen = 127.0.0.1:{served.port}",
                       apps=[app_section("mine", path="/elsewhere")])
    for command in (("push", "--text", "hi"), ("handshake",)):
        result = run(command[0], source, *command[1:])
        assert result.returncode == 1, (result.stdout, result.stderr)
        text = result.stdout + result.stderr
        assert "404" in text and "no wxgate app at this path" in text, text
        assert (f"the wxgate gateway at http://127.0.0.1:{served.port} has no app at "
                f"'/elsewhere': either it is not the one serving {source}") in text, text
        assert "--url" in text and "Traceback" not in text


def test_push_to_a_wrong_path_given_with_url_names_the_ini_path(served, tmp_path):
    source = write_ini(tmp_path / "mine.ini", apps=[app_section("mine", path="/xml")])
    url = f"http://127.0.0.1:{served.port}/xlm"
    for command in (("push", "--text", "hi"), ("handshake",)):
        result = run(command[0], source, *command[1:], "--url", url)
        assert result.returncode == 1, (result.stdout, result.stderr)
        text = result.stdout + result.stderr
        assert (f"a wxgate gateway answers there, with no app at '/xlm': the URL's path must "
                f"be {source} [app:mine] path '/xml'") in text, text
        assert "not the one serving" not in text, text


def test_push_sealed_with_another_key_says_the_gateway_holds_another_key(served, tmp_path):
    source = write_ini(tmp_path / "mine.ini", gateway=f"listen = 127.0.0.1:{served.port}",
                       apps=[app_section("mine", path="/xml", key=OTHER_KEY)])
    result = run("push", source, "--text", "hi")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert [status for _, status, _, _ in replies(result.stdout)] == [400]
    assert (f"takes the signature, but cannot open a push sealed with {source} [app:mine] "
            "encoding_aes_key and appid (it holds another key or appid): either it is not "
            f"the one serving {source}") in result.stderr, result.stderr
    assert OTHER_KEY not in result.stdout + result.stderr


class _Answering:
    """A real HTTP server on loopback answering every request with one status and body:
    some other program on the port, not a wxgate gateway."""

    def __init__(self, status, body):
        import http.server
        import threading

        class Fixed(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, format, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Fixed)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/wechat"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("status, body", [
    (403, b"Forbidden"),
    (404, b"Not Found"),
    (400, b"Bad Request"),
])
def test_a_refusal_from_a_server_that_is_not_wxgate_claims_nothing_about_it(tmp_path, status,
                                                                            body):
    source = write_ini(tmp_path / "mine.ini", apps=[app_section("mine")])
    with _Answering(status, body) as other:
        result = run("push", source, "--text", "hi", "--url", other.url)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert [line[1] for line in replies(result.stdout)] == [status]
    assert result.stderr == "", result.stderr  # no hint: nothing here says what it holds


def test_handshake_answered_200_without_the_echo_says_it_is_not_a_gateway_of_this_ini(tmp_path):
    source = write_ini(tmp_path / "mine.ini", apps=[app_section("mine")])
    with _Answering(200, b"hello from another demo") as other:
        result = run("handshake", source, "--url", other.url)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout.startswith(f"FAIL: {other.url} answered 200")
    assert (f"what answers there is not a wxgate gateway serving {source} [app:mine] "
            "(check --url's host and port") in result.stdout, result.stdout


# -- push --field: text, JSON values, and the subscribe events' List ---------------------------


ITEMS = [{"TemplateId": "T1", "SubscribeStatusString": "accept", "PopupScene": "0"},
         {"TemplateId": "T2", "SubscribeStatusString": "reject", "PopupScene": "0"}]


@pytest.mark.parametrize("app", ["json", "xml"])
def test_push_builds_a_subscribe_events_list_from_a_json_field(served, app):
    openid = f"o_sub_{uuid.uuid4().hex[:8]}"
    result = run("push", served.source, "--app", app, "--event", "subscribe_msg_popup_event",
                 "--openid", openid, "--field", f"List:={json.dumps(ITEMS)}")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert [line[1] for line in replies(result.stdout)] == [200]
    (call,) = [c for c in served.calls() if c["FromUserName"] == openid]
    # As WeChat sends them: a top-level List in JSON, wrapped in XML.
    if app == "json":
        assert call["List"] == ITEMS and "SubscribeMsgPopupEvent" not in call
    else:
        assert call["SubscribeMsgPopupEvent"] == {"List": ITEMS} and "List" not in call
    message = wxgate.Message({k: v for k, v in call.items() if k != "_app"}, app=app)
    assert message.items_list == ITEMS


@pytest.mark.parametrize("fields, needles", [
    (["--field", "TemplateId=T1", "--field", "SubscribeStatusString=accept"],
     ["TemplateId, SubscribeStatusString belong to the items of subscribe_msg_popup_event's "
      """List, not to the push: --field 'List:=[{"TemplateId": "T1", """
      """"SubscribeStatusString": "accept"}]'"""]),
    ([], ["subscribe_msg_popup_event carries its items in List", "List:=", "--help"]),
    (["--field", "List:=[]"], ["carries its items in List"]),
    (["--field", "List:=[1, 2]"], ["a list of objects"]),
], ids=["item fields at the top", "no List", "empty List", "List of numbers"])
def test_push_refuses_a_subscribe_event_whose_items_would_be_empty(served, fields, needles):
    openid = f"o_sub_{uuid.uuid4().hex[:8]}"
    result = run("push", served.source, "--app", "json", "--event",
                 "subscribe_msg_popup_event", "--openid", openid, *fields)
    # Before: 200 'success' with message.items_list == [] in the handler, and no word.
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.startswith("wxgate: cannot build this push: "), result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    assert not [c for c in served.calls() if c["FromUserName"] == openid]


@pytest.mark.parametrize("field, needle", [
    ("TemplateId", "--field takes NAME=TEXT or NAME:=JSON, got 'TemplateId'"),
    ("List.TemplateId=T1", "a nested field is a JSON value of its top-level field"),
    ('List:=[{"TemplateId": "T1"', "List:= takes JSON"),
    ("a b=1", "push field 'a b' is not a valid XML element name"),
])
def test_push_refuses_a_field_it_cannot_build_as_a_usage_error(served, field, needle):
    result = run("push", served.source, "--app", "xml", "--event", "x", "--field", field)
    # Before: "a b" was a traceback, and the others went out as fields nobody reads.
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and needle in result.stderr, result.stderr
    assert replies(result.stdout) == []


def test_push_field_applies_to_a_text_and_takes_json_numbers(served):
    msg_id = str(int(uuid.uuid4().int % 10 ** 18))
    result = run("push", served.source, "--app", "json", "--text", "with fields",
                 "--field", f"MsgId={msg_id}", "--field", "CreateTime:=1714000000")
    assert result.returncode == 0, (result.stdout, result.stderr)
    (call,) = [c for c in served.calls() if c.get("MsgId") == msg_id]
    # Before: --field was dropped without a word when --text was given.
    assert call["Content"] == "with fields" and call["CreateTime"] == 1714000000


def test_push_help_documents_the_field_syntax():
    result = run("push", "--help")
    assert result.returncode == 0, result.stderr
    for needle in ("NAME=TEXT", "NAME:=JSON", "List:=[{", "subscribe_msg_popup_event",
                   "<SubscribeMsgPopupEvent>"):
        assert needle in result.stdout, (needle, result.stdout)
