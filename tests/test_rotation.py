"""EncodingAESKey rotation: ``previous_encoding_aes_key``.

WeChat's guidance: keep the current and the previous key; when the current one fails, try
the previous one; encrypt the reply with the key that decrypted the push.
Pushes are built by conftest's builder (pycryptodome directly), never by wxgate.
"""

import base64
import dataclasses
import logging
import struct
import subprocess
import sys

import pytest
import webtest
from Crypto.Cipher import AES

import wxgate
from conftest import (AES_KEY, APPID, NOW, REPO, TOKEN, Recorder, build_push, ini_text,
                      open_reply, text_message)

OLD_KEY = AES_KEY  # the key the console still uses while the ini moves on
NEW_KEY = "Qm9vZ2llV29vZ2llU2VjcmV0S2V5MDEyMzQ1Njc4OWE"
OTHER_KEY = "zyxwvutsrqponmlkjihgfedcba9876543210ZYXWVUT"
MODES = ["compat", "safe"]
FORMATS = ["xml", "json"]
METRIC = "wxgate_previous_key_total"


def rotation_ini(name="test", path="/wechat", mode="safe", extra_gateway="", extra_app=""):
    return ini_text(mode=mode, path=path, extra_gateway="timestamp_window = 0\n" +
                    extra_gateway, extra_app=f"previous_encoding_aes_key = {OLD_KEY}\n" +
                    extra_app).replace(f"encoding_aes_key = {AES_KEY}",
                                       f"encoding_aes_key = {NEW_KEY}", 1).replace(
        "[app:test]", f"[app:{name}]")


def load(tmp_path, text, handler=None):
    source = tmp_path / "rotation.ini"
    source.write_text(text, "utf-8")
    config = wxgate.load_config(source, environ={})
    if handler is not None:
        config = dataclasses.replace(config, apps={
            name: dataclasses.replace(app, handler=handler, handler_spec="test:handler")
            for name, app in config.apps.items()})
    return config


@pytest.fixture
def gateway(tmp_path, clock):
    made = []

    def factory(handler, **kwargs):
        app = wxgate.make_app(load(tmp_path, rotation_ini(**kwargs), handler), clock=clock)
        made.append(app)
        return app, webtest.TestApp(app, lint=True)

    yield factory
    for app in made:
        app.close()


def post(testapp, fields, *, key, status=200, path="/wechat", **options):
    query, body = build_push(fields, key=key, **options)
    return testapp.post(f"{path}?{query}", body, content_type="text/xml", status=status)


def opens_with(encrypt, key):
    """Whether ``encrypt`` decrypts strictly under ``key``: valid pad, length and appid."""
    raw = base64.b64decode(key + "=")
    buffer = AES.new(raw, AES.MODE_CBC, raw[:16]).decrypt(base64.b64decode(encrypt))
    pad = buffer[-1]
    if not 1 <= pad <= 32 or buffer[-pad:] != bytes([pad]) * pad:
        return False
    buffer = buffer[:-pad]
    if len(buffer) < 20:
        return False
    (length,) = struct.unpack(">I", buffer[16:20])
    return 20 + length <= len(buffer) and buffer[20 + length:] == APPID.encode()


TRANSFER = {"MsgType": "transfer_customer_service"}


# -- configuration ------------------------------------------------------------------------------


def test_previous_key_loads_and_stays_out_of_repr(tmp_path):
    app = load(tmp_path, rotation_ini()).apps["test"]
    assert app.previous_encoding_aes_key == OLD_KEY
    assert OLD_KEY not in repr(app) and NEW_KEY not in repr(app)


@pytest.mark.parametrize("bad, why", [(OLD_KEY[:42], "42"), (OLD_KEY[:42] + "*", "Base64")])
def test_previous_key_is_validated_like_the_current_one(tmp_path, bad, why):
    text = rotation_ini().replace(f"previous_encoding_aes_key = {OLD_KEY}",
                                  f"previous_encoding_aes_key = {bad}")
    with pytest.raises(wxgate.ConfigError) as caught:
        load(tmp_path, text)
    assert caught.value.option == "previous_encoding_aes_key"
    assert caught.value.code == -40004
    assert why in caught.value.message
    assert bad not in caught.value.message


