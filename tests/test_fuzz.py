"""Fuzzing and hostile input: the WSGI app under arbitrary requests, crypto properties, XML attacks.

Sections: calling the app and checking its answer; fixtures; strategies; WSGI fuzzing (any
request, mutated pushes, hostile documents under valid signatures, mutated ciphertexts and
Base64 under recomputed msg_signatures, admin endpoints, odd field types) and the regressions
the fuzzer found, pinned; crypto properties; the XML (and JSON) attack corpus, plain and as
the encrypted inner document.

The properties, for every request (docs/troubleshooting.md, "Responses"):

- the callable never raises, and answers through ``start_response`` exactly once;
- the status is one the docs list, and never 500: the handler here never raises, so a
  500 can only be a wxgate bug;
- no response body and no log record holds the token, the EncodingAESKey, the AppSecret or the
  admin secret (unless the request itself carried that text, which a refusal may quote).

The default run is sized to stay well under a minute. ``--fuzz-long`` (or
``WXGATE_FUZZ_LONG=1``) runs 100 times more examples of every property.
"""

import base64
import dataclasses
import hashlib
import http.server
import io
import itertools
import json
import logging
import os
import re
import struct
import tempfile
import threading
import time
import traceback
import types
import urllib.parse
import warnings
import wsgiref.validate

import pytest
import webtest
from Crypto.Cipher import AES
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.control import currently_in_test_context

import wxgate
from conftest import (AES_KEY, APPID, GH_ID, NOW, OPENID, TOKEN, Clock, Recorder, build_push,
                      event_message, make_config, render, sha1_sign, text_message)
from fake_wechat import FakeWeChat

# Hypothesis keeps caches (and, after a failure, an @example patch) in .hypothesis/: not in
# the repository.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "wxgate-hypothesis"))
# After a failure Hypothesis imports libcst to write that patch; libcst's mypy_extensions warns
# on import, and setup.cfg makes warnings errors: a pytest INTERNALERROR would hide the failing
# example. Importing it once here, quietly, keeps failures readable.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:
        pass

FUZZ_LONG = os.environ.get("WXGATE_FUZZ_LONG", "") not in ("", "0")
FACTOR = 100 if FUZZ_LONG else 1


def fuzz(examples):
    """Settings for one property: ``examples`` by default, 100x that with --fuzz-long."""
    return settings(
        max_examples=examples * FACTOR, deadline=None, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                               HealthCheck.data_too_large, HealthCheck.large_base_example,
                               HealthCheck.filter_too_much])


APPSECRET = "f00dfacecafe4b1d9e8d7c6b5a493827"
ADMIN_SECRET = "adm1n-S3cret-9c1e-wxgate-fuzz"
RAW_KEY = base64.b64decode(AES_KEY + "=")
SECRETS = {
    "token": [TOKEN],
    "encoding_aes_key": [AES_KEY, RAW_KEY.hex()],
    "appsecret": [APPSECRET],
    "admin_secret": [ADMIN_SECRET],
}

# docs/troubleshooting.md, "Responses": every status the gateway may answer.
DOCUMENTED = {200, 400, 401, 403, 404, 405, 413, 415, 500, 502, 503}
STANDARD_METHODS = ("GET", "HEAD", "POST", "OPTIONS", "PATCH", "PUT", "DELETE", "TRACE")
WECHAT_CODE = re.compile(r"\(WeChat -400\d\d\)")


# ---------------------------------------------------------------------------------------------
# Calling the app and checking what it answers
# ---------------------------------------------------------------------------------------------

AUTO = object()


class BrokenInput:
    """A request body whose client hung up: every read raises."""

    def read(self, *args):
        raise ConnectionResetError("client went away")

    readline = read

    def readlines(self, *args):
        raise ConnectionResetError("client went away")

    def __iter__(self):
        return self


