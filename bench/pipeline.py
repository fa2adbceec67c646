"""Pushes per second through the WSGI callable, in-process: wxgate beside its peers.

    pip install -r bench/requirements.txt
    python bench/pipeline.py            # about 90 s
    python bench/pipeline.py --quick    # a few seconds, rougher figures
    python bench/pipeline.py --profile safe-xml-text   # cProfile of wxgate on one case

Every implementation gets the same pushes (built here with hashlib and pycryptodome, not with
wxgate's own functions) and a handler that does nothing:

- wxgate: ``make_app(config)`` called as WSGI, memory store, timestamp window off, its logger
  at WARNING (the row "+ INFO log line" adds its per-push line, with the handler and text
  formatter wxgate installs itself under ``wxgate serve`` or gunicorn, ``_setup_logging``,
  writing to /dev/null line-buffered as ``sys.stderr`` is);
- WeRoBot 1.13.1: ``robot.wsgi`` (a Bottle app) with session storage off and with its default
  SQLiteStorage (in a temporary file). It logs a WARNING for every push its handlers answer
  with nothing; that line is off except in the row "+ WARNING line". It parses XML only, so
  it has no JSON row;
- wechatpy 1.8.18: ``check_signature`` / ``WeChatCrypto.decrypt_message`` / ``parse_message``,
  the work a wechatpy user's view does; it is given the query already split into a dict (its
  web framework's job); ``parse_message`` is XML-only, so the JSON row uses ``json.loads``;
  it has no dedup, so a duplicate costs it a full push;
- the floor: sha1 + base64 + AES-CBC (pycryptodome, a new cipher per push) + ``xml.etree`` or
  ``json``, no framework, also given the split query; a second row adds ``parse_qsl``.

WSGI apps are called with a fresh environ (a copy of a gunicorn-like template) and a fresh
``BytesIO`` per call; the cost of building them is printed as "harness".

Every push is new to the gateway: each has its own nonce (so its own signed query) and its
own MsgId (CreateTime for events), in every case, every row and every repeat. The rows that
keep state between pushes (wxgate, WeRoBot) are handed pushes built for them just before each
timed loop, never one sent before; the rows that keep none (wechatpy, the floor, the harness)
cycle through a pool of distinct pushes, which is the same to them. wxgate runs with its
default ``dedup_size`` (10000) and timestamp window (300 s, its clock pinned to the pushes'
timestamp): past its first 10000 pushes each new one evicts the oldest key, as in any
long-running deployment on the memory store. After each case the handlers' calls are counted:
wxgate's and WeRoBot's must have run once per push, or the script stops. The one exception is
labelled: ``duplicate-hit`` sends one push over and over, which wxgate answers from its store
(its handler runs once) and the peers, which do not deduplicate, process in full.

Timing: warm-up, a calibrated loop per row as timeit does, then repeats taking turns across
the rows of a case so a burst of load elsewhere on the machine slows them all; the best repeat
of each row is kept. Each loop is timed in CPU time of the process (``time.process_time``),
so the time slices the machine gives to other work do not count. Garbage collection stays on,
as in a server.
"""

import os
import sys

# This folder also holds http.py, which would shadow the standard library's http package for
# everything imported below (bottle, requests...). Take the folder off sys.path first.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
# wxgate from the repository root, or from WXGATE_SRC (a folder holding another wxgate.py, to
# compare two versions).
sys.path.insert(0, os.environ.get("WXGATE_SRC") or os.path.dirname(HERE))

import argparse
import base64
import dataclasses
import gc
import hashlib
import importlib.util
import io
import itertools
import json
import logging
import platform
import struct
import tempfile
import time
import urllib.parse
import xml.etree.ElementTree as ET
from importlib import metadata

from Crypto.Cipher import AES

import wxgate

TOKEN = "benchtoken123"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
RAW_KEY = base64.b64decode(AES_KEY + "=")
APPID = "wx2c2769f8efd9abc2"
GH_ID = "gh_10f6c3c3ac5a"
OPENID = "oyORnuP8q7ou2gfYjqLzSIWZf0rs"
NOW = 1_714_000_000
DISTINCT = 20000
FIRST_MSG_ID = 6054768590064713728
FIRST_NONCE = 415670741