def test_previous_key_in_quotes_is_named(tmp_path):
    text = rotation_ini().replace(f"previous_encoding_aes_key = {OLD_KEY}",
                                  f"previous_encoding_aes_key = '{OLD_KEY}'")
    with pytest.raises(wxgate.ConfigError) as caught:
        load(tmp_path, text)
    assert caught.value.option == "previous_encoding_aes_key"
    assert "quotes" in caught.value.message and OLD_KEY not in caught.value.message


def test_previous_key_needs_a_current_one(tmp_path):
    text = rotation_ini(mode="plain").replace(f"encoding_aes_key = {NEW_KEY}\n", "", 1)
    with pytest.raises(wxgate.ConfigError) as caught:
        load(tmp_path, text)
    assert caught.value.option == "previous_encoding_aes_key"


# -- decryption and the reply ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", MODES)
def test_push_under_the_previous_key_is_answered_under_it_only(gateway, mode, fmt):
    handler = Recorder(reply=TRANSFER)
    _, testapp = gateway(handler, mode=mode)
    response = post(testapp, text_message("旧钥匙"), key=OLD_KEY, mode=mode, fmt=fmt)
    assert handler.messages[0]["Content"] == "旧钥匙"
    plaintext, appid, envelope = open_reply(response.body, fmt, key=OLD_KEY)
    assert appid == APPID and "transfer_customer_service" in plaintext
    assert opens_with(envelope["Encrypt"], OLD_KEY)
    assert not opens_with(envelope["Encrypt"], NEW_KEY)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", MODES)
def test_push_under_the_current_key_is_answered_under_it_only(gateway, mode, fmt):
    handler = Recorder(reply=TRANSFER)
    app, testapp = gateway(handler, mode=mode)
    response = post(testapp, text_message(), key=NEW_KEY, mode=mode, fmt=fmt)
    _, _, envelope = open_reply(response.body, fmt, key=NEW_KEY)
    assert opens_with(envelope["Encrypt"], NEW_KEY)
    assert not opens_with(envelope["Encrypt"], OLD_KEY)
    assert app.metrics.value(METRIC, app="test") == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_third_key_is_refused(gateway, caplog, fmt):
    # The sealed refusal still holds: failing under both keys is answered exactly as
    # any other failure past msg_signature (here: the current key, another appid).
    caplog.set_level(logging.INFO, logger="wxgate")
    handler = Recorder()
    app, testapp = gateway(handler)
    response = post(testapp, text_message(), key=OTHER_KEY, fmt=fmt, status=400)
    other = post(testapp, text_message(msg_id="2"), key=NEW_KEY, appid="wx0000000000000000",
                 fmt=fmt, status=400)
    assert response.body == other.body == wxgate.SEALED_REFUSAL.encode()
    logged = [r.getMessage() for r in caplog.records if "refused 400" in r.getMessage()]
    assert len(logged) == 2 and "-40008" in logged[0] and "-40005" in logged[1]
    for key in (OLD_KEY, NEW_KEY, OTHER_KEY):
        assert key not in response.text and key not in caplog.text
    assert handler.calls == 0
    assert app.metrics.value(METRIC, app="test") == 0


def test_msg_signature_is_checked_before_either_key(gateway):
    handler = Recorder()
    app, testapp = gateway(handler)
    response = post(testapp, text_message(), key=OLD_KEY, token="not-the-token", status=403)
    assert "-40001" in response.text
    assert handler.calls == 0
    assert app.metrics.value(METRIC, app="test") == 0


def test_success_reply_and_a_retry_under_the_previous_key(gateway):
    handler = Recorder()
    app, testapp = gateway(handler)
    for _ in range(2):
        assert post(testapp, text_message(msg_id="r1"), key=OLD_KEY).body == b"success"
    assert handler.calls == 1


# -- visibility ----------------------------------------------------------------------------


def warnings_about_the_previous_key(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING
            and "previous_encoding_aes_key" in r.getMessage()]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", MODES)
