"""Configuration: load_config/_parse_config, ${VAR} expansion, every bad value, make_app(path),
the lazy ``wxgate.application``, and plaintext mode without pycryptodome.

Error tests check the four attributes configparser's errors carry (``source``, ``section``,
``option``, ``lineno``) and that the message names them, since a user reads only the message.
"""

import json
import logging
import re
import subprocess
import sys
import textwrap
import uuid

import pytest
import webtest

import wxgate
from conftest import AES_KEY, APPID, NOW, REPO, TOKEN, sha1_sign
from readme import pages
from test_cli import AES_KEY as CLI_AES_KEY
from test_cli import TOKEN as CLI_TOKEN
from test_cli import app_section, assert_failed, output, write_ini
from test_cli import run as run_cli

EXAMPLE = REPO / "example.ini"

# Distinct, greppable secret values, so a leak is unambiguous.
SECRET_TOKEN = "tokSECRETvalue0001"
SECRET_APPSECRET = "appSECRETvalue0002"
SECRET_ADMIN = "admSECRETvalue0003"
SECRET_FORWARD = "fwdSECRETvalue0004"
SECRET_KEY = AES_KEY  # a valid 43-character EncodingAESKey
SECRETS = (SECRET_TOKEN, SECRET_APPSECRET, SECRET_ADMIN, SECRET_FORWARD, SECRET_KEY)


def ini(gateway="", app="", *, name="a", path="/wechat", mode="plain", key=None,
        token=SECRET_TOKEN, handler="wxgate:demo_handler", extra=""):
    """An ini text with one app; ``gateway`` and ``app`` are extra lines for each section."""
    lines = ["[wxgate]", gateway, "", f"[app:{name}]", f"path = {path}", f"appid = {APPID}",
             f"token = {token}", f"mode = {mode}", f"handler = {handler}"]
    if key is not None:
        lines.append(f"encoding_aes_key = {key}")
    lines += [app, extra, ""]
    return "\n".join(lines)


def line_of(text, start, occurrence=1):
    """The 1-based number of the ``occurrence``-th line that starts with ``start``."""
    seen = 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith(start):
            seen += 1
            if seen == occurrence:
                return number
    raise AssertionError(f"no line {occurrence} starting with {start!r}")


def load_text(tmp_path, text, environ=None, filename="wxgate.ini"):
    source = tmp_path / filename
    source.write_text(text, "utf-8")
    return wxgate.load_config(source, environ={} if environ is None else environ), source


def config_error(tmp_path, text, environ=None):
    with pytest.raises(wxgate.ConfigError) as info:
        load_text(tmp_path, text, environ)
    return info.value


def assert_names(error, source, section, option, lineno):
    """The attributes are exactly these, and the message names each one that is set."""
    assert (error.source, error.section, error.option, error.lineno) == (
        str(source), section, option, lineno)
    message = str(error)
    assert str(source) in message
    if section:
        assert f"[{section}]" in message
    if option:
        assert option in message
    if lineno:
        assert f":{lineno}" in message
    assert error.status == 500
    for secret in SECRETS:
        assert secret not in message


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch):
    # Resolving a handler may append the ini's directory to sys.path; keep tests independent.
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture
def handler_module(tmp_path):
    """Write a module beside the ini under a unique name; forget it in sys.modules after."""
    written = []

    def write(source, package=None):
        name = f"wxgate_test_handler_{uuid.uuid4().hex}"
        if package:
            (tmp_path / name).mkdir()
            (tmp_path / name / "__init__.py").write_text("", "utf-8")
            (tmp_path / name / f"{package}.py").write_text(textwrap.dedent(source), "utf-8")
        else:
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(source), "utf-8")
        written.append(name)
        return name

    yield write
    for name in written:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[loaded]


# -- the shipped example and defaults -------------------------------------------------------


def test_example_ini_loads_as_shipped():
    config = wxgate.load_config(EXAMPLE, environ={})
    assert config.source == str(EXAMPLE)
    assert list(config.apps) == ["demo"]
    demo = config.apps["demo"]
    assert demo.mode == "safe"
    assert len(demo.encoding_aes_key) == 43
    assert len(demo.aes_key) == 32
    assert demo.path == "/wechat"
    assert demo.handler is wxgate.demo_handler
    assert demo.format == "auto"
    assert config.listen == "127.0.0.1:8080"
    assert config.store == "memory"
    assert config.api_base == "https://api.weixin.qq.com"


def test_example_ini_serves_a_handshake():
    config = wxgate.load_config(EXAMPLE, environ={})
    demo = config.apps["demo"]
    testapp = webtest.TestApp(wxgate.make_app(config, clock=lambda: NOW), lint=True)
    response = testapp.get("/wechat", {"signature": sha1_sign(demo.token, str(NOW), "1"),
                                       "timestamp": str(NOW), "nonce": "1", "echostr": "e1"})
    assert response.body == b"e1"


def test_defaults_when_options_are_absent(tmp_path):
    text = "\n".join(["[app:a]", "path = /wechat", f"appid = {APPID}", f"token = {TOKEN}",
                      f"encoding_aes_key = {AES_KEY}", "handler = wxgate:demo_handler", ""])
    config, source = load_text(tmp_path, text)
    assert config.source == str(source)
    assert config.timestamp_window == wxgate.DEFAULT_TIMESTAMP_WINDOW == 300
    assert config.max_body_bytes == wxgate.DEFAULT_MAX_BODY_BYTES == 65536
    assert config.dedup_size == wxgate.DEFAULT_DEDUP_SIZE == 10000
    assert config.dedup_ttl == wxgate.DEFAULT_DEDUP_TTL == 300
    assert config.api_base == "https://api.weixin.qq.com"
    assert config.api_timeout == wxgate.DEFAULT_API_TIMEOUT
    assert config.store == "memory"
    assert config.store_prefix == "wxgate"
    assert config.admin_secret == ""
    assert config.admin_path == "/_wxgate"
    assert config.listen == "127.0.0.1:8080"
    app = config.apps["a"]
    assert (app.name, app.path, app.appid, app.token) == ("a", "/wechat", APPID, TOKEN)
    assert app.mode == "safe"
    assert app.format == "auto"
    assert app.appsecret == ""
    assert app.token_grant == "stable"
    assert app.token_refresh_margin == wxgate.DEFAULT_REFRESH_MARGIN
    assert (app.forward, app.forward_secret, app.delivery) == ("", "", "sync")


