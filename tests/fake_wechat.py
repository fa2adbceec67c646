"""A fake of WeChat's backend HTTP API, served for real on loopback.

Tests point wxgate's ``api_base`` at :attr:`FakeWeChat.url` and talk to it over real sockets,
so the client's URL building, JSON encoding, timeouts and retries are all exercised; nothing
patches ``urllib``. The fake follows WeChat's backend API docs (access_token, stable_token,
code2Session, customer-service and subscribe messages) and keeps the quirks a client must cope
with:

- ``GET /cgi-bin/token`` mints a new token on every call; the previous one keeps working for a
  grace period (5 minutes), then dies.
- ``POST /cgi-bin/stable_token`` returns the same token until it is 5 minutes from expiry;
  ``force_refresh`` kills the old token at once, at most 20 times a day, and a force refresh less
  than 30 s after the last one returns the current token instead.
- Token and session answers carry no ``errcode`` on success; business answers carry
  ``errcode: 0``.
- Business APIs answer 41001 without a token, 40001 for an unknown or dead token, 42001 for an
  expired one.
- ``POST /cgi-bin/media/upload`` reads its ``multipart/form-data`` body strictly, as a server
  that honours RFC 7578 would (boundary from the header, CRLF delimiters, the ``media`` part's
  file name, content type and bytes), and answers a ``media_id`` that ``image`` messages accept.
- As Cloud Hosting's 开放接口服务 sidecar (:meth:`FakeWeChat.act_as_cloud_sidecar`), it takes
  calls with no ``access_token`` and adds the credential itself; a path off its
  whitelist gets HTTP 502, every call gets 41001 "access_token missing" while the switch is off
  (or the version was not rebuilt), and a successful call carries an ``x-openapi-seqid`` header.

Tests steer it with an injectable clock (:class:`FakeClock`) and a few switches
(:meth:`FakeWeChat.fail_next`, :meth:`FakeWeChat.hang`, :meth:`FakeWeChat.revoke`,
:attr:`FakeWeChat.reject_all_tokens`), and inspect it through :attr:`FakeWeChat.calls`,
:attr:`FakeWeChat.token_fetches`, :attr:`FakeWeChat.requests` and the lists of accepted
messages. Standard library only.

Sections: Constants, Clock, Token records, Multipart, The fake, HTTP handler.
"""

from __future__ import annotations

import base64
import collections
import http.server
import json
import math
import secrets
import threading
import time
import urllib.parse

__all__ = ["FakeWeChat", "FakeClock", "Request", "Part", "MultipartError",
           "parse_multipart", "DEFAULT_APPID", "DEFAULT_SECRET", "SEQID_HEADER"]


###############################################################################################
# Constants ###################################################################################
###############################################################################################

# A well-formed but invented mini program: "wx" and 16 hex digits, a 32-hex-digit AppSecret.
DEFAULT_APPID = "wxb1a2c3d4e5f60718"
DEFAULT_SECRET = "0123456789abcdef0123456789abcdef"

TOKEN_PATH = "/cgi-bin/token"
STABLE_TOKEN_PATH = "/cgi-bin/stable_token"
CUSTOM_SEND_PATH = "/cgi-bin/message/custom/send"
TYPING_PATH = "/cgi-bin/message/custom/typing"
SUBSCRIBE_SEND_PATH = "/cgi-bin/message/subscribe/send"
CODE2SESSION_PATH = "/sns/jscode2session"
MEDIA_UPLOAD_PATH = "/cgi-bin/media/upload"
# Mini programs may upload images only (customerServiceMessage.uploadTempMedia); the same
# endpoint of an Official Account also takes voice, video and thumb.
MEDIA_TYPES = ("image",)

# What the 开放接口服务 sidecar adds to each answer it proxied successfully (its guide).
# https://developers.weixin.qq.com/miniprogram/dev/wxcloudrun/src/guide/weixin/open.html
SEQID_HEADER = "x-openapi-seqid"
# The sidecar's answer to a path that is not on its whitelist: a proxy's error page, not JSON.
# The sidecar's FAQ says 502; the body is our guess.
SIDECAR_REFUSED_BODY = b"<html><body><h1>502 Bad Gateway</h1></body></html>"

# Fields each customer-service msgtype must carry in the object named after it.
# https://developers.weixin.qq.com/miniprogram/dev/framework/open-ability/customer-message/send.html
CUSTOM_MSGTYPES = {
    "text": ("content",),
    "image": ("media_id",),
    "link": ("title", "description", "url", "thumb_url"),
    "miniprogrampage": ("title", "pagepath", "thumb_media_id"),
}
TYPING_COMMANDS = ("Typing", "CancelTyping")
MINIPROGRAM_STATES = ("developer", "trial", "formal")
LANGS = ("zh_CN", "en_US", "zh_HK", "zh_TW")