CASES = ("safe-xml-text", "safe-json-event", "plain-xml-text", "handshake", "duplicate-hit")


# -- the pushes ----------------------------------------------------------------------------

def sha1_sign(*parts):
    return hashlib.sha1("".join(sorted(parts)).encode("utf-8")).hexdigest()


def aes_encrypt(plaintext, prefix=b"a8eedb185eb2fecf"):
    message = plaintext.encode("utf-8")
    buffer = prefix + struct.pack(">I", len(message)) + message + APPID.encode()
    pad = 32 - len(buffer) % 32
    buffer += bytes([pad]) * pad
    return base64.b64encode(AES.new(RAW_KEY, AES.MODE_CBC, RAW_KEY[:16]).encrypt(buffer)).decode()


@dataclasses.dataclass
class Push:
    method: str
    query: dict      # already split, for wechatpy and the floor
    query_string: str
    body: bytes
    content_length: str
    fmt: str         # "xml" or "json"; "" for the handshake


def text_fields(i):
    return {"ToUserName": GH_ID, "FromUserName": OPENID, "CreateTime": NOW, "MsgType": "text",
            "Content": "hello from the bench", "MsgId": FIRST_MSG_ID + i}


def event_fields(i):
    # Events are deduplicated by FromUserName + CreateTime + Event: vary CreateTime.
    return {"ToUserName": GH_ID, "FromUserName": OPENID, "CreateTime": NOW - i,
            "MsgType": "event", "Event": "user_enter_tempsession", "SessionFrom": "bench"}


def to_xml(fields):
    inner = "".join(f"<{k}>{v}</{k}>" if isinstance(v, int) else f"<{k}><![CDATA[{v}]]></{k}>"
                    for k, v in fields.items())
    return f"<xml>{inner}</xml>"


def to_json(fields):
    return json.dumps(fields, ensure_ascii=False)


def make_push(fields, *, mode, fmt, i):
    """Push number ``i``: its nonce, and so its signed query, is its own."""
    timestamp, nonce = str(NOW), str(FIRST_NONCE + i)
    query = {"signature": sha1_sign(TOKEN, timestamp, nonce), "timestamp": timestamp,
             "nonce": nonce, "openid": OPENID}
    text = to_xml(fields) if fmt == "xml" else to_json(fields)
    if mode == "plain":
        body = text.encode("utf-8")
    else:
        encrypt = aes_encrypt(text)
        query["encrypt_type"] = "aes"
        query["msg_signature"] = sha1_sign(TOKEN, timestamp, nonce, encrypt)
        outer = {"ToUserName": GH_ID, "Encrypt": encrypt}
        body = (to_xml(outer) if fmt == "xml" else to_json(outer)).encode("utf-8")
    return Push("POST", query, urllib.parse.urlencode(query), body, str(len(body)), fmt)


def make_handshake(i):
    timestamp, nonce = str(NOW), str(FIRST_NONCE + i)
    query = {"signature": sha1_sign(TOKEN, timestamp, nonce), "timestamp": timestamp,
             "nonce": nonce, "echostr": str(4375120948345356249 + i)}
    return Push("GET", query, urllib.parse.urlencode(query), b"", "", "")


# One serial number for every push the process builds, whatever its case: no two pushes share
# a nonce (one signed query binds one body) or a MsgId / CreateTime (one dedup key).
_serial = itertools.count()

MAKERS = {
    "safe-xml-text": lambda i: make_push(text_fields(i), mode="safe", fmt="xml", i=i),
    "safe-json-event": lambda i: make_push(event_fields(i), mode="safe", fmt="json", i=i),
    "plain-xml-text": lambda i: make_push(text_fields(i), mode="plain", fmt="xml", i=i),
    "handshake": make_handshake,
}


def new_pushes(case, count):
    """``count`` pushes of ``case`` that no earlier call returned."""
    make = MAKERS[case]
    return [make(next(_serial)) for _ in range(count)]