def test_values_are_read_and_typed(tmp_path):
    gateway = "\n".join(["timestamp_window = 0", "max_body_bytes = 2048", "dedup_size = 5",
                         "dedup_ttl = 12.5", "api_base = http://127.0.0.1:9/", "api_timeout = 1.5",
                         "store_prefix = gw1", "admin_path = /admin/", "listen = 0.0.0.0:9000"])
    app = "\n".join(["format = JSON", "token_grant = classic", "token_refresh_margin = 60"])
    config, _ = load_text(tmp_path, ini(gateway, app, mode="Compat", key=AES_KEY))
    assert config.timestamp_window == 0 and isinstance(config.timestamp_window, int)
    assert config.max_body_bytes == 2048
    assert config.dedup_size == 5
    assert config.dedup_ttl == 12.5
    assert config.api_base == "http://127.0.0.1:9"  # trailing slash dropped
    assert config.api_timeout == 1.5
    assert config.store_prefix == "gw1"
    assert config.admin_path == "/admin"
    assert config.listen == "0.0.0.0:9000"
    app_config = config.apps["a"]
    assert (app_config.mode, app_config.format, app_config.token_grant) == (
        "compat", "json", "classic")
    assert app_config.token_refresh_margin == 60.0


def test_apps_keep_file_order(tmp_path):
    text = ini(name="zeta", path="/z") + "\n".join([
        "[app:alpha]", "path = /a", f"appid = {APPID}", f"token = {TOKEN}", "mode = plain",
        "handler = wxgate:demo_handler", ""])
    config, _ = load_text(tmp_path, text)
    assert list(config.apps) == ["zeta", "alpha"]


def test_plain_mode_needs_no_key(tmp_path):
    config, _ = load_text(tmp_path, ini(mode="plain"))
    assert config.apps["a"].encoding_aes_key == ""
    assert config.apps["a"].aes_key is None


def test_relative_sqlite_store_is_found_beside_the_ini(tmp_path):
    config, _ = load_text(tmp_path, ini("store = sqlite://state/wxgate.db"))
    assert config.store == "sqlite://" + str(tmp_path / "state" / "wxgate.db")


# -- ${VAR} expansion -----------------------------------------------------------------------


def test_env_references_are_expanded_from_the_environ_argument(tmp_path, monkeypatch):
    monkeypatch.setenv("WXGATE_TEST_TOKEN", "fromOsEnviron")
    app = "appsecret = ${WXGATE_TEST_SECRET}"
    config, _ = load_text(tmp_path, ini("admin_secret = pre-${WXGATE_TEST_ADMIN}-post", app,
                                        token="${WXGATE_TEST_TOKEN}"),
                          environ={"WXGATE_TEST_TOKEN": "fromArgument",
                                   "WXGATE_TEST_SECRET": SECRET_APPSECRET,
                                   "WXGATE_TEST_ADMIN": "mid0123456789"})
    assert config.apps["a"].token == "fromArgument"
    assert config.apps["a"].appsecret == SECRET_APPSECRET
    assert config.admin_secret == "pre-mid0123456789-post"


def test_os_environ_is_not_consulted_when_environ_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("WXGATE_TEST_TOKEN", "fromOsEnviron")
    error = config_error(tmp_path, ini(token="${WXGATE_TEST_TOKEN}"), environ={})
    assert "WXGATE_TEST_TOKEN" in str(error)
    assert "fromOsEnviron" not in str(error)


def test_environ_defaults_to_os_environ(tmp_path, monkeypatch):
    monkeypatch.setenv("WXGATE_TEST_TOKEN", "fromOsEnviron")
    source = tmp_path / "wxgate.ini"
    source.write_text(ini(token="${WXGATE_TEST_TOKEN}"), "utf-8")
    assert wxgate.load_config(source).apps["a"].token == "fromOsEnviron"


MISSING = "${WXGATE_TEST_MISSING}"


@pytest.mark.parametrize("section, option, text", [
    ("app:a", "appsecret", ini(app=f"appsecret = {MISSING}", key=SECRET_KEY, mode="safe")),
    ("app:a", "token", ini(token=f"{SECRET_TOKEN}{MISSING}", key=SECRET_KEY, mode="safe")),
    ("app:a", "encoding_aes_key", ini(key=MISSING, mode="safe")),
    ("app:a", "appid", ini(app=f"appsecret = {SECRET_APPSECRET}").replace(
        f"appid = {APPID}", f"appid = wx{MISSING}")),
    ("wxgate", "admin_secret", ini(f"admin_secret = {SECRET_ADMIN}{MISSING}",
                                   f"appsecret = {SECRET_APPSECRET}", key=SECRET_KEY)),
], ids=["appsecret", "token", "encoding_aes_key", "appid", "admin_secret"])
def test_missing_env_variable_names_file_section_option_and_variable(tmp_path, section,
                                                                     option, text):
    error = config_error(tmp_path, text, environ={"OTHER": "x"})
    # assert_names also checks that no secret of the file (nor the rest of the value) shows.
    assert_names(error, tmp_path / "wxgate.ini", section, option, line_of(text, f"{option} ="))
    assert "WXGATE_TEST_MISSING" in str(error)
    assert "not set" in str(error)


