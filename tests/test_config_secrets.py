"""Secrets in the ini that load but would not do what they say: a Redis URL whose raw ``@`` or
``/`` in the password makes part of the password the host, and an ``admin_secret`` short
enough to guess. Each is refused at load, with a message that never shows the secret.
"""

import pytest

import wxgate
from conftest import APPID, REPO, TOKEN


def write(tmp_path, gateway):
    source = tmp_path / "w.ini"
    source.write_text(f"[wxgate]\n{gateway}\n[app:a]\npath = /wechat\nappid = {APPID}\n"
                      f"token = {TOKEN}\nmode = plain\nhandler = wxgate:demo_handler\n", "utf-8")
    return source


def refusal(tmp_path, gateway):
    with pytest.raises(wxgate.ConfigError) as caught:
        wxgate.load_config(write(tmp_path, gateway), environ={})
    return caught.value


# -- the Redis URL ----------------------------------------------------------------------------

# (URL, pieces of its password that must never be shown): redis-py reads the host after the
# last "@" before the first "/", "?" or "#", so each of these would connect to a piece of
# the password, or fail on it.
RAW_PASSWORDS = [
    ("redis://:p@ss/w0rd@127.0.0.1:1/0", ["p@ss/w0rd", "ss/w0rd", "w0rd"]),
    ("redis://default:Pa/ssw0rd@127.0.0.1:1/0", ["Pa/ssw0rd", "ssw0rd"]),
    ("redis://:s3cr@t@127.0.0.1:6379/0", ["s3cr@t", "s3cr"]),
    ("rediss://user:hunter#22@redis.example:6380/0", ["hunter#22", "hunter"]),
    ("redis://:why?n0t@127.0.0.1:6379/0", ["why?n0t", "n0t"]),
    ("unix://:sock/pa55@/run/redis.sock?db=0", ["sock/pa55", "pa55"]),
]


@pytest.mark.parametrize("url, secrets", RAW_PASSWORDS, ids=[row[0] for row in RAW_PASSWORDS])
def test_a_raw_special_character_in_a_redis_password_is_refused_at_load(tmp_path, url,
                                                                        secrets):
    error = refusal(tmp_path, f"store = {url}")
    assert error.option == "store" and error.section == "wxgate"
    assert "percent-encode" in error.message and "%40" in error.message
    for secret in secrets:
        assert secret not in error.message


def test_the_redis_url_check_names_the_url_redacted(tmp_path):
    error = refusal(tmp_path, "store = redis://:p@ss/w0rd@127.0.0.1:1/0")
    assert "redis://***@127.0.0.1:1/0" in error.message


def test_wxgate_check_says_so_without_the_password(tmp_path, capsys):
    source = write(tmp_path, "store = redis://:p@ss/w0rd@127.0.0.1:1/0")
    assert wxgate.main(["check", str(source)]) == 1
    out, err = capsys.readouterr()
    assert "percent-encode" in err and "w0rd" not in out + err


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0",
    "redis://:plain@127.0.0.1:6379/0",
    "redis://user:pa:ss@127.0.0.1:6379/0",
    "rediss://default:S3cret@redis.example:6380/1",
    "unix://:pw@/run/redis.sock?db=0",
    "unix:///run/redis.sock",
])
def test_usual_redis_urls_still_load(tmp_path, url):
    assert wxgate.load_config(write(tmp_path, f"store = {url}"), environ={}).store == url


def test_the_percent_encoded_password_reaches_redis_whole(tmp_path):
    pytest.importorskip("redis")
    url = "redis://:p%40ss%2Fw0rd@127.0.0.1:1/0"
    config = wxgate.load_config(write(tmp_path, f"store = {url}"), environ={})
    store = wxgate.RedisStore(config.store)  # redis-py parses it; nothing connects yet
    try:
        options = store._redis.connection_pool.connection_kwargs
        assert (options["host"], options["port"], options["password"]) == \
            ("127.0.0.1", 1, "p@ss/w0rd")
    finally:
        store.close()


# -- admin_secret -----------------------------------------------------------------------------


@pytest.mark.parametrize("secret", ["Q", "s3cret", "fifteen-chars15"])
def test_an_admin_secret_under_16_characters_is_refused(tmp_path, secret):
    error = refusal(tmp_path, f"admin_secret = {secret}")
    assert error.option == "admin_secret" and error.section == "wxgate"
    assert "at least 16" in error.message and f"<{len(secret)} chars>" in error.message
    assert secret not in error.message.split("admin_secret:", 1)[1]


def test_an_admin_secret_from_the_environment_is_checked_too(tmp_path):
    source = write(tmp_path, "admin_secret = ${WXGATE_ADMIN_SECRET}")
    with pytest.raises(wxgate.ConfigError) as caught:
        wxgate.load_config(source, environ={"WXGATE_ADMIN_SECRET": "short"})
    assert caught.value.option == "admin_secret" and "short" not in caught.value.message
    long_enough = "0123456789abcdef"
    config = wxgate.load_config(source, environ={"WXGATE_ADMIN_SECRET": long_enough})
    assert config.admin_secret == long_enough


def test_no_admin_secret_still_loads_and_so_does_an_unset_one_in_check(tmp_path, capsys):
    assert wxgate.load_config(write(tmp_path, ""), environ={}).admin_secret == ""
    # A shell without the server's environment: check names the variable, and loads.
    source = write(tmp_path, "admin_secret = ${WXGATE_ADMIN_SECRET_UNSET}")
    assert wxgate.main(["check", str(source)]) == 0
    assert "WXGATE_ADMIN_SECRET_UNSET" in capsys.readouterr().out


def test_the_shipped_example_ini_loads(tmp_path):
    assert wxgate.load_config(REPO / "example.ini", environ={}).apps
    text = (REPO / "example.ini").read_text("utf-8").replace(
        "; admin_secret = ${WXGATE_ADMIN_SECRET}", "admin_secret = ${WXGATE_ADMIN_SECRET}")
    source = tmp_path / "example.ini"
    source.write_text(text, "utf-8")
    config = wxgate.load_config(source, environ={"WXGATE_ADMIN_SECRET": "k" * 32})
    assert config.admin_secret == "k" * 32
