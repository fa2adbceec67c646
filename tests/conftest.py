"""Shared test pieces: the vectors, config factories, and a WeChat push simulator.

The simulator builds pushes with hashlib and pycryptodome directly, not with wxgate's own
functions, so the WSGI tests do not trust the code they test to produce their inputs.
"""

import base64
import dataclasses
import hashlib
import json
import os
import socket
import struct
import threading
import urllib.parse
from pathlib import Path

import pytest
from Crypto.Cipher import AES

import wxgate

# The published vectors live inside the repository (tests/vectors/), so a user's own clone runs
# the whole suite with nothing beside it.
VECTORS_FILE = Path(__file__).resolve().parent / "vectors" / "wechat-vectors.json"
VECTORS = json.loads(VECTORS_FILE.read_text("utf-8"))

# A fixed test app. The key is the official doc's; the clock is pinned near NOW.
TOKEN = "testtoken123"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
APPID = "wx2c2769f8efd9abc2"
GH_ID = "gh_10f6c3c3ac5a"
OPENID = "oyORnuP8q7ou2gfYjqLzSIWZf0rs"
NOW = 1_714_000_000


def vectors(kind):
    """The published vectors of one or more kinds, as pytest params named by their id."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return [pytest.param(case, id=case["id"]) for case in VECTORS if case["kind"] in kinds]


class Clock:
    """A settable clock for the ``clock=`` seams."""

    def __init__(self, now=NOW):
        self.now = float(now)

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def ini_text(mode="safe", fmt="auto", extra_gateway="", extra_app="", path="/wechat"):
    return "\n".join([
        "[wxgate]", extra_gateway, "",
        "[app:test]", f"path = {path}", f"appid = {APPID}", f"token = {TOKEN}",
        f"encoding_aes_key = {AES_KEY}", f"mode = {mode}", f"format = {fmt}",
        "handler = wxgate:demo_handler", extra_app, ""])


def make_config(tmp_path, handler=None, **kwargs):
    """Write an ini, load it, and swap in a Python handler (a closure of the test)."""
    return load_ini(tmp_path / "wxgate.ini", ini_text(**kwargs), handler)


def load_ini(source, text, handler=None):
    """Write ``text`` to ``source``, load it, and give every app ``handler`` if one is given."""
    source.write_text(text, "utf-8")
    config = wxgate.load_config(source, environ={})
    if handler is not None:
        apps = {name: dataclasses.replace(app, handler=handler, handler_spec="test:handler")
                for name, app in config.apps.items()}
        config = dataclasses.replace(config, apps=apps)
    return config


def with_handler(config, handler):
    """``config`` with ``handler`` (a closure of the test) as every app's handler."""
    apps = {name: dataclasses.replace(app, handler=handler, handler_spec="test:handler")
            for name, app in config.apps.items()}
    return dataclasses.replace(config, apps=apps)


class Recorder:
    """A handler that records each message and returns a chosen reply (or raises)."""

    def __init__(self, reply=None):
        self.reply = reply
        self.messages = []
        self.lock = threading.Lock()
        self.fail = 0  # raise on this many next calls
        self.delay = None  # an Event to wait on before answering

    def __call__(self, message):
        with self.lock:
            self.messages.append(message)
            failing = self.fail > 0
            if failing:
                self.fail -= 1
        if self.delay is not None:
            self.delay.wait(10)
        if failing:
            raise RuntimeError("handler failure on purpose")
        return self.reply(message) if callable(self.reply) else self.reply

    @property
    def calls(self):
        return len(self.messages)


# -- an independent WeChat push builder ------------------------------------------------------

def sha1_sign(*parts):
    return hashlib.sha1("".join(sorted(parts)).encode("utf-8")).hexdigest()


def aes_encrypt(plaintext, key=AES_KEY, appid=APPID, prefix=b"0123456789abcdef"):
    raw = base64.b64decode(key + "=")
    message = plaintext.encode("utf-8")
    buffer = prefix + struct.pack(">I", len(message)) + message + appid.encode()
    pad = 32 - len(buffer) % 32
    buffer += bytes([pad]) * pad
    return base64.b64encode(AES.new(raw, AES.MODE_CBC, raw[:16]).encrypt(buffer)).decode()


def aes_decrypt(encrypt, key=AES_KEY):
    raw = base64.b64decode(key + "=")
    buffer = AES.new(raw, AES.MODE_CBC, raw[:16]).decrypt(base64.b64decode(encrypt))
    buffer = buffer[:-buffer[-1]]
    (length,) = struct.unpack(">I", buffer[16:20])
    return buffer[20:20 + length].decode("utf-8"), buffer[20 + length:].decode("utf-8")