@pytest.mark.parametrize("secret", ["a%b$c", "%(token)s", "$HOME", "$", "%", "${", "$(x)",
                                    "a${1X}b", "100%$%{x}", "${lower-case}"])
def test_dollar_and_percent_elsewhere_stay_literal(tmp_path, secret):
    # Not in the token: WeChat's tokens are letters and digits, and wxgate refuses others.
    # admin_secret takes 16 characters or more: the value is padded to that.
    padded = f"{secret}-and-long-enough"
    config, _ = load_text(tmp_path, ini(f"admin_secret = {padded}", f"appsecret = {secret}"),
                          environ={"HOME": "/root", "x": "X", "token": "T"})
    assert config.apps["a"].appsecret == secret
    assert config.admin_secret == padded


@pytest.mark.parametrize("written, environ", [
    pytest.param('"${WX_TOKEN}"', {"WX_TOKEN": ""}, id="quoted-empty-variable"),
    pytest.param("'${WX_TOKEN}'", {"WX_TOKEN": SECRET_TOKEN}, id="quoted-variable"),
    pytest.param(f'"{SECRET_TOKEN}"', {}, id="quoted-value"),
])
def test_a_token_in_quotes_says_to_remove_them(tmp_path, written, environ):
    # `token = "${T}"` with T empty would leave the 2-character token '""', which passes an
    # empty-value check. WeChat's tokens are 3-32 letters and digits, so quotes are refused,
    # and the message says what to do, without the value.
    text = ini(token=written)
    error = config_error(tmp_path, text, environ=environ)
    assert_names(error, tmp_path / "wxgate.ini", "app:a", "token", line_of(text, "token ="))
    assert "remove them" in str(error) and "quotes" in str(error)
    assert SECRET_TOKEN not in str(error) and '""' not in str(error)


def test_expanded_values_are_not_expanded_again(tmp_path):
    config, _ = load_text(tmp_path, ini(app="appsecret = ${WXGATE_TEST_SECRET}"),
                          environ={"WXGATE_TEST_SECRET": "a%b$c${WXGATE_TEST_OTHER}",
                                   "WXGATE_TEST_OTHER": "nope"})
    assert config.apps["a"].appsecret == "a%b$c${WXGATE_TEST_OTHER}"


# -- every bad value ------------------------------------------------------------------------


def test_missing_file_is_a_config_error_naming_the_path(tmp_path):
    missing = tmp_path / "nope.ini"
    with pytest.raises(wxgate.ConfigError) as info:
        wxgate.load_config(missing, environ={})
    assert info.value.source == str(missing)
    assert str(missing) in str(info.value)
    assert (info.value.section, info.value.option, info.value.lineno) == (None, None, None)


def test_directory_instead_of_file_is_a_config_error(tmp_path):
    with pytest.raises(wxgate.ConfigError) as info:
        wxgate.load_config(tmp_path, environ={})
    assert info.value.source == str(tmp_path)


def test_file_not_utf8_is_a_config_error(tmp_path):
    source = tmp_path / "wxgate.ini"
    source.write_bytes(ini().encode("utf-8").replace(b"appid", b"\xff\xfeappid"))
    with pytest.raises(wxgate.ConfigError) as info:
        wxgate.load_config(source, environ={})
    assert info.value.source == str(source) and "UTF-8" in str(info.value)


BAD_GATEWAY_NUMBERS = [
    ("timestamp_window", "abc"), ("timestamp_window", "-1"), ("timestamp_window", "1.5"),
    ("timestamp_window", "1e3"), ("max_body_bytes", "64k"), ("max_body_bytes", "-65536"),
    ("max_body_bytes", "100"), ("dedup_size", "0"), ("dedup_size", "-5"), ("dedup_size", "ten"),
    ("dedup_ttl", "-300"), ("dedup_ttl", "0"), ("dedup_ttl", "5m"), ("dedup_ttl", "nan"),
    ("dedup_ttl", "inf"), ("api_timeout", "0"), ("api_timeout", "-3"), ("api_timeout", "61"),
    ("api_timeout", "nan"), ("api_timeout", "three"), ("queue_visibility_timeout", "nan"),
    ("queue_visibility_timeout", "0"), ("delivery_threads", "0.5"), ("delivery_threads", "-1"),
]


@pytest.mark.parametrize("option, value", BAD_GATEWAY_NUMBERS)
def test_bad_gateway_number(tmp_path, option, value):
    text = ini(f"{option} = {value}")
    error = config_error(tmp_path, text)
    assert_names(error, tmp_path / "wxgate.ini", "wxgate", option, line_of(text, option))
    assert repr(value) in str(error)


@pytest.mark.parametrize("option, value", [
    ("token_refresh_margin", "-1"), ("token_refresh_margin", "soon"),
    ("token_refresh_margin", "3601"), ("token_refresh_margin", "nan"),
    ("token_refresh_margin", "-inf"), ("queue_max_attempts", "0"),
    ("queue_retry_base", "nan"), ("queue_retry_max", "-1"),
])
def test_bad_app_number(tmp_path, option, value):
    text = ini(app=f"{option} = {value}")
    error = config_error(tmp_path, text)
    assert_names(error, tmp_path / "wxgate.ini", "app:a", option, line_of(text, option))
    assert repr(value) in str(error)