def test_each_push_is_counted_and_warned_about_once_a_minute(gateway, clock, caplog, mode,
                                                             fmt):
    caplog.set_level(logging.INFO, logger="wxgate")
    app, testapp = gateway(Recorder(), mode=mode)
    for msg_id, step in (("1", 0), ("2", 10), ("3", 49)):  # 59 s in all
        clock.advance(step)
        post(testapp, text_message(msg_id=msg_id), key=OLD_KEY, mode=mode, fmt=fmt)
    assert app.metrics.value(METRIC, app="test") == 3
    assert len(warnings_about_the_previous_key(caplog)) == 1
    clock.advance(2)  # 61 s after the first warning
    post(testapp, text_message(msg_id="4"), key=OLD_KEY, mode=mode, fmt=fmt)
    post(testapp, text_message(msg_id="5"), key=NEW_KEY, mode=mode, fmt=fmt)
    assert app.metrics.value(METRIC, app="test") == 4
    warned = warnings_about_the_previous_key(caplog)
    assert len(warned) == 2
    for record in warned:
        assert "test" in record.getMessage()
        assert OLD_KEY not in record.getMessage() and NEW_KEY not in record.getMessage()
    assert f'{METRIC}{{app="test"}} 4' in app.metrics.render()


def test_the_warning_limit_is_per_app(tmp_path, clock, caplog):
    caplog.set_level(logging.INFO, logger="wxgate")
    second = rotation_ini(name="two", path="/two")
    text = rotation_ini(name="one", path="/one") + second[second.index("[app:two]"):]
    app = wxgate.make_app(load(tmp_path, text, Recorder()), clock=clock)
    testapp = webtest.TestApp(app, lint=True)
    for path in ("/one", "/two", "/one", "/two"):
        clock.advance(1)
        post(testapp, text_message(msg_id=f"{path}{clock.now}"), key=OLD_KEY, path=path)
    warned = warnings_about_the_previous_key(caplog)
    assert len(warned) == 2
    assert app.metrics.value(METRIC, app="one") == 2
    assert app.metrics.value(METRIC, app="two") == 2
    app.close()


# -- the command line -------------------------------------------------------------------------


def run(*args):
    return subprocess.run([sys.executable, "-m", "wxgate", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("key", [OLD_KEY, NEW_KEY], ids=["previous", "current"])
def test_cli_decrypt_knows_both_keys(tmp_path, key):
    source = tmp_path / "decrypt.ini"
    source.write_text(rotation_ini(), "utf-8")
    query, body = build_push(text_message("captured"), key=key, fmt="json", nonce="42")
    (tmp_path / "push.json").write_bytes(body)
    import urllib.parse
    signature = dict(urllib.parse.parse_qsl(query))["msg_signature"]
    result = run("decrypt", source, tmp_path / "push.json", "--timestamp", str(NOW),
                 "--nonce", "42", "--msg-signature", signature)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert '"Content": "captured"' in result.stdout or '"Content":"captured"' in result.stdout
    for secret in (OLD_KEY, NEW_KEY, TOKEN):
        assert secret not in result.stdout + result.stderr


def test_cli_decrypt_says_which_key_opened_it(tmp_path):
    source = tmp_path / "decrypt.ini"
    source.write_text(rotation_ini(), "utf-8")
    for key, option in ((OLD_KEY, "previous_encoding_aes_key"), (NEW_KEY, "encoding_aes_key")):
        _, body = build_push(text_message(), key=key, fmt="xml")
        (tmp_path / "push.xml").write_bytes(body)
        result = run("decrypt", source, tmp_path / "push.xml")
        assert result.returncode == 0, result.stderr
        assert f"decrypted with {option}\n" in result.stderr


def test_cli_decrypt_with_a_third_key_fails(tmp_path):
    source = tmp_path / "decrypt.ini"
    source.write_text(rotation_ini(), "utf-8")
    _, body = build_push(text_message(), key=OTHER_KEY, fmt="xml")
    (tmp_path / "push.xml").write_bytes(body)
    result = run("decrypt", source, tmp_path / "push.xml")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "cannot decrypt" in result.stderr


def test_cli_check_shows_the_previous_key_redacted(tmp_path):
    source = tmp_path / "check.ini"
    source.write_text(rotation_ini(), "utf-8")
    result = run("check", source)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "previous_encoding_aes_key <43 chars>" in result.stdout
    for secret in (OLD_KEY, NEW_KEY, TOKEN):
        assert secret not in result.stdout + result.stderr