def xml_of(fields):
    """Plain WeChat-style XML (strings in CDATA, ints bare, dicts nested, lists repeated)."""
    out = []
    for name, value in fields.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                out.append(f"<{name}>{xml_of(item)}</{name}>")
            elif isinstance(item, int):
                out.append(f"<{name}>{item}</{name}>")
            else:
                out.append(f"<{name}><![CDATA[{item}]]></{name}>")
    return "".join(out)


def render(fields, fmt):
    if fmt == "json":
        return json.dumps(fields, ensure_ascii=False)
    return f"<xml>{xml_of(fields)}</xml>"


def push_nonce(fields, mode="safe", fmt="xml"):
    """The nonce WeChat would pick: a new one per push, the same one for a retry (wxgate binds
    one signed query to one body, so two different pushes must not share a query)."""
    digest = hashlib.sha1(f"{mode}:{fmt}:{render(fields, fmt)}".encode("utf-8")).hexdigest()
    return str(int(digest[:8], 16))


def build_push(fields, *, mode="safe", fmt="xml", timestamp=NOW, nonce=None,
               token=TOKEN, key=AES_KEY, appid=APPID, prefix=b"0123456789abcdef"):
    """Return ``(query_string, body_bytes)`` as WeChat would send them; ``prefix`` is the
    16 random bytes in front of the encrypted message (a retry gets new ones)."""
    if nonce is None:
        nonce = push_nonce(fields, mode, fmt)
    timestamp = str(timestamp)
    query = {"signature": sha1_sign(token, timestamp, nonce), "timestamp": timestamp,
             "nonce": nonce, "openid": fields.get("FromUserName", OPENID)}
    if mode == "plain":
        return urllib.parse.urlencode(query), render(fields, fmt).encode("utf-8")
    encrypt = aes_encrypt(render(fields, fmt), key, appid, prefix)
    query["encrypt_type"] = "aes"
    query["msg_signature"] = sha1_sign(token, timestamp, nonce, encrypt)
    outer = {"ToUserName": fields.get("ToUserName", GH_ID), "Encrypt": encrypt}
    if mode == "compat":
        outer = dict(fields, Encrypt=encrypt)
    return urllib.parse.urlencode(query), render(outer, fmt).encode("utf-8")


def open_reply(body, fmt, token=TOKEN, key=AES_KEY):
    """Check an encrypted reply's MsgSignature and return (plaintext, appid, envelope)."""
    if fmt == "json":
        envelope = json.loads(body)
        assert isinstance(envelope["TimeStamp"], int) and isinstance(envelope["Nonce"], str)
    else:
        import xml.etree.ElementTree as ET
        root = ET.fromstring(body)
        envelope = {child.tag: child.text for child in root}
    assert set(envelope) == {"Encrypt", "MsgSignature", "TimeStamp", "Nonce"}
    expected = sha1_sign(token, str(envelope["TimeStamp"]), envelope["Nonce"],
                         envelope["Encrypt"])
    assert envelope["MsgSignature"] == expected
    plaintext, appid = aes_decrypt(envelope["Encrypt"], key)
    return plaintext, appid, envelope


def text_message(content="hello", msg_id="6054768590064713728", **extra):
    fields = {"ToUserName": GH_ID, "FromUserName": OPENID, "CreateTime": NOW,
              "MsgType": "text", "Content": content, "MsgId": msg_id}
    fields.update(extra)
    return fields


def event_message(event, **extra):
    fields = {"ToUserName": GH_ID, "FromUserName": OPENID, "CreateTime": NOW,
              "MsgType": "event", "Event": event}
    fields.update(extra)
    return fields


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture(autouse=True)
def _no_wxgate_config_env(monkeypatch):
    monkeypatch.delenv("WXGATE_CONFIG", raising=False)
    yield


REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WXGATE_TEST_REPO", str(REPO))


# -- real stores -----------------------------------------------------------------------------