@pytest.mark.parametrize("option, value", [
    ("mode", "secure"), ("mode", "none"), ("format", "yaml"), ("format", "XMLS"),
    ("token_grant", "client_credential"), ("token_grant", "refresh"),
])
def test_bad_choice(tmp_path, option, value):
    text = ini(app=f"{option} = {value}") if option != "mode" else ini(mode=value)
    error = config_error(tmp_path, text)
    assert_names(error, tmp_path / "wxgate.ini", "app:a", option, line_of(text, option))
    assert value.lower() in str(error)


@pytest.mark.parametrize("key", [AES_KEY[:42], AES_KEY + "H", "A" * 42 + "=", "!" * 43,
                                 "A" * 42 + "-"])
@pytest.mark.parametrize("mode", ["safe", "compat", "plain"])
def test_bad_encoding_aes_key_is_40004_without_the_key(tmp_path, key, mode):
    text = ini(key=key, mode=mode)
    error = config_error(tmp_path, text)
    assert_names(error, tmp_path / "wxgate.ini", "app:a", "encoding_aes_key",
                 line_of(text, "encoding_aes_key"))
    assert error.code == -40004
    assert "-40004" in str(error)
    assert key not in str(error)
    assert key[:20] not in str(error)


def test_42_character_key_says_how_many(tmp_path):
    error = config_error(tmp_path, ini(key=AES_KEY[:42], mode="safe"))
    assert "43" in str(error) and "42" in str(error)


@pytest.mark.parametrize("mode", ["safe", "compat"])
def test_encrypted_modes_require_the_key(tmp_path, mode):
    text = ini(mode=mode)
    error = config_error(tmp_path, text)
    assert (error.source, error.section, error.option) == (
        str(tmp_path / "wxgate.ini"), "app:a", "encoding_aes_key")
    # The option is absent: there is no line to point at, or the section header is named.
    assert error.lineno in (None, line_of(text, "[app:a]"))
    assert "encoding_aes_key" in str(error) and mode in str(error)


def test_key_may_be_blank_in_plain_mode(tmp_path):
    config, _ = load_text(tmp_path, ini(key="", mode="plain"))
    assert config.apps["a"].aes_key is None


@pytest.mark.parametrize("option", ["path", "appid", "token", "handler"])
def test_required_app_option(tmp_path, option):
    text = "\n".join(line for line in ini().splitlines() if not line.startswith(option))
    error = config_error(tmp_path, text)
    assert (error.section, error.option) == ("app:a", option)
    assert "required" in str(error)


def test_duplicate_paths_point_at_the_second(tmp_path):
    text = ini(path="/wechat") + "\n".join([
        "[app:b]", f"appid = {APPID}", f"token = {TOKEN}", "mode = plain",
        "handler = wxgate:demo_handler", "path = /wechat", ""])
    error = config_error(tmp_path, text)
    assert_names(error, tmp_path / "wxgate.ini", "app:b", "path", line_of(text, "path", 2))
    assert "/wechat" in str(error) and "app:a" in str(error)


@pytest.mark.parametrize("path", ["wechat", "https://example.com/wechat", "/we chat",
                                  "/wechat?x=1", "/wechat#top"])
def test_path_must_be_a_url_path(tmp_path, path):
    text = ini(path=path)
    error = config_error(tmp_path, text)
    assert_names(error, tmp_path / "wxgate.ini", "app:a", "path", line_of(text, "path"))
    assert repr(path) in str(error)


@pytest.mark.parametrize("section, typo", [("wxgate", "timestamp_windows"),
                                            ("wxgate", "maxbodybytes"),
                                            ("app:a", "encodingaeskey"),
                                            ("app:a", "app_secret"), ("app:a", "formats")])
def test_unknown_option_is_a_typo(tmp_path, section, typo):
    text = ini(f"{typo} = 1") if section == "wxgate" else ini(app=f"{typo} = 1")
    error = config_error(tmp_path, text)
    assert_names(error, tmp_path / "wxgate.ini", section, typo, line_of(text, typo))
    assert "unknown option" in str(error)


@pytest.mark.parametrize("header", ["[apps:b]", "[app]", "[wxgate:extra]", "[DEFAULT]",
                                    "[App:b]"])
def test_unknown_section(tmp_path, header):
    text = ini() + f"{header}\nx = 1\n"
    error = config_error(tmp_path, text)
    assert_names(error, tmp_path / "wxgate.ini", header[1:-1], None, line_of(text, header))
    assert "unknown section" in str(error)


@pytest.mark.parametrize("header", ["[app:]", "[app:a b]", "[app:a/b]"])
def test_bad_app_name(tmp_path, header):
    text = ini().replace("[app:a]", header)
    error = config_error(tmp_path, text)
    assert error.section == header[1:-1]
    assert f"{header}" in str(error)


@pytest.mark.parametrize("text", ["[wxgate]\ntimestamp_window = 300\n", "", "; nothing\n"])
def test_no_app_section(tmp_path, text):
    error = config_error(tmp_path, text)
    assert error.source == str(tmp_path / "wxgate.ini")
    assert "[app:NAME]" in str(error)


def test_duplicate_option_names_section_option_and_line(tmp_path):
    text = ini(app=f"token = {SECRET_TOKEN}2")
    error = config_error(tmp_path, text)
    assert_names(error, tmp_path / "wxgate.ini", "app:a", "token", line_of(text, "token", 2))


def test_malformed_line_names_its_line_not_its_text(tmp_path):
    # A forgotten "=" turns the whole line, secret included, into a parse error.
    text = ini(app=f"appsecret {SECRET_APPSECRET}")
    error = config_error(tmp_path, text)
    assert error.source == str(tmp_path / "wxgate.ini")
    assert error.lineno == line_of(text, "appsecret")
    assert SECRET_APPSECRET not in str(error)


# -- handlers -------------------------------------------------------------------------------