def build_inputs(count):
    """New pushes for every case (``duplicate-hit``: the one push it resends)."""
    inputs = {case: new_pushes(case, count) for case in MAKERS}
    inputs["handshake"] = inputs["handshake"][:1000]
    inputs["duplicate-hit"] = new_pushes("safe-xml-text", 1)
    return inputs


# Which path (and so which app) each case goes to.
PATHS = {"safe-xml-text": "/wechat", "safe-json-event": "/wechat", "plain-xml-text": "/plain",
         "handshake": "/wechat", "duplicate-hit": "/wechat"}


# -- calling a WSGI app the way a server does ------------------------------------------------

ENVIRON = {
    "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "SERVER_PROTOCOL": "HTTP/1.1",
    "SCRIPT_NAME": "", "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "50312",
    "HTTP_HOST": "127.0.0.1:8080", "HTTP_USER_AGENT": "Mozilla/4.0", "HTTP_ACCEPT": "*/*",
    "HTTP_CONNECTION": "close", "HTTP_PRAGMA": "no-cache", "CONTENT_TYPE": "text/xml",
    "RAW_URI": "/wechat", "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
    "wsgi.errors": sys.stderr, "wsgi.multithread": False, "wsgi.multiprocess": True,
    "wsgi.run_once": False, "wsgi.input_terminated": True, "SERVER_SOFTWARE": "gunicorn/23",
}

_status = []


def start_response(status, headers, exc_info=None):
    _status.append(status)


def wsgi_caller(app, path):
    template = dict(ENVIRON, PATH_INFO=path)
    BytesIO = io.BytesIO

    def call(push):
        environ = template.copy()
        environ["REQUEST_METHOD"] = push.method
        environ["QUERY_STRING"] = push.query_string
        environ["CONTENT_LENGTH"] = push.content_length
        environ["wsgi.input"] = BytesIO(push.body)
        result = app(environ, start_response)
        body = b"".join(result)
        if hasattr(result, "close"):
            result.close()
        return body

    return call


def null_app(environ, start_response):
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "7")])
    return [b"success"]


# -- wxgate --------------------------------------------------------------------------------