def make_environ(method="POST", path="/wechat", query="", body=b"", *, script_name="",
                 content_length=AUTO, input_terminated=False, broken_input=False, **extra):
    """A PEP 3333 environ; ``extra`` adds CGI keys (HTTP_AUTHORIZATION, REMOTE_ADDR...)."""
    environ = {
        "REQUEST_METHOD": method, "SCRIPT_NAME": script_name, "PATH_INFO": path,
        "QUERY_STRING": query, "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "203.0.113.7",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
        "wsgi.input": BrokenInput() if broken_input else io.BytesIO(body),
        "wsgi.errors": io.StringIO(), "wsgi.multithread": True, "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if content_length is AUTO:
        environ["CONTENT_LENGTH"] = str(len(body))
    elif content_length is not None:
        environ["CONTENT_LENGTH"] = content_length
    if input_terminated:
        environ["wsgi.input_terminated"] = True
    environ.update(extra)
    return environ


def validator_accepts(environ):
    """Whether ``wsgiref.validate`` takes this environ without asserting or warning itself."""
    script, path = environ.get("SCRIPT_NAME", ""), environ.get("PATH_INFO", "")
    length = environ.get("CONTENT_LENGTH", "")
    return (environ["REQUEST_METHOD"] in STANDARD_METHODS
            and (not script or (script.startswith("/") and script != "/"))
            and (not path or path.startswith("/"))
            and (not length or (length.isascii() and length.isdigit() and len(length) < 100))
            and not isinstance(environ["wsgi.input"], BrokenInput))


@dataclasses.dataclass
class Response:
    status: int
    headers: list
    body: bytes

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")


def call(app, environ):
    """Call the WSGI app (through wsgiref's validator when the environ allows) and check the
    response side of the contract: one start_response, a sane status line and headers, a
    Content-Length that matches the body."""
    started = []

    def start_response(status, headers, exc_info=None):
        assert exc_info is None
        started.append((status, headers))
        return lambda data: pytest.fail("wxgate used the write() callable")

    target = wsgiref.validate.validator(app) if validator_accepts(environ) else app
    result = target(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    assert len(started) == 1
    status, headers = started[0]
    assert re.fullmatch(r"[1-5][0-9][0-9] [^\r\n]+", status), status
    for name, value in headers:
        assert isinstance(name, str) and isinstance(value, str)
        assert "\r" not in value and "\n" not in value
        value.encode("latin-1")
    assert [v for n, v in headers if n.lower() == "content-length"] == [str(len(body))]
    return Response(int(status[:3]), headers, body)


class LogCapture(logging.Handler):
    """Every record of the ``wxgate`` logger (our own handler: caplog is function-scoped)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def clear(self):
        self.records.clear()

    def texts(self):
        for record in self.records:
            yield record.getMessage()
            yield repr(vars(record))  # the extra= fields a JSON log line would carry
            if record.exc_info:
                yield "".join(traceback.format_exception(*record.exc_info))

    def crashes(self):
        """Exceptions logged with a traceback (wxgate's internal errors, handler errors)."""
        return [record for record in self.records if record.exc_info]


def request_text(environ, body):
    """What the request itself carried, as text: a refusal may legitimately quote it."""
    query = environ.get("QUERY_STRING", "")
    return " ".join([environ.get("PATH_INFO", ""), environ.get("SCRIPT_NAME", ""), query,
                     urllib.parse.unquote(query, errors="replace"),
                     body.decode("utf-8", "replace"), body.decode("latin-1")])


def check(response, log, environ, body=b""):
    """The properties every answer must have."""
    if currently_in_test_context():
        note(f"status {response.status}: {response.body[:300]!r}")
    assert response.status in DOCUMENTED, f"undocumented status {response.status}"
    if response.status == 500:
        crashes = log.crashes()
        if crashes:
            exc = crashes[-1].exc_info[1]
            # Re-raised from the original, so Hypothesis tells distinct bugs apart.
            raise AssertionError(f"500 from wxgate (the handler never raises): "
                                 f"{crashes[-1].getMessage()}: {exc!r}") from exc
        raise AssertionError("500 without a logged traceback (the handler never raises)")
    said = request_text(environ, body)
    logs = "\n".join(log.texts())
    for name, forms in SECRETS.items():
        for secret in forms:
            if secret in said:
                continue
            assert secret.encode() not in response.body, f"the {name} is in the response"
            assert secret not in logs, f"the {name} is in the log"
    assert RAW_KEY not in response.body, "the AES key's bytes are in the response"
    for name, value in response.headers:
        for forms in SECRETS.values():
            assert all(secret not in value for secret in forms), f"a secret in {name}"


def push_outcome(log):
    """The outcome= of the push log line, or None."""
    for record in log.records:
        text = record.getMessage()
        # Anchored at the end: the key before it is the push's own (hostile) MsgId.
        match = re.search(r" outcome=(\S+) ms=[0-9.]+\Z", text)
        if text.startswith("push app=") and match:
            return match.group(1)
    return None


# ---------------------------------------------------------------------------------------------
# Fixtures: the gateways under fuzz, built once per test
# ---------------------------------------------------------------------------------------------

# name -> (mode, format) of one gateway, each with its app at /wechat.
SHAPES = {
    "plain": ("plain", "auto"),
    "compat": ("compat", "auto"),
    "safe": ("safe", "auto"),
    "safe-xml": ("safe", "xml"),
    "plain-json": ("plain", "json"),
}

REPLIES = [None, "success", "", "a plain reply 你好", {"MsgType": "transfer_customer_service"},
           {"MsgType": "text", "Content": "x ]]> <y> & 你好"}]


@pytest.fixture(scope="module")
def wechat():
    """WeChat's API, for the admin token endpoint; it knows our app and its secret."""
    with FakeWeChat(appid=APPID, secret=APPSECRET) as fake:
        yield fake


@pytest.fixture
def wxgate_log():
    logger = logging.getLogger("wxgate")
    capture = LogCapture()
    saved = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # thousands of examples: keep them out of pytest's own capture
    logger.addHandler(capture)
    yield capture
    logger.removeHandler(capture)
    logger.setLevel(saved[0])
    logger.propagate = saved[1]


def gateway_config(tmp_path, handler, wechat, mode, fmt, extra_gateway=""):
    return make_config(
        tmp_path, handler, mode=mode, fmt=fmt,
        extra_gateway=f"admin_secret = {ADMIN_SECRET}\napi_base = {wechat.url}\n"
                      f"api_timeout = 2\n{extra_gateway}",
        extra_app=f"appsecret = {APPSECRET}")


@pytest.fixture
def gateways(tmp_path, wechat):
    """One gateway per shape, sharing a handler that never raises (its reply is settable)."""
    handler = Recorder()
    apps = {name: wxgate.make_app(gateway_config(tmp_path, handler, wechat, mode, fmt),
                                  clock=Clock())
            for name, (mode, fmt) in SHAPES.items()}
    yield types.SimpleNamespace(apps=apps, handler=handler)
    for app in apps.values():
        app.close()


def start_example(gateways, log, reply):
    gateways.handler.reply = reply
    gateways.handler.messages.clear()
    log.clear()
    # Hypothesis sends one query with several bodies across examples (a mutated one, then
    # the original): forget the query-to-body binds, which would rightly refuse them.
    for app in gateways.apps.values():
        app.store._entries.clear()
        for dedup in app._dedups.values():  # a memory store's dedup records, one LRU an app
            dedup.store._entries.clear()
        app._binds._entries.clear()  # a memory store's binds have an LRU of their own


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

_ids = itertools.count(1)


def fresh_msg_id():
    # Unique per push, so dedup never answers a fuzzed push from an earlier example.
    return str(7_000_000_000_000_000_000 + next(_ids) * 1009)


latin1 = st.characters(max_codepoint=255)
any_chars = st.one_of(st.characters(), st.sampled_from(["\ud800", "\udfff", "\udc80", "\x00"]))
# Text that survives XML CDATA unchanged (no control characters, no CR, no "]]>").
xml_chars = st.one_of(
    st.characters(exclude_categories=("Cs", "Cc"), exclude_characters="\ufffe\uffff"),
    st.sampled_from("\t\n"))
xml_text = st.text(xml_chars, max_size=40).filter(lambda text: "]]>" not in text)

replies = st.sampled_from(REPLIES)


@st.composite
def push_fields(draw):
    """A well-formed text message or event, with a fresh MsgId."""
    if draw(st.booleans()):
        return text_message(draw(xml_text), msg_id=fresh_msg_id())
    return event_message("user_enter_tempsession", SessionFrom=draw(xml_text),
                         CreateTime=NOW + next(_ids))


def expected_fields(fields, fmt):
    """What the handler should see for ``fields`` sent flat in ``fmt``."""
    return {name: str(value) for name, value in fields.items()} if fmt == "xml" else fields


FRAGMENTS = [
    b"<!DOCTYPE xml [<!ENTITY a 'b'>]>", b"&a;", b"&#0;", b"&#xD800;", b"]]>", b"<![CDATA[",
    b"</xml>", b"<xml>", b"<a>", b"</a>", b"<Encrypt>x</Encrypt>", b"<MsgId>1</MsgId>",
    b"<MsgType><a>b</a></MsgType>", b"<\xe4\xb8\xad>x</\xe4\xb8\xad>", b"\x00", b"\xff",
    b"\xef\xbb\xbf", b'"', b"{", b"}", b"[", b"]", b",", b":", b'"Encrypt":', b'"MsgId":',
    b'"MsgType":', b'"List":', b"\\ud800", b"\\u0000", b"1e999", b"NaN", b"-0", b"9" * 40,
    b"9" * 5000, b"null", b"true", b"\r\n", b" ", b"<?xml version='1.0' encoding='utf-16'?>",
]


@st.composite
def mutated_bytes(draw, data, max_ops=4):
    """``data`` after 1..max_ops byte-level or XML/JSON-aware mutations."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["flip", "set", "delete", "insert", "fragment", "truncate",
                                   "duplicate"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "fragment":
            data[at:at] = draw(st.sampled_from(FRAGMENTS))
        elif op == "truncate":
            del data[at:]
        elif op == "duplicate":
            end = draw(st.integers(at, len(data)))
            data[at:at] = data[at:end]
    return bytes(data)


@st.composite
def mutated_query(draw, query):
    """A valid query string after one or more parameter-level mutations."""
    params = urllib.parse.parse_qsl(query, keep_blank_values=True)
    raw_suffix = ""
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop", "value", "flip_hex", "upper", "timestamp", "repeat",
                                   "raw", "many"]))
        names = [name for name, _ in params] or ["signature"]
        name = draw(st.sampled_from(names))
        if op == "drop":
            params = [(n, v) for n, v in params if n != name]
        elif op == "value":
            value = draw(st.text(any_chars, max_size=30))
            params = [(n, value if n == name else v) for n, v in params]
        elif op == "flip_hex":
            def flip(value):
                if not value:
                    return "0"
                at = draw(st.integers(0, len(value) - 1))
                return value[:at] + draw(st.sampled_from("0123456789abcdefG ")) + value[at + 1:]
            params = [(n, flip(v) if n in ("signature", "msg_signature") else v)
                      for n, v in params]
        elif op == "upper":
            params = [(n, v.upper()) for n, v in params]
        elif op == "timestamp":
            delta = draw(st.sampled_from([-301, -300, 299, 300, 301, 10**6, -NOW]))
            params = [(n, str(int(v) + delta) if n == "timestamp" and v.isdigit() else v)
                      for n, v in params]
        elif op == "repeat":
            params.insert(0, (name, draw(st.text(latin1, max_size=12))))
        elif op == "raw":
            raw_suffix += "&" + draw(st.text(latin1, max_size=20))
        elif op == "many":
            params += [(f"p{i}", "x") for i in range(draw(st.integers(60, 80)))]
    encoded = []
    for name, value in params:
        try:
            encoded.append(urllib.parse.urlencode([(name, value)]))
        except UnicodeEncodeError:  # a lone surrogate: send it as a raw %-escape instead
            encoded.append(f"{name}=%ED%A0%80")
    return "&".join(encoded) + raw_suffix


def handshake_query(echostr="4375120948345356249", nonce="1984", timestamp=NOW):
    return urllib.parse.urlencode({
        "signature": sha1_sign(TOKEN, str(timestamp), nonce), "timestamp": str(timestamp),
        "nonce": nonce, "echostr": echostr})


PATHS = ["/wechat", "/wechat/", "/wechat//", "/WECHAT", "/wechat/x", "/", "", "/_wxgate",
         "/_wxgate/", "/_wxgate/healthz", "/_wxgate/healthz/", "/_wxgate/metrics",
         "/_wxgate/token/test", "/_wxgate/token/x", "/_wxgate/token/", "/_wxgate/token/test/",
         "/_wxgate//token/test", "/_wxgate/token/../token/test", "/_wxgate/token/test\x00",
         "/_wxgate/healthz?x=1", "//wechat", "/%77echat"]
SCRIPT_NAMES = ["", "", "", "/wechat", "/_wxgate", "/x", "/"]
CONTENT_LENGTHS = [AUTO, AUTO, None, "0", "1", "7", "65536", "65537", "99999999999999999999",
                   "-1", " 12", "12 ", "+12", "1_0", "0x10", "1e3", "\u00b2", "\u00b9\u00b3",
                   "1" * 5000, "abc", ""]
AUTHORIZATIONS = [None, f"Bearer {ADMIN_SECRET}", f"bearer   {ADMIN_SECRET}  ",
                  f"Bearer {ADMIN_SECRET[:-1]}", f"Basic {ADMIN_SECRET}", f"Bearer{ADMIN_SECRET}",
                  "Bearer ", "Bearer", ""]


@st.composite
def queries(draw):
    kind = draw(st.sampled_from(["arbitrary", "handshake", "push", "push", "push",
                                 "mutated-handshake", "mutated-push", "mutated-push", "empty"]))
    if kind == "arbitrary":
        return draw(st.text(latin1, max_size=200))
    if kind == "empty":
        return ""
    if kind.endswith("handshake"):
        query = handshake_query(echostr=urllib.parse.quote(draw(st.text(latin1, max_size=30)))
                                or "e")
    else:
        mode = draw(st.sampled_from(["plain", "safe"]))
        query = build_push(text_message(msg_id=fresh_msg_id()), mode=mode)[0]
    return draw(mutated_query(query)) if kind.startswith("mutated") else query


@st.composite
def bodies(draw):
    kind = draw(st.sampled_from(["bytes", "push", "mutated-push", "empty"]))
    if kind == "bytes":
        return draw(st.binary(max_size=600))
    if kind == "empty":
        return b""
    fields = draw(push_fields())
    _, body = build_push(fields, mode=draw(st.sampled_from(["plain", "compat", "safe"])),
                         fmt=draw(st.sampled_from(["xml", "json"])))
    return draw(mutated_bytes(body)) if kind == "mutated-push" else body


@st.composite
def requests(draw):
    """Everything a client controls: method, path, query, headers and body."""
    body = draw(bodies())
    extra = {}
    authorization = draw(st.one_of(st.sampled_from(AUTHORIZATIONS), st.text(latin1, max_size=60)))
    if authorization is not None:
        extra["HTTP_AUTHORIZATION"] = authorization
    if draw(st.booleans()):
        extra["CONTENT_TYPE"] = draw(st.one_of(
            st.sampled_from(["text/xml", "application/json", "text/plain; charset=gbk"]),
            st.text(latin1, max_size=30)))
    if draw(st.integers(0, 4)) == 0:
        extra["REMOTE_ADDR"] = draw(st.sampled_from(["127.0.0.1", "::1", "10.0.0.1", ""]))
        if draw(st.booleans()):
            extra["HTTP_X_FORWARDED_FOR"] = "198.51.100.1"
    if draw(st.integers(0, 4)) == 0:
        extra["HTTP_X_REQUEST_ID"] = draw(st.text(latin1, max_size=80))
    return dict(
        # Weighted towards what reaches the push code: POST to the app's path.
        method=draw(st.one_of(
            st.sampled_from(["POST"] * 6 + ["GET"] * 3 + ["HEAD", "PUT", "DELETE", "OPTIONS",
                                                          "PATCH", "TRACE", "CONNECT", "post",
                                                          "get", ""]),
            st.text(latin1, max_size=10))),
        path=draw(st.one_of(st.just("/wechat"), st.sampled_from(PATHS),
                            st.text(latin1, max_size=30),
                            st.builds(str.__add__, st.sampled_from(PATHS),
                                      st.text(latin1, max_size=10)))),
        script_name=draw(st.one_of(st.just(""), st.sampled_from(SCRIPT_NAMES),
                                   st.text(latin1, max_size=12))),
        query=draw(queries()),
        body=body,
        content_length=draw(st.one_of(st.sampled_from(CONTENT_LENGTHS),
                                      st.integers(0, 2 * len(body) + 2).map(str),
                                      st.text(latin1, max_size=8))),
        input_terminated=draw(st.booleans()),
        broken_input=draw(st.integers(0, 19)) == 0,
        **extra)


# -- hostile XML and JSON documents, well formed or nearly -----------------------------------

TAGS = st.sampled_from(["ToUserName", "FromUserName", "CreateTime", "MsgType", "Content", "MsgId",
                        "Event", "Encrypt", "List", "SessionFrom", "trace_id", "a", "中文",
                        "x:y", "_", "A-1.b"])
ATTRIBUTES = st.sampled_from(["", ' a="1"', " a='&#x3c;'", ' xmlns="urn:x"',
                              ' xmlns:x="urn:x" x:b="2"'])
XML_LEAVES = st.one_of(
    xml_text.map(lambda text: f"<![CDATA[{text}]]>"),
    st.text(xml_chars, max_size=20).map(
        lambda text: text.replace("&", "&amp;").replace("<", "&lt;")),
    st.sampled_from(["&amp;", "&lt;", "&#65;", "&#x10FFFF;", "&#0;", "&#xD800;", "&a;", "]]>",
                     "<![CDATA[", "\r\n", "1714000000", "text", "event", ""]))
PROLOGS = st.sampled_from(["", "", "", "<?xml version='1.0'?>", "<?xml version='1.1'?>",
                           "<?xml version='1.0' encoding='utf-16'?>", "<!-- c -->", "<?pi x?>",
                           "\ufeff", "<!DOCTYPE xml>", "<!DOCTYPE xml [<!ENTITY a 'b'>]>",
                           "<!DOCTYPE xml SYSTEM 'http://127.0.0.1:9/x.dtd'>"])


def xml_element(tag, attributes, children):
    return f"<{tag}{attributes}>{''.join(children)}</{tag}>"


def _xml_branches(children):
    # A named function, not a lambda: Hypothesis reads a lambda's source to check that it
    # recurses, and misreads multi-line ones (a deprecation warning, an error here).
    return st.builds(xml_element, TAGS, ATTRIBUTES, st.lists(children, max_size=4))


XML_NODES = st.recursive(XML_LEAVES, _xml_branches, max_leaves=24)


@st.composite
def xml_documents(draw):
    fields = draw(st.lists(st.builds(xml_element, TAGS, ATTRIBUTES,
                                     st.lists(XML_NODES, max_size=3)), max_size=8))
    if draw(st.booleans()):  # most pushes carry a MsgId: make the dedup path likely
        fields.append(f"<MsgId>{fresh_msg_id()}</MsgId>")
    fields = draw(st.permutations(fields))
    return f"{draw(PROLOGS)}<xml{draw(ATTRIBUTES)}>{''.join(fields)}</xml>".encode(
        "utf-8", "surrogatepass")


JSON_KEYS = st.one_of(st.sampled_from(["ToUserName", "FromUserName", "CreateTime", "MsgType",
                                       "Content", "MsgId", "Event", "List", "trace_id",
                                       "Encrypt"]), st.text(any_chars, max_size=8))
def _json_branches(children):
    return st.one_of(st.lists(children, max_size=4),
                     st.dictionaries(JSON_KEYS, children, max_size=4))


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
              st.integers(-2**70, 2**70), st.text(any_chars, max_size=20)),
    _json_branches, max_leaves=24)


@st.composite
def json_documents(draw):
    document = draw(st.dictionaries(JSON_KEYS, JSON_VALUES, max_size=8))
    if draw(st.booleans()):
        document["MsgId"] = fresh_msg_id()
    text = json.dumps(document, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


def seal(plaintext, appid=APPID, prefix=b"0123456789abcdef"):
    """Encrypt arbitrary bytes the way WeChat does (pycryptodome only)."""
    buffer = prefix + struct.pack(">I", len(plaintext)) + plaintext + appid.encode()
    buffer += bytes([32 - len(buffer) % 32]) * (32 - len(buffer) % 32)
    return base64.b64encode(AES.new(RAW_KEY, AES.MODE_CBC, RAW_KEY[:16]).encrypt(buffer)).decode()


def encrypted_push(encrypt, *, mode="safe", fmt="xml", fields=None, nonce="415670741"):
    """``(query, body)`` carrying ``encrypt``, with msg_signature recomputed over it."""
    timestamp = str(NOW)
    query = urllib.parse.urlencode({
        "signature": sha1_sign(TOKEN, timestamp, nonce), "timestamp": timestamp,
        "nonce": nonce, "openid": OPENID, "encrypt_type": "aes",
        "msg_signature": sha1_sign(TOKEN, timestamp, nonce, encrypt)})
    outer = {"ToUserName": GH_ID, "Encrypt": encrypt}
    if mode == "compat":
        outer = dict(fields or text_message(msg_id=fresh_msg_id()), Encrypt=encrypt)
    return query, render(outer, fmt).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# WSGI fuzzing
# ---------------------------------------------------------------------------------------------


@fuzz(400)
@given(shape=st.sampled_from(sorted(SHAPES)), request=requests(), reply=replies)
def test_any_request_gets_a_documented_answer(gateways, wxgate_log, shape, request, reply):
    start_example(gateways, wxgate_log, reply)
    request = dict(request)
    environ = make_environ(request.pop("method"), request.pop("path"), request.pop("query"),
                           request["body"], **{k: v for k, v in request.items() if k != "body"})
    response = call(gateways.apps[shape], environ)
    check(response, wxgate_log, environ, request["body"])
    path = (environ["SCRIPT_NAME"] + environ["PATH_INFO"]) or "/"
    if response.status in (401, 502):
        assert "/_wxgate/" in path
    if response.status == 415:
        assert SHAPES[shape][1] != "auto"


def bearer_is_right(authorization):
    scheme, _, credential = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and credential.strip() == ADMIN_SECRET


@fuzz(200)
@given(method=st.sampled_from(["GET", "GET", "GET", "POST", "HEAD", "DELETE"]),
       path=st.one_of(st.sampled_from(["/_wxgate/token/test", "/_wxgate/token/nope",
                                       "/_wxgate/healthz", "/_wxgate/metrics"]),
                      st.builds(str.__add__, st.just("/_wxgate/"), st.text(latin1, max_size=20))),
       authorization=st.one_of(st.sampled_from(AUTHORIZATIONS), st.text(latin1, max_size=40),
                               st.builds(str.__add__, st.sampled_from(["Bearer ", "bearer "]),
                                         st.text(latin1, max_size=40))),
       remote=st.sampled_from(["127.0.0.1", "203.0.113.7"]))
def test_admin_endpoints_answer_only_the_admin_secret(gateways, wxgate_log, method, path,
                                                      authorization, remote):
    start_example(gateways, wxgate_log, None)
    extra = {"REMOTE_ADDR": remote}
    if authorization is not None:
        extra["HTTP_AUTHORIZATION"] = authorization
    environ = make_environ(method, path, "", **extra)
    response = call(gateways.apps["safe"], environ)
    check(response, wxgate_log, environ)
    if path.startswith("/_wxgate/token/") and method == "GET" and response.status == 200:
        assert bearer_is_right(authorization) and path == "/_wxgate/token/test"
        assert set(json.loads(response.body)) == {"access_token", "expires_at"}
    if path == "/_wxgate/token/test" and method == "GET" and not bearer_is_right(authorization):
        assert response.status == 401
    if path == "/_wxgate/metrics" and response.status == 200:
        assert remote == "127.0.0.1" or bearer_is_right(authorization)


@fuzz(300)
@given(shape=st.sampled_from(sorted(SHAPES)), fields=push_fields(),
       fmt=st.sampled_from(["xml", "json"]), sent_mode=st.sampled_from(["plain", "compat", "safe"]),
       reply=replies, data=st.data())
def test_mutated_pushes_get_a_documented_answer(gateways, wxgate_log, shape, fields, fmt,
                                                sent_mode, reply, data):
    mode, app_format = SHAPES[shape]
    start_example(gateways, wxgate_log, reply)
    query, body = build_push(fields, mode=sent_mode, fmt=fmt)
    mutate_query, mutate_body = data.draw(st.sampled_from(
        [(False, False), (True, False), (False, True), (False, True), (True, True)]))
    if mutate_query:
        query = data.draw(mutated_query(query), label="query")
    if mutate_body:
        body = data.draw(mutated_bytes(body), label="body")
    environ = make_environ("POST", "/wechat", query, body, CONTENT_TYPE="text/xml")
    response = call(gateways.apps[shape], environ)
    check(response, wxgate_log, environ, body)
    # safe and compat apps need Encrypt (compat or safe pushes); a plain app reads plain
    # pushes and the clear fields of compat ones.
    accepted = sent_mode != "plain" if mode != "plain" else sent_mode != "safe"
    if not (mutate_query or mutate_body) and accepted and app_format in ("auto", fmt):
        assert response.status == 200
        assert [dict(m) for m in gateways.handler.messages] == [expected_fields(fields, fmt)]


@fuzz(300)
@given(shape=st.sampled_from(sorted(SHAPES)), document=st.one_of(xml_documents(),
                                                                 json_documents()),
       outer=st.sampled_from(["xml", "json"]), reply=replies)
def test_hostile_documents_with_valid_signatures(gateways, wxgate_log, shape, document, outer,
                                                 reply):
    """Arbitrary XML/JSON push bodies that pass the signature check: plain bodies as they are,
    encrypted ones as the inner document of a push whose msg_signature is right."""
    mode, app_format = SHAPES[shape]
    start_example(gateways, wxgate_log, reply)
    if mode == "plain":
        query, _ = build_push(text_message(), mode="plain")
        body = document
    else:
        query, body = encrypted_push(seal(document), mode=mode,
                                     fmt=outer if app_format == "auto" else app_format)
    environ = make_environ("POST", "/wechat", query, body, CONTENT_TYPE="text/xml")
    response = call(gateways.apps[shape], environ)
    check(response, wxgate_log, environ, body + document)
    assert response.status in (200, 400, 415)
    if response.status == 200:
        assert len(gateways.handler.messages) == 1 or push_outcome(wxgate_log) == "duplicate"


def check_encrypted_outcome(gateways, log, response, fields, fmt, *, same_ciphertext=False):
    """A mutated ciphertext under a valid msg_signature: refused with WeChat's code, or read
    as a message that is not the original (unless the ciphertext bytes did not change)."""
    assert response.status in (200, 400), response.status
    if response.status == 400:
        # One answer whatever failed (no oracle); the log keeps WeChat's code.
        assert response.text == wxgate.SEALED_REFUSAL, response.text
        assert any(WECHAT_CODE.search(text) for text in log.texts()), log.texts()
        assert not gateways.handler.messages
        return
    if not gateways.handler.messages:
        assert push_outcome(log) == "duplicate"
        return
    (message,) = gateways.handler.messages
    if same_ciphertext:
        assert dict(message) == expected_fields(fields, fmt)
    else:
        assert dict(message) != expected_fields(fields, fmt)


def xml_safe(text):
    return all(ch in "\t\n" or (" " <= ch and ch not in "\ufffe\uffff") for ch in text) and \
        "]]>" not in text


@fuzz(300)
@given(shape=st.sampled_from(["safe", "compat"]), fields=push_fields(),
       fmt=st.sampled_from(["xml", "json"]), reply=replies, data=st.data())
def test_bit_flip_in_ciphertext_with_valid_signature(gateways, wxgate_log, shape, fields, fmt,
                                                     reply, data):
    mode, _ = SHAPES[shape]
    start_example(gateways, wxgate_log, reply)
    raw = bytearray(base64.b64decode(seal(render(fields, fmt).encode())))
    bit = data.draw(st.integers(0, len(raw) * 8 - 1), label="bit")
    raw[bit // 8] ^= 1 << (bit % 8)
    query, body = encrypted_push(base64.b64encode(raw).decode(), mode=mode, fmt=fmt,
                                 fields=fields)
    environ = make_environ("POST", "/wechat", query, body)
    response = call(gateways.apps[shape], environ)
    check(response, wxgate_log, environ, body)
    check_encrypted_outcome(gateways, wxgate_log, response, fields, fmt)


@fuzz(300)
@given(shape=st.sampled_from(["safe", "compat"]), fields=push_fields(),
       fmt=st.sampled_from(["xml", "json"]), reply=replies, data=st.data())
def test_mutated_ciphertext_with_valid_signature(gateways, wxgate_log, shape, fields, fmt, reply,
                                                 data):
    """Ciphertext bytes truncated, extended, blocks dropped, repeated or swapped, re-encoded."""
    mode, _ = SHAPES[shape]
    start_example(gateways, wxgate_log, reply)
    original = base64.b64decode(seal(render(fields, fmt).encode()))
    raw = bytearray(original)
    op = data.draw(st.sampled_from(["truncate", "extend", "drop", "repeat", "swap", "set_byte",
                                    "random"]), label="op")
    blocks = len(raw) // 16
    if op == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    elif op == "extend":
        raw += data.draw(st.one_of(st.binary(min_size=1, max_size=64),
                                   st.just(bytes(raw[-32:])), st.just(bytes(raw[:32]))))
    elif op == "drop":
        at = data.draw(st.integers(0, blocks - 1)) * 16
        del raw[at:at + 16 * data.draw(st.sampled_from([1, 2]))]
    elif op == "repeat":
        at = data.draw(st.integers(0, blocks - 1)) * 16
        raw[at:at] = raw[at:at + 32]
    elif op == "swap":
        i, j = sorted(data.draw(st.lists(st.integers(0, blocks - 1), min_size=2, max_size=2,
                                         unique=True)))
        raw[i * 16:(i + 1) * 16], raw[j * 16:(j + 1) * 16] = \
            raw[j * 16:(j + 1) * 16], raw[i * 16:(i + 1) * 16]
    elif op == "set_byte":
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255).filter(lambda b: b != original[at]))
    else:
        raw = bytearray(data.draw(st.binary(max_size=160)))
    assume(bytes(raw) != original)
    query, body = encrypted_push(base64.b64encode(raw).decode(), mode=mode, fmt=fmt,
                                 fields=fields)
    environ = make_environ("POST", "/wechat", query, body)
    response = call(gateways.apps[shape], environ)
    check(response, wxgate_log, environ, body)
    check_encrypted_outcome(gateways, wxgate_log, response, fields, fmt)


@fuzz(300)
@given(shape=st.sampled_from(["safe", "compat"]), fields=push_fields(),
       fmt=st.sampled_from(["xml", "json"]), reply=replies, data=st.data())
def test_mutated_base64_with_valid_signature(gateways, wxgate_log, shape, fields, fmt, reply,
                                             data):
    """The Base64 text itself: truncated, padded, bits flipped, whitespace, other alphabets."""
    mode, _ = SHAPES[shape]
    start_example(gateways, wxgate_log, reply)
    original = seal(render(fields, fmt).encode())
    text = original
    for _ in range(data.draw(st.integers(1, 2))):
        op = data.draw(st.sampled_from(["truncate", "pad", "unpad", "flip", "insert", "urlsafe",
                                        "append_block", "strip"]), label="op")
        at = data.draw(st.integers(0, len(text)))
        if op == "truncate":
            text = text[:at]
        elif op == "pad":
            text += data.draw(st.sampled_from(["=", "==", "===", "A", "AA", "AAA", "AAAA"]))
        elif op == "unpad":
            text = text.rstrip("=")
        elif op == "flip" and text:
            at = min(at, len(text) - 1)
            text = text[:at] + chr(ord(text[at]) ^ (1 << data.draw(st.integers(0, 7)))) + \
                text[at + 1:]
        elif op == "insert":
            text = text[:at] + data.draw(st.sampled_from([" ", "\n", "\t", "=", "+", "/", "-",
                                                          "_", "é", "\x00"])) + text[at:]
        elif op == "urlsafe":
            text = text.replace("+", "-").replace("/", "_")
        elif op == "append_block":
            text += base64.b64encode(data.draw(st.binary(min_size=1, max_size=48))).decode()
        elif op == "strip":
            text = f" {text}\n"
    assume(text != original)
    if fmt == "xml":
        assume(xml_safe(text))
    query, body = encrypted_push(text, mode=mode, fmt=fmt, fields=fields)
    environ = make_environ("POST", "/wechat", query, body)
    response = call(gateways.apps[shape], environ)
    check(response, wxgate_log, environ, body)
    try:
        same = base64.b64decode(text, validate=True) == base64.b64decode(original)
    except ValueError:  # binascii.Error, or non-ASCII text
        same = False
    check_encrypted_outcome(gateways, wxgate_log, response, fields, fmt, same_ciphertext=same)


FIELD_VALUES = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.booleans(),
                         st.text(any_chars, max_size=10), st.lists(st.integers(), max_size=2),
                         st.dictionaries(st.sampled_from(["a", "b"]), st.text(max_size=3),
                                         max_size=2))


@fuzz(100)
@given(pushes=st.lists(st.tuples(st.sampled_from(["MsgType", "Event", "MsgId", "FromUserName",
                                                  "CreateTime", None]), FIELD_VALUES),
                       min_size=1, max_size=4),
       reply=replies)
def test_odd_field_types_then_health_and_metrics(gateways, wxgate_log, pushes, reply):
    """JSON pushes whose well-known fields are numbers, lists, objects or null, then the admin
    endpoints: every answer documented, and /metrics still renders."""
    start_example(gateways, wxgate_log, reply)
    app = gateways.apps["plain"]
    # Counters live as long as the process: start each example from none, so a failure
    # reproduces from its own pushes alone.
    app.metrics = type(app.metrics)()
    for name, value in pushes:
        fields = text_message(msg_id=fresh_msg_id(), MsgType="event", Event="x")
        if name is not None:
            fields[name] = value
        query = build_push(text_message(), mode="plain")[0]
        body = json.dumps(fields).encode()  # \ud800 escapes for lone surrogates
        environ = make_environ("POST", "/wechat", query, body)
        check(call(app, environ), wxgate_log, environ, body)
    for path in ("/_wxgate/healthz", "/_wxgate/metrics"):
        environ = make_environ("GET", path, "", REMOTE_ADDR="127.0.0.1")
        response = call(app, environ)
        check(response, wxgate_log, environ)
        assert response.status == 200


# -- what the fuzzer found, pinned ----------------------------------------------------------------


@pytest.fixture
def handler():
    return Recorder()


@pytest.fixture
def plain_app(tmp_path, wechat, wxgate_log, handler):
    app = wxgate.make_app(gateway_config(tmp_path, handler, wechat, "plain", "auto"),
                          clock=Clock())
    yield app
    app.close()


@pytest.fixture
def safe_app(tmp_path, wechat, wxgate_log, handler):
    app = wxgate.make_app(gateway_config(tmp_path, handler, wechat, "safe", "auto"),
                          clock=Clock())
    yield app
    app.close()


@pytest.mark.parametrize("length", [
    pytest.param("\u00b2", id="superscript two"),
    pytest.param("\u00b9\u00b3", id="superscripts"),
    pytest.param("1" * 5000, id="5000 digits")])
def test_content_length_that_int_cannot_read_is_400(plain_app, wxgate_log, length):
    # str.isdigit() says yes to superscript digits (latin-1, so a server can pass them) and
    # to numbers int() refuses to convert (over 4300 digits).
    query, body = build_push(text_message(), mode="plain")
    environ = make_environ("POST", "/wechat", query, body, content_length=length)
    response = call(plain_app, environ)
    check(response, wxgate_log, environ, body)
    assert response.status in (400, 413)


@pytest.mark.parametrize("encrypt", [pytest.param("\\ud800", id="lone surrogate"),
                                     pytest.param("abc\\udfffdef", id="surrogate inside")])
def test_lone_surrogate_in_json_encrypt_is_refused(safe_app, wxgate_log, encrypt):
    query, _ = build_push(text_message())
    body = b'{"ToUserName": "gh", "Encrypt": "' + encrypt.encode() + b'"}'
    environ = make_environ("POST", "/wechat", query, body)
    response = call(safe_app, environ)
    check(response, wxgate_log, environ, body)
    assert response.status in (400, 403)


@pytest.mark.parametrize("fmt, value", [("xml", {"a": "b"}), ("json", {"a": "b"}),
                                        ("json", ["text"])])
def test_msgtype_that_is_not_a_string_is_answered_once(plain_app, handler, wxgate_log, fmt,
                                                       value):
    query, body = build_push(text_message(msg_id=fresh_msg_id(), MsgType=value), mode="plain",
                             fmt=fmt)
    for attempt in range(2):  # WeChat's retry must get the same answer
        environ = make_environ("POST", "/wechat", query, body)
        response = call(plain_app, environ)
        check(response, wxgate_log, environ, body)
        assert response.status in (200, 400)
    assert handler.calls <= 1


@pytest.mark.parametrize("value", [5, None, 1.5, True, pytest.param("\ud800", id="surrogate")])
def test_metrics_render_after_a_push_with_an_odd_msgtype(plain_app, wxgate_log, value):
    query = build_push(text_message(), mode="plain")[0]
    for fields in (text_message(msg_id=fresh_msg_id(), MsgType=value),
                   text_message(msg_id=fresh_msg_id())):
        body = json.dumps(fields).encode()  # a lone surrogate travels as the escape \ud800
        environ = make_environ("POST", "/wechat", query, body)
        check(call(plain_app, environ), wxgate_log, environ, body)
    environ = make_environ("GET", "/_wxgate/metrics", "", REMOTE_ADDR="127.0.0.1")
    response = call(plain_app, environ)
    check(response, wxgate_log, environ)
    assert response.status == 200


@pytest.mark.parametrize("mode", ["plain", "safe"])
@pytest.mark.parametrize("fmt, from_user", [
    # legal XML names, but not ones _dump_xml will write back
    pytest.param("xml", {"中": "x"}, id="xml non-ASCII element"),
    pytest.param("xml", {"a:b": "x"}, id="xml prefixed element"),
    # a lone surrogate, sent as the JSON escape \ud800
    pytest.param("json", "\ud800", id="json lone surrogate"),
    pytest.param("json", {"not a name": 1}, id="json object"),
])
def test_dict_reply_to_a_push_with_odd_from_user(tmp_path, wechat, wxgate_log, mode, fmt,
                                                 from_user):
    """The README's own example reply, to a push whose FromUserName is hostile: the handler
    did not raise, so the answer must not be a 500 (and WeChat's retry must not be either)."""
    handler = Recorder(reply={"MsgType": "transfer_customer_service"})
    app = wxgate.make_app(gateway_config(tmp_path, handler, wechat, mode, "auto"),
                          clock=Clock())
    fields = text_message(msg_id=fresh_msg_id(), FromUserName="PLACEHOLDER")
    inner = render(fields, fmt)
    replacement = json.dumps(from_user) if fmt == "json" else \
        "".join(f"<{k}>{v}</{k}>" for k, v in from_user.items())
    inner = inner.replace('"PLACEHOLDER"' if fmt == "json" else "<![CDATA[PLACEHOLDER]]>",
                          replacement).encode()
    if mode == "plain":
        query, body = build_push(fields, mode="plain")[0], inner
    else:
        query, body = encrypted_push(seal(inner), fmt=fmt)
    try:
        for attempt in range(2):
            environ = make_environ("POST", "/wechat", query, body)
            response = call(app, environ)
            check(response, wxgate_log, environ, body)
            assert response.status in (200, 400)
    finally:
        app.close()


def test_closed_gateways_leave_no_threads_behind(tmp_path, wechat, wxgate_log):
    """Found by --fuzz-long building one gateway per example: each close() left its dedup
    claim keeper thread running for good (10 000 gateways, 10 000 threads)."""
    def keepers():
        return {t for t in threading.enumerate() if t.name == "wxgate-claims" and t.is_alive()}

    before = keepers()  # other tests' gateways may never be closed: leave theirs alone
    for _ in range(3):
        app = wxgate.make_app(gateway_config(tmp_path, Recorder(), wechat, "plain", "auto"),
                              clock=Clock())
        query, body = build_push(text_message(msg_id=fresh_msg_id()), mode="plain")
        assert call(app, make_environ("POST", "/wechat", query, body)).status == 200
        app.close()
    patience = time.monotonic() + 3 * wxgate.CLAIM_RENEW_EVERY  # a stopped keeper ends in a beat
    for thread in keepers() - before:
        thread.join(max(0.0, patience - time.monotonic()))
    assert not keepers() - before


# ---------------------------------------------------------------------------------------------
# Crypto properties
# ---------------------------------------------------------------------------------------------

keys = st.binary(min_size=32, max_size=32)


def key_text(key):
    return base64.b64encode(key).decode()[:43]


@fuzz(300)
@given(message=st.text(), appid=st.text(), key=keys, prefix=st.binary(min_size=16, max_size=16),
       raw_key=st.booleans())
def test_round_trip_any_message_and_appid(message, appid, key, prefix, raw_key):
    aes_key = key if raw_key else key_text(key)
    encrypt = wxgate.encrypt_message(message, aes_key, appid, random_prefix=prefix)
    assert wxgate.decrypt_message(encrypt, aes_key, appid) == message
    assert wxgate._decrypt_buffer(encrypt, aes_key) == (prefix, message, appid)
    # Read back with pycryptodome alone: the layout is WeChat's, padded to 32.
    buffer = AES.new(key, AES.MODE_CBC, key[:16]).decrypt(base64.b64decode(encrypt))
    body, tail = message.encode(), appid.encode()
    pad = 32 - (20 + len(body) + len(tail)) % 32
    assert buffer == prefix + struct.pack(">I", len(body)) + body + tail + bytes([pad]) * pad
    # bytes in, same ciphertext out
    assert wxgate.encrypt_message(body, aes_key, appid, random_prefix=prefix) == encrypt


@fuzz(300)
@given(message=st.text(max_size=200), appid=st.sampled_from([APPID, "", "wx" + "0" * 16, "中文"]),
       data=st.data())
def test_any_bit_flip_is_rejected_or_changes_the_message(message, appid, data):
    encrypt = wxgate.encrypt_message(message, AES_KEY, appid)
    raw = bytearray(base64.b64decode(encrypt))
    bit = data.draw(st.integers(0, len(raw) * 8 - 1), label="bit")
    raw[bit // 8] ^= 1 << (bit % 8)
    flipped = base64.b64encode(raw).decode()
    try:
        decrypted = wxgate.decrypt_message(flipped, AES_KEY, appid)
    except wxgate.DecryptError as exc:
        assert exc.code in (-40005, -40008), exc.code
        assert exc.status == 400
    else:
        assert decrypted != message


@st.composite
def non_canonical_pads(draw):
    """``(buffer, canonical, message)``: a full buffer under test, with a padding that is not
    WeChat's 32-byte PKCS#7, and the same content correctly padded."""
    message = draw(st.text(max_size=80))
    body = message.encode()
    content = b"0123456789abcdef" + struct.pack(">I", len(body)) + body + APPID.encode()
    good_pad = 32 - len(content) % 32
    canonical = content + bytes([good_pad]) * good_pad
    kind = draw(st.sampled_from(["last byte 0", "last byte over 32", "pad bytes differ"]))
    if kind == "pad bytes differ":
        pad = draw(st.integers(2, 32))
        size = -(-(len(content) + pad) // 32) * 32
        region = [pad] * pad
        positions = draw(st.lists(st.integers(0, pad - 2), min_size=1, unique=True))
        for at in positions:
            region[at] = draw(st.integers(0, 255).filter(lambda b: b != pad))
    else:
        last = 0 if kind == "last byte 0" else draw(st.integers(33, 255))
        size = -(-(len(content) + 1) // 32) * 32
        region = [last]
    filler = draw(st.binary(min_size=size - len(content) - len(region),
                            max_size=size - len(content) - len(region)))
    buffer = content + filler + bytes(region)
    assert len(buffer) % 32 == 0
    note(f"{kind}: tail {buffer[-33:].hex()}")
    return buffer, canonical, message


def aes_seal(buffer):
    return base64.b64encode(AES.new(RAW_KEY, AES.MODE_CBC, RAW_KEY[:16]).encrypt(buffer)).decode()


@fuzz(300)
@given(case=non_canonical_pads())
def test_every_non_canonical_pad_is_40008(case):
    buffer, canonical, message = case
    assert wxgate.decrypt_message(aes_seal(canonical), AES_KEY, APPID) == message
    for read in (lambda e: wxgate.decrypt_message(e, AES_KEY, APPID),
                 lambda e: wxgate._decrypt_buffer(e, AES_KEY)):
        with pytest.raises(wxgate.DecryptError) as info:
            read(aes_seal(buffer))
        assert info.value.code == -40008


@fuzz(300)
@given(encrypt=st.one_of(
    st.text(max_size=200),
    st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="),
            max_size=200),
    st.binary(max_size=160).map(lambda raw: base64.b64encode(raw).decode()),
    st.integers(1, 5).flatmap(lambda n: st.binary(min_size=32 * n, max_size=32 * n)).map(
        lambda raw: base64.b64encode(raw).decode())))
def test_any_encrypt_text_is_a_decrypt_error(encrypt):
    try:
        wxgate.decrypt_message(encrypt, AES_KEY, APPID)
    except wxgate.DecryptError as exc:
        assert exc.code in (-40010, -40007, -40008, -40005)
        assert AES_KEY not in str(exc) and TOKEN not in str(exc)


# ---------------------------------------------------------------------------------------------
# XML (and JSON) attack corpus, plain and as the encrypted inner document
# ---------------------------------------------------------------------------------------------


def push_xml(content="hello", *, prolog="", root_attributes="", content_attributes=""):
    """A text push that would be accepted, but for what is spliced into it."""
    return (f"{prolog}<xml{root_attributes}><ToUserName><![CDATA[{GH_ID}]]></ToUserName>"
            f"<FromUserName><![CDATA[{OPENID}]]></FromUserName><CreateTime>{NOW}</CreateTime>"
            f"<MsgType><![CDATA[text]]></MsgType><Content{content_attributes}>{content}"
            f"</Content><MsgId>{fresh_msg_id()}</MsgId></xml>").encode("utf-8")


def billion_laughs(_):
    entities = ['<!ENTITY lol0 "lol">'] + [
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)]
    return push_xml("&lol9;", prolog=f"<!DOCTYPE xml [{''.join(entities)}]>")


CORPUS = {
    "billion laughs": billion_laughs,
    "quadratic blowup": lambda bait: push_xml(
        "&a;" * 2000, prolog=f'<!DOCTYPE xml [<!ENTITY a "{"A" * 100_000}">]>'),
    "external entity (file)": lambda bait: push_xml(
        "&x;", prolog=f'<!DOCTYPE xml [<!ENTITY x SYSTEM "file://{bait.marker}">]>'),
    "external entity (URL)": lambda bait: push_xml(
        "&x;", prolog=f'<!DOCTYPE xml [<!ENTITY x SYSTEM "{bait.url}/entity">]>'),
    "external parameter entity": lambda bait: push_xml(
        "&x;", prolog=f'<!DOCTYPE xml [<!ENTITY % p SYSTEM "{bait.url}/p.dtd"> %p;]>'),
    "DTD retrieval (SYSTEM)": lambda bait: push_xml(
        "hello", prolog=f'<!DOCTYPE xml SYSTEM "{bait.url}/x.dtd">'),
    "DTD retrieval (PUBLIC)": lambda bait: push_xml(
        "hello", prolog=f'<!DOCTYPE xml PUBLIC "-//EVIL//DTD X//EN" "{bait.url}/public.dtd">'),
    "entity expanded in an attribute": lambda bait: push_xml(
        "hello", root_attributes=' a="' + "&a;" * 2000 + '"',
        prolog=f'<!DOCTYPE xml [<!ENTITY a "{"A" * 10_000}">]>'),
    "undeclared entity": lambda bait: push_xml("&xxe;"),
    "nested one past the limit": lambda bait: push_xml(
        "<a>" * (wxgate.MAX_XML_DEPTH - 1) + "x" + "</a>" * (wxgate.MAX_XML_DEPTH - 1)),
    "nested 50000 deep": lambda bait: push_xml("<a>" * 50_000 + "x" + "</a>" * 50_000),
    "nested and never closed": lambda bait: push_xml("<a>" * 100_000),
    "UTF-16 with a DOCTYPE": lambda bait: billion_laughs(bait).decode().encode("utf-16"),
    "UTF-16 without a BOM": lambda bait: billion_laughs(bait).decode().encode("utf-16-le"),
    "UTF-7 declared DOCTYPE": lambda bait: (
        b'<?xml version="1.0" encoding="UTF-7"?>+ADw-!DOCTYPE xml +AFs-+ADw-!ENTITY x SYSTEM '
        b'+ACI-file:///etc/passwd+ACI-+AD4-+AF0-+AD4-' + push_xml("&x;")),
    "deep JSON": lambda bait: ('{"MsgType": "text", "Content": ' + "[" * 100_000 + "]" * 100_000
                               + "}").encode(),
    "huge JSON number": lambda bait: ('{"MsgType": "text", "MsgId": ' + "9" * 100_000
                                      + "}").encode(),
}

VARIANTS = {  # name -> mode of the app
    "plain": "plain", "safe outer": "safe", "safe inner": "safe", "compat inner": "compat"}


@pytest.fixture(scope="module")
def bait(tmp_path_factory):
    """A loopback server that XML resolvers would fetch from, and a local file they would read:
    a refused document must touch neither."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            body = b'<!ENTITY x SYSTEM "file:///etc/passwd">' if self.path.endswith(".dtd") \
                else b"BAIT-FETCHED"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              daemon=True)
    thread.start()
    marker = tmp_path_factory.mktemp("bait") / "marker.txt"
    marker.write_text("BAIT-FILE-CONTENT", "utf-8")
    yield types.SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}",
                                marker=marker, hits=hits)
    server.shutdown()
    server.server_close()
    thread.join(5)


def hostile_push(variant, document):
    # A nonce per document, as WeChat picks one per push: wxgate binds a signed query to the
    # first body it comes with, so the push after a refused one needs a query of its own.
    nonce = str(int(hashlib.sha1(document).hexdigest()[:8], 16))
    if variant == "plain":
        return build_push(text_message(), mode="plain", nonce=nonce)[0], document
    if variant == "safe outer":
        return build_push(text_message(), nonce=nonce)[0], document
    return encrypted_push(seal(document), mode="compat" if variant == "compat inner" else "safe",
                          nonce=nonce)


def corpus_app(tmp_path, handler, variant):
    # A 1 MiB limit, so the parser, not the body limit, meets every attack (even encrypted).
    config = make_config(tmp_path, handler, mode=VARIANTS[variant],
                         extra_gateway="max_body_bytes = 1048576")
    return webtest.TestApp(wxgate.make_app(config, clock=Clock()), lint=True)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", list(CORPUS))
def test_xml_attack_is_refused_and_the_app_survives(tmp_path, bait, variant, name):
    handler = Recorder()
    testapp = corpus_app(tmp_path, handler, variant)
    document = CORPUS[name](bait)
    query, body = hostile_push(variant, document)
    assert len(body) <= 1048576
    response = testapp.post(f"/wechat?{query}", body, content_type="text/xml", expect_errors=True)
    assert 400 <= response.status_int < 500, (response.status, response.body[:200])
    assert response.text and "\n" not in response.text.strip()
    assert handler.calls == 0
    assert b"BAIT" not in response.body and not bait.hits
    query, body = build_push(text_message(msg_id=fresh_msg_id()), mode=VARIANTS[variant])
    good = testapp.post(f"/wechat?{query}", body, content_type="text/xml")
    assert good.body == b"success"
    assert handler.calls == 1


# Huge or numerous attributes are refused (WeChat sends none; small ones are ignored).
ATTRIBUTES_CORPUS = {
    "huge attribute on the root": dict(root_attributes=' a="' + "x" * 500_000 + '"'),
    "huge attribute on a field": dict(content_attributes=' a="' + "x" * 500_000 + '"'),
    "many attributes": dict(root_attributes="".join(f' a{i}="{i}"' for i in range(20_000))),
}


@pytest.mark.parametrize("variant", ["plain", "safe inner", "compat inner"])
@pytest.mark.parametrize("name", list(ATTRIBUTES_CORPUS))
def test_huge_attributes_are_refused_and_the_next_push_handled(tmp_path, bait, variant, name):
    handler = Recorder()
    testapp = corpus_app(tmp_path, handler, variant)
    query, body = hostile_push(variant, push_xml("hello", **ATTRIBUTES_CORPUS[name]))
    assert len(body) <= 1048576
    response = testapp.post(f"/wechat?{query}", body, content_type="text/xml", status=400)
    if variant == "plain":
        assert "attributes" in response.text
    else:  # past msg_signature, one answer whatever failed (the log says what)
        assert response.text == wxgate.SEALED_REFUSAL
    assert handler.messages == []
    query, body = hostile_push(variant, push_xml("again"))
    assert testapp.post(f"/wechat?{query}", body, content_type="text/xml").body == b"success"
    assert [m["Content"] for m in handler.messages] == ["again"]