def test_handler_beside_the_ini_is_importable(tmp_path, handler_module):
    name = handler_module("""
        def on_message(message):
            return {"MsgType": "transfer_customer_service"}
    """)
    config, _ = load_text(tmp_path, ini(handler=f"{name}:on_message"))
    app = config.apps["a"]
    assert app.handler_spec == f"{name}:on_message"
    assert app.handler.__module__ == name
    assert sys.modules[name].__file__ == str(tmp_path / f"{name}.py")
    assert app.handler(None) == {"MsgType": "transfer_customer_service"}


def test_handler_in_a_package_beside_the_ini(tmp_path, handler_module):
    name = handler_module("""
        class Bot:
            @staticmethod
            def handle(message):
                return "success"
    """, package="bot")
    config, _ = load_text(tmp_path, ini(handler=f"{name}.bot:Bot.handle"))
    assert config.apps["a"].handler(None) == "success"


@pytest.mark.parametrize("spec, words", [
    ("wxgate_no_such_module_4f1e:handle", ["wxgate_no_such_module_4f1e"]),
    ("wxgate:no_such_handler", ["no_such_handler"]),
    ("wxgate:__version__", ["not callable"]),
    ("wxgate:DEFAULT_API_BASE", ["not callable"]),
    ("wxgate.demo_handler", ["module:callable"]),
    ("wxgate:", ["module:callable"]),
    (":demo_handler", ["module:callable"]),
])
def test_bad_handler(tmp_path, spec, words):
    text = ini(handler=spec)
    error = config_error(tmp_path, text)
    assert_names(error, tmp_path / "wxgate.ini", "app:a", "handler", line_of(text, "handler"))
    assert spec in str(error)
    for word in words:
        assert word in str(error)


def test_handler_whose_dependency_is_missing(tmp_path, handler_module):
    name = handler_module("import wxgate_no_such_dependency_77\ndef f(m):\n    pass\n")
    text = ini(handler=f"{name}:f")
    error = config_error(tmp_path, text)
    assert_names(error, tmp_path / "wxgate.ini", "app:a", "handler", line_of(text, "handler"))
    assert "wxgate_no_such_dependency_77" in str(error)


@pytest.mark.parametrize("source", [
    pytest.param("def f(message):\n    return (\n", id="syntax error"),
    pytest.param("raise RuntimeError('cannot start')\ndef f(m):\n    pass\n",
                 id="raises on import"),
])
def test_handler_module_that_fails_to_import(tmp_path, handler_module, source):
    name = handler_module(source)
    text = ini(handler=f"{name}:f")
    error = config_error(tmp_path, text)
    assert_names(error, tmp_path / "wxgate.ini", "app:a", "handler", line_of(text, "handler"))
    assert name in str(error)


# -- other gateway values -------------------------------------------------------------------


@pytest.mark.parametrize("admin_path, app_path", [
    ("", "/_wxgate"), ("", "/_wxgate/token"), ("/ops", "/ops/wechat"), ("/ops/", "/ops"),
])
def test_app_path_inside_admin_path(tmp_path, admin_path, app_path):
    text = ini(f"admin_path = {admin_path}" if admin_path else "", path=app_path)
    error = config_error(tmp_path, text)
    assert_names(error, tmp_path / "wxgate.ini", "app:a", "path", line_of(text, "path"))
    assert "admin_path" in str(error)


def test_app_path_beside_admin_path_is_fine(tmp_path):
    config, _ = load_text(tmp_path, ini(path="/_wxgate2"))
    assert config.apps["a"].path == "/_wxgate2"


def test_admin_path_root_is_refused(tmp_path):
    text = ini("admin_path = /")
    error = config_error(tmp_path, text)
    assert_names(error, tmp_path / "wxgate.ini", "wxgate", "admin_path",
                 line_of(text, "admin_path"))


@pytest.mark.parametrize("store", ["postgres://db/wxgate", "sqlite://", "mem", "redis",
                                   "/var/lib/wxgate.db"])
def test_bad_store_url(tmp_path, store):
    text = ini(f"store = {store}")
    error = config_error(tmp_path, text)
    assert_names(error, tmp_path / "wxgate.ini", "wxgate", "store", line_of(text, "store"))


@pytest.mark.parametrize("store", ["memory", "redis://127.0.0.1:6379/0",
                                   "rediss://cache.example:6380/1", "unix:///tmp/redis.sock"])
def test_good_store_url(tmp_path, store):
    config, _ = load_text(tmp_path, ini(f"store = {store}"))
    assert config.store == store


@pytest.mark.parametrize("api_base", ["api.weixin.qq.com", "ftp://api.weixin.qq.com",
                                      "https://", "https:///cgi-bin", "http//x",
                                      "https://api.weixin.qq.com extra"])
def test_bad_api_base(tmp_path, api_base):
    text = ini(f"api_base = {api_base}")
    error = config_error(tmp_path, text)
    assert_names(error, tmp_path / "wxgate.ini", "wxgate", "api_base",
                 line_of(text, "api_base"))


@pytest.mark.parametrize("listen", ["8080", "localhost", "127.0.0.1:0", "127.0.0.1:65536",
                                    "127.0.0.1:http"])
def test_bad_listen(tmp_path, listen):
    text = ini(f"listen = {listen}")
    error = config_error(tmp_path, text)
    assert_names(error, tmp_path / "wxgate.ini", "wxgate", "listen", line_of(text, "listen"))


# -- secrets stay out of repr ---------------------------------------------------------------