class CountingHandler:
    """A no-op handler that counts its calls (to prove no push was answered from the cache)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, message):
        self.calls += 1
        return None


def make_wxgate(tmpdir, handler):
    ini = os.path.join(tmpdir, "bench.ini")
    with open(ini, "w", encoding="utf-8") as f:
        f.write("\n".join([
            # The defaults: timestamp_window 300 (the clock is pinned to the pushes'
            # timestamp), dedup_size 10000; spelled out so the table's note stays true.
            "[wxgate]", "timestamp_window = 300", "dedup_size = 10000", "store = memory", "",
            "[app:bench]", "path = /wechat", f"appid = {APPID}", f"token = {TOKEN}",
            f"encoding_aes_key = {AES_KEY}", "mode = safe", "format = auto",
            "handler = wxgate:demo_handler", "",
            "[app:plain]", "path = /plain", f"appid = {APPID}", f"token = {TOKEN}",
            "mode = plain", "format = auto", "handler = wxgate:demo_handler", ""]))
    config = wxgate.load_config(ini, environ={})
    apps = {name: dataclasses.replace(app, handler=handler, handler_spec="bench:noop")
            for name, app in config.apps.items()}
    return wxgate.make_app(dataclasses.replace(config, apps=apps), clock=lambda: NOW)


# -- WeRoBot -------------------------------------------------------------------------------

def make_werobot(handler, session_file=None):
    import werobot
    from werobot.session.sqlitestorage import SQLiteStorage

    robot = werobot.WeRoBot(token=TOKEN, encoding_aes_key=AES_KEY, app_id=APPID)
    if session_file is None:
        robot.config["SESSION_STORAGE"] = False
    else:  # the default storage class, in a temporary file instead of the current directory
        robot.config["SESSION_STORAGE"] = SQLiteStorage(session_file)

    robot.add_handler(handler)  # a CountingHandler: no reply, like wxgate's
    # It logs "No handler responded message ..." at WARNING for every push answered with
    # nothing; keep the formatting (its cost) but not the output.
    robot.logger.setLevel(logging.ERROR)
    return robot.wsgi


# -- wechatpy ------------------------------------------------------------------------------

def wechatpy_ops():
    from wechatpy import parse_message
    from wechatpy.crypto import WeChatCrypto
    from wechatpy.utils import check_signature

    crypto = WeChatCrypto(TOKEN, AES_KEY, APPID)

    def safe_xml(push):
        q = push.query
        check_signature(TOKEN, q["signature"], q["timestamp"], q["nonce"])
        xml = crypto.decrypt_message(push.body, q["msg_signature"], q["timestamp"], q["nonce"])
        return parse_message(xml)

    def safe_json(push):
        # parse_message is XML-only: a JSON app's view decodes the envelope and the message
        # with json.loads; decrypt_message accepts the decoded envelope as a dict.
        q = push.query
        check_signature(TOKEN, q["signature"], q["timestamp"], q["nonce"])
        text = crypto.decrypt_message(json.loads(push.body), q["msg_signature"],
                                      q["timestamp"], q["nonce"])
        return json.loads(text)

    def plain_xml(push):
        q = push.query
        check_signature(TOKEN, q["signature"], q["timestamp"], q["nonce"])
        return parse_message(push.body)

    def handshake(push):
        q = push.query
        check_signature(TOKEN, q["signature"], q["timestamp"], q["nonce"])
        return q["echostr"]

    return {"safe-xml-text": safe_xml, "safe-json-event": safe_json,
            "plain-xml-text": plain_xml, "handshake": handshake, "duplicate-hit": safe_xml}


# -- the floor -----------------------------------------------------------------------------

def floor_ops(split_query=False):
    new, CBC, iv = AES.new, AES.MODE_CBC, RAW_KEY[:16]
    b64decode, sha1, fromstring, loads = base64.b64decode, hashlib.sha1, ET.fromstring, json.loads
    unpack, appid = struct.unpack_from, APPID.encode()

    def query_of(push):
        return dict(urllib.parse.parse_qsl(push.query_string)) if split_query else push.query

    def decrypt(q, encrypt):
        parts = sorted((TOKEN, q["timestamp"], q["nonce"], encrypt))
        if sha1("".join(parts).encode()).hexdigest() != q["msg_signature"]:
            raise ValueError("msg_signature")
        buffer = new(RAW_KEY, CBC, iv).decrypt(b64decode(encrypt))
        buffer = buffer[:-buffer[-1]]
        (length,) = unpack(">I", buffer, 16)
        if buffer[20 + length:] != appid:
            raise ValueError("appid")
        return buffer[20:20 + length]

    def safe_xml(push):
        q = query_of(push)
        inner = decrypt(q, fromstring(push.body).find("Encrypt").text)
        return {child.tag: child.text for child in fromstring(inner)}

    def safe_json(push):
        q = query_of(push)
        return loads(decrypt(q, loads(push.body)["Encrypt"]))

    def plain_xml(push):
        q = query_of(push)
        parts = sorted((TOKEN, q["timestamp"], q["nonce"]))
        if sha1("".join(parts).encode()).hexdigest() != q["signature"]:
            raise ValueError("signature")
        return {child.tag: child.text for child in fromstring(push.body)}

    def handshake(push):
        q = query_of(push)
        parts = sorted((TOKEN, q["timestamp"], q["nonce"]))
        if sha1("".join(parts).encode()).hexdigest() != q["signature"]:
            raise ValueError("signature")
        return q["echostr"]

    return {"safe-xml-text": safe_xml, "safe-json-event": safe_json,
            "plain-xml-text": plain_xml, "handshake": handshake, "duplicate-hit": safe_xml}


# -- timing --------------------------------------------------------------------------------

class Feed:
    """Hands out the next ``n`` items of a pool, wrapping around: for the rows that keep no
    state between pushes (wechatpy, the floor, the harness), to which a push seen before is
    the same work as a new one."""

    def __init__(self, items):
        self.items, self.position, self.handed = items, 0, 0

    def take(self, n):
        self.handed += n
        out = []
        while len(out) < n:
            chunk = self.items[self.position:self.position + n - len(out)]
            out.extend(chunk)
            self.position = (self.position + len(chunk)) % len(self.items)
        return out


class Fresh:
    """Hands out ``n`` pushes of a case that were never handed out before, built when asked
    (before the timed loop): for the rows that keep state, wxgate's dedup and query binds."""

    def __init__(self, case):
        self.case, self.handed = case, 0

    def take(self, n):
        self.handed += n
        return new_pushes(self.case, n)


