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
               token=TOKEN, key=AES_KEY, appid=APPID):
    """Return ``(query_string, body_bytes)`` as WeChat would send them."""
    if nonce is None:
        nonce = push_nonce(fields, mode, fmt)
    timestamp = str(timestamp)
    query = {"signature": sha1_sign(token, timestamp, nonce), "timestamp": timestamp,
             "nonce": nonce, "openid": fields.get("FromUserName", OPENID)}
    if mode == "plain":
        return urllib.parse.urlencode(query), render(fields, fmt).encode("utf-8")
    encrypt = aes_encrypt(render(fields, fmt), key, appid)
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