def test_secrets_are_not_in_repr(tmp_path):
    text = ini(f"admin_secret = {SECRET_ADMIN}", f"appsecret = {SECRET_APPSECRET}",
               key=SECRET_KEY, mode="safe",
               extra=f"forward = http://127.0.0.1:9/hook\nforward_secret = {SECRET_FORWARD}")
    config, _ = load_text(tmp_path, text)
    app = config.apps["a"]
    assert (app.token, app.appsecret, app.encoding_aes_key, config.admin_secret,
            app.forward_secret) == (SECRET_TOKEN, SECRET_APPSECRET, SECRET_KEY, SECRET_ADMIN,
                                    SECRET_FORWARD)
    gateway = wxgate.make_app(config)
    for shown in (repr(config), str(config), repr(app), str(app), repr(gateway)):
        for secret in SECRETS:
            assert secret not in shown
    assert APPID in repr(app)  # the repr still says something useful


# -- make_app and wxgate.application --------------------------------------------------------


def write_plain_ini(tmp_path, token, path="/wechat", filename="wxgate.ini"):
    source = tmp_path / filename
    source.write_text(ini("timestamp_window = 0", path=path, token=token), "utf-8")
    return source


def handshake(testapp, token, path="/wechat", status=200, **kwargs):
    query = {"signature": sha1_sign(token, "1700000000", "7"), "timestamp": "1700000000",
             "nonce": "7", "echostr": "echo-" + token}
    return testapp.get(path, query, status=status, **kwargs)


@pytest.mark.parametrize("kind", [str, lambda p: p])
def test_make_app_accepts_a_path(tmp_path, kind):
    source = write_plain_ini(tmp_path, "pathtoken")
    testapp = webtest.TestApp(wxgate.make_app(kind(source)), lint=True)
    assert handshake(testapp, "pathtoken").body == b"echo-pathtoken"


def test_make_app_with_a_bad_path_raises_config_error(tmp_path):
    with pytest.raises(wxgate.ConfigError):
        wxgate.make_app(str(tmp_path / "missing.ini"))


@pytest.fixture
def fresh_application(monkeypatch):
    monkeypatch.setattr(wxgate.application, "_app", None)
    yield wxgate.application


def test_application_reads_wxgate_config_from_os_environ(tmp_path, monkeypatch,
                                                         fresh_application):
    monkeypatch.setenv("WXGATE_CONFIG", str(write_plain_ini(tmp_path, "osenvtoken")))
    testapp = webtest.TestApp(fresh_application, lint=True)
    assert handshake(testapp, "osenvtoken").body == b"echo-osenvtoken"
    assert isinstance(fresh_application._app, wxgate.Gateway)


def test_application_reads_wxgate_config_from_the_wsgi_environ(tmp_path, fresh_application):
    source = write_plain_ini(tmp_path, "setenvtoken")
    testapp = webtest.TestApp(fresh_application, lint=True,
                              extra_environ={"WXGATE_CONFIG": str(source)})
    assert handshake(testapp, "setenvtoken").body == b"echo-setenvtoken"


def test_application_prefers_os_environ(tmp_path, monkeypatch, fresh_application):
    monkeypatch.setenv("WXGATE_CONFIG", str(write_plain_ini(tmp_path, "first", filename="1.ini")))
    other = write_plain_ini(tmp_path, "second", filename="2.ini")
    testapp = webtest.TestApp(fresh_application, lint=True,
                              extra_environ={"WXGATE_CONFIG": str(other)})
    assert handshake(testapp, "first").body == b"echo-first"
    handshake(testapp, "second", status=403)


def test_application_builds_once(tmp_path, monkeypatch, fresh_application):
    monkeypatch.setenv("WXGATE_CONFIG", str(write_plain_ini(tmp_path, "once")))
    testapp = webtest.TestApp(fresh_application, lint=True)
    handshake(testapp, "once")
    built = fresh_application._app
    monkeypatch.setenv("WXGATE_CONFIG", str(tmp_path / "elsewhere.ini"))
    handshake(testapp, "once")
    assert fresh_application._app is built


def test_application_without_wxgate_config_is_500_and_a_log_line(fresh_application, caplog):
    testapp = webtest.TestApp(fresh_application, lint=True)
    with caplog.at_level(logging.ERROR, "wxgate"):
        response = testapp.get("/wechat", status=500)
    assert response.body == b""
    assert any("WXGATE_CONFIG" in record.getMessage() for record in caplog.records
               if record.name == "wxgate" and record.levelno == logging.ERROR)
    assert fresh_application._app is None


def test_application_with_a_bad_config_is_500_then_recovers(tmp_path, monkeypatch,
                                                           fresh_application, caplog):
    source = tmp_path / "wxgate.ini"
    source.write_text(ini("timestamp_window = 0", token=SECRET_TOKEN, mode="secure"), "utf-8")
    monkeypatch.setenv("WXGATE_CONFIG", str(source))
    testapp = webtest.TestApp(fresh_application, lint=True)
    with caplog.at_level(logging.ERROR, "wxgate"):
        response = handshake(testapp, SECRET_TOKEN, status=500)
    assert response.body == b""
    messages = [r.getMessage() for r in caplog.records if r.name == "wxgate"]
    assert any(str(source) in m and "[app:a] mode" in m and "secure" in m for m in messages)
    assert not any(SECRET_TOKEN in m for m in messages)
    # The next request, after the operator fixed the file, builds the app.
    write_plain_ini(tmp_path, SECRET_TOKEN)
    assert handshake(testapp, SECRET_TOKEN).body == f"echo-{SECRET_TOKEN}".encode()


# -- without pycryptodome -------------------------------------------------------------------