class Same:
    """Hands out one push over and over: the labelled duplicate case."""

    def __init__(self, push):
        self.push, self.handed = push, 0

    def take(self, n):
        self.handed += n
        return [self.push] * n


def calibrate(fn, feed, seconds):
    """Warm up, then return how many calls of ``fn`` last about ``seconds`` (as timeit does)."""
    for item in feed.take(50):  # imports, caches, the first sqlite page
        fn(item)
    n = 10
    while True:
        elapsed = run_once(fn, feed, n) * n
        if elapsed >= seconds / 5 or n >= 1_000_000:
            break
        n *= 2 if elapsed > seconds / 50 else 10
    return max(10, int(n * seconds / max(elapsed, 1e-9)))


def run_once(fn, feed, n):
    """CPU seconds per call of ``fn`` over the feed's next ``n`` inputs.

    CPU time of this process (``time.process_time``), not wall time: on a machine shared with
    other work, the time slices the scheduler gives to others are not counted.
    """
    items = feed.take(n)
    t0 = time.process_time()
    for item in items:
        fn(item)
    return (time.process_time() - t0) / n


def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def wxgate_own_handler(stream, fallback):
    """The handler ``wxgate._setup_logging("text")`` installs (``wxgate serve``, gunicorn),
    writing to ``stream``; ``fallback`` if it installs none (the root logger has a handler)."""
    log = logging.getLogger("wxgate")
    handlers, level, stderr = log.handlers[:], log.level, sys.stderr
    log.handlers, sys.stderr = [], stream  # its handler writes to the sys.stderr of now
    try:
        wxgate._setup_logging("text")
        return log.handlers[-1] if log.handlers else fallback
    finally:
        log.handlers, sys.stderr = handlers, stderr
        log.setLevel(level)


def group_of(impl):
    """The rows that share one app, and so one handler and one feed of pushes."""
    if impl.startswith("wxgate"):
        return "wxgate"
    if impl.startswith("WeRoBot, off"):
        return "WeRoBot, sessions off"
    return impl


def check_outputs(impls, feed_of, handlers):
    """Run each implementation once per case and refuse to time one that gives a wrong answer."""
    checked = set()
    for (impl, case), fn in impls.items():
        if fn in checked or impl.startswith("harness"):  # wxgate + INFO line: the same app
            continue
        checked.add(fn)
        counter = handlers.get(group_of(impl))
        before = counter.calls if counter else 0
        push = feed_of(impl, case).take(1)[0]
        del _status[:]
        result = fn(push)
        if counter is not None:  # a WSGI app: wxgate or WeRoBot
            status = _status[-1] if _status else "none"
            expected = push.query["echostr"].encode() if push.method == "GET" else None
            ok = status.startswith("200") and (expected is None or result == expected)
            if impl.startswith("wxgate") and push.method == "POST":
                ok = ok and result == b"success"
            if push.method == "POST":  # the handler saw the push
                ok = ok and counter.calls == before + 1
        elif case == "handshake":
            ok = result == push.query["echostr"]
        else:
            msg_type = result["MsgType"] if isinstance(result, dict) else result.type
            ok = msg_type in ("text", "event", "user_enter_tempsession")
        if not ok:
            raise SystemExit(f"{impl} on {case} answered {_status[-1:]} {result!r:.200}")


