"""The ``wxgate`` command line, run as a real subprocess: exit codes, output, secrets kept.

Exit codes: 0 done, 1 failed (the reason on stderr, never a secret), 2 usage error.
The end-to-end tests start ``wxgate serve`` once for the module and drive it with
``wxgate push`` and ``wxgate handshake``, as the README's demo does.
"""

import json
import re
import subprocess
import sys
import time
import uuid

import pytest

import wxgate
from conftest import REPO, VECTORS, free_port
from fake_wechat import DEFAULT_APPID, DEFAULT_SECRET, FakeWeChat

COMMANDS = ["serve", "genkey", "sign", "check", "token", "push", "handshake", "decrypt",
            "worker", "queue"]

# Secrets of the test inis: long and distinctive, so a leak cannot hide behind a short match.
TOKEN = "cliTokenSecretValue7f3a"
AES_KEY = "Qm9vZ2llV29vZ2llU2VjcmV0S2V5MDEyMzQ1Njc4OWE"  # 43 characters
APPSECRET = "cliAppSecretValue0123456789abcdef"
ADMIN_SECRET = "cliAdminSecretValue42xyz"
SECRETS = (TOKEN, AES_KEY, APPSECRET, ADMIN_SECRET)


def run(*args, timeout=30, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "wxgate", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


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
DECRYPT_CASES = [pytest.param(case, id=case["id"]) for case in VECTORS if case["kind"] == "decrypt"]


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
    assert "FAIL" in result.stdout + result.stderr and "cannot reach" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