NO_CRYPTO_SCRIPT = r"""
import hashlib, json, sys

class BlockCrypto:
    # Behave as if pycryptodome were not installed.
    def find_spec(self, name, path=None, target=None):
        if name == "Crypto" or name.startswith("Crypto."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, BlockCrypto())
for loaded in [m for m in sys.modules if m == "Crypto" or m.startswith("Crypto.")]:
    del sys.modules[loaded]
sys.path.insert(0, sys.argv[1])

import wxgate
import webtest

out = {"aes": wxgate._AES is None}
try:
    import Crypto.Cipher
    out["blocked"] = False
except ImportError:
    out["blocked"] = True

testapp = webtest.TestApp(wxgate.make_app(sys.argv[2]), lint=True)
token, timestamp, nonce = "plaintoken", "1700000000", "42"
signature = hashlib.sha1("".join(sorted([token, timestamp, nonce])).encode()).hexdigest()
query = f"signature={signature}&timestamp={timestamp}&nonce={nonce}"
body = ("<xml><ToUserName><![CDATA[gh_1]]></ToUserName><FromUserName><![CDATA[o1]]>"
        "</FromUserName><CreateTime>1700000000</CreateTime><MsgType><![CDATA[text]]>"
        "</MsgType><Content><![CDATA[hello]]></Content><MsgId>123</MsgId></xml>")
response = testapp.post("/wechat?" + query, body.encode(), content_type="text/xml")
out["push"] = [response.status_int, response.text]
nonce = "43"  # another push, another query: wxgate binds one query to one body
signature = hashlib.sha1("".join(sorted([token, timestamp, nonce])).encode()).hexdigest()
query = f"signature={signature}&timestamp={timestamp}&nonce={nonce}"
response = testapp.post("/wechat?" + query, json.dumps({
    "ToUserName": "gh_1", "FromUserName": "o1", "CreateTime": 1700000001, "MsgType": "text",
    "Content": "kf", "MsgId": "124"}).encode(), content_type="text/xml")
out["json_reply"] = [response.status_int, json.loads(response.text)["MsgType"]]

for mode in ("safe", "compat"):
    try:
        wxgate.load_config(sys.argv[3 if mode == "safe" else 4], environ={})
        out[mode] = None
    except wxgate.ConfigError as exc:
        out[mode] = [str(exc), exc.section, exc.option]
try:
    wxgate.encrypt_message("x", "A" * 43, "wx1")
    out["encrypt"] = None
except wxgate.WxgateError as exc:
    out["encrypt"] = str(exc)
print(json.dumps(out))
"""