def check_handled(case, group, pushes, calls):
    """Stop unless the handler ran once per push: a push answered from wxgate's dedup store
    would be timed as a new one. In ``duplicate-hit`` wxgate's handler must not run at all."""
    if case == "handshake":
        expected = 0
    elif case == "duplicate-hit" and group == "wxgate":
        expected = 0
    else:
        expected = pushes
    if calls != expected:
        raise SystemExit(f"{group} on {case}: {pushes} pushes sent, its handler ran {calls} "
                         f"times (expected {expected}): the figures would not measure what "
                         "they say")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, rougher figures")
    parser.add_argument("--seconds", type=float, help="length of one repeat (default 0.2)")
    parser.add_argument("--repeats", type=int, help="repeats, best kept (default 5)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset")
    parser.add_argument("--profile", metavar="CASE", choices=CASES,
                        help="profile wxgate alone on CASE with cProfile and exit")
    args = parser.parse_args(argv)
    seconds = args.seconds or (0.03 if args.quick else 0.2)
    repeats = args.repeats or (3 if args.quick else 5)
    cases = [c for c in args.cases.split(",") if c]

    missing = [name for name in ("werobot", "wechatpy") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not installed: pip install -r "
                         "bench/requirements.txt")
    logging.getLogger("wxgate").setLevel(logging.WARNING)
    tmp = tempfile.TemporaryDirectory(prefix="wxgate-bench-")

    handler = CountingHandler()
    gateway = make_wxgate(tmp.name, handler)
    wxgate_calls = {case: wsgi_caller(gateway, PATHS[case]) for case in CASES}

    if args.profile:
        feed = Fresh(args.profile) if args.profile != "duplicate-hit" else \
            Same(new_pushes("safe-xml-text", 1)[0])
        return profile(wxgate_calls[args.profile], feed)

    impls = {}  # (implementation, case) -> fn(push)
    for case in cases:
        impls["wxgate", case] = wxgate_calls[case]
    handlers = {"wxgate": handler, "WeRoBot, sessions off": CountingHandler(),
                "WeRoBot, SQLite sessions": CountingHandler()}
    robot_off = make_werobot(handlers["WeRoBot, sessions off"])
    robot_sql = make_werobot(handlers["WeRoBot, SQLite sessions"],
                             os.path.join(tmp.name, "werobot_session.sqlite3"))
    if "safe-xml-text" in cases:  # the cost of each one's log line per push
        impls["wxgate + INFO log line", "safe-xml-text"] = wxgate_calls["safe-xml-text"]
        impls["WeRoBot, off + WARNING line", "safe-xml-text"] = wsgi_caller(robot_off, "/wechat")
    pyops, floor, floor_qs = wechatpy_ops(), floor_ops(), floor_ops(split_query=True)
    for case in cases:
        if case != "safe-json-event":  # WeRoBot parses XML only
            impls["WeRoBot, sessions off", case] = wsgi_caller(robot_off, PATHS[case])
            impls["WeRoBot, SQLite sessions", case] = wsgi_caller(robot_sql, PATHS[case])
        impls["wechatpy check+decrypt+parse", case] = pyops[case]
        impls["floor", case] = floor[case]
        impls["floor + parse_qsl", case] = floor_qs[case]
        impls["harness (WSGI null app)", case] = wsgi_caller(null_app, PATHS[case])

    # Where each row's pushes come from. The rows of one app share a feed (so wxgate + INFO
    # line never gets a push wxgate had); wxgate and WeRoBot, which keep state between
    # pushes, get new pushes only; the rest cycle through a pool of distinct ones.
    duplicate = new_pushes("safe-xml-text", 1)[0]
    pools = {case: new_pushes(case, 1000 if case == "handshake" else DISTINCT)
             for case in cases if case in MAKERS}
    feeds = {}

    def feed_of(impl, case):
        group = group_of(impl)
        if (group, case) not in feeds:
            if case == "duplicate-hit":
                feeds[group, case] = Same(duplicate)
            elif group in handlers:
                feeds[group, case] = Fresh(case)
            else:
                feeds[group, case] = Feed(pools[case])
        return feeds[group, case]

    check_outputs(impls, feed_of, handlers)

    # Rows that keep their log line: wxgate's INFO line per push, and the WARNING WeRoBot logs
    # for every push its handlers answer with nothing. Each is formatted and written to
    # /dev/null; every other row runs with them off.
    devnull = open(os.devnull, "w", buffering=1)  # line-buffered, as sys.stderr is
    log_handler = logging.StreamHandler(devnull)
    log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logged = {"wxgate + INFO log line": ("wxgate", logging.INFO, logging.WARNING,
                                         wxgate_own_handler(devnull, log_handler)),
              "WeRoBot, off + WARNING line": ("WeRoBot", logging.WARNING, logging.ERROR,
                                              log_handler)}

    def timed(impl, case, action):
        if impl not in logged:
            return action()
        name, on, off, log_handler = logged[impl]
        log = logging.getLogger(name)
        log.setLevel(on)
        log.addHandler(log_handler)
        log.propagate = False
        try:
            return action()
        finally:
            log.setLevel(off)
            log.removeHandler(log_handler)
            log.propagate = True

    results = {}
    started = time.perf_counter()
    for case in cases:
        rows = [(impl, fn) for (impl, c), fn in impls.items() if c == case]
        counted = {group_of(impl) for impl, _ in rows if group_of(impl) in handlers}
        if case == "duplicate-hit" and "wxgate" in counted:
            # Sent once more now: the pushes of the cases before may have evicted its key.
            wxgate_calls[case](duplicate)
        before = {group: (handlers[group].calls, feed_of(group, case).handed)
                  for group in counted}
        sizes = {impl: timed(impl, case, lambda: calibrate(fn, feed_of(impl, case), seconds))
                 for impl, fn in rows}
        best = dict.fromkeys(sizes, float("inf"))
        # Repeats take turns across the implementations, so a burst of load on the machine
        # slows them all instead of one of them; the best repeat of each is kept.
        for _ in range(repeats):
            for impl, fn in rows:
                gc.collect()
                per_call = timed(impl, case, lambda: run_once(fn, feed_of(impl, case),
                                                               sizes[impl]))
                best[impl] = min(best[impl], per_call)
        for impl in best:
            results[impl, case] = best[impl]
        for group, (calls, handed) in before.items():
            check_handled(case, group, feed_of(group, case).handed - handed,
                          handlers[group].calls - calls)
    elapsed = time.perf_counter() - started
    print_table(results, cases)
    print()
    print(f"Python {platform.python_version()} ({platform.python_implementation()}), "
          f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs: {cpu_model()}")
    print("peers: " + ", ".join(f"{name} {version(name)}" for name in (
        "WeRoBot", "bottle", "wechatpy", "xmltodict", "cryptography", "pycryptodome")))
    print(f"wxgate {wxgate.__version__} ({wxgate.__file__}); best of {repeats} x "
          f"~{seconds:g} s of CPU time per row; {elapsed:.0f} s of timing")
    print("× wxgate: the row's time per push over wxgate's (2.00: takes twice as long)")
    print("Every push of every case is new to wxgate (its handler ran once per push), except "
          "in duplicate-hit,\nwhich resends one push: wxgate answers it from its dedup store, "
          "the peers (no dedup) process it in full.")
    devnull.close()
    tmp.cleanup()


def print_table(results, cases):
    header = f"{'case':<16} {'implementation':<30} {'µs/op':>9} {'ops/s':>9} {'× wxgate':>9}"
    print(header)
    print("-" * len(header))
    order = ["wxgate", "wxgate + INFO log line", "WeRoBot, sessions off",
             "WeRoBot, off + WARNING line", "WeRoBot, SQLite sessions"]
    for case in cases:
        base = results.get(("wxgate", case))
        rows = sorted(((impl, seconds) for (impl, c), seconds in results.items() if c == case),
                      key=lambda row: order.index(row[0]) if row[0] in order else len(order))
        for impl, seconds in rows:
            ratio = f"{seconds / base:.2f}" if base else "-"
            print(f"{case:<16} {impl:<30} {seconds * 1e6:>9.1f} {1 / seconds:>9,.0f} "
                  f"{ratio:>9}")
        print()


def profile(call, feed, n=20000):
    import cProfile
    import pstats

    for item in feed.take(100):
        call(item)
    items = feed.take(n)
    profiler = cProfile.Profile()
    profiler.enable()
    for item in items:
        call(item)
    profiler.disable()
    stats = pstats.Stats(profiler)
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