import shutil
import subprocess
import time


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a free loopback port, for the whole session."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed, and CI must run the Redis tests")
        pytest.skip("redis-server binary not installed (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    import redis
    client = redis.Redis.from_url(url)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    else:
        process.kill()
        pytest.fail("redis-server did not start")
    client.close()
    yield {"url": url, "port": port, "process": process, "binary": binary}
    process.kill()
    process.wait()


@pytest.fixture(params=["sqlite", "redis"])
def shared_store(request, tmp_path):
    """The URL of a store several processes share: a new sqlite file, or an emptied Redis."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/shared.db"
    server = request.getfixturevalue("redis_server")
    import redis
    redis.Redis.from_url(server["url"]).flushdb()
    return server["url"]


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_factory(request, tmp_path, clock):
    """Build stores of one kind (memory, sqlite, redis) on the test's clock.

    Stores made by one factory share their data (same sqlite file, same Redis db), like the
    workers of one deployment.
    """
    kind = request.param
    made = []
    if kind == "redis":
        server = request.getfixturevalue("redis_server")
        import redis
        redis.Redis.from_url(server["url"]).flushdb()

    def factory(**options):
        if kind == "memory":
            store = made[0] if made else wxgate.MemoryStore(clock=clock, **options)
        elif kind == "sqlite":
            store = wxgate.SqliteStore(str(tmp_path / "wxgate.db"), clock=clock)
        else:
            store = wxgate.RedisStore(server["url"])
        made.append(store)
        return store

    factory.kind = kind
    yield factory
    for store in made:
        store.close()


# -- long fuzzing ----------------------------------------------------------------------------


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true", default=False,
                     help="run tests/test_fuzz.py with 100x more Hypothesis examples "
                          "(same as WXGATE_FUZZ_LONG=1)")


def pytest_configure(config):
    # test_fuzz.py sizes its @settings when it is imported, after this hook.
    if config.getoption("--fuzz-long", default=False):
        os.environ["WXGATE_FUZZ_LONG"] = "1"


# -- slow tests ------------------------------------------------------------------------------
# `python -m pytest -m "not slow"` runs the suite less the tests marked slow here: those that
# start a process or a server (gunicorn, redis-server, Apache, nginx, node, a `wxgate` command,
# mypy, a second Python) and those that take more than about a second. CI runs them all.

import sys  # noqa: E402

# Modules whose every test starts servers or processes.
SLOW_MODULES = {"test_cgi.py", "test_cli.py", "test_deploy.py", "test_scaling.py",
                "test_storm.py", "test_types.py"}
# Fixtures that start one (some once for the module or the session).
SLOW_FIXTURES = {"redis_server", "serve", "gunicorn", "env_served", "served_main",
                 "installed", "checked"}
# Fixtures whose "redis" parameter starts redis-server.
REDIS_PARAMETERS = {"store_factory", "queue_store", "shared_store", "two_stores"}
# The other tests that start a process, or take more than about a second, by file and name.
SLOW_TESTS = {
    "test_cloud.py": {"test_cli_check_explains_a_cloud_app",
                      "test_cli_check_online_fetches_no_token_for_token_grant_cloud",
                      "test_cli_handshake_on_a_cloud_app_says_why_not",
                      "test_cli_push_sends_the_cloud_headers", "test_under_real_gunicorn"},
    "test_config.py": {"test_a_quoted_encoding_aes_key_says_remove_the_quotes",
                       "test_a_token_wechat_would_not_take_is_refused",
                       "test_an_appid_of_the_wrong_shape_is_refused",
                       "test_an_encoding_aes_key_in_quotes_or_with_a_space_is_refused",
                       "test_an_ini_starting_with_a_bom_loads",
                       "test_plaintext_mode_works_without_pycryptodome"},
    "test_delivery.py": {"test_500_pushes_acknowledged_while_down_then_delivered_once_in_order",
                         "test_failing_message_goes_to_dead_letters_and_retry_dead_delivers_it",
                         "test_gateway_killed_mid_delivery_loses_nothing",
                         "test_worker_sigterm_lets_the_running_delivery_finish",
                         "test_worker_with_delivery_threads_0_delivers_and_stops_on_sigterm"},
    "test_fuzz.py": {"test_any_request_gets_a_documented_answer",
                     "test_bit_flip_in_ciphertext_with_valid_signature",
                     "test_every_non_canonical_pad_is_40008",
                     "test_hostile_documents_with_valid_signatures",
                     "test_mutated_base64_with_valid_signature",
                     "test_mutated_ciphertext_with_valid_signature",
                     "test_mutated_pushes_get_a_documented_answer"},
    "test_ops.py": {"test_application_under_wxgate_config_logs_json_lines"},
    "test_metrics_workers.py": {"test_a_forked_child_adds_only_its_own_counts_and_exit_adds_"
                                "the_rest",
                                "test_cgi_processes_add_up",
                                "test_counters_add_up_across_replaced_gunicorn_workers",
                                "test_counts_made_while_the_store_is_down_are_added_once_it_"
                                "is_back"},
    "test_handler_docs.py": {"test_the_example_catches_a_broken_bot",
                               "test_the_testing_example_passes_as_written"},
    "test_recipes.py": {"test_backend_accepts_a_fresh_forward",
                        "test_backend_answers_400_to_a_signed_body_that_is_not_json_and_keeps_"
                        "serving",
                        "test_backend_keeps_serving_while_a_client_stalls_mid_body",
                        "test_backend_refuses_hostile_requests_and_keeps_serving",
                        "test_backend_refuses_to_start_without_a_secret",
                        "test_backend_rejects_a_stale_forward",
                        "test_handler_example_logs_a_failed_send_and_still_answers_success"},
    "test_reliability.py": {"test_attempt_cut_off_by_a_kill_does_not_count",
                            "test_full_disk_log_names_the_real_cause",
                            "test_full_disk_runs_nothing_twice_on_one_process",
                            "test_gateway_killed_during_the_insert_loses_nothing_sqlite",
                            "test_healthz_is_not_200_while_the_disk_is_full",
                            "test_list_dead_shows_the_error_of_each_attempt",
                            "test_memory_store_under_several_workers_warns_at_start",
                            "test_redis_dies_while_a_handler_runs_and_its_retry_on_this_"
                            "process_waits",
                            "test_redis_outage_runs_nothing_twice_on_one_process",
                            "test_serve_that_cannot_bind_delivers_nothing",
                            "test_success_only_once_durably_queued_redis_paused",
                            "test_success_only_once_durably_queued_sqlite_locked",
                            "test_takeover_after_the_deadline_is_refused"},
    "test_rotation.py": {"test_cli_check_shows_the_previous_key_redacted",
                         "test_cli_decrypt_knows_both_keys",
                         "test_cli_decrypt_says_which_key_opened_it",
                         "test_cli_decrypt_with_a_third_key_fails"},
    "test_security.py": {"test_cli_url_with_a_password_is_one_line_without_the_password",
                         "test_decrypt_on_a_non_utf8_file_is_one_line_and_exit_2"},
    "test_cloud_identity.py": {"test_under_gunicorn", "test_under_wxgate_serve"},
    "test_costs.py": {"test_modules_import_wxgate_loads", "test_a_push_does_not_load"},
    "test_log_escaping.py": {"test_gunicorn_writes_one_line_per_record",
                             "test_wxgate_serve_writes_one_line_per_record"},
    "test_stores.py": {"test_redis_store_without_the_package_names_the_extra",
                       "test_a_redis_that_evicts_keys_is_named_once",
                       "test_redis_flushed_is_noticed_on_the_way_of_the_next_push",
                       "test_redis_restarted_empty_is_noticed_at_the_next_health_check",
                       "test_sqlite_add_is_atomic_across_processes",
                       "test_two_stores_on_one_file_in_each_process_stay_consistent"},
}


def _is_slow(item):
    module = item.path.name
    if module in SLOW_MODULES or item.originalname in SLOW_TESTS.get(module, ()):
        return True
    if SLOW_FIXTURES.intersection(item.fixturenames):
        return True
    parameters = getattr(getattr(item, "callspec", None), "params", {})
    return any(parameters.get(name) == "redis" for name in REDIS_PARAMETERS)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)


# A test not marked slow must start no process: `-m "not slow"` runs where no server is
# installed (CI's runs on other Pythons), and stays quick. An audit hook sees every
# subprocess.Popen and fork, whoever calls it, and refuses it while such a test runs.
_RUNNING_FAST_TEST = [None]
_PROCESS_EVENTS = {"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.system"}


def _refuse_processes_in_fast_tests(event, arguments):
    if event in _PROCESS_EVENTS and _RUNNING_FAST_TEST[0] is not None:
        raise RuntimeError(f"{_RUNNING_FAST_TEST[0]} starts a process ({event}) but is not "
                           "marked slow: add it to SLOW_TESTS in tests/conftest.py")


sys.addaudithook(_refuse_processes_in_fast_tests)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _RUNNING_FAST_TEST[0] = None if item.get_closest_marker("slow") else item.nodeid
    try:
        yield
    finally:
        _RUNNING_FAST_TEST[0] = None