def test_plaintext_mode_works_without_pycryptodome(tmp_path):
    plain = tmp_path / "plain.ini"
    plain.write_text(ini("timestamp_window = 0", token="plaintoken"), "utf-8")
    safe, compat = tmp_path / "safe.ini", tmp_path / "compat.ini"
    safe.write_text(ini(mode="safe", key=AES_KEY), "utf-8")
    compat.write_text(ini(mode="compat", key=AES_KEY), "utf-8")
    result = subprocess.run(
        [sys.executable, "-c", NO_CRYPTO_SCRIPT, str(REPO), str(plain), str(safe), str(compat)],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["blocked"] is True and out["aes"] is True
    assert out["push"] == [200, "success"]
    assert out["json_reply"] == [200, "transfer_customer_service"]
    for mode in ("safe", "compat"):
        message, section, option = out[mode]
        assert "pip install pycryptodome" in message
        assert mode in message and section == "app:a" and option == "mode"
        assert AES_KEY not in message
    assert "pip install pycryptodome" in out["encrypt"]


# -- values WeChat's console would not give, as `wxgate check` reports them --------------------


def test_an_ini_starting_with_a_bom_loads(tmp_path):
    source = tmp_path / "bom.ini"
    source.write_bytes(b"\xef\xbb\xbf" + write_ini(
        tmp_path / "plain.ini", apps=[app_section("main")]).read_bytes())
    result = run_cli("check", source)
    assert result.returncode == 0, output(result)
    assert "[app:main] /wechat" in result.stdout


@pytest.mark.parametrize("written, value", [
    pytest.param(f'"{CLI_TOKEN}"', CLI_TOKEN, id="double-quotes"),
    pytest.param(f"'{CLI_TOKEN}'", CLI_TOKEN, id="single-quotes"),
    pytest.param("cliToken SecretValue7f3a", "SecretValue7f3a", id="space-inside"),
    pytest.param("cliToken-SecretValue7f3a", "SecretValue7f3a", id="dash-inside"),
    pytest.param("cliTokenSecretValue7f3a0123456789", CLI_TOKEN, id="33-characters"),
    pytest.param("ab", None, id="2-characters"),
])
def test_a_token_wechat_would_not_take_is_refused(tmp_path, written, value):
    source = write_ini(tmp_path / "wxgate.ini", apps=[app_section("main", token=written)])
    result = run_cli("check", source)
    lineno = source.read_text("utf-8").splitlines().index(f"token = {written}") + 1
    assert_failed(result, f"{source}:{lineno}", "[app:main]", "token:")
    if value is not None:  # never echo the token, or a part of it
        assert value not in output(result)


@pytest.mark.parametrize("written", [
    pytest.param(f'"{CLI_AES_KEY}"', id="double-quotes"),
    pytest.param(f"{CLI_AES_KEY[:20]} {CLI_AES_KEY[21:]}", id="space-inside"),
])
def test_an_encoding_aes_key_in_quotes_or_with_a_space_is_refused(tmp_path, written):
    # Refused for its length or alphabet, like a token in quotes or with a space.
    source = write_ini(tmp_path / "wxgate.ini", apps=[app_section("main", key=written)])
    result = run_cli("check", source)
    assert_failed(result, str(source), "[app:main]", "encoding_aes_key:")
    assert CLI_AES_KEY[21:] not in output(result)


@pytest.mark.parametrize("appid, quoted", [
    ("wx12", False),
    ("wx2c2769f8efd9abc", False),  # one digit lost in the paste
    ("wx2c2769f8efd9abc20", False),
    ("WX2C2769F8EFD9ABC2", False),
    ("wx2c2769f8efd9abcg", False),
    ("gh_10f6c3c3ac5a", False),  # the original id, not the AppID
    ('"wx2c2769f8efd9abc2"', True),
])
def test_an_appid_of_the_wrong_shape_is_refused(tmp_path, appid, quoted):
    source = write_ini(tmp_path / "wxgate.ini", apps=[app_section("main", appid=appid)])
    lineno = source.read_text("utf-8").splitlines().index(f"appid = {appid}") + 1
    result = run_cli("check", source)
    # The value is shown: an AppID is public (it is in every mini program's URL).
    assert_failed(result, f"{source}:{lineno}", "[app:main]", "appid:", repr(appid),
                  "16 lowercase hex digits")
    assert ("remove the quotes" in result.stderr) == quoted, result.stderr


def test_every_appid_of_the_docs_and_example_ini_has_the_consoles_shape():
    # What a user copies must load, so every appid they may copy fits the rule.
    found = []
    for path in (*pages(), REPO / "example.ini"):
        found += re.findall(r"^appid = (\S+)$", path.read_text("utf-8"), re.M)
    assert found
    for appid in found:
        assert re.fullmatch(r"wx[0-9a-f]{16}", appid), appid


def test_a_quoted_encoding_aes_key_says_remove_the_quotes(tmp_path):
    source = write_ini(tmp_path / "wxgate.ini",
                       apps=[app_section("main", key=f'"{CLI_AES_KEY}"')])
    result = run_cli("check", source)
    # Not "expected 43 characters, got 45", with no word about the quotes.
    assert_failed(result, "[app:main]", "encoding_aes_key:", "remove them", "-40004")
    assert "got 45" not in result.stderr, result.stderr


# -- an unknown option, a key with Base64's pad: messages that name the fix -----------------


@pytest.mark.parametrize("section, typo, meant", [
    ("app:a", "hanlder", "handler"),
    ("app:a", "app_secret", "appsecret"),
    ("wxgate", "timestamp_windw", "timestamp_window"),
    ("app:a", "colour", None),  # nothing close: no guess
])
def test_unknown_option_guesses_the_close_one_and_lists_every_option(tmp_path, section, typo,
                                                                     meant):
    text = ini(f"{typo} = 1") if section == "wxgate" else ini(app=f"{typo} = 1")
    error = config_error(tmp_path, text)
    assert_names(error, tmp_path / "wxgate.ini", section, typo, line_of(text, typo))
    message = str(error)
    # Before: "unknown option; expected one of [...]", with no guess.
    guess = f"{typo}: unknown option; did you mean '{meant}'? "
    assert (guess in message) == (meant is not None), message
    if meant is None:
        assert "did you mean" not in message, message
    known = wxgate._GATEWAY_OPTIONS if section == "wxgate" else wxgate._APP_OPTIONS
    assert message.endswith(f"the options of [{section}] are {', '.join(sorted(known))}")


@pytest.mark.parametrize("option", ["encoding_aes_key", "previous_encoding_aes_key"])
def test_a_key_with_base64s_trailing_pad_says_to_drop_it(tmp_path, option):
    other = "Qm9vZ2llV29vZ2llU2VjcmV0S2V5MDEyMzQ1Njc4OWE"
    extra = f"previous_encoding_aes_key = {other}=" if option != "encoding_aes_key" else ""
    text = ini(mode="safe", key=AES_KEY + ("=" if not extra else ""), extra=extra)
    error = config_error(tmp_path, text)
    assert_names(error, tmp_path / "wxgate.ini", "app:a", option, line_of(text, option + " "))
    # Before: "expected 43 characters, got 44 (WeChat -40004)", no word of the "=".
    assert str(error).endswith(f"{option}: expected 43 characters, got 44: the console's "
                               "EncodingAESKey has no trailing '=' (drop it) (WeChat -40004)")
    assert error.code == -40004
    assert AES_KEY not in str(error) and other not in str(error)


def test_a_44_character_key_without_the_pad_says_no_word_of_it(tmp_path):
    error = config_error(tmp_path, ini(mode="safe", key=AES_KEY + "H"))
    assert str(error).endswith("expected 43 characters, got 44 (WeChat -40004)"), str(error)


def test_config_records_behave_as_frozen_dataclasses():
    import copy
    import dataclasses
    import pickle

    app = wxgate.AppConfig(name="a", path="/a", appid="wx0123456789abcdef", token="t0k3n")
    config = wxgate.Config(apps={"a": app})
    assert dataclasses.is_dataclass(config) and dataclasses.is_dataclass(app)
    assert [field.name for field in dataclasses.fields(app)][:4] == ["name", "path", "appid",
                                                                   "token"]
    moved = dataclasses.replace(app, path="/b")
    assert (moved.path, moved.name, app.path) == ("/b", "a", "/a") and moved != app
    assert dataclasses.replace(config, apps={"a": moved}).apps["a"] is moved
    assert dataclasses.asdict(config)["apps"]["a"]["path"] == "/a"
    assert pickle.loads(pickle.dumps(config)) == config == copy.deepcopy(config)
    assert hash(app) == hash(copy.copy(app)) and wxgate.Config().apps == {}
    assert wxgate.Config().apps is not wxgate.Config().apps  # a dict default is not shared
    with pytest.raises(AttributeError):
        app.path = "/c"
    with pytest.raises(TypeError):
        wxgate.AppConfig(name="a", path="/a", appid="wx0123456789abcdef")  # no token
    with pytest.raises(TypeError):
        wxgate.Config(apps={}, dedup_sise=1)