# WeChat's wording, so a client that logs errmsg shows what production would show. The
# messages on the token endpoints differ from the business ones on purpose: there, 40001
# means a wrong AppSecret, not a bad token.
ERRMSGS = {
    -1: "system error",
    0: "ok",
    40001: "invalid credential, access_token is invalid or not latest",
    40002: "invalid grant_type",
    40003: "invalid openid",
    40008: "invalid message type",
    40004: "invalid media type",
    40013: "invalid appid",
    40014: "invalid access_token",
    40029: "invalid code",
    40037: "invalid template_id",
    40125: "invalid appsecret",
    40163: "code been used",
    41001: "access_token missing",
    41002: "appid missing",
    41004: "appsecret missing",
    41005: "media data missing",
    41008: "missing code",
    42001: "access_token expired",
    43001: "require GET method",
    43002: "require POST method",
    44004: "empty content",
    45009: "reach max api daily quota limit",
    45011: "api minute-quota reach limit  mustslower  retry next minute",
    45072: "command invalid",
    47001: "data format error",
    47003: "argument invalid!",
}
TOKEN_SECRET_ERRMSG = "AppSecret error"

# We read at most this much of a request body; the real API's limit is not documented and
# no test needs more.
MAX_BODY_BYTES = 1 << 20

# Beijing time, UTC+8: WeChat's daily quotas reset at local midnight (assumed, unverified).
DAY_OFFSET = 8 * 3600.0


###############################################################################################
# Clock #######################################################################################
###############################################################################################


class FakeClock:
    """A settable clock to pass as ``clock=``, so tests move time without sleeping.

    Calling it returns the current fake time in seconds since the epoch, like ``time.time``.
    The default start is a fixed moment (2023-11-14 22:13:20 UTC), so daily quotas and
    expiry times are the same on every run.
    """

    def __init__(self, start: float = 1_700_000_000.0):
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move time forward by *seconds* and return the new time."""
        if seconds < 0:
            raise ValueError(f"time only moves forward, got {seconds!r}")
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, now: float) -> None:
        """Jump to *now*; going backwards is allowed, for tests of clock skew."""
        with self._lock:
            self._now = float(now)


###############################################################################################
# Token records ###############################################################################
###############################################################################################


class _Token:
    """One minted access_token and the two ways it stops working.

    ``expires_at`` is its natural end (``expires_in`` after minting): past it WeChat answers
    42001. ``dies_at`` is when it was replaced or revoked (plus any grace): past it WeChat
    answers 40001, "not latest". A token never replaced has ``dies_at`` at infinity.
    """

    __slots__ = ("value", "appid", "kind", "issued_at", "expires_at", "dies_at")

    def __init__(self, value, appid, kind, issued_at, expires_at):
        self.value = value
        self.appid = appid
        self.kind = kind  # "classic" or "stable": the two kinds never affect each other
        self.issued_at = issued_at
        self.expires_at = expires_at
        self.dies_at = math.inf

    def kill(self, when: float) -> None:
        # The earlier death wins: a revoked token that is then replaced must not get a
        # grace period back.
        self.dies_at = min(self.dies_at, when)


Request = collections.namedtuple("Request", "method path query body")
Request.__doc__ = """One request as the fake received it.

``query`` is a dict of the first value of each parameter; ``body`` the decoded JSON, or None
when the body was empty or not JSON (``raw`` bodies are not kept). A ``multipart/form-data``
body is a dict of :class:`Part` by field name, or the :class:`MultipartError` it raised.
"""


class _Code:
    """A js_code issued by a test, as a login on the phone would produce."""

    __slots__ = ("openid", "session_key", "unionid", "appid", "expires_at", "used")

    def __init__(self, openid, session_key, unionid, appid, expires_at):
        self.openid = openid
        self.session_key = session_key
        self.unionid = unionid
        self.appid = appid
        self.expires_at = expires_at
        self.used = False


###############################################################################################
# Multipart ###################################################################################
###############################################################################################

Part = collections.namedtuple("Part", "name filename content_type data")
Part.__doc__ = "One field of a multipart/form-data body; ``filename`` is None for plain fields."


class MultipartError(ValueError):
    """The body is not multipart/form-data that a strict server would accept."""


_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                         "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _header_params(value: str):
    """Split ``form-data; name="media"; filename="a.jpg"`` into its value and parameters.

    Quoted strings may hold ';' and backslash escapes; what browsers send for CR, LF and '"'
    in a file name is percent-escapes, which we keep as they came (WeChat sees them too).
    """
    head, _, rest = value.partition(";")
    params, i = {}, 0
    while i < len(rest):
        while i < len(rest) and rest[i] in " \t;":
            i += 1
        start = i
        while i < len(rest) and rest[i] != "=":
            i += 1
        name = rest[start:i].strip().lower()
        i += 1
        if i < len(rest) and rest[i] == '"':
            i += 1
            chars = []
            while i < len(rest) and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < len(rest):
                    i += 1
                chars.append(rest[i])
                i += 1
            if i >= len(rest):
                raise MultipartError(f"unterminated quoted parameter {name!r}")
            i += 1
            params[name] = "".join(chars)
        else:
            start = i
            while i < len(rest) and rest[i] != ";":
                i += 1
            params[name] = rest[start:i].strip()
    return head.strip().lower(), params


def parse_multipart(content_type: str, body: bytes) -> dict:
    """Parse a ``multipart/form-data`` body strictly (RFC 7578, RFC 2046 section 5.1).

    Written apart from any encoder under test: the boundary comes from the Content-Type
    header (quoted or not); the body must start with ``--boundary`` CRLF; each part's data
    runs to the next CRLF ``--boundary``, byte for byte, so data may hold CRLF, ``--`` and
    anything else that is not that exact sequence; the last delimiter is ``--boundary--``.
    Returns ``{name: Part}``; raises :class:`MultipartError` on anything else.
    """
    kind, params = _header_params(content_type or "")
    if kind != "multipart/form-data":
        raise MultipartError(f"content type is {kind!r}, not multipart/form-data")
    boundary = params.get("boundary", "")
    if not 1 <= len(boundary) <= 70 or boundary.endswith(" "):
        raise MultipartError(f"bad boundary {boundary!r}")
    delimiter = b"--" + boundary.encode("latin-1")
    if not body.startswith(delimiter + b"\r\n"):
        raise MultipartError("body does not start with the boundary")
    position = len(delimiter) + 2
    parts = {}
    while True:
        end = body.find(b"\r\n" + delimiter, position)
        if end < 0:
            raise MultipartError("part is not closed by the boundary")
        if body[position:position + 2] == b"\r\n":  # a part with no headers at all
            headers_end, lines = position - 2, []
        else:
            headers_end = body.find(b"\r\n\r\n", position, end + 2)
            if headers_end < 0:
                raise MultipartError("part has no blank line after its headers")
            lines = body[position:headers_end].split(b"\r\n")
        headers = {}
        for line in lines:
            name, colon, value = line.decode("utf-8").partition(":")
            if not colon or not name or set(name) - _TOKEN_CHARS:
                raise MultipartError(f"bad part header line {line[:60]!r}")
            headers[name.lower()] = value.strip()
        disposition, dparams = _header_params(headers.get("content-disposition", ""))
        if disposition != "form-data" or "name" not in dparams:
            raise MultipartError("part has no Content-Disposition: form-data; name=...")
        if dparams["name"] in parts:
            raise MultipartError(f"field {dparams['name']!r} appears twice")
        parts[dparams["name"]] = Part(dparams["name"], dparams.get("filename"),
                                      headers.get("content-type"), body[headers_end + 4:end])
        position = end + 2 + len(delimiter)
        if body[position:position + 2] == b"--":
            if body[position + 2:] not in (b"", b"\r\n"):
                raise MultipartError("data after the closing boundary")
            return parts
        if body[position:position + 2] != b"\r\n":
            raise MultipartError("boundary is followed by neither CRLF nor --")
        position += 2


###############################################################################################
# The fake ####################################################################################
###############################################################################################


class FakeWeChat:
    """WeChat's backend API on ``127.0.0.1``, on a free port, in a daemon thread.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`::

        with FakeWeChat(clock=clock) as wechat:
            manager = TokenManager(DEFAULT_APPID, DEFAULT_SECRET, api_base=wechat.url)

    :param appid: an app registered from the start; ``None`` registers none (see
        :meth:`add_app`).
    :param secret: its AppSecret.
    :param clock: returns the time in seconds; pass a :class:`FakeClock` to move time by hand.
    :param expires_in: lifetime of every token minted, in seconds (WeChat: 7200).
    :param grace: how long a classic token keeps working after a newer one is minted
        (WeChat: 5 minutes).
    :param stable_refresh_window: a stable token this close to expiry is replaced on the next
        normal call (WeChat: 5 minutes, so a returned token always has 300 s left).
    :param force_refresh_limit: effective ``force_refresh`` calls per app and day before 45009.
    :param force_refresh_interval: a ``force_refresh`` sooner than this after the last effective
        one returns the current token instead of a new one (WeChat: 30 s).
    :param force_refresh_grace: how long the old stable token survives a force refresh;
        WeChat's is unverified, and 0 (dies at once) is the strictest guess.
    :param code_lifetime: how long an issued js_code can be exchanged (WeChat: about 5 min).
    """

    def __init__(
        self,
        appid: str | None = DEFAULT_APPID,
        secret: str = DEFAULT_SECRET,
        *,
        clock=time.time,
        expires_in: int = 7200,
        grace: float = 300.0,
        stable_refresh_window: float = 300.0,
        force_refresh_limit: int = 20,
        force_refresh_interval: float = 30.0,
        force_refresh_grace: float = 0.0,
        code_lifetime: float = 300.0,
    ):
        self.clock = clock
        self.expires_in = expires_in
        self.grace = grace
        self.stable_refresh_window = stable_refresh_window
        self.force_refresh_limit = force_refresh_limit
        self.force_refresh_interval = force_refresh_interval
        self.force_refresh_grace = force_refresh_grace
        self.code_lifetime = code_lifetime
        #: When true, every business call with a token answers 40001, as if WeChat had
        #: invalidated all tokens; tests use it to prove the client's retry is bounded.
        self.reject_all_tokens = False
        #: Set by :meth:`act_as_cloud_sidecar`: ``(whitelist, enabled)``, or None.
        self._sidecar = None
        self._seqids = []

        # One lock guards every piece of state below. Handlers run in their own threads and a
        # token call reads and writes several tables at once (mint a token, kill the previous
        # one, count the refresh); doing all of that under one lock keeps each call atomic, so
        # two concurrent calls can never both "replace" the same token.
        self._lock = threading.Lock()
        self._apps = {}
        self._tokens = {}
        self._issued = []
        self._classic = {}  # appid -> latest classic _Token
        self._stable = {}  # appid -> current stable _Token
        self._last_force = {}  # appid -> time of the last effective force refresh
        self._force_counts = collections.Counter()  # (appid, day) -> effective force refreshes
        self._codes = {}
        self._failures = collections.defaultdict(collections.deque)
        self._hangs = {}
        self._calls = collections.Counter()
        self._requests = []
        self._custom_messages = []
        self._typing_commands = []
        self._subscribe_messages = []
        self._uploads = []
        self._errors = []
        self._next_msgid = 2_000_000_000_000_000_000

        # Set by stop(), so handlers sleeping in hang() wake up and leave without answering.
        self._stopping = threading.Event()
        self._server = None
        self._thread = None
        if appid is not None:
            self.add_app(appid, secret)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> FakeWeChat:
        """Bind a free port on 127.0.0.1 and serve in a daemon thread; returns self."""
        if self._server is not None:
            raise RuntimeError("FakeWeChat is already running")
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        # A short poll interval because shutdown() waits for the serve loop to notice: the
        # default 0.5 s would cost half a second per test.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="fake-wechat",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; returns promptly even with hung handlers."""
        if self._server is None:
            return
        # Wake hung handlers first: they would otherwise sleep on after the test ends. Handler
        # threads are daemons and the server does not join them, so nothing here waits on them.
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeWeChat:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The base URL to use as wxgate's ``api_base``, e.g. ``http://127.0.0.1:41234``."""
        if self._server is None:
            raise RuntimeError("FakeWeChat is not running; call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- apps, tokens, codes ----------------------------------------------------------------

    def add_app(self, appid: str, secret: str) -> None:
        """Register an app, or change the secret of a registered one."""
        with self._lock:
            self._apps[appid] = secret

    def issue_code(
        self,
        openid: str,
        session_key: str | None = None,
        unionid: str | None = None,
        *,
        appid: str | None = None,
    ) -> str:
        """Issue a single-use js_code that /sns/jscode2session exchanges for these values.

        *session_key* defaults to a random one shaped like WeChat's (Base64 of 16 bytes).
        *appid* binds the code to one app, as WeChat does; ``None`` accepts any registered app.
        """
        if session_key is None:
            session_key = _b64_16()
        code = secrets.token_hex(16)
        with self._lock:
            expires_at = self.clock() + self.code_lifetime
            self._codes[code] = _Code(openid, session_key, unionid, appid, expires_at)
        return code

    def revoke(self, token: str) -> None:
        """Kill *token* now: business calls with it answer 40001 from here on."""
        with self._lock:
            record = self._tokens.get(token)
            if record is None:
                raise KeyError(f"the fake never issued token {token[:8]!r}...")
            record.kill(self.clock())

    def act_as_cloud_sidecar(self, whitelist=(), *, enabled: bool = True) -> None:
        """Behave as Cloud Hosting's 开放接口服务 from now on (``whitelist=None``: stop).

        A call to a path in *whitelist* with no ``access_token`` is answered as if a valid
        token had been sent, plus an ``x-openapi-seqid`` response header. A path off the
        whitelist gets HTTP 502 and an HTML body. With *enabled* false (the switch is off, or
        the version was not rebuilt after turning it on) every call gets 41001. A call that
        does carry an ``access_token`` gets 40001: the sidecar only adds its own credential
        to calls made as documented without one (our strictest reading, unverified).
        """
        with self._lock:
            if whitelist is None:
                self._sidecar = None
            else:
                self._sidecar = (frozenset(_normal_path(path) for path in whitelist), enabled)

    @property
    def seqids(self) -> list:
        """The ``x-openapi-seqid`` values the sidecar answered with, in order."""
        with self._lock:
            return list(self._seqids)

    def token_errcode(self, token: str | None) -> int:
        """What a business call with *token* would answer now: 0, 41001, 40001 or 42001.

        ``reject_all_tokens`` is not taken into account; this is the token's own state.
        """
        with self._lock:
            return self._check_token(token)

    def current_stable_token(self, appid: str = DEFAULT_APPID) -> str | None:
        """The stable token a normal call would consider current for *appid*, if any."""
        with self._lock:
            record = self._stable.get(appid)
            return record.value if record is not None else None

    # -- fault injection --------------------------------------------------------------------

    def fail_next(
        self, path: str, errcode: int, errmsg: str | None = None, *, times: int = 1,
        status: int = 200,
    ) -> None:
        """Answer the next *times* calls to *path* with ``{"errcode", "errmsg"}``.

        The call is counted and logged but has no other effect (no token minted, no message
        recorded). WeChat answers errors with status 200; *status* lets a test imitate a proxy
        in between. Failures queue: two ``fail_next`` calls fail the next two requests in order.
        """
        if errmsg is None:
            errmsg = ERRMSGS.get(errcode, "fake error")
        with self._lock:
            queue = self._failures[_normal_path(path)]
            for _ in range(times):
                queue.append((status, errcode, errmsg))

    def hang(self, path: str, seconds: float, *, times: int | None = 1) -> None:
        """Sleep *seconds* before handling the next *times* calls to *path*.

        ``times=None`` hangs every call until ``hang(path, 0)`` clears it. The request is
        handled after the sleep (so a client that timed out may still have sent its message,
        as with the real API), unless :meth:`stop` cuts the sleep short: then the connection is
        closed without an answer.
        """
        with self._lock:
            if seconds <= 0 or times == 0:
                self._hangs.pop(_normal_path(path), None)
            else:
                self._hangs[_normal_path(path)] = [seconds, times]

    # -- inspection -------------------------------------------------------------------------
    # Each property returns a copy taken under the lock, so a test never iterates over a list
    # that a handler thread is appending to.

    @property
    def calls(self) -> collections.Counter:
        """Requests received per path (all of them, failed ones included); 0 for unseen paths."""
        with self._lock:
            return collections.Counter(self._calls)

    @property
    def token_fetches(self) -> int:
        """Calls to /cgi-bin/token and /cgi-bin/stable_token together."""
        with self._lock:
            return self._calls[TOKEN_PATH] + self._calls[STABLE_TOKEN_PATH]

    @property
    def requests(self) -> list:
        """Every request received, in order, as :class:`Request` tuples."""
        with self._lock:
            return list(self._requests)

    @property
    def issued_tokens(self) -> list:
        """Every token minted, oldest first, classic and stable alike."""
        with self._lock:
            return [record.value for record in self._issued]

    @property
    def custom_messages(self) -> list:
        """Bodies accepted by /cgi-bin/message/custom/send, in order."""
        with self._lock:
            return list(self._custom_messages)

    @property
    def typing_commands(self) -> list:
        """Bodies accepted by /cgi-bin/message/custom/typing, in order."""
        with self._lock:
            return list(self._typing_commands)

    @property
    def subscribe_messages(self) -> list:
        """Bodies accepted by /cgi-bin/message/subscribe/send, in order."""
        with self._lock:
            return list(self._subscribe_messages)

    @property
    def uploads(self) -> list:
        """Uploads accepted by /cgi-bin/media/upload, in order: dicts of ``media_id``,
        ``type``, ``filename``, ``content_type`` and ``data`` (the bytes as received)."""
        with self._lock:
            return [dict(upload) for upload in self._uploads]

    @property
    def errors(self) -> list:
        """Exceptions raised inside the fake's handlers: bugs in the fake, answered with 500."""
        with self._lock:
            return list(self._errors)

    def clear_log(self) -> None:
        """Forget calls, requests and recorded messages; tokens, codes and faults stay."""
        with self._lock:
            self._calls.clear()
            self._requests.clear()
            self._custom_messages.clear()
            self._typing_commands.clear()
            self._subscribe_messages.clear()
            self._uploads.clear()

    # -- request handling (called by _Handler) ----------------------------------------------

    def _begin(self, request: Request):
        """Count and log *request*; return the hang and the injected failure it gets, if any."""
        with self._lock:
            self._calls[request.path] += 1
            self._requests.append(request)
            hang = None
            entry = self._hangs.get(request.path)
            if entry is not None:
                hang = entry[0]
                if entry[1] is not None:
                    entry[1] -= 1
                    if entry[1] <= 0:
                        del self._hangs[request.path]
            queue = self._failures.get(request.path)
            failure = queue.popleft() if queue else None
        return hang, failure

    def _dispatch(self, request: Request):
        """Answer *request*: return ``(status, body)``."""
        status, body, _ = self._dispatch_with_headers(request)
        return status, body

    def _dispatch_with_headers(self, request: Request):
        """Answer *request*: ``(status, body, headers)``; a bytes body is sent as text."""
        with self._lock:
            sidecar = self._sidecar
        if sidecar is None:
            return self._route(request) + ((),)
        whitelist, enabled = sidecar
        if not enabled:
            return 200, _error(41001), ()
        if request.path not in whitelist:
            return 502, SIDECAR_REFUSED_BODY, ()
        if "access_token" in request.query:
            return 200, _error(40001), ()
        # The sidecar adds its own credential: hand the route a token it always accepts, while
        # the request the test inspects stays as the client sent it.
        query = dict(request.query, access_token=_SIDECAR_CREDENTIAL)
        status, body = self._route(request._replace(query=query))
        seqid = secrets.token_hex(16)
        with self._lock:
            self._seqids.append(seqid)
        return status, body, ((SEQID_HEADER, seqid),)

    def _route(self, request: Request):
        route = _ROUTES.get(request.path)
        if route is None:
            return 404, {"errcode": 404, "errmsg": f"fake wechat: no api at {request.path}"}
        method, handler = route
        if request.method != method:
            errcode = 43001 if method == "GET" else 43002
            return 200, _error(errcode)
        with self._lock:
            return 200, handler(self, request)

    def _record_error(self, exc: BaseException) -> None:
        with self._lock:
            self._errors.append(exc)

    # Everything below runs with self._lock held.

    def _check_credentials(self, grant_type, expected_grant, appid, secret, secret_errcode):
        """The checks token and session endpoints share; an error body, or None when fine."""
        if grant_type != expected_grant:
            return _error(40002)
        if not appid:
            return _error(41002)
        if appid not in self._apps:
            return _error(40013)
        if not secret:
            return _error(41004)
        if not secrets.compare_digest(secret.encode(), self._apps[appid].encode()):
            if secret_errcode == 40001:
                return _error(40001, TOKEN_SECRET_ERRMSG)
            return _error(secret_errcode)
        return None

    def _mint(self, appid: str, kind: str, now: float) -> _Token:
        # Real tokens are long opaque strings of letters, digits, "_" and "-" (WeChat says to
        # keep room for 512); 128 such characters catch a client that truncates.
        record = _Token(secrets.token_urlsafe(96), appid, kind, now, now + self.expires_in)
        self._tokens[record.value] = record
        self._issued.append(record)
        return record

    def _check_token(self, token) -> int:
        if token is _SIDECAR_CREDENTIAL:
            return 0
        if not token:
            return 41001
        record = self._tokens.get(token)
        if record is None:
            return 40001
        now = self.clock()
        # Death is checked before expiry: a token replaced and past its grace is "not latest"
        # (40001) even once its natural lifetime is also over.
        if now >= record.dies_at:
            return 40001
        if now >= record.expires_at:
            return 42001
        return 0

    def _handle_token(self, request: Request) -> dict:
        query = request.query
        appid = query.get("appid", "")
        error = self._check_credentials(
            query.get("grant_type"), "client_credential", appid, query.get("secret", ""), 40001
        )
        if error is not None:
            return error
        # "The previous access_token stays valid for 5 minutes after a new one is fetched."
        # https://mp.weixin.qq.com/debug/minigame/dev/api-backend/auth.getAccessToken.html
        now = self.clock()
        previous = self._classic.get(appid)
        if previous is not None:
            previous.kill(now + self.grace)
        record = self._mint(appid, "classic", now)
        self._classic[appid] = record
        return {"access_token": record.value, "expires_in": self.expires_in}

    def _handle_stable_token(self, request: Request) -> dict:
        body = request.body
        if not isinstance(body, dict):
            return _error(47001)
        appid = body.get("appid", "")
        error = self._check_credentials(
            body.get("grant_type"), "client_credential", appid, body.get("secret", ""), 40001
        )
        if error is not None:
            return error
        now = self.clock()
        current = self._stable.get(appid)
        alive = current is not None and now < current.dies_at

        # The documented type is boolean; we refuse to read "true" or 1 as true, so a client
        # that sends the wrong type gets normal mode and its test notices.
        if body.get("force_refresh") is True:
            # "Calls less than 30 s apart do not refresh": the current token comes back.
            last = self._last_force.get(appid)
            if alive and last is not None and now - last < self.force_refresh_interval:
                return self._stable_answer(current, now)
            day = (appid, int((now + DAY_OFFSET) // 86400))
            if self._force_counts[day] >= self.force_refresh_limit:
                return _error(45009)
            self._force_counts[day] += 1
            self._last_force[appid] = now
            if current is not None:
                current.kill(now + self.force_refresh_grace)
            record = self._mint(appid, "stable", now)
            self._stable[appid] = record
            return self._stable_answer(record, now)

        # Normal mode: the same token while it has more than the window left, so concurrent
        # workers never invalidate each other; then a new one, the old living to its expiry.
        if alive and now < current.expires_at - self.stable_refresh_window:
            return self._stable_answer(current, now)
        record = self._mint(appid, "stable", now)
        self._stable[appid] = record
        return self._stable_answer(record, now)

    def _stable_answer(self, record: _Token, now: float) -> dict:
        # The same token comes back with the time it has left, not the full lifetime.
        return {"access_token": record.value, "expires_in": int(record.expires_at - now)}

    def _business_error(self, request: Request):
        """The token and body-shape checks every business API makes first."""
        errcode = self._check_token(request.query.get("access_token"))
        if errcode == 0 and self.reject_all_tokens:
            errcode = 40001
        if errcode:
            return _error(errcode)
        if not isinstance(request.body, dict):
            return _error(47001)
        if not _nonempty_str(request.body.get("touser")):
            return _error(40003)
        return None

    def _handle_custom_send(self, request: Request) -> dict:
        error = self._business_error(request)
        if error is not None:
            return error
        body = request.body
        msgtype = body.get("msgtype")
        if msgtype not in CUSTOM_MSGTYPES:
            return _error(40008)
        payload = body.get(msgtype)
        if not isinstance(payload, dict):
            return _error(47001)
        if msgtype == "text" and not _nonempty_str(payload.get("content")):
            return _error(44004)
        for field in CUSTOM_MSGTYPES[msgtype]:
            if not _nonempty_str(payload.get(field)):
                return _error(47001)
        self._custom_messages.append(body)
        return _error(0)

    def _handle_typing(self, request: Request) -> dict:
        error = self._business_error(request)
        if error is not None:
            return error
        if request.body.get("command") not in TYPING_COMMANDS:
            return _error(45072)
        self._typing_commands.append(request.body)
        return _error(0)

    def _handle_subscribe_send(self, request: Request) -> dict:
        error = self._business_error(request)
        if error is not None:
            return error
        body = request.body
        if not _nonempty_str(body.get("template_id")):
            return _error(40037)
        data = body.get("data")
        if not isinstance(data, dict) or not data:
            return _error(47003, "argument invalid! data is empty")
        for keyword, item in data.items():
            if not isinstance(item, dict) or not _nonempty_str(item.get("value")):
                return _error(47003, f"argument invalid! data.{keyword}.value is empty")
        state = body.get("miniprogram_state", "formal")
        if state not in MINIPROGRAM_STATES:
            return _error(47003, "argument invalid! miniprogram_state")
        if body.get("lang", "zh_CN") not in LANGS:
            return _error(47003, "argument invalid! lang")
        self._subscribe_messages.append(body)
        self._next_msgid += 1
        answer = _error(0)
        answer["msgid"] = self._next_msgid
        return answer

    def _handle_media_upload(self, request: Request) -> dict:
        errcode = self._check_token(request.query.get("access_token"))
        if errcode == 0 and self.reject_all_tokens:
            errcode = 40001
        if errcode:
            return _error(errcode)
        if request.query.get("type") not in MEDIA_TYPES:
            return _error(40004)
        form = request.body
        if isinstance(form, MultipartError):
            return _error(41005, f"media data missing ({form})")
        part = form.get("media") if isinstance(form, dict) else None
        # curl -F media=@file, the documented call, sends a file name and a content type.
        if part is None or not part.filename or not part.content_type or not part.data:
            return _error(41005)
        media_id = "fake_media_" + secrets.token_urlsafe(48)
        self._uploads.append({"media_id": media_id, "type": request.query["type"],
                              "filename": part.filename, "content_type": part.content_type,
                              "data": part.data})
        return {"errcode": 0, "errmsg": "ok", "type": request.query["type"],
                "media_id": media_id, "created_at": int(self.clock())}

    def _handle_code2session(self, request: Request) -> dict:
        query = request.query
        appid = query.get("appid", "")
        error = self._check_credentials(
            query.get("grant_type"), "authorization_code", appid, query.get("secret", ""),
            40125,
        )
        if error is not None:
            return error
        js_code = query.get("js_code")
        if not js_code:
            return _error(41008)
        code = self._codes.get(js_code)
        if code is None or (code.appid is not None and code.appid != appid):
            return _error(40029)
        # A used code stays "used" even after its lifetime, as that is the likelier mistake
        # (a client retrying an exchange that already succeeded).
        if code.used:
            return _error(40163)
        if self.clock() >= code.expires_at:
            return _error(40029)
        code.used = True
        answer = {"openid": code.openid, "session_key": code.session_key}
        if code.unionid is not None:
            answer["unionid"] = code.unionid
        return answer


_ROUTES = {
    TOKEN_PATH: ("GET", FakeWeChat._handle_token),
    STABLE_TOKEN_PATH: ("POST", FakeWeChat._handle_stable_token),
    CUSTOM_SEND_PATH: ("POST", FakeWeChat._handle_custom_send),
    TYPING_PATH: ("POST", FakeWeChat._handle_typing),
    SUBSCRIBE_SEND_PATH: ("POST", FakeWeChat._handle_subscribe_send),
    CODE2SESSION_PATH: ("GET", FakeWeChat._handle_code2session),
    MEDIA_UPLOAD_PATH: ("POST", FakeWeChat._handle_media_upload),
}


# Stands for the credential the 开放接口服务 sidecar adds; compared by identity, so no string a
# client sends can be it.
_SIDECAR_CREDENTIAL = object()


def _error(errcode: int, errmsg: str | None = None) -> dict:
    return {"errcode": errcode, "errmsg": errmsg if errmsg is not None else ERRMSGS[errcode]}


def _nonempty_str(value) -> bool:
    return isinstance(value, str) and value != ""


def _normal_path(path: str) -> str:
    return "/" + path.lstrip("/")


def _b64_16() -> str:
    return base64.b64encode(secrets.token_bytes(16)).decode("ascii")


###############################################################################################
# HTTP handler ################################################################################
###############################################################################################


class _Server(http.server.ThreadingHTTPServer):
    # Handler threads are daemons and server_close() must not join them: a hung handler
    # would otherwise hold stop() for as long as it sleeps.
    daemon_threads = True
    block_on_close = False
    # socketserver's default backlog of 5 resets the 6th simultaneous client; the tests open
    # dozens at once, as a gateway's threads would against the real API.
    request_queue_size = 128
    fake = None

    def handle_error(self, request, client_address):
        # Errors inside a handler are recorded by the handler itself; what reaches here is a
        # client that went away (a timeout test), which is not worth a traceback on stderr.
        pass


class _Handler(http.server.BaseHTTPRequestHandler):
    """Turns HTTP into :class:`Request` tuples for the fake, and its answers into JSON."""

    # A client that connects and never sends should not pin a thread for ever.
    timeout = 10
    server_version = "FakeWeChat/1.0"

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def _serve(self, method: str) -> None:
        fake = self.server.fake
        split = urllib.parse.urlsplit(self.path)
        query = {
            name: values[0]
            for name, values in urllib.parse.parse_qs(split.query, keep_blank_values=True).items()
        }
        request = Request(method, split.path, query, self._read_body())
        try:
            hang, failure = fake._begin(request)
            if hang is not None and fake._stopping.wait(hang):
                # stop() was called while we slept: leave without an answer, as a server
                # going down would.
                self.close_connection = True
                return
            if failure is not None:
                status, errcode, errmsg = failure
                self._send(status, {"errcode": errcode, "errmsg": errmsg})
                return
            status, body, headers = fake._dispatch_with_headers(request)
        except Exception as exc:  # a bug in the fake: make it visible to the test
            fake._record_error(exc)
            status, body = 500, {"errcode": 500, "errmsg": f"fake wechat bug: {exc!r}"}
            headers = ()
        self._send(status, body, headers)

    def _read_body(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length <= 0:
            return None
        raw = self.rfile.read(min(length, MAX_BODY_BYTES))
        content_type = self.headers.get("Content-Type", "")
        if content_type.lower().startswith("multipart/"):
            try:
                return parse_multipart(content_type, raw)
            except (MultipartError, UnicodeDecodeError) as exc:
                return MultipartError(str(exc))
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None

    def _send(self, status: int, body, headers=()) -> None:
        if isinstance(body, bytes):  # a proxy's page (the sidecar's 502), not WeChat's JSON
            data, content_type = body, "text/html"
        else:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            # The parameter is "encoding", not "charset", in captured answers from
            # api.weixin.qq.com (unverified); a client must not depend on either.
            content_type = "application/json; encoding=utf-8"
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (timeout tests); WeChat would not care either.
            self.close_connection = True

    def log_message(self, format, *args):
        # Quiet: one line per request on stderr would bury test output.
        pass
