"""wxgate: the push endpoint of a WeChat Mini Program, as one WSGI module.

WeChat pushes customer-service messages and events to a URL of yours. wxgate answers the URL
verification handshake, checks signatures, decrypts and encrypts in the three modes (plaintext,
compatible, safe), reads and writes XML and JSON, drops WeChat's retried duplicates, calls your
handler, and replies inside WeChat's 5-second window. It also owns the access_token and the
backend API calls that need it.

Two commands on a fresh machine, in a checkout (each makes a virtual environment first)::

    python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/wxgate serve example.ini
    python3 -m venv .venv && .venv/bin/pip install '.[test]' && .venv/bin/python -m pytest

Under a real server (several workers share what they remember through ``store = sqlite:///...``
or ``redis://...`` in the ini; the docs/ pages say more)::

    WXGATE_CONFIG=/etc/wxgate.ini gunicorn -w 4 wxgate:application
    # mod_wsgi:  WSGIScriptAlias / /path/to/wxgate.py   and   SetEnv WXGATE_CONFIG /etc/wxgate.ini

The module is cut into sections, each using only those above it (``grep -n '^# .* ####'
wxgate.py`` lists them). The core is all a push needs, and nothing in it reaches below the
boundary at import time or by a private attribute:

    Limits and constants      every number WeChat or we impose, with its reason
    Errors                    WxgateError and its kin; redacting secrets and log values
    Configuration objects     the frozen Config and AppConfig
    Configuration values      checks of tokens, appids, handlers, store URLs, listen
    Configuration parser      the ini file, ${VAR} expansion, load_config
    Signatures and crypto     SHA-1 signatures, the AES envelope, the key-rotation rule
    Push parsing              format sniffing, hardened XML and JSON
    Message and replies       Message, its dedup key, RawReply, the reply on the wire
    Push verification         query, headers, body and time in; a verified push or a
                              refusal out: every mode, format, bind and sealed refusal
    Stores                    the Store interface, the memory store, counts' totals
    Sqlite store              one file that a host's processes share
    Redis store               shared by every host; open_store picks a store by URL
    Store fallback            a shared store's outage policy
    Duplicate detection       WeChat's retries: claims, waiting, recorded answers
    Delivery                  the handler call, the forward backend, the backend document
    Metrics                   Prometheus counters and histograms, added up across
                              processes in a shared store
    Logs                      the push line, rate-limited lines, one-time notices, logging
    Admin endpoints           healthz, metrics, the admin token endpoint
    Process lifecycle         delivery threads, CGI and several-worker warnings
    Reading requests          the query string and body out of environ
    WSGI application          routing and the pipeline: Gateway, make_app, application

Below the boundary, the optional parts, used only when asked for (an app's API client is
made on its first API call, the queue and its worker only for delivery = queue): WeChat HTTP,
access_token (TokenManager), WeChat API client (WeChatClient), Router, Durable queue,
Delivery worker, Push simulator (Simulator), Fake WeChat API (FakeAPI), Dev server and
demo handler, and the command line (``wxgate``): acting as WeChat (push, handshake,
decrypt), then the rest and ``main``.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = [
    "application",
    "make_app",
    "load_config",
    "Config",
    "AppConfig",
    "Gateway",
    "Message",
    "RawReply",
    "WxgateError",
    "ConfigError",
    "SignatureError",
    "ReplayError",
    "DecryptError",
    "MessageError",
    "PayloadTooLarge",
    "WeChatAPIError",
    "WeChatConnectionError",
    "Store",
    "MemoryStore",
    "SqliteStore",
    "RedisStore",
    "open_store",
    "TokenManager",
    "WeChatClient",
    "Router",
    "Simulator",
    "FakeAPI",
    "sign",
    "check_signature",
    "encrypt_message",
    "decrypt_message",
    "demo_handler",
    "main",
]

import atexit
import base64
import binascii
import bisect
import collections
import collections.abc
import configparser
import functools
import hashlib
import hmac
import importlib
import io
import itertools
import json
import logging
import os
import re
import sqlite3
import struct
import sys
import threading
import time
import types
import weakref
from typing import Any, BinaryIO, Callable, Iterator, Mapping, TypeVar
from xml.parsers import expat

try:  # The only third-party import, and only encrypted apps need it.
    from Crypto.Cipher import AES as _AES
except ImportError:  # pragma: no cover - exercised by the "no pycryptodome" test in a subprocess
    try:  # Debian's python3-pycryptodome installs the same library as "Cryptodome"
        from Cryptodome.Cipher import AES as _AES  # type: ignore[no-redef]
    except ImportError:
        _AES = None  # type: ignore[assignment]  # _require_aes() says what to install

logger = logging.getLogger("wxgate")


###############################################################################
# Limits and constants ########################################################
###############################################################################

# WeChat waits 5 s for the passive reply, then retries (the retry count is unverified).
# https://developers.weixin.qq.com/miniprogram/dev/framework/open-ability/customer-message/receive.html
REPLY_DEADLINE = 5.0
# A claim on a dedup key lives this long unless its owner, alive and still working, renews it
# every CLAIM_RENEW_EVERY seconds. A worker killed mid-handler thus holds up WeChat's retries
# for at most CLAIM_TTL, well inside their 5-second wait, and the retry runs the handler.
CLAIM_TTL = 3.0
CLAIM_RENEW_EVERY = 0.5
# A delivery that takes over a claim (its owner was killed, stalled, or failed) runs the
# handler only with at least this share of the reply deadline left: 1.5 s of WeChat's 5.
# With less, the reply would arrive after WeChat stopped waiting, and a stalled owner may
# yet finish too, so the handler would run twice for nothing. A killed owner's claim lapses
# at most CLAIM_TTL after a retry arrives, which leaves that retry 2 s: enough.
TAKEOVER_ROOM = 0.3
# WeChat pads to 32 bytes, not AES's 16: the doc's own safe-mode push ends in 19 pad bytes.
PKCS7_BLOCK = 32
# random (16) + msg_len (4): the shortest buffer that can hold an (empty) message.
MIN_BUFFER_BYTES = 20
RANDOM_PREFIX_BYTES = 16
ENCODING_AES_KEY_LENGTH = 43

DEFAULT_API_BASE = "https://api.weixin.qq.com"
DEFAULT_TIMESTAMP_WINDOW = 300
# A timestamp may be this far ahead of our clock, however wide the window: the window's
# past side covers network delay and WeChat's retries (which keep the first timestamp), the
# future side only clock skew, and NTP keeps that under a second. A push stamped ahead
# would otherwise stay valid for twice the window.
MAX_CLOCK_AHEAD = 60
# Handled pushes and signed queries are remembered this long past the end of their window,
# for the clocks of several workers that differ slightly.
REMEMBER_MARGIN = 10.0
_WINDOW_OFF = ("timestamp_window = 0 turns the replay check off: a captured push is handled "
               "again once dedup_ttl has passed, for ever")
DEFAULT_MAX_BODY_BYTES = 65536
DEFAULT_DEDUP_SIZE = 10000
DEFAULT_DEDUP_TTL = 300
# An API call must fit inside the 5-second push window, with room for the handler's own work.
DEFAULT_API_TIMEOUT = 3.0
# stable_token hands out a new token once the old one is 5 minutes from expiry, both valid
# during that overlap; refreshing 300 s early lands exactly in it.
DEFAULT_REFRESH_MARGIN = 300.0
# force_refresh calls less than 30 s apart do not refresh.
# https://developers.weixin.qq.com/doc/service/api/base/api_getstableaccesstoken
STABLE_FORCE_GAP = 30.0
# After a wrong AppSecret (40001 from the token endpoint) or an exhausted quota (45009), every
# push would otherwise ask again; the same error is raised for this long instead.
FAILED_FETCH_PAUSE = 60.0
DEFAULT_ADMIN_PATH = "/_wxgate"
# admin_secret is the bearer secret that hands out every app's access_token, and the
# endpoint takes guesses from anyone who reaches it: a short one could be found by trying.
MIN_ADMIN_SECRET_CHARS = 16
# `wxgate serve` gives a client this long to send its whole request (line, headers, body):
# WeChat sends a few kilobytes at once, and a client trickling bytes would hold a thread and
# its descriptors for as long as it liked.
DEFAULT_READ_TIMEOUT = 10.0
DEFAULT_LISTEN = "127.0.0.1:8080"

# Business APIs answer these when the token is dead, replaced or expired.
TOKEN_REJECTED_ERRCODES = frozenset({40001, 40014, 42001})
# On the token endpoints themselves these mean the credentials are wrong: never retry.
CREDENTIAL_ERRCODES = frozenset({40001, 40013, 40125})
BUSY_ERRCODE = -1
# "-1 system busy" gets a short bounded backoff; the sum stays well inside the push window.
BUSY_BACKOFF = (0.2, 0.5)
# An upload's multipart boundary: RFC 2046 allows 70 characters; 32 random hex digits do
# not occur in a file by chance, and the encoder checks anyway.
MULTIPART_BOUNDARY_BYTES = 16

# Nested elements deeper than this are refused: WeChat's deepest push (wxa_media_check) has 3.
MAX_XML_DEPTH = 16
# WeChat sends no attributes. Small ones are ignored (leniently); huge or numerous ones are
# an attack, refused like a DOCTYPE.
MAX_XML_ATTRIBUTES = 16
MAX_XML_ATTRIBUTE_CHARS = 1024
# After a shared store fails, calls skip it for this long before trying it again.
STORE_RETRY_AFTER = 2.0
# How long the health check's own write lives: it only proves the store can be written.
HEALTH_TTL = 60.0
# The health check writes at most this often; between two writes it answers what the store's
# latest write said. Anyone may call it, and each write takes sqlite's write lock that every
# push needs (or a connect timeout while Redis is blackholed): a flood of probes must not
# compete with pushes. Load balancers probe every few seconds, so the answer is as fresh.
HEALTH_CHECK_EVERY = 1.0
# How often a process waiting on another process's work looks at the shared store again.
POLL_INTERVAL = 0.02
# How often a process asks a shared store whether it still holds what it held: one Redis GET
# or one stat() of the sqlite file a second, on the way of a push (and at each health
# check). A Redis restarted without persistence, or a database file deleted under the
# gateway, is then noticed within a second of the next push.
STORE_VERIFY_EVERY = 1.0
# With a shared store, each process adds what it counted to the metrics' totals there at most
# this often, from a thread of its own: how far a scrape may lag behind the pushes answered,
# and what a process killed outright loses. A push never waits on that write.
METRICS_FLUSH_EVERY = 1.0

DEFAULT_FORWARD_TIMEOUT = 4.0
# A forward backend's answer is read up to this size. A longer one is the backend's error,
# never sent cut: a cut JSON document, UTF-8 character or fixed reply is not the reply.
MAX_BACKEND_REPLY_BYTES = 1 << 20
# The longest Content-Type a reply may carry. RFC 6838 gives a type and a subtype 127
# characters each; a charset or a boundary parameter fits in what is left.
MAX_CONTENT_TYPE_CHARS = 256
# Defaults of the queue's retry schedule: 1 s, 2 s, 4 s ... capped at 5 minutes, 10 attempts;
# each delay is then jittered by 0.5x to 1.5x.
DEFAULT_MAX_ATTEMPTS = 10
DEFAULT_RETRY_BASE = 1.0
DEFAULT_RETRY_MAX = 300.0
# A claimed message not acknowledged within this long is delivered again (its worker died).
DEFAULT_VISIBILITY_TIMEOUT = 60.0
# How long a delivered message's key is kept, so a re-delivery skips the handler.
DONE_TTL = 86400.0
# A queued message whose delivery was cut off this many times (its worker killed or crashed
# mid-delivery each time: a handler that exhausts memory, an OOM killer) goes to the dead
# letters. Cut-off attempts do not count as attempts, since the backend may have taken the
# message, so without this bound such a message is retried for ever; five leaves room for
# a deploy or two that stop workers mid-delivery.
MAX_CUT_OFFS = 5

# Message types and events named in WeChat's docs; others count as "other".
_KNOWN_TYPES = frozenset({
    "text", "image", "miniprogrampage", "event", "user_enter_tempsession", "debug_demo",
    "wxa_media_check", "subscribe_msg_popup_event", "subscribe_msg_change_event",
    "subscribe_msg_sent_event", "trade_manage_remind_access_api", "trade_manage_remind_shipping",
    "trade_manage_order_settlement", "add_express_path", "xpay_goods_deliver_notify",
    "xpay_coin_pay_notify", "xpay_refund_notify", "xpay_complaint_notify",
    "secvod_upload_event", "secvod_audit_event",
    "open_product_order_pay", "wxa_nickname_audit", "wxa_privacy_apply", "wxa_category_audit",
    "wxa_illegal_record", "wxa_appeal_record"})
FORMATS = ("auto", "xml", "json")
MODES = ("safe", "compat", "plain", "cloud")
# "cloud": Cloud Hosting's 开放接口服务 sidecar adds the credential; wxgate holds no token.
TOKEN_GRANTS = ("stable", "classic", "cloud")
# A refusal of a request that proved nothing (no valid signature, a Cloud Hosting push, a
# wrong admin secret) is logged at most REFUSAL_LOG_BURST times per app in each
# REFUSAL_LOG_WINDOW seconds: anyone can send them, and 20,000 such requests made 18,000
# WARNING lines. wxgate_refused_total still counts every one, and a signed push's refusal
# is always logged.
REFUSAL_LOG_BURST = 10
REFUSAL_LOG_WINDOW = 60.0
# A push that only previous_encoding_aes_key opens is logged at most this often per app:
# enough for the operator to see that the console still uses the old key, not a line a push.
PREVIOUS_KEY_WARN_EVERY = 60.0

# The return codes of WeChat's official WXBizMsgCrypt sample, which its docs quote.
# https://developers.weixin.qq.com/doc/oplatform/developers/dev/push/encryption.md
VALIDATE_SIGNATURE_ERROR = -40001
PARSE_ERROR = -40002
ILLEGAL_AES_KEY = -40004
VALIDATE_APPID_ERROR = -40005
DECRYPT_AES_ERROR = -40007
ILLEGAL_BUFFER = -40008
DECODE_BASE64_ERROR = -40010
GEN_RETURN_ERROR = -40011


###############################################################################
# Errors ######################################################################
###############################################################################

# The default of ``WxgateError(code=...)``: the class's own code (None is a real choice).
_CLASS_CODE: Any = object()


class WxgateError(Exception):
    """The root of wxgate's errors: a short message, the HTTP status to answer, WeChat's code.

    :param message: what is wrong, where, and how to fix it; never a secret's value.
    :param status: the HTTP status a request that caused it gets.
    :param code: WeChat's official -400xx code, when one applies.
    """

    status: int = 400
    code: int | None = None

    def __init__(self, message: str, *, status: int | None = None,
                 code: int | None = _CLASS_CODE) -> None:
        # ``code=None`` means "no code", not "the class's": a missing msg_signature is a
        # MessageError but no -40002, and must not say so in the body, the log or a metric.
        if code is not _CLASS_CODE:
            self.code = code
        if status is not None:
            self.status = status
        if self.code is not None and "(WeChat " not in message:
            message = f"{message} (WeChat {self.code})"
        super().__init__(message)
        self.message: str = message


class ConfigError(WxgateError):
    """The ini file is missing, unreadable or holds a bad value; raised when it loads."""

    status = 500

    def __init__(self, message: str, *, source: str | None = None, section: str | None = None,
                 option: str | None = None, lineno: int | None = None,
                 code: int | None = _CLASS_CODE) -> None:
        where = " ".join(
            part for part in (
                f"{source}:{lineno}" if source and lineno else source,
                f"[{section}]" if section else None,
                f"{option}:" if option else None,
            ) if part
        )
        super().__init__(f"{where} {message}" if where else message, code=code)
        self.source, self.section, self.option, self.lineno = source, section, option, lineno


class SignatureError(WxgateError):
    """``signature`` or ``msg_signature`` does not match: the request is not from WeChat."""

    status = 403
    code = VALIDATE_SIGNATURE_ERROR


class ReplayError(WxgateError):
    """The request's ``timestamp`` is outside the configured window around our clock."""

    status = 403


class DecryptError(WxgateError):
    """The ``Encrypt`` field cannot be decrypted into a message for this app."""

    code = ILLEGAL_BUFFER


class MessageError(WxgateError):
    """The body (or the decrypted content) is not a push we can read."""

    code = PARSE_ERROR


class PayloadTooLarge(WxgateError):
    """The body is longer than ``max_body_bytes``."""

    status = 413


class WeChatAPIError(WxgateError):
    """WeChat's API answered with a non-zero ``errcode``.

    :param errcode: WeChat's integer errcode (40001, 45009, -1, ...).
    :param errmsg: WeChat's errmsg, or our explanation of it.
    """

    status = 502

    def __init__(self, errcode: int, errmsg: str = "") -> None:
        self.errcode = errcode
        self.errmsg = errmsg
        super().__init__(f"WeChat API error {errcode}: {errmsg}")


class WeChatConnectionError(WxgateError):
    """WeChat's API could not be reached, timed out, or answered something that is not JSON.

    :ivar http_status: the HTTP status it answered, when it answered one (else None).
    """

    status = 502
    http_status: int | None = None


def _redact(value):
    """Name a secret without showing it: only whether it is set, and its length."""
    return "<unset>" if not value else f"<{len(value)} chars>"


def _redact_url(url):
    """A URL fit to print: its userinfo shown as ``***@``, its query and fragment dropped.

    The one way wxgate names a URL (store, forward, api_base, --url). The userinfo ends at
    the *last* ``@``: redis-py takes raw passwords, so ``redis://:p@ss/w0rd@host/0`` is a
    password ``p@ss/w0rd``, and a ``/``, ``#``, ``?`` or ``:`` may come before the host.
    """
    scheme, separator, rest = str(url).partition("://")
    if not separator:
        return "<not a URL>"
    # XXX: an "@" in a path or query without userinfo also hides the host; better that
    # than printing half a password.
    userinfo, at, rest = rest.rpartition("@")
    rest = re.split(r"[?#]", rest, maxsplit=1)[0]
    return f"{scheme}://{'***@' if at else ''}{rest}"


# What ends or rewrites a line in a log reader: C0 controls (CR, LF, and the separators
# str.splitlines() also breaks on), DEL, C1 controls (NEL) and Unicode's line and paragraph
# separators.
_UNLOGGABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _loggable(value):
    """``value`` fit to be a log call's argument: a string's control characters escaped as
    ``repr`` writes them (``\\n``, ``\\x85``), the rest left as it is.

    Every value a request carries (a pushed MsgType, MsgId or sender, a path) goes through it
    before it reaches a log call: a newline in a pushed field would otherwise write a line of
    its own, a forged ``ERROR`` among them, and the formatter is the deployer's, so the
    message itself must hold no line break. Text without control characters, the usual
    case, is returned as it is after one ``isprintable()``.
    """
    if not isinstance(value, str) or value.isprintable():
        return value
    return _UNLOGGABLE.sub(lambda match: repr(match.group())[1:-1], value)


###############################################################################
# Configuration objects #######################################################
###############################################################################

_REQUIRED = object()  # a record field without a default


class _DataclassFields:
    """A record's ``__dataclass_fields__``, made on first use from its ``_defaults``.

    Tests and tools call ``dataclasses.replace``, ``fields`` and ``asdict`` on the records;
    but the dataclasses module imports ``inspect``, and every CGI push would pay for both at
    import for what only they use.
    """

    def __get__(self, instance, cls):
        import dataclasses
        specs = []
        for name, default in cls._defaults.items():
            shown = name not in cls._secret
            if default is _REQUIRED:
                field = dataclasses.field(repr=shown)
            elif isinstance(default, dict):
                field = dataclasses.field(default_factory=dict, repr=shown)
            else:
                field = dataclasses.field(default=default, repr=shown)
            specs.append((name, cls.__annotations__.get(name, "object"), field))
        fields = dataclasses.make_dataclass(cls.__name__, specs).__dataclass_fields__
        setattr(cls, "__dataclass_fields__", fields)  # the class's own, from now on
        return fields


class _Record:
    """A frozen record: made by keyword (or by position, in field order), compared and
    hashed by its values, pickled and copied like a dataclass, and shown by ``repr()``
    without its secrets.

    A subclass lists its fields in ``__slots__`` and ``_defaults`` (``{name: default}``,
    ``_REQUIRED`` for none; a dict default is copied for each record) and the fields
    ``repr()`` leaves out in ``_secret``.
    """

    __slots__ = ()
    _defaults: dict[str, Any] = {}
    _secret: frozenset[str] = frozenset()
    __dataclass_fields__ = _DataclassFields()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kind, fields = type(self).__name__, self._defaults
        if len(args) > len(fields):
            raise TypeError(f"{kind}() takes {len(fields)} fields, {len(args)} given")
        given = dict(zip(fields, args))
        for name, value in kwargs.items():
            if name not in fields:
                raise TypeError(f"{kind}() got an unexpected keyword argument {name!r}")
            if name in given:
                raise TypeError(f"{kind}() got multiple values for argument {name!r}")
            given[name] = value
        for name, default in fields.items():
            value = given.get(name, default)
            if value is _REQUIRED:
                raise TypeError(f"{kind}() missing required argument {name!r}")
            if value is default and isinstance(default, dict):
                value = {}
            object.__setattr__(self, name, value)

    def _values(self):
        return tuple(getattr(self, name) for name in self._defaults)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: {type(self).__name__} is "
                             "frozen")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: {type(self).__name__} is "
                             "frozen")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == tuple(getattr(other, name) for name in self._defaults)

    def __hash__(self) -> int:
        return hash(self._values())

    def __reduce__(self):
        return type(self), self._values()

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._defaults
                          if name not in self._secret)
        return f"{type(self).__name__}({shown})"


class AppConfig(_Record):
    """One ``[app:NAME]`` section: a mini program served by this gateway.

    Attributes keep the ini keys' spelling. Secrets are left out of ``repr()``.
    """

    name: str
    path: str
    appid: str
    token: str
    mode: str
    format: str
    encoding_aes_key: str
    appsecret: str
    handler: Callable[[Message], Any] | None
    handler_spec: str
    token_grant: str
    token_refresh_margin: float
    forward: str
    forward_secret: str
    forward_timeout: float
    delivery: str
    queue_max_attempts: int
    queue_retry_base: float
    queue_retry_max: float
    dedup_ttl: float | None  # None: the gateway's [wxgate] dedup_ttl
    previous_encoding_aes_key: str
    cloud_source_check: bool
    _keys: tuple[bytes | None, bytes | None]

    _defaults = {
        "name": _REQUIRED, "path": _REQUIRED, "appid": _REQUIRED, "token": _REQUIRED,
        "mode": "safe", "format": "auto", "encoding_aes_key": "", "appsecret": "",
        "handler": None, "handler_spec": "", "token_grant": "stable",
        "token_refresh_margin": DEFAULT_REFRESH_MARGIN, "forward": "", "forward_secret": "",
        "forward_timeout": DEFAULT_FORWARD_TIMEOUT, "delivery": "sync",
        "queue_max_attempts": DEFAULT_MAX_ATTEMPTS, "queue_retry_base": DEFAULT_RETRY_BASE,
        "queue_retry_max": DEFAULT_RETRY_MAX, "dedup_ttl": None,
        "previous_encoding_aes_key": "", "cloud_source_check": True,
    }
    # _keys: both keys decoded, on first use (Base64 on every push cost more than the rest
    # of its key handling); a record with a bad key raises on every use, as it always did.
    __slots__ = (*_defaults, "_keys")
    __match_args__ = tuple(_defaults)
    _secret = frozenset(("token", "encoding_aes_key", "appsecret", "forward_secret",
                         "previous_encoding_aes_key"))

    @property
    def aes_key(self) -> bytes | None:
        """The 32-byte AES key, or None in plain mode without a key."""
        try:
            return self._keys[0]
        except AttributeError:
            return self._decode_keys()[0]

    @property
    def previous_aes_key(self) -> bytes | None:
        """The previous key's 32 bytes while a key rotation is under way, else None."""
        try:
            return self._keys[1]
        except AttributeError:
            return self._decode_keys()[1]

    @property
    def aes_keys(self) -> tuple[bytes | None, bytes | None]:
        """``(aes_key, previous_aes_key)``, read at once (a push reads both)."""
        try:
            return self._keys
        except AttributeError:
            return self._decode_keys()

    def _decode_keys(self):
        current, previous = self.encoding_aes_key, self.previous_encoding_aes_key
        keys = (_decode_aes_key(current) if current else None,
                _decode_aes_key(previous) if previous else None)
        object.__setattr__(self, "_keys", keys)  # derived from the fields: still frozen
        return keys


class Config(_Record):
    """The whole gateway configuration, as checked by :func:`load_config`.

    :ivar source: the ini file it came from (for messages only).
    :ivar apps: ``{name: AppConfig}`` in file order.
    """

    source: str
    timestamp_window: int
    max_body_bytes: int
    dedup_size: int
    dedup_ttl: float
    api_base: str
    api_timeout: float
    store: str  # may hold a password: not in repr()
    store_prefix: str
    admin_secret: str
    admin_path: str
    listen: str
    log_format: str
    delivery_threads: int
    queue_visibility_timeout: float
    apps: dict[str, AppConfig]

    _defaults = {
        "source": "<config>", "timestamp_window": DEFAULT_TIMESTAMP_WINDOW,
        "max_body_bytes": DEFAULT_MAX_BODY_BYTES, "dedup_size": DEFAULT_DEDUP_SIZE,
        "dedup_ttl": DEFAULT_DEDUP_TTL, "api_base": DEFAULT_API_BASE,
        "api_timeout": DEFAULT_API_TIMEOUT, "store": "memory", "store_prefix": "wxgate",
        "admin_secret": "", "admin_path": DEFAULT_ADMIN_PATH, "listen": DEFAULT_LISTEN,
        "log_format": "text", "delivery_threads": 1,
        "queue_visibility_timeout": DEFAULT_VISIBILITY_TIMEOUT, "apps": {},
    }
    __slots__ = tuple(_defaults)
    __match_args__ = tuple(_defaults)
    _secret = frozenset(("store", "admin_secret"))


###############################################################################
# Configuration values ########################################################
###############################################################################

# WeChat's console takes a Token of 3 to 32 letters and digits.
_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9]{3,32}")
# An AppID, as the console shows it (开发管理 → 开发设置 → 开发者ID): "wx" and 16 lowercase
# hex digits, for mini programs, official accounts and third-party platforms alike.
_APPID_PATTERN = re.compile(r"wx[0-9a-f]{16}")


def _check_admin_secret(reader, secret):
    """``admin_secret``, unless it is short enough to guess; never echoed in errors."""
    if secret and len(secret) < MIN_ADMIN_SECRET_CHARS:
        raise reader.error("admin_secret", f"is {_redact(secret)}: use at least "
                           f"{MIN_ADMIN_SECRET_CHARS} random characters, as anyone who "
                           "reaches the admin endpoints may guess it (the token line of "
                           "`wxgate genkey` is 32 random ones)")
    return secret


def _check_token(reader, token):
    """The app's token, if WeChat's console could have made it; never echoed in errors.

    The console takes 3 to 32 letters and digits, so anything else is a copying mistake
    that would fail every signature: quotes kept from a shell or a YAML file, a space, a
    character lost or added.
    """
    if _TOKEN_PATTERN.fullmatch(token):
        return token
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "\"'":
        raise reader.error("token", "is in quotes: remove them (ini values take no quotes); "
                           "WeChat's tokens are 3 to 32 letters and digits")
    if not 3 <= len(token) <= 32:
        problem = f"got {len(token)} characters"
    elif any(character.isspace() for character in token):
        problem = "it has a space inside"
    else:
        problem = "it has characters other than letters and digits"
    raise reader.error("token", f"expected 3 to 32 letters and digits, as WeChat's console "
                       f"takes, but {problem}")


def _check_appid(reader, appid):
    """The app's AppID, if it has the console's shape; shown in errors, as it is no secret.

    A wrong AppID loads and then fails far away: every encrypted push with -40005, every
    token fetch with 40013. Its shape alone catches a truncated paste or a placeholder.
    """
    if _APPID_PATTERN.fullmatch(appid):
        return appid
    quoted = len(appid) >= 2 and appid[0] == appid[-1] and appid[0] in "\"'"
    fix = ": remove the quotes (ini values take no quotes)" if quoted else \
        " (开发管理 → 开发设置 → 开发者ID)"
    raise reader.error("appid", f"expected the console's AppID, 'wx' and 16 lowercase hex "
                       f"digits, got {appid!r}{fix}")


def _resolve_handler(spec, base_dir):
    """Import ``module:callable``; the ini file's directory is searched after ``sys.path``."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError("expected module:callable, e.g. mypkg.bot:on_message")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name.split(".")[0] or base_dir in sys.path:
            raise
        # Handlers usually sit beside the ini file; servers rarely start in that directory.
        sys.path.append(base_dir)
        module = importlib.import_module(module_name)
    target = module
    for part in attribute.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{spec} is not callable")
    return target


def _parse_store_url(url, base_dir="."):
    """Normalise ``memory``, ``sqlite://PATH`` or ``redis[s]://...``; raise ValueError if none."""
    if url == "memory":
        return url
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        if not path:
            raise ValueError("sqlite store needs a path: sqlite:///var/lib/wxgate/wxgate.db")
        return "sqlite://" + os.path.join(base_dir, path)
    if url.startswith(("redis://", "rediss://", "unix://")):
        _check_url_userinfo(url)
        return url
    shown = url.split("://")[0] if "://" in url else _redact(url)
    raise ValueError(f"expected memory, sqlite:///path/to/wxgate.db or redis://host:port/db, "
                     f"got {shown[:20]!r}")


def _check_url_userinfo(url):
    """Raise ValueError when a password or user name in ``url`` is not percent-encoded.

    redis-py reads a URL as urllib does: the host starts after the last ``@`` before the
    first ``/``, ``?`` or ``#``. A raw ``/`` in a password thus ends the host part early,
    and a raw ``@`` after it turns the rest of the password into the host:
    ``redis://:p@ss/w0rd@10.0.0.5/0`` connects to host ``ss`` (and asks DNS for it) on
    every store call and health check. So the text before the URL's last ``@`` must hold
    none of ``@/?#``. The message names the URL redacted, never the password.
    """
    userinfo = url.partition("://")[2].rpartition("@")[0]
    if any(character in userinfo for character in "@/?#"):
        raise ValueError(
            f"{_redact_url(url)!r}: the password (or user name) holds a raw '@', '/', '?' or "
            "'#', which would make part of it the host; percent-encode them (@ is %40, / is "
            "%2F, ? is %3F, # is %23), as in redis://:p%40ss%2Fword@10.0.0.5:6379/0")


def _parse_listen(listen):
    """``host:port`` → ``(host, port)``."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port such as 127.0.0.1:8080, got {listen!r}")
    return host.strip("[]"), int(port)


###############################################################################
# Configuration parser ########################################################
###############################################################################

_GATEWAY_OPTIONS = {
    "timestamp_window", "max_body_bytes", "dedup_size", "dedup_ttl", "api_base", "api_timeout",
    "store", "store_prefix", "admin_secret", "admin_path", "listen", "log_format",
    "delivery_threads", "queue_visibility_timeout",
}
_APP_OPTIONS = {
    "path", "appid", "appsecret", "token", "encoding_aes_key", "mode", "format", "handler",
    "token_grant", "token_refresh_margin", "forward", "forward_secret", "forward_timeout",
    "delivery", "queue_max_attempts", "queue_retry_base", "queue_retry_max", "dedup_ttl",
    "previous_encoding_aes_key", "cloud_source_check",
}
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Secrets that only the running gateway uses (the API, the admin endpoints, the backend):
# `wxgate handshake`, `push`, `decrypt` and `check` work without them, so on a host whose
# secrets live in a systemd EnvironmentFile they run from a plain shell.
_SERVER_SECRETS = frozenset({"appsecret", "admin_secret", "forward_secret"})
def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
                ) -> Config:
    """Read and check an ini file; return a :class:`Config`.

    :param path: the ini file. Relative ``sqlite://`` stores and handler modules are found
        next to it.
    :param environ: where ``${VAR}`` references are looked up; defaults to ``os.environ``.
    :raises ConfigError: the file is missing or unreadable, or a value is wrong; the message
        names the file, section and option, never a secret's value.
    """
    return _load_config(path, environ)


def _load_config(path, environ=None, unset=None):
    """:func:`load_config`; with an ``unset`` list, a secret only the server uses (see
    ``_SERVER_SECRETS``) may name an unset variable: it loads empty, and ``(section, option,
    variable)`` is appended to ``unset``. For the commands that need only the token and key.
    """
    environ = os.environ if environ is None else environ
    source = os.fspath(path)
    try:
        # utf-8-sig: Windows' Notepad starts a UTF-8 file with a BOM, which configparser
        # would read as part of the first line ("option before any [section]").
        with open(source, encoding="utf-8-sig") as file:
            text = file.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", source=source) from None
    except UnicodeDecodeError:
        raise ConfigError("config file is not UTF-8", source=source) from None
    return _parse_config(text, environ, source, unset=unset)


def _option_lines(text):
    """Map ``(section, option)`` to its line number, so errors can point at the line."""
    lines, section = {}, None
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("[") and "]" in stripped:
            section = stripped[1:stripped.index("]")].strip()
            lines.setdefault((section, None), lineno)
        elif section and stripped and stripped[0] not in ";#" and not line[0].isspace():
            name = re.split(r"[=:]", stripped, maxsplit=1)[0].strip().lower()
            lines.setdefault((section, name), lineno)
    return lines


def _expand_env(value, environ, where, unset=None):
    """Replace each ``${NAME}`` by the environment variable; anything else stays as written.

    A value left empty (or only spaces) by the expansion is an error, not an empty setting:
    ``token = ${WX_TOKEN}`` with ``WX_TOKEN=`` would otherwise let anyone sign pushes.
    With an ``unset`` list, a variable that is not set is appended to it and the value is
    ``""`` instead of an error.
    """
    if "${" not in value:
        return value
    names, missing = [], []

    def substitute(match):
        name = match.group(1)
        if name not in environ:
            if unset is None:
                raise ConfigError(f"environment variable {name} is not set", **where)
            missing.append(name)
            return ""
        names.append(name)
        return environ[name]

    expanded = _ENV_REFERENCE.sub(substitute, value)
    if missing:
        unset.extend(missing)
        return ""
    if names and not expanded.strip():
        which = ", ".join(dict.fromkeys(names))
        raise ConfigError(f"environment variable {which} is empty: set it, or remove the "
                          "option", **where)
    return expanded


class _SectionReader:
    """Typed, checked access to one ini section; every error names file, section and option."""

    def __init__(self, parser, section, environ, source, lines, unset=None):
        self.values = dict(parser.items(section)) if parser.has_section(section) else {}
        self.section, self.environ, self.source, self.lines = section, environ, source, lines
        self.unset = unset  # see _load_config

    def was_unset(self, option):
        """Whether ``option`` loaded empty because its variable is not set (see unset)."""
        return any(entry[:2] == (self.section, option) for entry in self.unset or ())

    def where(self, option):
        return {"source": self.source, "section": self.section, "option": option,
                "lineno": self.lines.get((self.section, option))}

    def error(self, option, message, code=_CLASS_CODE):
        return ConfigError(message, code=code, **self.where(option))

    def check_known(self, known):
        for option in self.values:
            if option not in known:
                import difflib
                close = difflib.get_close_matches(option, sorted(known), n=1)
                guess = f" did you mean {close[0]!r}?" if close else ""
                raise self.error(option, f"unknown option;{guess} the options of "
                                 f"[{self.section}] are {', '.join(sorted(known))}")

    def text(self, option, default=None, *, required=False):
        raw = self.values.get(option)
        if raw is None or raw.strip() == "":
            if required:
                raise self.error(option, "is required")
            return default
        if self.unset is None or option not in _SERVER_SECRETS:
            return _expand_env(raw.strip(), self.environ, self.where(option))
        missing = []
        value = _expand_env(raw.strip(), self.environ, self.where(option), missing)
        self.unset.extend((self.section, option, name) for name in missing)
        return value if value else default

    def number(self, option, default, *, kind=int, minimum=0, maximum=None):
        raw = self.text(option)
        if raw is None:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise self.error(option, f"expected a number, got {raw!r}") from None
        if value != value or value in (float("inf"), float("-inf")):  # nan, inf
            raise self.error(option, f"expected a finite number, got {raw!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise self.error(option, f"expected a number {bounds}, got {raw!r}")
        return value

    def choice(self, option, choices):
        value = self.text(option, choices[0]).lower()
        if value not in choices:
            raise self.error(option, f"expected one of {', '.join(choices)}, got {value!r}")
        return value


def _parse_config(text, environ, source="<config>", *, unset=None):
    """Build a :class:`Config` from ini text; pure apart from importing handler modules.

    :param unset: a list, to load with server-only secrets unset (see ``_load_config``).
    """
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=(";", "#"), default_section="\0none")
    try:
        parser.read_string(text, source=source)
    except (configparser.DuplicateOptionError, configparser.DuplicateSectionError) as exc:
        what = f"option {exc.option!r}" if getattr(exc, "option", None) else "section"
        raise ConfigError(f"{what} appears twice", source=source, section=exc.section,
                          option=getattr(exc, "option", None), lineno=exc.lineno) from None
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError("option before any [section]: start with [wxgate] or [app:NAME]",
                          source=source, lineno=exc.lineno) from None
    except configparser.ParsingError as exc:
        # Never quote the line: it may be "appsecret <the secret>" with its "=" missing.
        errors = getattr(exc, "errors", None)
        lineno = errors[0][0] if errors else None
        raise ConfigError("line is not 'option = value' (nor a [section] or a comment)",
                          source=source, lineno=lineno) from None
    except configparser.Error as exc:
        lineno = getattr(exc, "lineno", None)
        raise ConfigError(f"not a valid ini file ({type(exc).__name__})", source=source,
                          lineno=lineno) from None
    lines = _option_lines(text)
    base_dir = os.path.dirname(os.path.abspath(source)) if not source.startswith("<") else "."

    for section in parser.sections():
        if section != "wxgate" and not section.startswith("app:"):
            raise ConfigError("unknown section; expected [wxgate] or [app:NAME]",
                              source=source, section=section, lineno=lines.get((section, None)))

    gateway = _SectionReader(parser, "wxgate", environ, source, lines, unset)
    gateway.check_known(_GATEWAY_OPTIONS)
    api_base = gateway.text("api_base", DEFAULT_API_BASE).rstrip("/")
    if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", api_base):
        raise gateway.error("api_base", "expected an http:// or https:// URL, got "
                            f"{_redact_url(api_base)!r}")
    admin_path = "/" + gateway.text("admin_path", DEFAULT_ADMIN_PATH).strip("/")
    if admin_path == "/":
        raise gateway.error("admin_path", "must not be '/'; the default is /_wxgate")
    store = gateway.text("store", "memory")
    try:
        _parse_store_url(store, base_dir)
    except ValueError as exc:
        raise gateway.error("store", str(exc)) from None
    listen = gateway.text("listen", DEFAULT_LISTEN)
    try:
        _parse_listen(listen)
    except ValueError as exc:
        raise gateway.error("listen", str(exc)) from None

    apps, paths = {}, {}
    for section in parser.sections():
        if not section.startswith("app:"):
            continue
        app = _parse_app(_SectionReader(parser, section, environ, source, lines, unset),
                         base_dir)
        if app.path in paths:
            raise ConfigError(f"path {app.path!r} is already used by [app:{paths[app.path]}]",
                              **_SectionReader(parser, section, environ, source, lines)
                              .where("path"))
        if app.path == admin_path or app.path.startswith(admin_path + "/"):
            raise ConfigError(f"path {app.path!r} is inside admin_path {admin_path!r}",
                              source=source, section=section, option="path",
                              lineno=lines.get((section, "path")))
        paths[app.path] = app.name
        apps[app.name] = app
    if not apps:
        raise ConfigError("no [app:NAME] section: there is nothing to serve", source=source)
    visibility = gateway.number("queue_visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT,
                                kind=float, minimum=1)
    for app in apps.values():
        if app.delivery != "queue":
            continue
        where = {"source": source, "section": f"app:{app.name}", "option": "delivery",
                 "lineno": lines.get((f"app:{app.name}", "delivery"))}
        if store == "memory":
            raise ConfigError("delivery = queue needs a durable store, and memory is not: set "
                              "[wxgate] store = sqlite:///path/to/wxgate.db or redis://...",
                              **where)
        if app.forward and visibility <= app.forward_timeout:
            raise ConfigError(f"queue_visibility_timeout ({visibility:g} s) must exceed "
                              f"forward_timeout ({app.forward_timeout:g} s), or a slow "
                              "delivery is started twice", **where)

    return Config(
        source=source,
        timestamp_window=gateway.number("timestamp_window", DEFAULT_TIMESTAMP_WINDOW),
        max_body_bytes=gateway.number("max_body_bytes", DEFAULT_MAX_BODY_BYTES, minimum=1024),
        dedup_size=gateway.number("dedup_size", DEFAULT_DEDUP_SIZE, minimum=1),
        dedup_ttl=gateway.number("dedup_ttl", DEFAULT_DEDUP_TTL, kind=float, minimum=1),
        api_base=api_base,
        api_timeout=gateway.number("api_timeout", DEFAULT_API_TIMEOUT, kind=float,
                                   minimum=0.1, maximum=60),
        store=_parse_store_url(store, base_dir),
        store_prefix=gateway.text("store_prefix", "wxgate"),
        admin_secret=_check_admin_secret(gateway, gateway.text("admin_secret", "")),
        admin_path=admin_path,
        listen=listen,
        log_format=gateway.choice("log_format", ("text", "json")),
        delivery_threads=gateway.number("delivery_threads", 1, maximum=64),
        queue_visibility_timeout=visibility,
        apps=apps,
    )


def _parse_app(reader, base_dir):
    """Check one ``[app:NAME]`` section and return its :class:`AppConfig`."""
    name = reader.section[len("app:"):].strip()
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise reader.error(None, "app name must be letters, digits, '_', '.' or '-'")
    reader.check_known(_APP_OPTIONS)
    path = reader.text("path", required=True)
    if not path.startswith("/") or any(c.isspace() or c in "?#" for c in path):
        raise reader.error("path", f"expected a URL path such as /wechat, got {path!r}")
    mode = reader.choice("mode", MODES)
    encrypted = mode in ("safe", "compat")
    key = reader.text("encoding_aes_key", "")
    if encrypted and not key:
        raise reader.error("encoding_aes_key", f"is required in {mode} mode (43 characters "
                           "from the console's 消息推送 page)")
    # The key WeChat's console used before the current one, kept while the two cannot be
    # switched at the same instant (see Gateway._decrypt).
    previous = reader.text("previous_encoding_aes_key", "")
    for option, value in (("encoding_aes_key", key), ("previous_encoding_aes_key", previous)):
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            raise reader.error(option, "is in quotes: remove them (ini values take no "
                               "quotes); the console's EncodingAESKey is 43 letters and "
                               "digits", code=ILLEGAL_AES_KEY)
        if value:
            try:
                _decode_aes_key(value)
            except WxgateError as exc:
                reason = exc.message.split(" (WeChat")[0]
                if len(value) == ENCODING_AES_KEY_LENGTH + 1 and value.endswith("="):
                    # 32 bytes in Base64 are 44 characters, the last a "=" pad; the console
                    # shows the key without it, but a copy from another tool may keep it.
                    reason += ": the console's EncodingAESKey has no trailing '=' (drop it)"
                raise reader.error(option, reason, code=ILLEGAL_AES_KEY) from None
    if previous and not key:
        raise reader.error("previous_encoding_aes_key", "is set without encoding_aes_key: "
                           "the previous key only helps beside a current one")
    if encrypted and _AES is None:
        raise reader.error("mode", f"{mode} mode needs AES: pip install pycryptodome (or, for "
                           "Debian's system Python, apt-get install python3-pycryptodome)")
    # Cloud Hosting pushes come with no signature and no encryption: no token to check them
    # with, and no key (a token or key left in the section is not used).
    token = reader.text("token", "", required=mode != "cloud")
    if token:
        token = _check_token(reader, token)
    handler_spec = reader.text("handler", "")
    forward = reader.text("forward", "")
    if not handler_spec and not forward:
        raise reader.error("handler", "is required (module:callable), unless forward names "
                           "an HTTP backend")
    handler = None
    if handler_spec:
        try:
            handler = _resolve_handler(handler_spec, base_dir)
        except Exception as exc:  # a SyntaxError in the module, or one raised on import
            raise reader.error("handler", f"cannot load {handler_spec!r}: "
                               f"{type(exc).__name__}: {exc}") from None
    forward_secret = reader.text("forward_secret", "")
    if forward and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", forward):
        raise reader.error("forward", "expected an http:// or https:// URL, got "
                           f"{_redact_url(forward)!r}")
    if forward and not forward_secret and not reader.was_unset("forward_secret"):
        raise reader.error("forward_secret", "is required with forward: the backend checks "
                           "X-Wxgate-Signature with it (wxgate genkey prints a random one)")
    return AppConfig(
        name=name,
        path=path,
        appid=_check_appid(reader, reader.text("appid", required=True)),
        token=token,
        mode=mode,
        format=reader.choice("format", FORMATS),
        encoding_aes_key=key,
        previous_encoding_aes_key=previous,
        appsecret=reader.text("appsecret", ""),
        handler=handler,
        handler_spec=handler_spec,
        token_grant=reader.choice("token_grant", TOKEN_GRANTS),
        token_refresh_margin=reader.number("token_refresh_margin", DEFAULT_REFRESH_MARGIN,
                                           kind=float, maximum=3600),
        forward=forward,
        forward_secret=forward_secret,
        forward_timeout=reader.number("forward_timeout", DEFAULT_FORWARD_TIMEOUT, kind=float,
                                      minimum=0.1, maximum=600),
        delivery=reader.choice("delivery", ("sync", "queue")),
        cloud_source_check=reader.choice("cloud_source_check", ("yes", "no")) == "yes",
        queue_max_attempts=reader.number("queue_max_attempts", DEFAULT_MAX_ATTEMPTS, minimum=1),
        queue_retry_base=reader.number("queue_retry_base", DEFAULT_RETRY_BASE, kind=float,
                                       minimum=0.001),
        queue_retry_max=reader.number("queue_retry_max", DEFAULT_RETRY_MAX, kind=float,
                                      minimum=0.001),
        # Its own window on a shared store: virtual payment's retries reach hours.
        dedup_ttl=reader.number("dedup_ttl", None, kind=float, minimum=1),
    )


###############################################################################
# Signatures and crypto #######################################################
###############################################################################

def sign(token: str, timestamp: str | int, nonce: str | int, encrypt: str | None = None
         ) -> str:
    """Return WeChat's signature: lowercase hex SHA-1 of the sorted strings, joined.

    With three arguments this is the URL ``signature``; with ``encrypt`` (the ``Encrypt``
    field) it is ``msg_signature``. Strings sort as strings, not numbers.
    https://developers.weixin.qq.com/miniprogram/dev/framework/server-ability/message-push.html
    """
    parts = [token, str(timestamp), str(nonce)]
    if encrypt is not None:
        parts.append(encrypt)
    parts.sort()
    return hashlib.sha1("".join(parts).encode("utf-8", "surrogateescape")).hexdigest()


def check_signature(signature: str | None, token: str, timestamp: str | int, nonce: str | int,
                    encrypt: str | None = None) -> None:
    """Raise :class:`SignatureError` unless ``signature`` matches; compare in constant time.

    We compare bytes, not str: ``hmac.compare_digest`` raises TypeError on non-ASCII text,
    which would turn a hostile query string into a crash.
    """
    expected = sign(token, timestamp, nonce, encrypt).encode("ascii")
    given = (signature or "").encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(expected, given.lower()):
        which = "msg_signature" if encrypt is not None else "signature"
        raise SignatureError(f"{which} does not match: check the app's token")


def _decode_aes_key(encoding_aes_key):
    """The 32-byte AES key from the 43-character EncodingAESKey (or the 32 bytes themselves).

    We do not demand that re-encoding gives the same text: the 43rd character carries two
    unused bits, and official sample keys set them.
    """
    if isinstance(encoding_aes_key, (bytes, bytearray)):
        if len(encoding_aes_key) != 32:
            raise WxgateError(f"AES key must be 32 bytes, got {len(encoding_aes_key)}",
                              code=ILLEGAL_AES_KEY)
        return bytes(encoding_aes_key)
    return _decode_key_text(encoding_aes_key)


def _decode_key_text(text):
    if len(text) != ENCODING_AES_KEY_LENGTH:
        raise WxgateError(f"expected {ENCODING_AES_KEY_LENGTH} characters, got {len(text)}",
                          code=ILLEGAL_AES_KEY)
    try:
        key = base64.b64decode(text + "=", validate=True)
    except (binascii.Error, ValueError):
        raise WxgateError("not Base64: use the 43 letters and digits from the console",
                          code=ILLEGAL_AES_KEY) from None
    if len(key) != 32:  # "A"*42 + "=" is 43 characters of valid Base64, for 31 bytes
        raise WxgateError(f"decodes to {len(key)} bytes, not 32", code=ILLEGAL_AES_KEY)
    return key


_decode_key_text = functools.lru_cache(maxsize=64)(_decode_key_text)


def _require_aes():
    if _AES is None:
        raise WxgateError("encrypted messages need AES: pip install pycryptodome", status=500)
    return _AES


def encrypt_message(plaintext: str | bytes, aes_key: str | bytes, appid: str, *,
                    random_prefix: str | bytes | None = None) -> str:
    """Encrypt a message the way WeChat does; return the Base64 ``Encrypt`` text.

    Layout: random (16 bytes) | msg_len (4, big-endian) | msg | appid, PKCS#7-padded to 32,
    AES-256-CBC with IV = key[:16].

    :param plaintext: the message, ``str`` (sent as UTF-8) or ``bytes``.
    :param aes_key: the 43-character EncodingAESKey, or its 32 decoded bytes.
    :param appid: the mini program's AppID, appended to the buffer.
    :param random_prefix: 16 bytes; by default 16 random lowercase hex characters, the shape
        WeChat itself sends. Pinned only to reproduce published vectors.
    """
    key = _decode_aes_key(aes_key)
    message = plaintext.encode("utf-8") if isinstance(plaintext, str) else bytes(plaintext)
    if random_prefix is None:
        random_prefix = os.urandom(RANDOM_PREFIX_BYTES // 2).hex().encode("ascii")
    elif isinstance(random_prefix, str):
        random_prefix = random_prefix.encode("utf-8")
    if len(random_prefix) != RANDOM_PREFIX_BYTES:
        raise ValueError(f"random_prefix must be {RANDOM_PREFIX_BYTES} bytes")
    buffer = b"".join((random_prefix, struct.pack(">I", len(message)), message,
                       appid.encode("utf-8")))
    pad = PKCS7_BLOCK - len(buffer) % PKCS7_BLOCK
    buffer += bytes((pad,)) * pad
    cipher = _require_aes().new(key, _AES.MODE_CBC, key[:16])
    return base64.b64encode(cipher.encrypt(buffer)).decode("ascii")


if sys.version_info >= (3, 11):
    # Standard Base64 with nothing else in it: no spaces, no stray characters; b64decode's
    # check, in C, with no Python call around it (a non-ASCII str raises ValueError).
    _strict_b64decode = functools.partial(binascii.a2b_base64, strict_mode=True)
else:
    def _strict_b64decode(text):
        """Standard Base64 with nothing else in it: no spaces, no stray characters."""
        return base64.b64decode(text, validate=True)


# One ECB cipher per key: building a CBC cipher object costs more than the AES work of a
# push. ECB decryption keeps no state between calls, so threads can share it.
_ECB_CIPHERS: dict[bytes, Any] = {}


def _cbc_decrypt(key, ciphertext):
    """AES-256-CBC decryption with IV = key[:16]: each block's ECB output XOR the previous
    ciphertext block (the IV for the first), done as one big-integer XOR."""
    ecb = _ECB_CIPHERS.get(key)
    if ecb is None:
        if len(_ECB_CIPHERS) >= 64:
            _ECB_CIPHERS.clear()
        ecb = _ECB_CIPHERS[key] = _require_aes().new(key, _AES.MODE_ECB)
    chain = key[:16] + ciphertext[:-16]
    return (int.from_bytes(ecb.decrypt(ciphertext), "big")
            ^ int.from_bytes(chain, "big")).to_bytes(len(ciphertext), "big")


def _decrypt_buffer(encrypt, aes_key):
    """Strictly decrypt ``Encrypt``; return ``(random_prefix, message, appid)``.

    Every failure is a :class:`DecryptError` with the official sample's code.
    """
    key = aes_key if type(aes_key) is bytes and len(aes_key) == 32 else \
        _decode_aes_key(aes_key)
    try:
        ciphertext = _strict_b64decode(encrypt)
    except (binascii.Error, ValueError, TypeError):
        raise DecryptError("Encrypt is not valid Base64", code=DECODE_BASE64_ERROR) from None
    if not ciphertext or len(ciphertext) % PKCS7_BLOCK:
        raise DecryptError(f"ciphertext is {len(ciphertext)} bytes, not a non-zero multiple "
                           f"of {PKCS7_BLOCK}", code=DECRYPT_AES_ERROR)
    buffer = _cbc_decrypt(key, ciphertext)
    pad = buffer[-1]
    # Every pad byte must equal the pad length; the official sample trusts the last byte alone.
    if not 1 <= pad <= PKCS7_BLOCK or buffer[-pad:] != bytes((pad,)) * pad:
        raise DecryptError("bad padding: wrong key, or the message was altered",
                           code=ILLEGAL_BUFFER)
    buffer = buffer[:-pad]
    # From here on a message names the kind of failure only, never a decrypted value (a
    # length, a byte, the appid found): whoever can sign could read plaintext through them.
    if len(buffer) < MIN_BUFFER_BYTES:
        raise DecryptError(f"decrypted buffer is shorter than {MIN_BUFFER_BYTES} bytes",
                           code=ILLEGAL_BUFFER)
    (length,) = struct.unpack_from(">I", buffer, RANDOM_PREFIX_BYTES)
    end = MIN_BUFFER_BYTES + length
    if end > len(buffer):
        raise DecryptError("length field points past the end of the buffer",
                           code=ILLEGAL_BUFFER)
    try:
        message = buffer[MIN_BUFFER_BYTES:end].decode("utf-8")
        appid = buffer[end:].decode("utf-8")
    except UnicodeDecodeError:
        raise DecryptError("decrypted message is not UTF-8", code=ILLEGAL_BUFFER) from None
    return buffer[:RANDOM_PREFIX_BYTES], message, appid


def decrypt_message(encrypt: str, aes_key: str | bytes, appid: str) -> str:
    """Strictly decrypt ``Encrypt`` and return the message text.

    :param encrypt: the Base64 ``Encrypt`` field.
    :param aes_key: the 43-character EncodingAESKey, or its 32 decoded bytes.
    :param appid: the AppID the buffer must end with (-40005 otherwise).
    :raises DecryptError: with ``.code`` -40010, -40007, -40008 or -40005.
    """
    _, message, found = _decrypt_buffer(encrypt, aes_key)
    if not hmac.compare_digest(found.encode("utf-8"), appid.encode("utf-8")):
        # Never quote ``found``: when the key is right but the length field is forged, it
        # is any slice of the plaintext, and whoever can sign could read it through us.
        raise DecryptError(f"message is not for this app's appid {appid!r}",
                           code=VALIDATE_APPID_ERROR)
    return message


def _open_encrypt(encrypt, aes_key, previous_key, appid):
    """Open ``Encrypt`` with the current key, then the previous one: ``(text, key)``.

    The one home of the key-rotation rule, for pushes and ``wxgate decrypt`` alike.
    WeChat's guidance for a key change: keep the current and the previous key, try the
    previous one when the current one fails, and encrypt the reply with the key that
    opened the push.
    https://developers.weixin.qq.com/doc/oplatform/Third-party_Platforms/2.0/Before_Develop/Message_encryption_and_decryption.md
    A wrong key nearly always fails the padding (-40008), and the appid check (-40005)
    catches the rare wrong key that unpads by chance; Base64 and length errors are the same
    under any key, so they are not tried twice. A push that fails under both keys raises
    what the current key said.

    :param previous_key: previous_encoding_aes_key, or None when no rotation is under way.
    :raises DecryptError: neither key opens it.
    """
    try:
        return decrypt_message(encrypt, aes_key, appid), aes_key
    except DecryptError as exc:
        if previous_key is None or exc.code not in (ILLEGAL_BUFFER, VALIDATE_APPID_ERROR):
            raise
        try:
            return decrypt_message(encrypt, previous_key, appid), previous_key
        except DecryptError:
            raise exc from None


###############################################################################
# Push parsing ################################################################
###############################################################################

def _sniff_format(body):
    """``"xml"`` or ``"json"`` from the first non-space byte; Content-Type is unreliable."""
    start = body.lstrip()[:1]
    if start == b"<":
        return "xml"
    if start == b"{":
        return "json"
    raise MessageError("body is neither XML nor JSON")


class _XMLRefused(Exception):
    pass


def _refuse_dtd(*_args):
    # A DOCTYPE is how billion laughs, external entities and DTD retrieval get in, and WeChat
    # never sends one, so we refuse it outright rather than trying to tame it.
    raise _XMLRefused("DOCTYPE and entity declarations are refused")


def _parse_xml(data):
    """Parse a WeChat XML document into a dict.

    Elements with children become dicts, repeated elements lists, leaves their text (CDATA or
    not). Attributes are ignored (WeChat sends none), unless huge or numerous. DTDs and
    entities are refused.
    """
    parser = expat.ParserCreate("utf-8")
    parser.buffer_text = True
    parser.StartDoctypeDeclHandler = _refuse_dtd
    parser.EntityDeclHandler = _refuse_dtd
    parser.ExternalEntityRefHandler = _refuse_dtd
    # Each frame: [tag, children dict or None, text parts].
    stack = []
    result = []

    def start(tag, attributes):
        if len(stack) >= MAX_XML_DEPTH:
            raise _XMLRefused(f"elements nested deeper than {MAX_XML_DEPTH}")
        if attributes and (len(attributes) > MAX_XML_ATTRIBUTES or any(
                len(value) > MAX_XML_ATTRIBUTE_CHARS for value in attributes.values())):
            raise _XMLRefused(f"<{tag[:40]}> has huge or numerous attributes (WeChat sends "
                              "none)")
        if stack and stack[-1][1] is None:
            stack[-1][1] = {}
        stack.append([tag, None, []])

    def end(_tag):
        tag, children, texts = stack.pop()
        value = children if children is not None else "".join(texts)
        if not stack:
            result.append(value)
            return
        siblings = stack[-1][1]
        previous = siblings.get(tag, _MISSING)
        if previous is _MISSING:
            siblings[tag] = value
        elif isinstance(previous, _Repeated):
            previous.append(value)
        else:
            siblings[tag] = _Repeated((previous, value))

    def text(data):
        if stack:
            stack[-1][2].append(data)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    try:
        parser.Parse(data, True)
    except _XMLRefused as exc:
        raise MessageError(f"XML refused: {exc}") from None
    except expat.ExpatError as exc:
        raise MessageError(f"malformed XML: {expat.ErrorString(exc.code)} "
                           f"at line {exc.lineno}") from None
    document = result[0] if result else None
    if not isinstance(document, dict):
        raise MessageError("XML document has no fields")
    return _normalise_lists(document)


class _Repeated(list):
    """A list made from repeated XML elements (so a third repeat appends to it)."""


_MISSING = object()

_LIST_FIELDS = frozenset({"List"})


def _normalise_lists(fields):
    """Make every ``List`` a list (one item arrives as an object) and repeats plain lists."""
    for name, value in fields.items():
        if isinstance(value, _Repeated):
            value = fields[name] = [
                _normalise_lists(item) if isinstance(item, dict) else item for item in value]
        elif isinstance(value, dict):
            _normalise_lists(value)
        if name in _LIST_FIELDS and not isinstance(value, list):
            fields[name] = [value]
    return fields


def _parse_json(data):
    """Parse a JSON push into a dict, with the same ``List`` rule as XML."""
    try:
        # Decoded strictly first: json.loads(bytes) would also take UTF-16 and let raw
        # surrogate bytes through.
        document = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except (ValueError, RecursionError) as exc:
        raise MessageError(f"malformed JSON: {str(exc)[:80]}") from None
    if not isinstance(document, dict):
        raise MessageError("JSON push is not an object")
    # JSON may spell a character as \uXXXX, and a lone surrogate half is valid JSON but not
    # text: it could not be logged, re-encoded or replied to. WeChat never sends one.
    if b"\\ud" in data or b"\\uD" in data:
        try:
            json.dumps(document, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise MessageError("JSON holds a lone surrogate (\\ud800-\\udfff escape)") from None
    if "List" in document and not isinstance(document["List"], list):
        document["List"] = [document["List"]]
    return document


# Fast paths for the two shapes WeChat sends: the safe-mode envelope, and a flat document of
# leaf elements. Each regex matches only text that expat would parse to the same dict (no
# control characters, CR, entities, "]]>" in text, repeats or List); anything else, valid or
# not, goes to _parse_xml, which has the final word.
_XML_SPACE = rb"[ \t\r\n]*"
# CDATA text: runs of ordinary bytes, each "]" not starting "]]>". Written as runs (not one
# byte per repetition) so that re takes a run in one step: three times faster on a push.
_CDATA_BYTE = rb"[^\]\x00-\x08\x0b\x0c\x0e-\x1f\r]"
_CDATA_TEXT = _CDATA_BYTE + rb"*(?:\](?!\]>)" + _CDATA_BYTE + rb"*)*"
_PLAIN_TEXT = rb"[^<&\]\x00-\x08\x0b\x0c\x0e-\x1f\r]*"
_ENVELOPE_XML = re.compile(
    _XML_SPACE + rb"<xml>" + _XML_SPACE + rb"<ToUserName><!\[CDATA\[([A-Za-z0-9_\-]*)\]\]>"
    rb"</ToUserName>" + _XML_SPACE + rb"<Encrypt><!\[CDATA\[([A-Za-z0-9+/=]*)\]\]></Encrypt>"
    + _XML_SPACE + rb"</xml>" + _XML_SPACE)
_FLAT_LEAF = (rb"<([A-Za-z_][A-Za-z0-9_]*)>(?:<!\[CDATA\[(" + _CDATA_TEXT + rb")\]\]>|("
              + _PLAIN_TEXT + rb"))</\1>")
_FLAT_FIELD = re.compile(_FLAT_LEAF)
# The same leaf, non-capturing, repeated inside <xml>...</xml> (the name is group 1 each time).
_FLAT_XML = re.compile(_XML_SPACE + rb"<xml>(?:" + _XML_SPACE + _FLAT_LEAF.replace(
    rb"(" + _CDATA_TEXT, rb"(?:" + _CDATA_TEXT).replace(
        rb"|(" + _PLAIN_TEXT, rb"|(?:" + _PLAIN_TEXT)
    + rb")+" + _XML_SPACE + rb"</xml>" + _XML_SPACE)


def _parse_flat_xml(data):
    """The fields of a flat WeChat XML document, or None when the fast path does not apply."""
    if b"\xef\xbf\xbe" in data or b"\xef\xbf\xbf" in data:
        return None  # U+FFFE and U+FFFF: not XML characters, for expat to refuse
    envelope = _ENVELOPE_XML.fullmatch(data)
    if envelope is not None:
        return {"ToUserName": envelope.group(1).decode("ascii"),
                "Encrypt": envelope.group(2).decode("ascii")}
    if _FLAT_XML.fullmatch(data) is None:
        return None
    fields = {}
    for name, cdata, text in _FLAT_FIELD.findall(data):
        name = name.decode("ascii")
        if name in fields or name in _LIST_FIELDS:
            return None  # repeats and lists take the general path
        try:
            fields[name] = (cdata or text).decode("utf-8")
        except UnicodeDecodeError:
            return None
    return fields


def _parse_body(data, fmt):
    if fmt == "xml":
        fields = _parse_flat_xml(data)
        return fields if fields is not None else _parse_xml(data)
    return _parse_json(data)


###############################################################################
# Message and replies #########################################################
###############################################################################

# A MsgId or trace_id goes into a key as it is only when it looks like WeChat's own: a 64-bit
# number, or hex and digits joined by "_" (WeChat calls MsgId a string, and both occur). Any
# other value is hashed, so no key grows with what a push carries: plain and cloud pushes
# are not signed over their body, and a 60 KB MsgId would otherwise be a 60 KB key.
_VERBATIM_KEY_PART = re.compile(r"[0-9A-Za-z_.\-]{1,64}")


def _key_part(value):
    """A push's value as a piece of its dedup key: itself when short and plain, else
    ``#`` and a digest (``#`` never appears in a verbatim part, so the two cannot meet)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # a JSON MsgId may be a number; str() keeps all of its digits
    if isinstance(value, str) and _VERBATIM_KEY_PART.fullmatch(value):
        return value
    return "#" + hashlib.sha256(_canonical_json(value).encode(
        "utf-8", "surrogatepass")).hexdigest()


def _canonical_scalar(value):
    if isinstance(value, str):
        return value.strip()
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# WeChat's deepest push nests 3 levels; a JSON push may nest as deep as the parser took
# (about 900), which the recursive path below must not follow into a RecursionError.
_CANONICAL_DEPTH = 32
_canonical_dumps = json.JSONEncoder(ensure_ascii=False, sort_keys=True,
                                    separators=(",", ":")).encode


class _TooDeep(Exception):
    pass


def _canonical(value, depth):
    """``value`` with the rules of ``_canonical_json`` applied, ready for json's encoder."""
    if type(value) is str:
        return value.strip()
    if depth > _CANONICAL_DEPTH and isinstance(value, (dict, list)):
        raise _TooDeep
    if isinstance(value, dict):
        return {str(name): field.strip() if type(field) is str else _canonical(field, depth + 1)
                for name, field in value.items()}
    if isinstance(value, list):
        if len(value) == 1:
            return _canonical(value[0], depth + 1)
        return [_canonical(item, depth + 1) for item in value]
    return _canonical_scalar(value)


def _canonical_json(value):
    """One text for a push's fields however they came: the identity a retry shares.

    XML gives text where JSON gives numbers (``CreateTime`` is ``"1610969440"`` in one and
    ``1610969440`` in the other), an XML element that appears once is no list while JSON
    may give a list of one, and XML wraps the subscribe events' ``List`` in an element of
    its own. So every leaf becomes a string without surrounding spaces, a list of one item
    its item, and a top-level element holding nothing but ``List`` gives way to it; keys
    are sorted, as compact JSON. A push nested deeper than any of WeChat's is written by
    ``_canonical_json_deep``, to the same text, without recursion.
    """
    if isinstance(value, dict) and "List" not in value:
        for name, item in value.items():
            if isinstance(item, dict) and list(item) == ["List"]:
                value = {other: field for other, field in value.items() if other != name}
                value["List"] = item["List"]
                break
    try:
        return _canonical_dumps(_canonical(value, 0))
    except _TooDeep:
        return _canonical_json_deep(value)


def _canonical_json_deep(value):
    """``_canonical_json``'s text for a value of any depth, with a stack of its own."""
    parts: list[str] = []
    pending: list[tuple[bool, Any]] = [(False, value)]  # (is text to write, what)
    while pending:
        is_text, item = pending.pop()
        if is_text:
            parts.append(item)
        elif isinstance(item, dict):
            entries = sorted(item.items(), key=lambda entry: str(entry[0]))
            pending.append((True, "}"))
            for index in range(len(entries) - 1, -1, -1):
                name, field = entries[index]
                pending.append((False, field))
                pending.append((True, ("," if index else "") + _canonical_dumps(
                    str(name)) + ":"))
            pending.append((True, "{"))
        elif isinstance(item, list):
            if len(item) == 1:
                pending.append((False, item[0]))
                continue
            pending.append((True, "]"))
            for index in range(len(item) - 1, -1, -1):
                pending.append((False, item[index]))
                if index:
                    pending.append((True, ","))
            pending.append((True, "["))
        else:
            parts.append(_canonical_dumps(_canonical_scalar(item)))
    return "".join(parts)


def _dedup_key(app_name, fields):
    """The identity of a push, so WeChat's retries can be recognised, and only they.

    ``MsgId`` for messages (plus ``trace_id`` when present). Anything else is identified by
    all it carries: a digest of its fields in one canonical form (see ``_canonical_json``).
    WeChat's doc suggests ``FromUserName`` + ``CreateTime`` for events, but two distinct
    events share those: two payments in one second differ only by ``OutTradeNo``, two
    entries from contact buttons by ``SessionFrom``. A retry repeats the message, so its
    content is the same; the encryption, nonce and signature around it are not part of it.
    None when the push has no sender and time (nothing tells two copies from two pushes).
    Every part taken from the push is bounded (see ``_key_part``): a key stays under about
    150 bytes plus the app's name.
    """
    msg_id = fields.get("MsgId")
    if msg_id not in (None, ""):
        # WeChat's own MsgId (a short plain str) is its own key part: no call to say so.
        part = msg_id if type(msg_id) is str and _VERBATIM_KEY_PART.fullmatch(msg_id) \
            else _key_part(msg_id)
        key = f"{app_name}:m:{part}"
        trace = fields.get("trace_id")
        return f"{key}:{_key_part(trace)}" if trace not in (None, "") else key
    sender, created = fields.get("FromUserName"), fields.get("CreateTime")
    if not sender or created in (None, ""):
        return None
    digest = hashlib.sha256(_canonical_json(fields).encode("utf-8", "surrogatepass"))
    return f"{app_name}:e:{digest.hexdigest()}"


_NO_CLOUD: Mapping[str, str] = types.MappingProxyType({})


class Message(collections.abc.Mapping):
    """A push from WeChat: a read-only mapping of its fields under WeChat's own names.

    ``message["MsgType"]``, ``message["Content"]``... Nested XML elements are dicts, repeated
    ones lists, and the subscribe-message ``List`` is always a list.

    :ivar app: the app's name (its ``[app:NAME]``).
    :ivar msg_type: ``MsgType``; :ivar event: ``Event`` for events, else None. Each is None
        when the push's value is not a string (a JSON push may hold any JSON value there;
        ``message["MsgType"]`` still gives it as sent).
    :ivar from_user: the sender's openid, ``FromUserName``; ``""`` when the push has none
        (or its value is not a string), so it can go straight to ``client.send_text``.
    :ivar dedup_key: the key retries are matched by.
    :ivar format: ``"xml"`` or ``"json"``; :ivar encrypted: whether it came encrypted.
    :ivar cloud: in ``mode = cloud``, the headers Cloud Hosting's gateway sent with the push,
        under their names in capitals (``X-WX-OPENID``, ``X-WX-APPID``, ``X-WX-UNIONID``,
        ``X-WX-ENV``, ``X-WX-FROM-*``): only those sent, read-only. Empty in other modes.
    """

    __slots__ = ("_fields", "app", "msg_type", "event", "from_user", "dedup_key", "format",
                 "encrypted", "_client", "_client_factory", "cloud")
    app: str
    msg_type: str | None
    event: str | None
    from_user: str
    dedup_key: str | None
    format: str
    encrypted: bool
    cloud: Mapping[str, str]

    def __init__(self, fields: dict[str, Any], *, app: str = "", format: str = "xml",
                 encrypted: bool = False, client: WeChatClient | None = None,
                 cloud: Mapping[str, str] | None = None,
                 client_factory: Callable[[], WeChatClient] | None = None) -> None:
        self._fields = fields
        self.app = app
        # The attributes are typed, and handlers (and the Router) trust the types: a JSON
        # push's MsgType may be a list or an object, which is no type name to match.
        msg_type = fields.get("MsgType")
        self.msg_type = msg_type if isinstance(msg_type, str) else None
        event = fields.get("Event")
        self.event = event if self.msg_type == "event" and isinstance(event, str) else None
        sender = fields.get("FromUserName")
        self.from_user = sender if isinstance(sender, str) else ""
        # The dedup key reads the raw fields: a hostile push still gets the key it always had.
        self.dedup_key = _dedup_key(app, fields)
        self.format = format
        self.encrypted = encrypted
        self._client = client
        self._client_factory = client_factory
        # Read-only: a handler must not rewrite what Cloud Hosting's gateway said.
        self.cloud = types.MappingProxyType(dict(cloud)) if cloud else _NO_CLOUD

    @property
    def client(self) -> WeChatClient:
        """The app's :class:`WeChatClient`, for API calls from the handler.

        The gateway always gives one, made on first use (``client_factory``); a Message
        built by hand has one only if given.

        :raises WxgateError: this Message was built without ``client=``.
        """
        if self._client is None and self._client_factory is not None:
            self._client = self._client_factory()
        if self._client is None:
            raise WxgateError("this Message was built without a client: pass client=... "
                              "to Message(...)")
        return self._client

    def __getitem__(self, name: str) -> Any:
        return self._fields[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return (f"<Message {self.app} {_loggable(self.msg_type)}/{_loggable(self.event)} "
                f"key={self.dedup_key!r}>")

    @property
    def items_list(self) -> list[dict[str, Any]]:
        """The subscribe events' ``List`` items whatever the format (XML wraps them)."""
        if "List" in self._fields:
            return self._fields["List"]
        for value in self._fields.values():
            if isinstance(value, dict) and "List" in value:
                return value["List"]
        return []

    def to_dict(self) -> dict[str, Any]:
        """A plain (deep-copied) dict of the fields, e.g. for JSON."""
        return json.loads(json.dumps(self._fields))


_XML_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")


# Characters XML 1.0 cannot carry, even in CDATA: a reply holding one cannot be parsed.
# Those outside its Char production (#x9 | #xA | #xD | [#x20-#xD7FF] | [#xE000-#xFFFD] |
# [#x10000-#x10FFFF]), listed rather than negated: the negated class takes re some
# milliseconds to compile, on every start of a CGI push.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _cdata(text):
    # A "]]>" inside the value would end the section early and let the value add elements
    # (a second MsgType) to the reply: split it across two sections. Characters XML cannot
    # carry are dropped, so a control character echoed from a user cannot break the reply.
    text = _XML_ILLEGAL.sub("", text)
    return "<![CDATA[" + text.replace("]]>", "]]]]><![CDATA[>") + "]]>"


def _dump_xml(fields, root="xml"):
    """Render a dict as WeChat XML: strings in CDATA, numbers bare, dicts nested, lists
    repeated."""
    parts = [f"<{root}>"]
    _dump_xml_fields(fields, parts, 0)
    parts.append(f"</{root}>")
    return "".join(parts)


def _dump_xml_fields(fields, parts, depth):
    if depth > MAX_XML_DEPTH:
        raise WxgateError("reply nested too deeply", code=GEN_RETURN_ERROR, status=500)
    for name, value in fields.items():
        if not isinstance(name, str) or not _XML_NAME.match(name):
            raise WxgateError(f"reply field {name!r} is not a valid XML element name",
                              code=GEN_RETURN_ERROR, status=500)
        for item in value if isinstance(value, list) else (value,):
            parts.append(f"<{name}>")
            if isinstance(item, dict):
                _dump_xml_fields(item, parts, depth + 1)
            elif isinstance(item, bool) or not isinstance(item, (int, float)):
                parts.append(_cdata(str(item)))
            else:
                parts.append(str(item))
            parts.append(f"</{name}>")


def _dump_json(fields):
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


def _reply_fields(reply, message, now):
    """Fill in ``ToUserName``, ``FromUserName`` and ``CreateTime`` from the push when missing."""
    def scalar(name):  # a nested element or a list cannot address a reply
        value = message.get(name, "")
        return value if isinstance(value, (str, int)) and not isinstance(value, bool) else ""

    fields = {"ToUserName": scalar("FromUserName"), "FromUserName": scalar("ToUserName"),
              "CreateTime": int(now)}
    fields.update(reply)
    return fields


def _envelope(encrypt, signature, timestamp, nonce, fmt):
    """The documented four-field encrypted reply (TimeStamp a number, Nonce a string)."""
    if fmt == "json":
        return _dump_json({"Encrypt": encrypt, "MsgSignature": signature,
                           "TimeStamp": int(timestamp), "Nonce": nonce})
    return (f"<xml><Encrypt>{_cdata(encrypt)}</Encrypt>"
            f"<MsgSignature>{_cdata(signature)}</MsgSignature>"
            f"<TimeStamp>{int(timestamp)}</TimeStamp><Nonce>{_cdata(nonce)}</Nonce></xml>")


def _shorten(value):
    """``repr(value)``, cut to 40 characters for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# A reply's Content-Type goes out as a header and into the dedup record "d<type>\n<body>":
# one line of printable ASCII.
_HEADER_VALUE = re.compile(r"[\x20-\x7e]+\Z")


class RawReply:
    """A reply sent exactly as given: no field filled in, no encryption, in every mode.

    Some pushes want a fixed body rather than a message: virtual payment's
    ``xpay_goods_deliver_notify`` and its kin are answered ``{"ErrCode":0,"ErrMsg":"success"}``,
    and "回复微信服务器的消息不需要加密" (the reply is not encrypted, even in safe mode).
    https://developers.weixin.qq.com/minigame/dev/guide/open-ability/virtual-payment/message-push.md
    A handler returns one; a forward backend asks for the same with the response header
    ``X-Wxgate-Reply: raw``. WeChat's retries of the push get the same body and type from the
    dedup store.

    :param body: bytes or str, sent as they are, or a dict, sent as compact UTF-8 JSON
        (``{"ErrCode":0,"ErrMsg":"success"}``). Bytes must be UTF-8, as the dedup store
        keeps text.
    :param content_type: the reply's Content-Type header, as is (sent with
        ``X-Content-Type-Options: nosniff``, so it is what a client goes by).
    :raises TypeError: ``body`` is none of those types.
    :raises ValueError: the body is not UTF-8, or ``content_type`` is not one line of
        printable ASCII, or is longer than ``MAX_CONTENT_TYPE_CHARS`` (256).
    """

    __slots__ = ("body", "content_type")
    body: bytes
    content_type: str

    def __init__(self, body: bytes | str | dict[str, Any],
                 content_type: str = "application/json; charset=utf-8") -> None:
        if isinstance(body, dict):
            body = _dump_json(body)
        if isinstance(body, str):
            try:
                body = body.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: no UTF-8 can carry it
                raise ValueError("RawReply body is not valid text (a lone surrogate)") \
                    from None
        if not isinstance(body, (bytes, bytearray)):
            raise TypeError(f"RawReply body must be bytes, str or dict, not "
                            f"{type(body).__name__}")
        body = bytes(body)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("RawReply body must be UTF-8") from None
        if not isinstance(content_type, str) or not _HEADER_VALUE.match(content_type):
            raise ValueError(f"RawReply content_type must be one line of printable ASCII, "
                             f"got {_shorten(content_type)}")
        if len(content_type) > MAX_CONTENT_TYPE_CHARS:
            raise ValueError(f"RawReply content_type is {len(content_type)} characters, over "
                             f"{MAX_CONTENT_TYPE_CHARS}")
        self.body, self.content_type = body, content_type

    def __repr__(self) -> str:
        return f"<RawReply {self.content_type!r} {len(self.body)} bytes>"


_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json; charset=utf-8"
_CONTENT_TYPES = {"xml": "text/xml; charset=utf-8", "json": _JSON}


def _business_name(app):
    """The app's business code, fit for a log line: its handler, or its backend redacted."""
    return app.handler_spec or _redact_url(app.forward)


def _reply_dropped(app, reply):
    """Whether a reply is a message that cannot be sent: a Mini Program on Cloud Hosting
    gets no passive reply, only Official Accounts do, so a dict reply becomes success."""
    return app.mode == "cloud" and isinstance(reply, dict)


def _render_reply(app, message, reply, *, nonce, aes_key, now, random_prefix=None):
    """The reply on the wire, ``(content_type, text)``, for what business code returned.

    The one home of the reply format: None and ``"success"`` answer ``success``, ``""``
    the empty reply, a :class:`RawReply` goes exactly as given in every mode, a str as it
    is, and a dict becomes a message addressed back to the sender (``_reply_fields``), in
    the push's format. A reply to an encrypted push is encrypted, in the mode of the
    request being answered (never a sticky flag), with ``aes_key``, the key that opened
    it, and signed with ``nonce``; ``now`` is its TimeStamp and ``random_prefix`` its 16
    random bytes, so the function is pure.

    :raises TypeError: the business code returned something else.
    """
    if isinstance(reply, RawReply):  # exactly as given, in every mode
        return reply.content_type, reply.body.decode("utf-8")
    if isinstance(reply, (bytes, bytearray)):
        reply = bytes(reply).decode("utf-8")
    if reply is None or reply == "success":
        return _TEXT, "success"
    if reply == "":
        return _TEXT, ""
    if _reply_dropped(app, reply):
        return _TEXT, "success"
    if isinstance(reply, dict):
        fields = _reply_fields(reply, message, now)
        text = _dump_json(fields) if message.format == "json" else _dump_xml(fields)
    elif isinstance(reply, str):
        text = reply
    else:
        raise TypeError(f"{_business_name(app)} returned "
                        f"{type(reply).__name__}; expected None, a str, a dict or a "
                        "RawReply")
    if not message.encrypted:
        return _CONTENT_TYPES[message.format], text
    timestamp = str(int(now))
    encrypt = encrypt_message(text, aes_key or app.aes_key, app.appid,
                              random_prefix=random_prefix)
    signature = sign(app.token, timestamp, nonce, encrypt)
    return _CONTENT_TYPES[message.format], _envelope(encrypt, signature, timestamp, nonce,
                                                     message.format)


###############################################################################
# Push verification ###########################################################
###############################################################################

# What a push is, as plain values: the query (a dict of strings), the headers Cloud Hosting
# adds, a body reader and the time go in; a verified push, or a WxgateError naming the
# refusal, comes out. Nothing here reads environ, a clock or a store: the WSGI section
# takes those strings out of the request, and the one store write a push makes (its query
# bind) is a callable the caller passes. Every mode's rules are here, in the order they run.
# https://developers.weixin.qq.com/miniprogram/dev/framework/server-ability/message-push.html

# The body of every refusal after msg_signature, whatever failed: distinct ones (padding,
# length, UTF-8, appid, parsing) would be an oracle for whoever holds the Token.
SEALED_REFUSAL = "Encrypt does not decrypt to a push for this app"
# Headers Cloud Hosting's gateway adds to a request it passes to the container, as
# message.cloud shows them; under resource sharing X-WX-FROM-* too.
# https://developers.weixin.qq.com/miniprogram/dev/wxcloudservice/wxcloudrun/src/development/weixin/index.md
_CLOUD_HEADERS = ("X-WX-OPENID", "X-WX-APPID", "X-WX-UNIONID", "X-WX-ENV",
                  "X-WX-FROM-OPENID", "X-WX-FROM-APPID", "X-WX-FROM-UNIONID")
# "To know a caller is WeChat, check that X-WX-SOURCE is present"; an older copy of the push
# page says x-wx-sources (unverified), so either spelling passes.
_CLOUD_SOURCE_HEADERS = ("X-WX-SOURCE", "X-WX-SOURCES")
# Cloud Hosting's console checks a push path with this body before saving the settings.
# https://developers.weixin.qq.com/miniprogram/dev/wxcloudservice/wxcloudrun/src/guide/weixin/push.md
_PATH_CHECK_ACTION = "CheckContainerPath"


def _check_format(expected, fmt, what="body"):
    """Refuse, with 415, a ``what`` in a format the app does not take (``expected`` is
    ``auto``, ``xml`` or ``json``). The one place this rule lives."""
    if expected != "auto" and fmt != expected:
        raise MessageError(f"the {what} is {fmt}, but the app expects {expected} (format = "
                           f"{expected})", status=415, code=None)


def _read_fields(body, expected):
    """``(fields, format)`` of a push's body: refused when empty, or in a format the app
    does not take."""
    if not body.strip():
        raise MessageError("empty body", code=None)
    fmt = _sniff_format(body)
    if expected != "auto" and fmt != expected:
        _check_format(expected, fmt)
    # _parse_body's steps, written out: this runs on every push.
    if fmt == "xml":
        fields = _parse_flat_xml(body)
        return fields if fields is not None else _parse_xml(body), fmt
    return _parse_json(body), fmt


def _required(query, *names):
    values = []
    for name in names:
        value = query.get(name)
        if not value:
            missing = ", ".join(name for name in names if not query.get(name))
            raise MessageError(f"query is missing {missing}", code=None)
        values.append(value)
    return values


def _check_timestamp(timestamp, now, window):
    """Refuse a timestamp older than ``window`` or more than ``MAX_CLOCK_AHEAD`` ahead."""
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise MessageError(f"timestamp {timestamp[:20]!r} is not a number of seconds",
                           code=None)
    if not window:
        return
    age = int(now) - int(timestamp)
    if age > window:
        raise ReplayError(f"timestamp {timestamp} is {age} s old, beyond timestamp_window "
                          f"({window} s): a replay, or a clock that needs NTP")
    ahead = min(window, MAX_CLOCK_AHEAD)
    if -age > ahead:
        raise ReplayError(f"timestamp {timestamp} is {-age} s ahead of our clock, more than "
                          f"{ahead} s: a forged timestamp, or a clock that needs NTP")


def _sealed_refusal(cause):
    """The one refusal for every failure after msg_signature (see :func:`_verify_push`).

    The client gets ``SEALED_REFUSAL`` and 400, whatever failed; ``message`` (for the log
    line) adds the kind of failure and WeChat's code, which our messages past decryption
    keep free of decrypted bytes. A parse error of the decrypted text is named by its class
    only: its message may quote the plaintext.
    """
    code = cause.code if cause.code is not None else PARSE_ERROR
    if isinstance(cause, DecryptError):
        kind = cause.message
    else:  # a payload we cannot read is WeChat's -40002, a 415 included
        kind = f"decrypted payload refused ({type(cause).__name__}, {cause.status}) " \
               f"(WeChat {code})"
    error = DecryptError(f"{SEALED_REFUSAL}: {kind}", code=code)
    error.public = SEALED_REFUSAL
    error.signed = True  # past msg_signature: logged whatever the refusal rate
    return error


class _VerifiedPush:
    """What :func:`_verify_push` proved: the push's fields and how it came.

    :ivar nonce: the query's nonce, which an encrypted reply repeats ("" in cloud mode).
    :ivar timestamp: the query's timestamp (None in cloud mode, which signs nothing).
    :ivar aes_key: the key that opened the push, which seals the reply; None in the clear.
    :ivar previous_key: whether only previous_encoding_aes_key opened it.
    :ivar cloud: Cloud Hosting's identity headers, in cloud mode.
    """

    __slots__ = ("fields", "format", "encrypted", "nonce", "timestamp", "aes_key",
                 "previous_key", "cloud", "ttl")

    def __init__(self, fields, fmt, *, encrypted=False, nonce="", timestamp=None,
                 aes_key=None, previous_key=False, cloud=None, ttl=None):
        self.fields, self.format, self.encrypted = fields, fmt, encrypted
        self.nonce, self.timestamp, self.aes_key = nonce, timestamp, aes_key
        self.previous_key, self.cloud, self.ttl = previous_key, cloud, ttl


def _verify_handshake(app, query, now, window, bind, admin_path=DEFAULT_ADMIN_PATH):
    """The console's URL check (a GET): return the ``echostr`` to answer, or raise."""
    if app.mode == "cloud":
        raise WxgateError("mode = cloud: Cloud Hosting sends no URL handshake, and there "
                          f"is no token to sign one; probe {admin_path}/healthz instead",
                          status=405)
    signature, timestamp, nonce, echostr = _required(
        query, "signature", "timestamp", "nonce", "echostr")
    _check_timestamp(timestamp, now, window)
    check_signature(signature, app.token, timestamp, nonce)
    # Its query is a plain push's query (the same signature), and it is logged like every
    # request: bound to the empty body a GET has, it can carry no push.
    bind(app, timestamp, nonce, b"")
    return echostr


def _verify_push(app, query, headers, read_body, now, window, bind):
    """Verify, decrypt and parse a push: a :class:`_VerifiedPush`, or None for Cloud
    Hosting's path check; else raise the refusal.

    :param query: the query string's parameters, first value of each.
    :param headers: in cloud mode, the request's ``X-WX-*`` headers by their names
        (``_CLOUD_HEADERS`` and ``_CLOUD_SOURCE_HEADERS``); unused in the other modes.
    :param read_body: returns the body; called only once the query has passed what can be
        checked without it.
    :param now: the time, in seconds; ``window`` is ``timestamp_window``.
    :param bind: ``bind(app, timestamp, nonce, body)`` binds a signed query to its body,
        raising :class:`SignatureError` when the query came before with another body.

    safe and compat modes need ``Encrypt`` and ``msg_signature`` (WeChat sends both in
    either mode) and read only the decrypted fields: the clear ones of a compat push are
    covered by no signature. A plain app reads those clear fields, so the console can move
    to compat first; its only protection is the URL ``signature``, which does not cover
    the body (the README says what that means).

    When a query is bound to its body depends on what proves the body: in safe and compat
    modes ``msg_signature``, so a body binds only once it has passed; the URL ``signature``
    alone would let whoever saw a query first bind it to garbage, and WeChat's genuine push
    and all its retries would then be refused.
    """
    if app.mode == "cloud":
        return _verify_cloud_push(app, headers, read_body)
    timestamp, nonce = query.get("timestamp"), query.get("nonce")
    if not (timestamp and nonce):
        _required(query, "timestamp", "nonce")  # raises, naming what is missing
    _check_timestamp(timestamp, now, window)
    if app.mode == "plain":  # checked before we even read the body
        check_signature(_required(query, "signature")[0], app.token, timestamp, nonce)
    body = read_body()
    if app.mode == "plain":
        # The URL signature is all a plain push has, so it binds before any other check:
        # a genuine push refused below (a format the app does not take, a body it
        # cannot parse) still keeps its logged query from carrying another body.
        ttl = bind(app, timestamp, nonce, body)
        try:
            fields, fmt = _plain_fields(app, body)
        except WxgateError as exc:
            # Signed and bound: WeChat's own push, or the one body a captured query
            # could carry. Its refusal line is never held back.
            exc.signed = True
            raise
        return _VerifiedPush(fields, fmt, nonce=nonce, timestamp=timestamp, ttl=ttl)
    fields, fmt = _read_fields(body, app.format)
    encrypt = fields.get("Encrypt")
    if encrypt is None:
        raise MessageError(f"{app.mode} mode refuses an unencrypted push", code=None)
    if not isinstance(encrypt, str):
        raise MessageError("Encrypt is not a string", code=None)
    # msg_signature covers Encrypt: check it before decoding a single byte.
    signature = query.get("msg_signature") or _required(query, "msg_signature")[0]
    check_signature(signature, app.token, timestamp, nonce, encrypt)
    ttl = bind(app, timestamp, nonce, body)
    key, previous = app.aes_keys
    try:
        text, aes_key = _open_encrypt(encrypt, key, previous, app.appid)
        inner = text.encode()
        fmt = _sniff_format(inner)
        if app.format != "auto" and fmt != app.format:
            _check_format(app.format, fmt, "decrypted push")
        if fmt == "xml":  # _parse_body's steps, written out: this runs on every push
            fields = _parse_flat_xml(inner)
            if fields is None:
                fields = _parse_xml(inner)
        else:
            fields = _parse_json(inner)
    except WxgateError as exc:
        # One answer for every failure past msg_signature; the log line keeps the kind
        # and WeChat's code, never a decrypted byte.
        raise _sealed_refusal(exc) from None
    return _VerifiedPush(fields, fmt, encrypted=True, nonce=nonce, timestamp=timestamp,
                         aes_key=aes_key, previous_key=aes_key is not key, ttl=ttl)


def _plain_fields(app, body):
    """A plain push's fields, the clear ones (an ``Encrypt`` beside them, as in compat
    mode, is left out), and its format."""
    fields, fmt = _read_fields(body, app.format)
    if fields.get("Encrypt") is not None:
        fields = {name: value for name, value in fields.items() if name != "Encrypt"}
        if "MsgType" not in fields:  # a safe-mode push: nothing in clear to read
            raise MessageError("encrypted push, but the app has mode = plain: set mode "
                               "to compat (or safe) and its encoding_aes_key", code=None)
    return fields, fmt


def _verify_cloud_push(app, headers, read_body):
    """A Cloud Hosting push: no signature, no encryption; None for the path check.

    Query binds do not apply here: Cloud Hosting signs nothing, so there is no signed query
    that could be replayed with another body. What stands in for the signature is
    X-WX-SOURCE, which Cloud Hosting's gateway adds; it proves something only while the
    service's public access is off, hence the option.
    https://developers.weixin.qq.com/miniprogram/dev/wxcloudservice/wxcloudrun/src/guide/weixin/push.md
    """
    # An empty header names no source: it is refused like a missing one.
    if app.cloud_source_check and not any(
            str(headers.get(name, "")).strip() for name in _CLOUD_SOURCE_HEADERS):
        raise WxgateError("no X-WX-SOURCE header: the request did not come through Cloud "
                          "Hosting's gateway (cloud_source_check = yes)", status=403)
    cloud = {}
    for name in _CLOUD_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        # Servers join a repeated header's values with commas (RFC 9110 5.3), and no
        # openid, appid or env id holds one: the client sent a second copy of its own,
        # beside or instead of the gateway's, and which is true cannot be told.
        if "," in value:
            raise WxgateError(f"{name} came more than once; an identity header must come "
                              "once, as Cloud Hosting's gateway sends it", status=400)
        cloud[name] = value
    fields, fmt = _read_fields(read_body(), app.format)
    # The console's path check is a body of one field. A push that merely carries an
    # "action" field among others is a message and goes to the handler.
    if fields.get("action") == _PATH_CHECK_ACTION and len(fields) == 1:
        return None  # the console's path check: answered before any handler or store
    if "Encrypt" in fields:
        raise MessageError("encrypted push, but Cloud Hosting pushes are not encrypted: "
                           "check the app's mode, and the console's push settings",
                           code=None)
    return _VerifiedPush(fields, fmt, cloud=cloud)


class _QueryBinds:
    """Binds each signed query to one body until its timestamp leaves the window.

    The URL signature covers token, timestamp and nonce, never the body, so anyone who
    saw a query (access logs hold them all) could send another body with it. WeChat's
    retries resend the same bytes: a byte-identical body passes, to be answered as a
    duplicate; a different one is a forgery, refused with 403. The pair lives in the
    shared store, so the bind holds across workers.

    The key is the app, timestamp and nonce, whatever signature came with them: the
    console's handshake (a GET, bound to an empty body), a plain push's ``signature``
    and an encrypted one's ``msg_signature`` for one timestamp and nonce are one query,
    bound once. Only a validly signed request binds (:func:`_verify_push` checks first),
    so a forger cannot occupy the key of a query WeChat has yet to send.
    """

    def __init__(self, store, *, prefix, ttl, window, clock, metrics):
        self.store, self._prefix, self._ttl, self._window = store, prefix, ttl, window
        self._clock, self._metrics = clock, metrics

    def remember_for(self, app, timestamp):
        """Seconds to remember a push of ``app`` stamped ``timestamp``, its dedup key and
        its query: the app's dedup_ttl (else the gateway's), and at least until the
        timestamp has left the window, so a replay is never handled again however short
        dedup_ttl is."""
        ttl = app.dedup_ttl or self._ttl
        if not self._window or timestamp is None:
            return ttl
        return max(ttl, int(timestamp) + self._window - self._clock() + REMEMBER_MARGIN)

    def bind(self, app, timestamp, nonce, body):
        """Bind the query ``(timestamp, nonce)`` to ``body``; raise if it came with another.
        Return how long the bind is remembered (:meth:`remember_for`), the push's too."""
        query_id = hashlib.sha1(f"{timestamp}\n{nonce}".encode(
            "utf-8", "surrogateescape")).hexdigest()
        key = f"{self._prefix}:query:{app.name}:{query_id}"
        digest = hashlib.sha256(body).hexdigest()
        ttl = self.remember_for(app, timestamp)
        if self.store.add(key, digest, ttl):
            return ttl
        bound = self.store.get(key)
        if bound is None or hmac.compare_digest(bound.encode("ascii", "replace"),
                                                digest.encode("ascii")):
            return ttl
        self._metrics.count("wxgate_query_reused_total", app=app.name)
        raise SignatureError("signed query reused with a different body: a forged or altered "
                             "push, refused", code=None)


###############################################################################
# Stores ######################################################################
###############################################################################

class Store:
    """A small key-value store with expiry: what dedup, the token cache and the locks share.

    Values are strings; ``ttl`` is in seconds. Implementations must make :meth:`add` atomic
    across every process that shares the store: it is the one operation claims and locks
    rest on.
    """

    #: True when other processes see the same data (so waiting must poll the store).
    shared = False
    #: What the store is, for metrics labels ("memory", "sqlite", "redis").
    kind = "custom"
    #: How logs name the store: its URL or path, any password redacted.
    name = "store"

    def add(self, key: str, value: str, ttl: float) -> bool:
        """Set ``key`` only if it is absent or expired; return whether it was set."""
        raise NotImplementedError

    def get(self, key: str) -> str | None:
        """The value, or None when absent or expired."""
        raise NotImplementedError

    def set(self, key: str, value: str, ttl: float) -> None:
        """Set ``key`` unconditionally."""
        raise NotImplementedError

    def delete(self, key: str, value: str | None = None) -> bool:
        """Delete ``key``; with ``value``, only while it still holds that value."""
        raise NotImplementedError

    def touch(self, key: str, value: str, ttl: float) -> bool:
        """Give ``key`` a new ``ttl`` while it still holds ``value``; return whether it did."""
        raise NotImplementedError

    def ping(self) -> None:
        """Raise if the store cannot be reached."""

    def verify(self) -> str | None:
        """Why the store no longer holds what it held (its data lost), or None.

        A store that can lose its data behind the gateway's back (a Redis restarted without
        persistence or flushed, a sqlite file deleted while open) notices it here, puts
        itself right (a new identity key, the configured file reopened) and says so once:
        each process that noticed reports it once. A read or a stat(), cheap enough to be
        asked once a second.
        """
        return None

    def close(self) -> None:
        """Release connections."""

    def add_counts(self, key: str, deltas: dict[str, float],
                   batch: tuple[str, int] | None = None) -> None:
        """Add each of ``deltas`` (series -> amount) to the totals under ``key``: all of
        them or none, atomically for every process sharing the store.

        ``batch``, ``(writer, number)``, makes sending a batch again safe: the store adds a
        writer's batch only if its number is above the last one it added for that writer.
        A write whose answer was lost may have been applied, so a writer sends a failed
        batch again unchanged, and numbers the next one higher. The metrics use this.
        """
        raise NotImplementedError

    def read_counts(self, key: str) -> dict[str, float]:
        """The totals under ``key`` (series -> total); empty when nothing was added."""
        raise NotImplementedError


class MemoryStore(Store):
    """The in-process default: an LRU bounded by ``max_entries``, with per-entry expiry.

    :param max_entries: how many keys to keep; the least recently used go first.
    :param clock: returns the time in seconds (injectable for tests).
    """

    kind = name = "memory"

    def __init__(self, max_entries: int = DEFAULT_DEDUP_SIZE, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._entries: collections.OrderedDict[str, tuple[str, float]] = \
            collections.OrderedDict()  # key -> (value, expires_at)
        self._lock = threading.Lock()

    def _live(self, key, now):
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._entries[key]
            return None
        return entry

    # add and set run two and one times a push: their steps are written out, not called.

    def add(self, key, value, ttl):
        now = self._clock()
        entries = self._entries
        with self._lock:
            entry = entries.get(key)
            if entry is not None and entry[1] > now:
                return False  # live; an expired one is replaced like an absent one
            entries[key] = (value, now + ttl)
            entries.move_to_end(key)
            while len(entries) > self.max_entries:
                entries.popitem(last=False)
            return True

    def get(self, key):  # twice on a retry (its query's bind, its answer): _live written out
        now = self._clock()
        entries = self._entries
        with self._lock:
            entry = entries.get(key)
            if entry is None:
                return None
            if entry[1] <= now:
                del entries[key]
                return None
            entries.move_to_end(key)
            return entry[0]

    def set(self, key, value, ttl):
        now = self._clock()
        entries = self._entries
        with self._lock:
            entries[key] = (value, now + ttl)
            entries.move_to_end(key)
            while len(entries) > self.max_entries:
                entries.popitem(last=False)

    def delete(self, key, value=None):
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or (value is not None and entry[0] != value):
                return False
            del self._entries[key]
            return True

    def touch(self, key, value, ttl):
        now = self._clock()
        with self._lock:
            entry = self._live(key, now)
            if entry is None or entry[0] != value:
                return False
            self._entries[key] = (value, now + ttl)
            self._entries.move_to_end(key)  # a live claim is the last thing to evict
            return True

    def __len__(self):
        return len(self._entries)


def _number_text(value):
    """A total as the exposition shows it, and an amount as Redis takes it: whole numbers
    without a fraction."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


###############################################################################
# Sqlite store ################################################################
###############################################################################

def _rollback(connection):
    """End a failed transaction without hiding why it failed.

    When COMMIT fails on a full disk (SQLITE_FULL) or on an I/O error, sqlite has already
    rolled the transaction back, and a ROLLBACK would raise "cannot rollback - no transaction
    is active", which the caller would then report instead of "database or disk is full".
    So roll back only a transaction still open, and never let the rollback's own error
    replace the one being raised.
    """
    if connection.in_transaction:
        try:
            connection.execute("ROLLBACK")
        except sqlite3.Error:
            pass


class SqliteStore(Store):
    """A store in one sqlite file, shared by every process on a host (gunicorn workers).

    WAL mode lets readers run beside the one writer; every write is one short ``BEGIN
    IMMEDIATE`` transaction, and the busy timeout makes concurrent writers queue instead of
    failing. Expired rows are deleted as we go. The file and a directory we create are
    owner-only, because the file holds access tokens.

    The file can be deleted or replaced while in use (``rm wx.db*``, a restore from a
    backup): open connections then keep writing to the old file, which no new process
    sees, so the workers of one host split into two stores. At most once per
    ``STORE_VERIFY_EVERY`` an operation compares the file at ``path`` with the one open
    (device and inode), and on a difference goes back to ``path``; :meth:`verify` says so.

    :param path: the database file.
    :param clock: returns the time in seconds (injectable for tests).
    :param busy_timeout: seconds a writer waits for the lock before giving up.
    :param synchronous: sqlite's ``PRAGMA synchronous`` for this store's connections.
    :param schema: more ``CREATE ... IF NOT EXISTS`` statements, run on each new
        connection (the queue's table), so a file made anew while serving has them too.
    """

    shared = True
    kind = "sqlite"
    _CLEANUP_EVERY = 256

    # Idle connections kept per process. A connection is borrowed for one operation and given
    # back, so a process holds at most this many plus one per operation running right now,
    # whatever its threads do: `wxgate serve` starts a thread per request and gevent a
    # greenlet, and a connection tied to each of them leaked its descriptors.
    _POOL_SIZE = 4

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time,
                 busy_timeout: float = 2.0, synchronous: str = "NORMAL",
                 schema: tuple[str, ...] = ()) -> None:
        self.path = os.path.abspath(path)
        self.name = f"sqlite://{self.path}"
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous
        self._schema = (
            "CREATE TABLE IF NOT EXISTS wxgate_kv (key TEXT PRIMARY KEY, value TEXT NOT"
            " NULL, expires_at REAL NOT NULL)",
            "CREATE INDEX IF NOT EXISTS wxgate_kv_expiry ON wxgate_kv (expires_at)",
        ) + tuple(schema)
        # pid -> (lock, idle connections). Connections made before a fork stay in their
        # parent's entry: never used again, and never closed either, since closing an
        # inherited handle can release the parent's POSIX locks. An idle connection is
        # (generation, connection): one made before the file was reopened is closed.
        self._pools: dict[int, Any] = {}
        self._writes = 0
        self._generation = 0
        self._check_lock = threading.Lock()
        self._check_due = time.monotonic() + STORE_VERIFY_EVERY
        self._reopened: list[str] = []  # why the file was reopened, until verify() says it
        self._create_file()
        self._identity = self._file_identity()
        self.using(lambda connection: None)  # the schema now: a bad path fails at startup

    def reopen(self, *, synchronous: str, schema: tuple[str, ...]) -> SqliteStore:
        """Another store on the same file and clock, with its own connections, durability
        and tables (the durable queue's)."""
        return SqliteStore(self.path, clock=self._clock, synchronous=synchronous,
                           schema=schema)

    def _create_file(self):
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
        # Create the file owner-only before sqlite does (with the umask's mode). Only when it
        # is new: closing any descriptor of a database file drops every POSIX lock this
        # process holds on it, so reopening a file another connection here is using would
        # corrupt it ("How To Corrupt An SQLite Database File", section 2.2).
        try:
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass

    def _file_identity(self):
        """(device, inode) of the file at ``path`` now, or None when there is none."""
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return None
        return status.st_dev, status.st_ino

    def _check_file(self, force=False):
        """Go back to the file at ``path`` if it is no longer the one open (see the class).

        One thread checks at a time, and the others do not wait for it: they use the
        connections they have until the check is done, as they did before it.
        """
        if not self._check_lock.acquire(blocking=force):
            return
        try:
            now = time.monotonic()
            if not force and now < self._check_due:
                return
            self._check_due = now + STORE_VERIFY_EVERY
            identity = self._file_identity()
            if identity == self._identity:
                return
            what = ("was deleted" if identity is None else
                    "was deleted or replaced (the path names another file now)")
            # The generation first, then the idle connections: one given back in between
            # is either closed at once or found in the list and closed here.
            self._generation += 1
            lock, idle = self._pool()
            with lock:
                stale, idle[:] = list(idle), []
            for _, connection in stale:
                connection.close()  # the old file's: its POSIX locks are no longer needed
            self._create_file()
            self.using(lambda connection: None)
            self._identity = self._file_identity()
            self._reopened.append(f"its file {what} while in use; reopened {self.path}")
        finally:
            self._check_lock.release()

    def verify(self):
        self._check_file(force=True)
        reasons, self._reopened = self._reopened, []
        return "; ".join(reasons) or None

    def _pool(self):
        pid = os.getpid()
        pool = self._pools.get(pid)
        if pool is None:  # setdefault is atomic: two threads agree on one pool
            pool = self._pools.setdefault(pid, (threading.Lock(), []))
        return pool

    def _connect(self):
        connection = sqlite3.connect(self.path, timeout=self._busy_timeout,
                                     isolation_level=None, check_same_thread=False)
        try:
            self._use_wal(connection)
            connection.execute(f"PRAGMA synchronous={self._synchronous}")
            for statement in self._schema:
                connection.execute(statement)
        except BaseException:
            connection.close()
            raise
        for suffix in ("-wal", "-shm"):
            try:
                os.chmod(self.path + suffix, 0o600)
            except OSError:
                pass
        return connection

    def _use_wal(self, connection):
        """Put the file in WAL mode, waiting up to the busy timeout for the lock it needs.

        Only a new file changes mode (WAL is then written in the file), and the change
        takes the write lock from inside a read: sqlite refuses that at once with "database
        is locked", without its busy timeout, while another connection writes. gunicorn's
        workers open a new file together at their first requests, so the one that came
        second failed to build its gateway and answered a push 500. Retry instead.
        """
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(0.01)

    def using(self, operation: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``operation(connection)`` on a connection of this process's pool (the durable
        queue runs its transactions so, on its own tables in the same file).

        A connection serves one thread at a time (sqlite connections must not be shared
        mid-statement, nor cross a fork); past ``_POOL_SIZE`` idle ones, it is closed. So is
        one still inside a transaction (its ROLLBACK failed too): back in the pool, it would
        run the next operation's statements inside that transaction, and keep its lock.
        """
        if time.monotonic() >= self._check_due:
            self._check_file()
        lock, idle = self._pool()
        with lock:
            generation, connection = idle.pop() if idle else (self._generation, None)
        if connection is None:
            connection = self._connect()
        try:
            return operation(connection)
        finally:
            kept = False
            if not connection.in_transaction:
                with lock:
                    kept = len(idle) < self._POOL_SIZE and generation == self._generation
                    if kept:
                        idle.append((generation, connection))
            if not kept:
                connection.close()

    def _write(self, statements):
        self._writes += 1
        return self.using(lambda connection: self._transaction(connection, statements))

    def _transaction(self, connection, statements):
        connection.execute("BEGIN IMMEDIATE")
        try:
            changed = 0
            for sql, parameters in statements:
                changed = connection.execute(sql, parameters).rowcount
            if self._writes % self._CLEANUP_EVERY == 0:
                connection.execute("DELETE FROM wxgate_kv WHERE expires_at <= ?",
                                   (self._clock(),))
            connection.execute("COMMIT")
        except BaseException:
            _rollback(connection)
            raise
        return changed

    def add(self, key, value, ttl):
        now = self._clock()
        return self._write((
            ("DELETE FROM wxgate_kv WHERE key = ? AND expires_at <= ?", (key, now)),
            ("INSERT OR IGNORE INTO wxgate_kv VALUES (?, ?, ?)", (key, value, now + ttl)),
        )) == 1

    def query(self, sql: str, parameters: Any = ()) -> list[Any]:
        """All rows of a SELECT, its cursor closed: a statement left unfinished keeps its
        snapshot of the file (WAL) open and hides what other processes write after it."""
        def read(connection):
            cursor = connection.execute(sql, parameters)
            try:
                return cursor.fetchall()
            finally:
                cursor.close()
        return self.using(read)

    def execute(self, sql: str, parameters: Any = ()) -> tuple[int, int | None]:
        """One statement in autocommit mode; return ``(rowcount, lastrowid)``."""
        def execute(connection):
            cursor = connection.execute(sql, parameters)
            try:
                return cursor.rowcount, cursor.lastrowid
            finally:
                cursor.close()
        return self.using(execute)

    def get(self, key):
        rows = self.query("SELECT value FROM wxgate_kv WHERE key = ? AND expires_at > ?",
                          (key, self._clock()))
        return rows[0][0] if rows else None

    def set(self, key, value, ttl):
        self._write((("INSERT OR REPLACE INTO wxgate_kv VALUES (?, ?, ?)",
                      (key, value, self._clock() + ttl)),))

    def delete(self, key, value=None):
        if value is None:
            statement = ("DELETE FROM wxgate_kv WHERE key = ?", (key,))
        else:
            statement = ("DELETE FROM wxgate_kv WHERE key = ? AND value = ?", (key, value))
        return self._write((statement,)) == 1

    def touch(self, key, value, ttl):
        now = self._clock()
        return self._write((("UPDATE wxgate_kv SET expires_at = ? WHERE key = ? AND value = ?"
                             " AND expires_at > ?", (now + ttl, key, value, now)),)) == 1

    def ping(self):
        self.query("SELECT 1")

    def close(self):
        lock, idle = self._pool()
        with lock:
            connections, idle[:] = list(idle), []
        for _, connection in connections:
            connection.close()

    # The metrics' totals, and each writer's last batch. Made on first use rather than with
    # the other tables, so a file written only by an older wxgate gets them too.
    _COUNTS_SCHEMA = (
        "CREATE TABLE IF NOT EXISTS wxgate_counts (key TEXT NOT NULL, series TEXT NOT NULL,"
        " value REAL NOT NULL, PRIMARY KEY (key, series))",
        "CREATE TABLE IF NOT EXISTS wxgate_count_batches (writer TEXT PRIMARY KEY,"
        " number INTEGER NOT NULL, at REAL NOT NULL)",
    )
    # A writer's last batch number is kept this long after its last batch: far longer than
    # a process waits to send a failed batch again.
    _BATCH_MEMORY = 86400.0

    def add_counts(self, key, deltas, batch=None):
        now = self._clock()

        def add(connection):
            connection.execute("BEGIN IMMEDIATE")
            try:
                for statement in self._COUNTS_SCHEMA:
                    connection.execute(statement)
                if batch is not None:
                    writer, number = f"{key}:{batch[0]}", batch[1]
                    rows = connection.execute("SELECT number FROM wxgate_count_batches WHERE"
                                              " writer = ?", (writer,)).fetchall()
                    if rows and rows[0][0] >= number:  # added already: its answer was lost
                        connection.execute("ROLLBACK")
                        return
                    connection.execute("INSERT OR REPLACE INTO wxgate_count_batches VALUES"
                                       " (?, ?, ?)", (writer, number, now))
                    if not rows:  # a new writer (a new process): forget those long gone
                        connection.execute("DELETE FROM wxgate_count_batches WHERE at < ?",
                                           (now - self._BATCH_MEMORY,))
                connection.executemany(
                    "INSERT INTO wxgate_counts VALUES (?, ?, ?) ON CONFLICT (key, series)"
                    " DO UPDATE SET value = value + excluded.value",
                    [(key, series, float(value)) for series, value in deltas.items()])
                connection.execute("COMMIT")
            except BaseException:
                _rollback(connection)
                raise
        self.using(add)

    def read_counts(self, key):
        try:
            rows = self.query("SELECT series, value FROM wxgate_counts WHERE key = ?", (key,))
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            return {}  # nothing was ever added to this file
        return dict(rows)


###############################################################################
# Redis store #################################################################
###############################################################################

class RedisStore(Store):
    """A store in Redis, shared by every process on every host.

    Needs the optional ``redis`` package (``pip install 'wxgate[redis]'``), imported only here.

    A Redis without persistence forgets everything when it restarts, and one that evicts
    keys (``maxmemory-policy``) forgets some: pushes handled before would then run again.
    So the store keeps an identity key, written once with no expiry, and :meth:`verify`
    reads it: gone, or changed by another process that found it gone, means the data was
    lost.

    :param url: ``redis://[:password@]host:port/db``, ``rediss://...`` or ``unix://...``.
    :param socket_timeout: seconds for each command, so a dead Redis cannot stall a push.
    :param prefix: the gateway's ``store_prefix``, under which the identity key lives.
    """

    shared = True
    kind = "redis"
    # Compare-and-delete: a lock or claim is released only by the one who holds it.
    _DELETE_IF = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
                  "return redis.call('del', KEYS[1]) else return 0 end")
    _TOUCH_IF = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
                 "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end")

    def __init__(self, url: str, *, socket_timeout: float = 1.0, client: Any = None,
                 prefix: str = "wxgate") -> None:
        self.name = _redact_url(url) if url else "redis"
        self._identity_key = f"{prefix}:store-id"
        self._identity: str | None = None  # the identity key's value, once read
        if client is None:
            try:
                import redis
            except ImportError:
                raise ConfigError("store = redis://... needs the redis package: "
                                  "pip install 'wxgate[redis]'") from None
            try:
                client = redis.Redis.from_url(url, socket_timeout=socket_timeout,
                                              socket_connect_timeout=socket_timeout)
            except ValueError:  # its message may quote the password
                raise ConfigError(f"store {_redact_url(url)}: not a valid Redis URL (a "
                                  "password with '/' or '@' must be percent-encoded)") from None
        self._redis = client
        self._delete_if = client.register_script(self._DELETE_IF)
        self._touch_if = client.register_script(self._TOUCH_IF)

    def add(self, key, value, ttl):
        return bool(self._redis.set(key, value, nx=True, px=max(1, int(ttl * 1000))))

    def get(self, key):
        value = self._redis.get(key)
        return value.decode("utf-8") if isinstance(value, bytes) else value

    def set(self, key, value, ttl):
        self._redis.set(key, value, px=max(1, int(ttl * 1000)))

    def delete(self, key, value=None):
        if value is None:
            return bool(self._redis.delete(key))
        return bool(self._delete_if(keys=[key], args=[value]))

    def touch(self, key, value, ttl):
        return bool(self._touch_if(keys=[key], args=[value, max(1, int(ttl * 1000))]))

    def ping(self):
        self._redis.ping()

    def verify(self):
        found = self.get(self._identity_key)
        if found is not None and found == self._identity:
            return None
        if found is None:
            # The first process to look writes it; the others read what it wrote.
            self._redis.set(self._identity_key, os.urandom(16).hex(), nx=True)
        known, self._identity = self._identity, self.get(self._identity_key)
        if known is None:
            self._check_eviction_policy()
            return None  # this process's first look: nothing to compare with
        if found is None:
            return (f"its identity key {self._identity_key} is gone: Redis restarted without "
                    "persistence, was flushed, or evicted keys (maxmemory-policy)")
        return (f"its identity key {self._identity_key} changed: another process found "
                "the data lost first")

    def _check_eviction_policy(self):
        """Warn, once per process, when a full Redis would evict keys instead of refusing
        writes: every key wxgate writes but two (the identity, the metrics' totals) has an
        expiry, so volatile-* policies evict dedup records as readily as allkeys-* ones,
        silently. With noeviction a full Redis refuses writes, which the gateway logs and
        survives (see _FallbackStore)."""
        try:
            policy = self._redis.info("memory").get("maxmemory_policy")
        except Exception:  # INFO may be refused (an ACL, a managed Redis): nothing to say
            return
        if policy not in (None, "noeviction"):
            logger.warning("store %s has maxmemory-policy %s: once full, Redis evicts dedup "
                           "records (and queued messages), and pushes handled before run "
                           "again without a word; set maxmemory-policy noeviction",
                           self.name, policy)

    @property
    def client(self) -> Any:
        """The redis-py client (the durable queue's scripts run on it)."""
        return self._redis

    def close(self):
        self._redis.close()

    # One script, so that the check of the writer's last batch and the additions are one
    # atomic step for every client. KEYS: the totals' hash, then the writer's last batch
    # number (absent without a batch). ARGV: the batch number, how long (ms) to remember
    # it, then series and amount pairs.
    _ADD_COUNTS = """
        if #KEYS > 1 and tonumber(redis.call('get', KEYS[2]) or '0') >= tonumber(ARGV[1]) then
            return 0
        end
        for i = 3, #ARGV, 2 do
            redis.call('hincrbyfloat', KEYS[1], ARGV[i], ARGV[i + 1])
        end
        if #KEYS > 1 then
            redis.call('set', KEYS[2], ARGV[1], 'PX', ARGV[2])
        end
        return 1
    """
    _BATCH_MEMORY = 86400.0

    def add_counts(self, key, deltas, batch=None):
        keys, arguments = [key], [0, 0]
        if batch is not None:
            keys.append(f"{key}:batch:{batch[0]}")
            arguments = [batch[1], int(self._BATCH_MEMORY * 1000)]
        for series, value in deltas.items():
            arguments += (series, _number_text(value))
        self._redis.register_script(self._ADD_COUNTS)(keys=keys, args=arguments)

    def read_counts(self, key):
        return {series.decode("utf-8") if isinstance(series, bytes) else series: float(value)
                for series, value in self._redis.hgetall(key).items()}


def open_store(url: str, *, clock: Callable[[], float] = time.time,
               max_entries: int = DEFAULT_DEDUP_SIZE, prefix: str = "wxgate") -> Store:
    """Open the store a ``[wxgate] store`` value names (``memory``, ``sqlite://``,
    ``redis://``)."""
    if url == "memory":
        return MemoryStore(max_entries, clock=clock)
    if url.startswith("sqlite://"):
        return SqliteStore(url[len("sqlite://"):], clock=clock)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url, prefix=prefix)
    raise ConfigError(f"unknown store {url.split('://')[0]!r}")


###############################################################################
# Store fallback ##############################################################
###############################################################################

class _FallbackStore(Store):
    """A shared store that keeps pushes flowing when it fails, and loses as little as it can.

    When Redis is down or the disk is full we log loudly and carry on: what cannot be
    written to the shared store goes to a private in-process store, so no push is dropped.
    What is lost meanwhile is only what other processes cannot see: a retry that lands on
    another process may run its handler again (the dedup section keeps each process's own
    recent answers, so a retry landing here never does).

    - Reads and writes fail separately. sqlite on a full disk still reads, so while only
      writes fail, reads still go to the shared store: a message handled before the outage
      is found done there, by every process.
    - After a failure, the failing kind of operation is left alone for ``STORE_RETRY_AFTER``
      seconds (a blackholed Redis costs a connect timeout per call), then tried again.
    - Values set while writes fail are journalled, and written back (with ``add``, never
      over what the shared store holds) as soon as a write succeeds again, so messages
      handled during the outage are known to every process after it. The one value a
      write-back replaces is the one its ``set`` was meant to replace (``replacing``): the
      claim this process took before the outage, which would otherwise hold the key until
      it expires and then let another process run the work again.
    - At most once per ``STORE_VERIFY_EVERY``, on the way of a push, and at each health
      check, the shared store is asked whether it lost its data (:meth:`Store.verify`).
      A loss cannot be undone, but it is logged, counted in ``wxgate_store_lost_total`` and
      shown by the detailed health check, so the operator learns why handled pushes ran
      again, instead of finding nothing anywhere.
    """

    def __init__(self, primary, *, clock=time.time, max_entries=DEFAULT_DEDUP_SIZE,
                 metrics=None):
        self.primary = primary
        self.shared = primary.shared
        self.kind, self.name = primary.kind, primary.name
        self._metrics = metrics
        self._verify_lock = threading.Lock()
        self._verify_due = 0.0  # on time.monotonic(): the first operation verifies
        self.losses = 0  # data losses this process noticed
        self.last_loss: tuple[float, str] | None = None  # (clock time, reason)
        self._local = MemoryStore(max_entries, clock=clock)
        self._max_entries = max_entries
        # key -> (value, expires_at, replacing): the sets to write back. Guarded by _lock,
        # as are the failure flags, so a recovery takes the journal exactly once however
        # many threads see the store come back at the same moment.
        self._journal = collections.OrderedDict()
        self._lock = threading.Lock()
        self._write_failing = self._read_failing = False
        self._write_retry_at = self._read_retry_at = 0.0  # on time.monotonic()
        self._clock = clock
        self._last_warning = 0.0

    @property
    def failing(self):
        """True while the shared store's writes (or reads) fail."""
        return self._write_failing or self._read_failing

    @property
    def write_failing(self):
        """True from a failed write to the shared store until a write succeeds again."""
        return self._write_failing

    def _skip(self, write):
        if write:
            return self._write_failing and time.monotonic() < self._write_retry_at
        return self._read_failing and time.monotonic() < self._read_retry_at

    def _failed(self, exc, write):
        now = time.monotonic()
        with self._lock:
            warn = not self.failing or now - self._last_warning > 10
            if warn:
                self._last_warning = now
            if write:
                self._write_failing, self._write_retry_at = True, now + STORE_RETRY_AFTER
            # A store that cannot be reached at all (Redis down or blackholed: a connect
            # timeout per call) will not read either; a full disk will.
            if not write or _unreachable(exc):
                self._read_failing, self._read_retry_at = True, now + STORE_RETRY_AFTER
        if warn:
            logger.error("store %s failed (%s: %s); continuing without cross-process "
                         "dedup and token sharing until it recovers",
                         type(self.primary).__name__, type(exc).__name__, _cause(exc))

    def _verify(self, force=False):
        """Ask the shared store whether it lost its data, at most once per
        ``STORE_VERIFY_EVERY`` (``force``: now); log and count a loss.

        One thread asks; the others go on without waiting. While the store fails, the
        question waits for its recovery, which is when a restarted Redis comes back empty.
        """
        if not force and (time.monotonic() < self._verify_due or self.failing):
            return
        if not self._verify_lock.acquire(blocking=force):
            return
        try:
            if not force and time.monotonic() < self._verify_due:
                return
            self._verify_due = time.monotonic() + STORE_VERIFY_EVERY
            try:
                reason = self.primary.verify()
            except Exception as exc:
                self._failed(exc, write=False)
                return
        finally:
            self._verify_lock.release()
        if reason is None:
            return
        self.losses += 1
        self.last_loss = (self._clock(), reason)
        if self._metrics is not None:
            self._metrics.count("wxgate_store_lost_total", store=self.kind)
        logger.error("store %s lost its data: %s. Pushes it remembered as handled run again "
                     "if WeChat retries them, and messages queued in it are gone",
                     self.name, reason)

    def _succeeded(self, write):
        if not (self._write_failing if write else self._read_failing):
            return
        with self._lock:
            if write:
                if not self._write_failing:
                    return
                self._write_failing = False
                journal, self._journal = self._journal, collections.OrderedDict()
            else:
                self._read_failing, journal = False, None
            recovered = not self.failing
        if journal:
            # Off the request's thread: a long outage may have journalled thousands of keys,
            # and the push that found the store back should not wait for them.
            threading.Thread(target=self._write_back, args=(journal,), daemon=True,
                             name="wxgate-write-back").start()
        if recovered:
            logger.warning("store %s recovered", type(self.primary).__name__)
            self._verify_due = 0.0  # a Redis that restarted may have come back empty

    def _write_back(self, journal):
        """Write what was set during the outage to the shared store, then forget it here."""
        now, written = self._clock(), 0
        items = list(journal.items())
        for index, (key, (value, expires_at, replacing)) in enumerate(items):
            if expires_at <= now:
                continue
            try:
                added = self.primary.add(key, value, expires_at - now)
                if not added and replacing is not None:
                    # Our own claim still holds the key: compare-and-delete it, then add.
                    # Another process may claim the key between the two, and then keeps
                    # it, as it would after our claim had expired.
                    self.primary.delete(key, replacing)
                    added = self.primary.add(key, value, expires_at - now)
                written += bool(added)
            except Exception as exc:
                # Failing again: what is left goes back in the journal for the next recovery.
                with self._lock:
                    for left, entry in items[index:]:
                        self._journal.setdefault(left, entry)
                self._failed(exc, write=True)
                return
        # The local copies stay: they are still true (a done key stays done), they are read
        # only while the shared store fails, and the LRU bounds them.
        logger.info("store %s: wrote back %d key(s) set during the outage",
                    type(self.primary).__name__, written)

    def _read_primary(self, key):
        """The shared store's value, or None when absent or when reads fail too."""
        if self._skip(write=False):
            return None
        try:
            value = self.primary.get(key)
        except Exception as exc:
            self._failed(exc, write=False)
            return None
        self._succeeded(write=False)
        return value

    def _write(self, operation, *args):
        """``(True, result)`` from the shared store, or ``(False, None)`` when it failed."""
        if self._skip(write=True):
            return False, None
        try:
            result = getattr(self.primary, operation)(*args)
        except Exception as exc:  # any driver's error: sqlite3, OSError, redis
            self._failed(exc, write=True)
            return False, None
        self._succeeded(write=True)
        return True, result

    def add(self, key, value, ttl):
        self._verify()
        done, result = self._write("add", key, value, ttl)
        if done:
            return result
        # The shared store may still say the key is taken (a full disk still reads): then it
        # is, for every process. Only a key absent there is claimed here, in this process.
        if self._read_primary(key) is not None:
            return False
        return self._local.add(key, value, ttl)

    def get(self, key):
        self._verify()
        if not self.failing:
            try:
                return self.primary.get(key)
            except Exception as exc:
                self._failed(exc, write=False)
        # Degraded: what this process wrote during the outage is newer than the shared store.
        value = self._local.get(key)
        return value if value is not None else self._read_primary(key)

    def set(self, key, value, ttl, *, replacing=None):
        """Set ``key``; ``replacing``, the value this set overwrites (a claim of ours),
        may be overwritten by the write-back too, where nothing else is."""
        self._verify()
        done, _ = self._write("set", key, value, ttl)
        if done:
            return
        self._local.set(key, value, ttl)
        with self._lock:
            self._journal[key] = (value, self._clock() + ttl, replacing)
            self._journal.move_to_end(key)
            while len(self._journal) > self._max_entries:
                self._journal.popitem(last=False)

    def delete(self, key, value=None):
        local = self._local.delete(key, value)
        if local:
            with self._lock:
                self._journal.pop(key, None)
        done, result = self._write("delete", key, value)
        return bool(result) or local

    def touch(self, key, value, ttl):
        if self._local.touch(key, value, ttl):
            return True
        return bool(self._write("touch", key, value, ttl)[1])

    def check_write(self, key):
        """Write ``key`` to the shared store now; raise if it cannot be written.

        The health check: the store is healthy only when a write succeeds, so after a
        failure it stays unhealthy until one does (this one, or a push's). Once the write
        has succeeded, it asks the store whether it lost its data.
        """
        try:
            self.primary.set(key, str(self._clock()), HEALTH_TTL)
        except Exception as exc:
            self._failed(exc, write=True)
            raise
        self._succeeded(write=True)
        self._verify(force=True)

    def ping(self):
        self.primary.ping()

    def close(self):
        self.primary.close()

    def add_counts(self, key, deltas, batch=None):
        """Add to the shared totals, or raise: unlike a key, a count cannot be kept here
        for other processes to read, so the caller keeps its batch and sends it again
        (see :meth:`Store.add_counts`). A failure or a success counts as any write's."""
        if type(self.primary).add_counts is Store.add_counts:
            raise NotImplementedError  # a store of the user's own without totals
        if self._skip(write=True):
            raise WxgateError(f"store {self.name} failed less than {STORE_RETRY_AFTER:g} s "
                              "ago", status=503)
        try:
            self.primary.add_counts(key, deltas, batch)
        except NotImplementedError:  # not a failure of the store
            raise
        except Exception as exc:
            self._failed(exc, write=True)
            raise
        self._succeeded(write=True)

    def read_counts(self, key):
        if type(self.primary).read_counts is Store.read_counts:
            raise NotImplementedError
        if self._skip(write=False):
            raise WxgateError(f"store {self.name} failed less than {STORE_RETRY_AFTER:g} s "
                              "ago", status=503)
        try:
            counts = self.primary.read_counts(key)
        except NotImplementedError:
            raise
        except Exception as exc:
            self._failed(exc, write=False)
            raise
        self._succeeded(write=False)
        return counts


def _unreachable(exc):
    """Whether a store's error means it cannot be reached (rather than refusing a write)."""
    return isinstance(exc, (ConnectionError, TimeoutError)) or \
        type(exc).__name__ in ("ConnectionError", "TimeoutError")  # redis's own classes


def _cause(exc):
    """An exception's own message, or the one it was raised from (sqlite's real error)."""
    text = str(exc)
    if not text and exc.__cause__ is not None:
        text = str(exc.__cause__)
    return text


###############################################################################
# Duplicate detection #########################################################
###############################################################################

def _store_key(message):
    """Where a message's dedup key lives in the store: a push that came unencrypted (and so
    unauthenticated) has its own namespace, so a forged plain body can never claim the key
    of a genuine encrypted push and have it answered "duplicate"."""
    return message.dedup_key if message.encrypted else f"clear:{message.dedup_key}"


def _dedup_store(store, clock):
    """Where one app's dedup records go: ``store`` when it is shared (every process must
    see the same keys), else a memory store of the same size for this app alone."""
    if isinstance(store, MemoryStore):
        return MemoryStore(store.max_entries, clock=clock)
    return store


class _InFlightTimeout(WxgateError):
    status = 503


def _wait_at(gate, timeout):
    """Wait up to ``timeout`` seconds for ``gate`` to open.

    A gate is a bare lock, acquired by the push that owns a dedup key when it claims it and
    released once its work is over: cheaper to make than a threading.Event, or than an
    object around the lock, on every push. Waiters pass it and leave it open.
    """
    if gate.acquire(timeout=timeout):
        gate.release()  # let the next waiter through too


class _Dedup:
    """Run each push's work once per dedup key, and answer retries with the first reply.

    A key moves through three states in the store: absent, claimed (``p`` + a claim id) and
    done (``d`` + the reply, for ``ttl``). Whoever's ``add`` succeeds owns the key and runs
    the work; everyone else waits for ``done``. If the work raises, the owner deletes its
    claim, so the next delivery (a waiting duplicate or WeChat's retry) runs it again:
    nothing that was not acknowledged is remembered as done.

    A claim lives ``CLAIM_TTL`` seconds, and a keeper thread renews the claims of work still
    running in this process. So a slow handler keeps its retries waiting for its reply
    instead of running again, while the claim of a worker that was killed expires within
    ``CLAIM_TTL`` and the next delivery takes over.

    With a shared store, each process also remembers the answers it gave recently (an LRU
    of ``max_entries`` keys, each for its ttl) and looks there before the store. Whatever
    the store does (Redis down, a full disk), a retry landing on the process that handled
    the message is answered from there and never runs the work again.
    """

    def __init__(self, store, *, prefix, ttl, clock=time.time, sleep=time.sleep,
                 max_entries=DEFAULT_DEDUP_SIZE):
        self.store, self.prefix, self.ttl = store, prefix, ttl
        self._clock, self._sleep = clock, sleep
        # A memory store is its own memory: no second copy of it.
        self._recent = MemoryStore(max_entries, clock=clock) if store.shared else None
        # A store that journals writes through an outage can be told which claim a done
        # value replaces (see _FallbackStore), so the write-back can replace it too.
        self._journalled = isinstance(store, _FallbackStore)
        # key -> (claim, gate) for work running in this process: waiters here wait at the
        # gate (_wait_at) instead of polling the store, and the keeper renews the claim.
        self._owned = {}
        self._owned_lock = threading.Lock()
        self._claims = itertools.count()
        self._claim_pid = self._claim_prefix = None
        self._keeper_pid = None
        self._closed = threading.Event()

    def close(self):
        """Stop the keeper thread (claims still open then expire on their own)."""
        self._closed.set()

    def store_key(self, key, kind="dedup"):
        """Where ``key``'s state lives in the store (``kind``: "dedup", or "queued")."""
        return f"{self.prefix}:{kind}:{key}"

    @staticmethod
    def done_value(content_type, body):
        """The store's value for a key whose answer is ``(content_type, body)``."""
        return f"d{content_type}\n{body}"

    def run(self, key, work, deadline, ttl=None, *, kind="dedup", recorded=False, room=0.0,
            args=()):
        """Return ``(content_type, body, duplicate)``; ``work(*args)`` returns
        ``(type, body)`` (arguments rather than a closure: a push makes none).

        ``deadline`` is on ``time.monotonic()``: it measures WeChat's real 5-second wait,
        whatever the injected clock says. ``ttl`` (default: the dedup ttl) is how long the
        answer is remembered. ``recorded`` says that ``work()`` itself stores the done
        value, in the same transaction as its effect (the queue's insert): the key is then
        never "done" without the effect, nor the effect without "done". ``room`` is the
        time ``work()`` needs: a claim taken over from another delivery with less than
        that left before ``deadline`` is given back, as one taken after it is.

        :raises _InFlightTimeout: the first delivery is still running at ``deadline``, or
            the work could be taken over only too late to answer in time.
        """
        store_key = f"{self.prefix}:{kind}:{key}"  # self.store_key(key, kind), on every push
        if self._recent is not None:
            answer = self._answered_here(store_key)
            if answer is not None:
                return answer
        owned = self._owned.get(store_key)
        if owned is not None:
            # A copy is running in this process right now. Its claim may live only in a
            # store that has since failed (Redis died under the handler), where our add
            # would fall back to an empty local store and run the work beside it: this
            # process knows better than any store, so wait for that copy here.
            _wait_at(owned[1], max(0.0, deadline - time.monotonic()))
            if self._owned.get(store_key) is owned:
                raise _InFlightTimeout("a duplicate waited for the first delivery, which is "
                                       "still running at the reply deadline")
            answer = self._answered_here(store_key)
            if answer is not None:
                return answer
            # It failed (its claim released) or it ended in a memory store: the claim
            # loop below finds which, and takes the work over in the first case.
        if self._claim_pid != os.getpid():
            # Containers often give every host's workers the same pids: add randomness,
            # drawn once per process (after any fork).
            self._claim_prefix = f"p{os.getpid()}.{os.urandom(6).hex()}."
            self._claim_pid = os.getpid()
        claim = f"{self._claim_prefix}{next(self._claims)}"
        # Whether another delivery held the key before us: our claim is then a takeover.
        taken_over = owned is not None
        while True:
            if self.store.add(store_key, claim, CLAIM_TTL):
                left = deadline - time.monotonic()
                if left <= 0 or (taken_over and left < room):
                    # A takeover (the first owner's claim expired, or was released) after
                    # WeChat stopped waiting, or too close to it for the work to answer in
                    # time: nobody would read the reply, and the work would run for
                    # nothing, beside a stalled owner that may still finish, or beside a
                    # retry already on its way. Give the key back for that retry.
                    self.store.delete(store_key, claim)
                    raise _InFlightTimeout("claimed the message only after the reply "
                                           "deadline, or too close to it to run the "
                                           "handler; left to WeChat's next retry")
                return self._own(store_key, claim, work, ttl or self.ttl, recorded,
                                 args) + (False,)
            taken_over = True
            value = self.store.get(store_key)
            if value is None and time.monotonic() < deadline:
                continue  # released (the first delivery failed) or expired: claim it
            if value is None:
                raise _InFlightTimeout("could not claim the message before the reply deadline")
            if value[0] == "d":
                content_type, _, body = value[1:].partition("\n")
                return content_type, body, True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _InFlightTimeout("a duplicate waited for the first delivery, which is "
                                       "still running at the reply deadline")
            owned = self._owned.get(store_key)
            if owned is not None:
                _wait_at(owned[1], remaining)
            else:
                self._sleep(min(POLL_INTERVAL, remaining))

    def _answered_here(self, store_key):
        """``(content_type, body, True)`` from this process's recent answers, or None."""
        if self._recent is None:
            return None
        value = self._recent.get(store_key)
        if value is None:
            return None
        content_type, _, body = value[1:].partition("\n")
        return content_type, body, True

    def _own(self, store_key, claim, work, ttl, recorded=False, args=()):
        event = threading.Lock()  # the gate duplicates wait at (_wait_at)
        event.acquire()
        with self._owned_lock:
            self._owned[store_key] = (claim, event)
        if self._keeper_pid != os.getpid():
            self._start_keeper()
        try:
            try:
                content_type, body = work(*args)
            except BaseException:
                # Forget the claim so the retry runs the work again; a lost message is worse
                # than a repeated one.
                self.store.delete(store_key, claim)
                raise
            done = f"d{content_type}\n{body}"  # self.done_value(...), on every push
            # This process's memory first: it holds whatever the store does next.
            if self._recent is not None:
                self._recent.set(store_key, done, ttl)
            if not recorded and self._journalled:
                self.store.set(store_key, done, ttl, replacing=claim)
            elif not recorded:
                self.store.set(store_key, done, ttl)
            return content_type, body
        finally:
            with self._owned_lock:
                self._owned.pop(store_key, None)
            event.release()

    def _start_keeper(self):
        # Started in the process that owns the claims: threads do not survive a fork.
        with self._owned_lock:
            if self._keeper_pid == os.getpid():
                return
            self._keeper_pid = os.getpid()
        threading.Thread(target=self._keep_claims, name="wxgate-claims", daemon=True).start()

    def _keep_claims(self):
        while not self._closed.wait(CLAIM_RENEW_EVERY):
            with self._owned_lock:
                owned = [(key, claim) for key, (claim, _) in self._owned.items()]
            for key, claim in owned:
                try:
                    # Compare-and-renew: a claim already answered, or taken over after a
                    # stall, is left alone.
                    self.store.touch(key, claim, CLAIM_TTL)
                except Exception:
                    logger.exception("could not renew the claim on %s", key)


###############################################################################
# Delivery ####################################################################
###############################################################################

class DeliveryError(WxgateError):
    """The business code could not take the message: the forward backend failed."""

    status = 500


def _forward_signature(secret, timestamp, body):
    """HMAC-SHA256 over the timestamp and the body, hex: what a backend checks."""
    return hmac.new(secret.encode("utf-8"), str(timestamp).encode("ascii") + body,
                    hashlib.sha256).hexdigest()


def _no_redirects():
    """An opener handler that never follows a redirect: the 3xx reaches the caller as an
    ``HTTPError``.

    urllib follows a 302 to a POST as a GET to wherever ``Location`` says, with our
    ``X-Wxgate-*`` headers, and would hand that server's answer to WeChat as the reply.
    urllib.request (and http.client, email and ssl under it) is imported here, on the first
    forward: a gateway whose apps have handlers never loads it.
    """
    import urllib.request

    class NoRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, request, fp, code, msg, headers, newurl):
            return None

    return NoRedirects


def _backend_document(message, *, queued=False):
    """The document a push becomes for a forward backend or the durable queue.

    ``{"app", "dedup_key", "format", "message"}``, and ``"cloud"`` (the
    :attr:`Message.cloud` headers) when there are any; a queued one keeps ``"encrypted"``
    too, so its delivery sees the message as the gateway did (:func:`_queued_message`).
    """
    document = {"app": message.app, "dedup_key": message.dedup_key, "format": message.format,
                "message": dict(message)}
    if queued:
        document["encrypted"] = message.encrypted
    if message.cloud:  # mode = cloud: Cloud Hosting's X-WX-* headers, as message.cloud
        document["cloud"] = dict(message.cloud)
    return document


def _queued_message(document, client_factory=None):
    """The :class:`Message` a queued :func:`_backend_document` was made from."""
    return Message(document["message"], app=document["app"], format=document["format"],
                   encrypted=document.get("encrypted", False), cloud=document.get("cloud"),
                   client_factory=client_factory)


def _forward(app, message, *, timestamp, timeout=None):
    """POST a push to the app's backend; return its reply (None, a str, a dict or a RawReply).

    The body is ``{"app", "dedup_key", "format", "message"}`` (and ``"cloud"``, the
    :attr:`Message.cloud` headers, when there are any); ``X-Wxgate-Signature`` is
    HMAC-SHA256 of ``X-Wxgate-Timestamp`` + body with ``forward_secret``. A 204 or empty
    body means ``success``; a JSON body is the reply, as a handler's return value would be.
    With the response header ``X-Wxgate-Reply: raw``, the body and its Content-Type go to
    WeChat exactly as given, as a handler's :class:`RawReply` does.

    A redirect is not followed: a 3xx is the backend's error, like any status but 2xx. An
    answer over ``MAX_BACKEND_REPLY_BYTES`` is an error too, never a reply sent cut.

    :raises DeliveryError: the backend timed out, was unreachable, answered a non-2xx status,
        more than ``MAX_BACKEND_REPLY_BYTES``, or something that is not JSON (nor a raw reply
        in UTF-8 with a Content-Type a RawReply takes).
    """
    import http.client
    import socket
    import urllib.error
    import urllib.request
    body = _dump_json(_backend_document(message)).encode("utf-8")
    timestamp = str(int(timestamp))
    request = urllib.request.Request(app.forward, data=body, method="POST", headers={
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": f"wxgate/{__version__}",
        "X-Wxgate-Timestamp": timestamp,
        "X-Wxgate-Signature": _forward_signature(app.forward_secret, timestamp, body),
    })
    timeout = app.forward_timeout if timeout is None else timeout
    try:
        with urllib.request.build_opener(_no_redirects()).open(request, timeout=timeout) \
                as response:
            status, raw = response.status, response.read(MAX_BACKEND_REPLY_BYTES + 1)
            headers = response.headers
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the connection; its body is not read
        hint = ""
        if exc.code in (401, 403):  # what tests/backend.py and the README's examples answer
            hint = (f": check that [app:{app.name}] forward_secret is the secret the backend "
                    "checks X-Wxgate-Signature with, and that both clocks are right")
        elif 300 <= exc.code < 400:  # Location is not shown: it may carry a secret too
            hint = (": a redirect, which wxgate never follows (it would carry the push and "
                    "its signature elsewhere); point forward at the URL that answers")
        raise DeliveryError(f"backend {_redact_url(app.forward)} answered HTTP {exc.code}"
                            f"{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, socket.gaierror):
            reason = "cannot resolve its host (check forward, and this host's DNS)"
        raise DeliveryError(f"backend {_redact_url(app.forward)} failed: {reason}") from None
    except (ValueError, http.client.HTTPException) as exc:
        raise DeliveryError(f"backend {_redact_url(app.forward)} failed: "
                            f"{type(exc).__name__}") from None
    if len(raw) > MAX_BACKEND_REPLY_BYTES:
        raise DeliveryError(f"backend {_redact_url(app.forward)} answered more than "
                            f"{MAX_BACKEND_REPLY_BYTES} bytes; a reply is never sent cut")
    if headers.get("X-Wxgate-Reply", "").strip().lower() == "raw":
        try:
            return RawReply(raw, headers.get("Content-Type") or "text/plain; charset=utf-8")
        except ValueError as exc:
            raise DeliveryError(f"backend {_redact_url(app.forward)} raw reply refused: "
                                f"{exc}") from None
    if status == 204 or not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise DeliveryError(f"backend {_redact_url(app.forward)} answered something that is "
                            "not JSON") from None


def _business_reply(app, message, *, timestamp):
    """Hand a message to the app's business code: its backend, its handler, or both.

    With both, the backend goes first: if it fails, the handler has not run, so the retry
    repeats nothing but the forward (which the backend recognises by ``dedup_key``). The
    handler's reply wins unless it is None.
    """
    forwarded = _forward(app, message, timestamp=timestamp) if app.forward else None
    reply = app.handler(message) if app.handler is not None else None
    return forwarded if reply is None else reply


###############################################################################
# Metrics #####################################################################
###############################################################################

_METRIC_HELP = {
    "wxgate_pushes_total": ("counter", "Pushes answered, by app, message type and outcome."),
    "wxgate_duplicates_total": ("counter", "WeChat retries answered from the dedup store."),
    "wxgate_refused_total": ("counter", "Requests refused, by app, status and WeChat code."),
    "wxgate_query_reused_total": ("counter", "Signed queries sent again with another body."),
    "wxgate_previous_key_total": ("counter", "Pushes decrypted with previous_encoding_aes_key."),
    "wxgate_handler_seconds": ("histogram", "Time in business code (handler or forward)."),
    "wxgate_token_fetches_total": ("counter", "Calls to WeChat's token endpoints."),
    "wxgate_token_errors_total": ("counter", "Token endpoint errors, by errcode."),
    "wxgate_queue_dead_letters_total": ("counter", "Messages moved to the dead letters."),
    "wxgate_store_lost_total": ("counter", "Times a gateway process found the shared store "
                                "had lost its data (Redis emptied, sqlite file deleted)."),
    "wxgate_queue_pending": ("gauge", "Messages waiting in the durable queue."),
    "wxgate_queue_in_flight": ("gauge", "Queued messages being delivered now."),
    "wxgate_queue_dead": ("gauge", "Messages in the dead-letter list."),
}
_HISTOGRAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _label_text(labels):
    return ",".join(f'{name}="{_escape_label(value)}"' for name, value in labels)


def _escape_label(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Metrics:
    """The counters and histograms of a gateway, rendered in Prometheus' text format.

    Counting is local: a lock and a dict, no I/O on a push's path. With a shared store
    (:meth:`share`), each process adds what it counted since its last flush to totals kept
    in the store, at most once every ``METRICS_FLUSH_EVERY`` seconds (from a thread of its
    own), at exit, and before it answers a scrape; :meth:`scrape` then shows the totals of
    every process of the gateway, whichever worker answers it. A worker that exits or is
    replaced (``--max-requests``) has added its counts first, so no counter goes down; only
    a process killed outright loses its last second. Queue gauges are read from the shared
    store at scrape time. :meth:`value` is this process's own count.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._counters = {}
        self._histograms = {}
        self._keys = {}
        self._store = self._store_key = None
        self._threaded = True
        # The process whose counts this object adds to the store (None until it counts).
        self._pid: int | None = None
        self._writer, self._number = "", 0  # this process's batches: (writer, number)
        self._flushed = {}  # series -> this process's value when last added to the store
        self._pending = None  # (number, deltas, snapshot): a batch not known to be added
        self._failing = False
        # Held across a flush and, for a scrape, across the flush and the read after it.
        self._flush_lock = threading.RLock()
        self._start_lock = threading.Lock()
        self._stop: threading.Event | None = None
        self._at_exit = None

    def _key(self, name, labels, raw=None):
        # Counting is on every push's path: remember each label set's normalised key
        # (count and observe look ``raw`` up themselves and call this on a miss).
        if raw is None:
            raw = (name, *labels.items())
        try:
            key = self._keys.get(raw)
        except TypeError:  # an unhashable label value (a MsgType that is a list)
            raw, key = None, None
        if key is None:
            # Label values as text: a code may be -40001 (int) or "" and must sort together.
            # A pushed MsgType is a label: cap its length, and keep it encodable.
            key = name, tuple(sorted(
                (label, str(value)[:64].encode("utf-8", "backslashreplace").decode("utf-8"))
                for label, value in labels.items()))
            if raw is not None and len(self._keys) < 10000:
                self._keys[raw] = key
        return key

    def count(self, name, amount=1, **labels):
        if self._store is not None and self._pid != os.getpid():
            self._start()
        raw = (name, *labels.items())
        try:
            key = self._keys.get(raw) or self._key(name, labels, raw)
        except TypeError:  # an unhashable label value: _key makes its key afresh
            key = self._key(name, labels)
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + amount

    def observe(self, name, value, **labels):
        if self._store is not None and self._pid != os.getpid():
            self._start()
        raw = (name, *labels.items())
        try:
            key = self._keys.get(raw) or self._key(name, labels, raw)
        except TypeError:  # an unhashable label value: _key makes its key afresh
            key = self._key(name, labels)
        with self._lock:
            histogram = self._histograms.get(key)
            if histogram is None:
                histogram = self._histograms[key] = [0] * (len(_HISTOGRAM_BUCKETS) + 3)
            # One slot per bucket here (the last for +Inf); render() makes them cumulative.
            histogram[bisect.bisect_left(_HISTOGRAM_BUCKETS, value)] += 1
            histogram[-2] += value
            histogram[-1] += 1

    def value(self, name, **labels):
        """A counter's current value in this process (0 when never counted)."""
        return self._counters.get(self._key(name, labels), 0)

    @staticmethod
    def _samples(counters, histograms):
        """``(family, series, value)`` for each sample line; a series is its exposition
        text (``name{labels}``), and each bucket, sum and count is one of its own."""
        for (name, labels), value in counters:
            yield name, f"{name}{{{_label_text(labels)}}}", value
        for (name, labels), histogram in histograms:
            cumulative = 0
            for bound, count in zip(_HISTOGRAM_BUCKETS, histogram):
                cumulative += count
                label = _label_text(labels + (("le", repr(bound)),))
                yield name, f"{name}_bucket{{{label}}}", cumulative
            label = _label_text(labels + (("le", "+Inf"),))
            yield name, f"{name}_bucket{{{label}}}", histogram[-1]
            yield name, f"{name}_sum{{{_label_text(labels)}}}", histogram[-2]
            yield name, f"{name}_count{{{_label_text(labels)}}}", histogram[-1]

    @staticmethod
    def _lines(samples):
        lines, seen = [], set()
        for family, series, value in samples:
            if family not in seen:
                seen.add(family)
                kind, text = _METRIC_HELP.get(family, ("untyped", family))
                lines.extend((f"# HELP {family} {text}", f"# TYPE {family} {kind}"))
            lines.append(f"{series} {value}")
        return lines

    def render(self, gauges=()):
        """This process's exposition text; ``gauges`` is ``[(name, labels dict, value)]``."""
        with self._lock:
            counters = sorted(self._counters.items())
            histograms = sorted((k, list(v)) for k, v in self._histograms.items())
        samples = list(self._samples(counters, histograms))
        samples += [(name, f"{name}{{{_label_text(tuple(sorted(labels.items())))}}}", value)
                    for name, labels, value in gauges]
        return "\n".join(self._lines(samples)) + "\n"

    def share(self, store, key):
        """Add this process's counts to totals under ``key`` in ``store``, a shared store
        with ``add_counts`` and ``read_counts``; :meth:`scrape` then shows those totals."""
        self._store, self._store_key = store, key

    def without_thread(self):
        """Flush only when asked (:meth:`flush`, a scrape, exit): under CGI the process
        ends with its one request, and no thread may outlive the response."""
        self._threaded = False

    def _start(self):
        """Start adding this process's counts to the store: on its first count."""
        with self._start_lock:
            pid = os.getpid()
            if self._pid == pid or self._store is None:
                return
            with self._flush_lock, self._lock:
                if self._pid is not None:
                    # A forked child (gunicorn --preload): what the parent counted before
                    # the fork is the parent's to add, never each child's again.
                    self._flushed = dict(self._series())
                    self._pending = None
                # A writer per process, so a batch sent again is known by the store.
                self._writer, self._number = os.urandom(8).hex(), 0
                self._pid = pid
            if self._at_exit is None:  # inherited by forked children, which flush their own
                self._at_exit = functools.partial(self._flush_now, weakref.ref(self))
                atexit.register(self._at_exit)
            if self._threaded:
                self._stop = threading.Event()
                # The thread holds a weak reference: a gateway dropped without close()
                # ends it, and is not kept alive by it.
                threading.Thread(target=self._flush_every, name="wxgate-metrics", daemon=True,
                                 args=(weakref.ref(self), self._stop, METRICS_FLUSH_EVERY)
                                 ).start()

    @staticmethod
    def _flush_every(reference, stop, seconds):
        while not stop.wait(seconds):
            metrics = reference()
            if metrics is None:
                return
            metrics.flush()
            del metrics

    @staticmethod
    def _flush_now(reference):
        metrics = reference()
        if metrics is not None:
            metrics.flush(final=True)

    def _series(self):
        """``(series, value)`` of every sample this process counted; hold ``_lock``."""
        for _, series, value in self._samples(self._counters.items(),
                                              self._histograms.items()):
            yield series, value

    def flush(self, final=False):
        """Add what this process counted since its last flush to the store's totals;
        return whether everything it counted until now is there (``final``: the last
        chance, at exit or close, so a failure loses the counts).

        A batch is numbered, and one that failed is sent again unchanged before any
        other: a write whose answer was lost (a Redis timeout) may have been applied, and
        the store adds each writer's batch once. So a count is never lost while the
        process lives, nor added twice.
        """
        with self._flush_lock:
            store = self._store
            if store is None or self._pid != os.getpid():
                return True  # nothing counted here yet, or only what a parent counted
            for _ in range(2):  # a batch sent again, then what was counted since
                if self._pending is None:
                    with self._lock:
                        snapshot = dict(self._series())
                    flushed = self._flushed
                    deltas = {series: value - flushed.get(series, 0)
                              for series, value in snapshot.items()
                              if series not in flushed or value != flushed[series]}
                    if not deltas:
                        return True
                    self._number += 1
                    self._pending = (self._number, deltas, snapshot)
                number, deltas, snapshot = self._pending
                try:
                    store.add_counts(self._store_key, deltas, batch=(self._writer, number))
                except NotImplementedError:
                    self._unshare(store)
                    return True
                except Exception as exc:
                    if final:
                        logger.error("metrics: cannot add this process's last counts to "
                                     "store %s (%s: %s); they are lost", store.name,
                                     type(exc).__name__, exc)
                    elif not self._failing:
                        logger.warning("metrics: cannot add this process's counts to store "
                                       "%s (%s: %s); keeping them until it can",
                                       store.name, type(exc).__name__, exc)
                    self._failing = True
                    return False
                self._flushed, self._pending, self._failing = snapshot, None, False
            return True

    def _unshare(self, store):
        logger.warning("metrics: store %s keeps no totals (add_counts, read_counts): each "
                       "process shows its own counts", store.name)
        self._store = None

    def scrape(self, gauges=()):
        """The exposition text a scrape gets, or None when the store cannot give it.

        With a shared store, the totals of every process: this process adds its counts,
        then reads the totals, under the flush lock, so that its own flusher cannot move
        counts between the two. Every scrape, from any process, shows a total read after
        the previous scrape's, so no counter goes down. When the store cannot take this
        process's counts or give the totals, there is no true answer: None (the endpoint
        answers 503, which Prometheus records as a failed scrape, not a counter reset).
        """
        store = self._store
        if store is None:
            return self.render(gauges)
        with self._flush_lock:
            try:
                if not self.flush():
                    return None
                if self._store is None:
                    return self.render(gauges)
                totals = store.read_counts(self._store_key)
            except NotImplementedError:
                self._unshare(store)
                return self.render(gauges)
            except Exception as exc:
                logger.error("metrics: cannot read every process's totals from store %s "
                             "(%s: %s)", store.name, type(exc).__name__, exc)
                return None
        samples = [(_series_family(series), series, _number_text(value))
                   for series, value in sorted(totals.items(),
                                               key=lambda item: _series_order(item[0]))]
        samples += [(name, f"{name}{{{_label_text(tuple(sorted(labels.items())))}}}", value)
                    for name, labels, value in gauges]
        return "\n".join(self._lines(samples)) + "\n"

    def close(self):
        """Stop this process's flushing thread and add what it counted to the totals."""
        if self._stop is not None:
            self._stop.set()
        with self._flush_lock:
            self.flush(final=True)
            self._store = None  # what is counted from now on stays in this process
        if self._at_exit is not None:
            atexit.unregister(self._at_exit)
            self._at_exit = None


def _series_family(series):
    """The metric family of a series' exposition text (a bucket's is its histogram's)."""
    name = series.partition("{")[0]
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and \
                _METRIC_HELP.get(name[:-len(suffix)], ("",))[0] == "histogram":
            return name[:-len(suffix)]
    return name


def _series_order(series):
    """Counters first, then histograms, by family and labels; each histogram's buckets by
    bound, then its sum and count, as :meth:`_Metrics.render` lists them."""
    name, _, labels = series.partition("{")
    family = _series_family(series)
    part, bound = 0, 0.0
    if family != name:
        part = ("_bucket", "_sum", "_count").index(name[len(family):])
        if part == 0:  # the bound is the last label: render() appends it
            labels, _, bound_text = labels.rpartition('le="')
            bound = float(bound_text.rstrip('"}'))
    return family != name, family, labels.rstrip(",}"), part, bound


###############################################################################
# Logs ########################################################################
###############################################################################

class _LineLimit:
    """At most ``burst`` log lines per key in each ``window`` seconds of ``clock``.

    :meth:`allow` says whether a line may go out; the line then says what was held back.
    """

    def __init__(self, burst, window, clock):
        self._burst, self._window, self._clock = burst, window, clock
        self._lock = threading.Lock()
        self._windows = {}  # key -> [start of its window, lines let out, lines held back]

    def allow(self, key):
        """None to hold the line back; else ``(held, last)``: how many lines the previous
        window held back, and whether this is the last line of its window."""
        now = self._clock()
        # One lock: two threads at a window's edge must not both let out its last line.
        with self._lock:
            state = self._windows.get(key)
            # A key's first line, its window over, or a clock set back: a new window.
            if state is None or not 0 <= now - state[0] < self._window:
                held = state[2] if state is not None else 0
                self._windows[key] = state = [now, 0, 0]
            else:
                held = 0
            if state[1] >= self._burst:
                state[2] += 1
                return None
            state[1] += 1
            return held, state[1] == self._burst


def _held_back_note(held, last, what):
    """What a refusal line adds about the lines :class:`_LineLimit` held back."""
    note = f" ({held} more refusals not logged)" if held else ""
    if last:
        note += (f" (the next refusals for {what} are counted in wxgate_refused_total, not "
                 f"logged, for the rest of {REFUSAL_LOG_WINDOW:g} s)")
    return note


def _given_request_id(environ):
    """The proxy's X-Request-Id (nginx ``$request_id``) when usable, else "-".

    The text line's ``rid=``: it matches the proxy's access log, and without a proxy id
    there is nothing to match, so no id is made up (a uuid per push costs the hot path).
    A space would split the line's fields: such an id is not usable either.
    """
    given = environ.get("HTTP_X_REQUEST_ID", "")
    if given and len(given) <= 64 and given.isascii() and given.isprintable() \
            and " " not in given:
        return given
    return "-"


def _request_id(environ):
    """The proxy's X-Request-Id when there is one (nginx ``$request_id``), else a fresh one.

    The fresh one is 16 hex digits, 64 random bits as ``uuid4().hex[:16]`` gave, without a
    ``getrandom(2)`` and a UUID object per push: an id to find a line by, not a
    secret. ``random``'s module generator is reseeded in every forked child, so gunicorn's
    workers do not draw the same ids.
    """
    given = environ.get("HTTP_X_REQUEST_ID", "")
    if given and len(given) <= 64 and given.isascii() and given.isprintable():
        return given
    import random  # on first use: a text line needs no id of ours
    return "%016x" % random.getrandbits(64)


_PUSH_LINE = "push app=%s type=%s key=%s outcome=%s ms=%.1f rid=%s"


def _log_push(app_name, kind, key, outcome, milliseconds, environ, json_fields):
    """The INFO line of one push (``_PUSH_LINE``), with the fields JSON lines show when
    ``json_fields``; the caller has checked that INFO is enabled."""
    # The extra fields too: a deployer's format may show %(dedup_key)s.
    kind, key = _loggable(kind), _loggable(key)
    extra = None
    if json_fields:  # the fields only JSON lines show
        extra = {"app": app_name, "dedup_key": key, "outcome": outcome,
                 "duration_ms": round(milliseconds, 2), "msg_type": kind,
                 "request_id": _request_id(environ)}
    # logger.info would walk the stack (findCaller) to learn what this frame knows;
    # makeRecord + handle is the rest of its path, so a user's record factory,
    # Logger.disabled, filters, handlers and propagation all still apply. The frame is not
    # kept in a local: in its own locals it would be a reference cycle, keeping the push's
    # objects alive until the garbage collector runs.
    code = sys._getframe().f_code
    logger.handle(logger.makeRecord(
        logger.name, logging.INFO, code.co_filename, sys._getframe().f_lineno,
        _PUSH_LINE, (app_name, kind, key, outcome, milliseconds,
                     _given_request_id(environ)), None, code.co_name, extra))


class _TextFormatter(logging.Formatter):
    """``%(asctime)s %(levelname)s %(name)s: %(message)s``, the time text made once a second.

    ``localtime`` and ``strftime`` cost more than the rest of a push line's formatting
    (bench/logcost.py), and pushes come many to a second. The output is
    ``logging.Formatter``'s, to the millisecond; a ``datefmt`` is formatted as usual.
    """

    def __init__(self, fmt="%(asctime)s %(levelname)s %(name)s: %(message)s"):
        super().__init__(fmt)
        # (second, its text), replaced whole: threads formatting lines of two different
        # seconds at once could otherwise pair one second with the other's text.
        self._second_text = (None, "")

    def formatTime(self, record, datefmt=None):
        if datefmt:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached = self._second_text
        if cached[0] != second:
            cached = (second, time.strftime(self.default_time_format, self.converter(second)))
            self._second_text = cached
        return self.default_msec_format % (cached[1], record.msecs)


# json.dumps(..., ensure_ascii=False)'s own string encoder (the C one where there is one).
_encode_json_string = json.encoder.encode_basestring


class _JSONFormatter(_TextFormatter):
    """One JSON object per line, with the push's fields when the record carries them.

    The line is what ``json.dumps(document, ensure_ascii=False)`` writes for the document
    ``{"time", "level", "logger", "message", <fields>, "exception"}``, byte for byte, built
    from its parts: strings go through json's own encoder, the push's number and ``None``
    are written as json writes them, and anything else goes through ``json.dumps``, so no
    dict and no encoder object are made per line.
    """

    _FIELDS = ("app", "dedup_key", "outcome", "duration_ms", "request_id", "msg_type")

    def __init__(self):
        super().__init__("%(message)s")

    def format(self, record):
        encode = _encode_json_string
        parts = ['{"time": ', encode(self.formatTime(record)), ', "level": ',
                 encode(record.levelname), ', "logger": ', encode(record.name),
                 ', "message": ', encode(record.getMessage())]
        values = record.__dict__  # where extra= puts the fields
        for name in self._FIELDS:
            if name in values:
                value = values[name]
                parts += (', "', name, '": ', _json_value(value))
        if record.exc_info:
            parts += (', "exception": ', encode(self.formatException(record.exc_info)))
        parts.append("}")
        return "".join(parts)


def _json_value(value):
    """``json.dumps(value, ensure_ascii=False)``, without its encoder for the usual values."""
    kind = type(value)
    if kind is str:
        return _encode_json_string(value)
    if kind is float and value - value == 0.0:  # finite: json writes float.__repr__
        return float.__repr__(value)
    if kind is int:
        return int.__repr__(value)
    if value is None:
        return "null"
    return json.dumps(value, ensure_ascii=False)  # NaN, bool, lists, subclasses...


class _StderrHandler(logging.StreamHandler):
    """The handler wxgate installs itself: no second flush of a stream the line flushed.

    ``sys.stderr`` is line-buffered (always, since Python 3.9), so writing the line with its
    newline already made the one ``write(2)``; ``StreamHandler.flush`` would then take the
    handler's lock again to flush an empty buffer. Any other stream is flushed as usual.
    """

    def emit(self, record):
        try:
            stream = self.stream
            stream.write(self.format(record) + self.terminator)
            if not (getattr(stream, "line_buffering", False) and
                    self.terminator.endswith("\n")):
                self.flush()
        except RecursionError:  # as StreamHandler.emit does
            raise
        except Exception:
            self.handleError(record)


def _logging_before_handlers(level):
    """Before ``wxgate serve`` or ``worker`` imports the handler: the root logger at ``level``,
    and our handler as Python's last resort.

    Most handler modules call ``logging.basicConfig()``, which adds a root handler but sets
    no level unless asked: the root's default WARNING then hid every INFO line, theirs and
    ours. With the root at INFO first, a bare ``basicConfig()`` shows both, and an explicit
    ``basicConfig(level=logging.WARNING)`` still wins for the user's own loggers.

    A module that sets nothing up and logs on import finds no handler at all: Python's last
    resort would print its WARNING lines bare (no time, no level) and drop its INFO lines.
    Ours formats them as wxgate's own; it is not on the root, so ``basicConfig()`` still
    configures. The process is ours: ``serve`` and ``worker`` are its main program.
    """
    root = logging.getLogger()
    if not root.handlers and root.level == logging.WARNING:  # nobody has touched it yet
        root.setLevel(level)
    handler = _StderrHandler()
    handler.setFormatter(_TextFormatter())
    logging.lastResort = handler


def _setup_logging(log_format, level=logging.INFO, *, root=False):
    """Make the ``wxgate`` logger's lines show, once, whoever configured logging.

    Under gunicorn or mod_wsgi nothing configures Python logging, and the per-push INFO lines
    would vanish: we add a handler when neither our logger nor the root has one. When the
    root has one (a handler module's ``basicConfig``, an entry file's), our lines go there,
    and only there; our own level is still ``level`` unless the deployer set one for
    ``wxgate``, so a root at WARNING hides their INFO lines but not ours.

    :param root: put our handler on the root logger rather than on ours, for ``wxgate serve``
        and ``worker``, whose process is ours: a handler module that logs without setting
        logging up then gets its lines in our format, at the root's level (INFO, see
        :func:`_logging_before_handlers`), instead of Python's bare last resort, which drops
        INFO. Inside someone else's process (gunicorn, mod_wsgi) the root is not ours.
    """
    if logger.level == logging.NOTSET:
        logger.setLevel(level)
    if logger.handlers or logging.getLogger().handlers:
        return  # logging is the deployer's: their handlers, their format
    # The last resort of _logging_before_handlers, when it is ours: one handler, one format.
    last = logging.lastResort
    handler = last if root and isinstance(last, _StderrHandler) else _StderrHandler()
    handler.setFormatter(_JSONFormatter() if log_format == "json" else _TextFormatter())
    (logging.getLogger() if root else logger).addHandler(handler)


class _Notices:
    """Warnings an operator needs once, not once per push: a push the previous key opened
    (counted every time, said at most once a minute per app), and a cloud app's dict reply
    turned into success (said once per app and process)."""

    def __init__(self, metrics, clock):
        self._metrics, self._clock = metrics, clock
        self._lock = threading.Lock()
        self._previous_key_warned: dict[str, float] = {}  # app name -> clock time of the last
        self._dropped_noted: set[str] = set()  # cloud apps whose dropped reply was logged

    def dropped_reply(self, app):
        """Say once per app and process that a cloud app's dict reply became success."""
        with self._lock:
            first = app.name not in self._dropped_noted
            self._dropped_noted.add(app.name)
        if first:
            logger.warning("app=%s mode = cloud: the handler's dict reply was dropped and "
                           "success sent (Cloud Hosting passes no passive reply to a Mini "
                           "Program); answer through message.client instead", app.name)

    def previous_key(self, app):
        """Count a push the previous key opened; warn at most once a minute per app."""
        self._metrics.count("wxgate_previous_key_total", app=app.name)
        now = self._clock()
        with self._lock:  # two threads at the minute's edge: one line, not two
            last = self._previous_key_warned.get(app.name)
            warn = last is None or now - last >= PREVIOUS_KEY_WARN_EVERY
            if warn:
                self._previous_key_warned[app.name] = now
        if warn:
            logger.warning("app=%s a push opened only with previous_encoding_aes_key: WeChat "
                           "still uses the old key; remove previous_encoding_aes_key once "
                           "wxgate_previous_key_total stops growing", app.name)


###############################################################################
# Admin endpoints #############################################################
###############################################################################

# The body of the 404 for a path that is neither an app's nor an admin endpoint. wxgate push
# and handshake tell a wxgate gateway that holds no app at a path by it.
_NO_APP_BODY = b"no wxgate app at this path"


def _from_loopback(environ):
    # Behind a proxy every client looks like 127.0.0.1, so a forwarded request never counts.
    return environ.get("REMOTE_ADDR") in ("127.0.0.1", "::1") and \
        "HTTP_X_FORWARDED_FOR" not in environ and "HTTP_FORWARDED" not in environ


class _Admin:
    """The endpoints under ``admin_path``: ``/healthz`` (open), ``/metrics`` and
    ``/token/NAME`` (the admin secret's).

    :param gateway: the :class:`Gateway` whose config, store, queue, metrics and
        ``client(name)`` it reports on.
    :param refusal_lines: the gateway's :class:`_LineLimit` for refusal lines.
    """

    def __init__(self, gateway, refusal_lines):
        self.gateway = gateway
        self.config = gateway.config
        self._refusal_lines = refusal_lines
        self._health_lock = threading.Lock()
        self._health_due = 0.0  # on time.monotonic(): when healthz writes again

    def respond(self, environ, subpath):
        """``(status, headers, body)`` for ``subpath``, the path below ``admin_path``."""
        method = environ.get("REQUEST_METHOD", "")
        if subpath in ("/healthz", "/metrics") or subpath.startswith("/token/"):
            if method != "GET":
                return 405, [("Content-Type", _TEXT), ("Allow", "GET")], b""
        if subpath == "/healthz":
            return self._healthz(self._authorized(environ) or _from_loopback(environ))
        if subpath == "/metrics":
            if not (self._authorized(environ) or _from_loopback(environ)):
                return 401, [("Content-Type", _TEXT), ("WWW-Authenticate", "Bearer")], \
                    b"unauthorized: use the admin secret, or scrape from 127.0.0.1"
            text = self.gateway.metrics.scrape(self._gauges())
            if text is None:  # no total to give: a failed scrape, never a lower count
                return 503, [("Content-Type", _TEXT)], \
                    b"metrics unavailable: the shared store failed (see the log)"
            return 200, [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")], \
                text.encode("utf-8")
        if not self.config.admin_secret or not subpath.startswith("/token/"):
            return 404, [("Content-Type", _TEXT)], _NO_APP_BODY
        if not self._authorized(environ):
            allowed = self._refusal_lines.allow(None)
            if allowed is not None:
                logger.warning("admin token request refused: missing or wrong bearer "
                               "secret%s", _held_back_note(*allowed, "the admin token"))
            return 401, [("Content-Type", _TEXT), ("WWW-Authenticate", "Bearer")], \
                b"unauthorized"
        name = subpath[len("/token/"):]
        if name not in self.config.apps:
            return 404, [("Content-Type", _TEXT)], b"no such app"
        try:
            info = self.gateway.client(name).tokens.token_info()
        except WxgateError as exc:
            logger.error("admin token for app %s failed: %s", name, exc.message)
            return 502, [("Content-Type", _JSON)], _dump_json({"error": exc.message}).encode()
        return 200, [("Content-Type", _JSON), ("Cache-Control", "no-store")], \
            _dump_json(info).encode()

    def _authorized(self, environ):
        secret = self.config.admin_secret
        if not secret:
            return False
        scheme, _, credential = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            credential.strip().encode("utf-8", "surrogateescape"), secret.encode("utf-8"))

    def _healthz(self, detailed):
        """The store's (and queue's) state; names, version and counts only for ``detailed``
        callers (the admin secret, or loopback, as for /metrics): the rest get the status."""
        status, state = (200, "ok") if self._store_writable() else (503, "store unreachable")
        if not detailed:
            # The status is the store's write: an anonymous caller (a load balancer, anyone
            # on the internet) must not make every probe a queue scan as well.
            return status, [("Content-Type", _JSON), ("Cache-Control", "no-store")], \
                _dump_json({"status": state}).encode()
        store, queue = self.gateway.store, self.gateway.queue
        document = {"status": state, "version": __version__, "apps": sorted(self.config.apps),
                    "store": self.config.store.split("://")[0]}
        losses = getattr(store, "losses", 0)
        if losses:
            # Still 200: the store works again, and every worker shares it, so a 503 would
            # take the whole gateway out of a load balancer for a loss that is over.
            at, reason = store.last_loss
            document["store_lost"] = {"count": losses, "last_at": at, "last": reason}
        if queue is not None and status == 200:
            try:
                document["queue"] = queue.stats(self.gateway.now())
            except Exception as exc:
                status, document["status"] = 503, "queue unreachable"
                logger.error("healthz: queue unreachable: %s: %s", type(exc).__name__, exc)
        return status, [("Content-Type", _JSON), ("Cache-Control", "no-store")], \
            _dump_json(document).encode()

    def _store_writable(self):
        """Whether the store takes writes, for healthz; a failure is logged once per check.

        A write, not a ping: sqlite on a full disk still answers SELECT 1, and a store that
        failed stays unhealthy until a write succeeds again (this check's, or a push's). At
        most one write per ``HEALTH_CHECK_EVERY``: in between, the latest write's outcome
        (the fallback store's flag, set and cleared by every write) is the answer.
        """
        store = self.gateway.store
        try:
            if not isinstance(store, _FallbackStore):
                store.ping()
                return True
            with self._health_lock:  # one prober writes; the others read the flag
                now = time.monotonic()
                due = now >= self._health_due
                if due:
                    self._health_due = now + HEALTH_CHECK_EVERY
            if not due:
                return not store.write_failing
            store.check_write(f"{self.config.store_prefix}:healthz:{os.getpid()}")
            return True
        except Exception as exc:
            logger.error("healthz: store cannot be written: %s: %s", type(exc).__name__,
                         _cause(exc))
            return False

    def _gauges(self):
        queue = self.gateway.queue
        if queue is None:
            return []
        try:
            stats = queue.stats(self.gateway.now())
        except Exception:
            return []
        return [(f"wxgate_queue_{name}", {}, value) for name, value in stats.items()]


###############################################################################
# Process lifecycle ###########################################################
###############################################################################

def _worker_processes(argv, environ, under_gunicorn):
    """Why this looks like one of several worker processes (a short reason), or "".

    Read from gunicorn's own settings (``-w``/``--workers`` on its command line or in
    ``GUNICORN_CMD_ARGS``, ``WEB_CONCURRENCY``) when gunicorn is the server, else from
    processes beside this one: children of the same parent running the same command
    (gunicorn, Apache's prefork children, uwsgi without its own settings). Best effort: it
    only decides whether to warn.
    """
    if under_gunicorn:
        import shlex
        words = list(argv[1:])
        try:
            words += shlex.split(environ.get("GUNICORN_CMD_ARGS", ""))
        except ValueError:
            pass
        workers = environ.get("WEB_CONCURRENCY")
        for index, word in enumerate(words):  # the last setting wins, as in gunicorn
            if word in ("-w", "--workers") and index + 1 < len(words):
                workers = words[index + 1]
            elif word.startswith("--workers="):
                workers = word.split("=", 1)[1]
            elif word.startswith("-w") and word[2:].isdigit():
                workers = word[2:]
        try:
            count = int(workers or 1)
        except ValueError:
            count = 1
        return f"gunicorn with {count} workers" if count > 1 else ""
    siblings = _sibling_processes()
    return f"{siblings + 1} processes running this command" if siblings else ""


def _sibling_processes():
    """How many other children of our parent run our command line (0 when unknown)."""
    try:
        with open("/proc/self/cmdline", "rb") as file:
            command = file.read()
        with open("/proc/self/stat", "rb") as file:
            parent = file.read().rsplit(b")", 1)[1].split()[1].decode()
        with open(f"/proc/{parent}/task/{parent}/children", "rb") as file:
            children = file.read().split()
    except (OSError, IndexError, ValueError):
        return 0
    count = 0
    for child in children:
        if child.decode() == str(os.getpid()):
            continue
        try:
            with open(f"/proc/{child.decode()}/cmdline", "rb") as file:
                count += file.read() == command
        except OSError:
            pass
    return count


class _Lifecycle:
    """A gateway's process, apart from its requests: the delivery threads it runs, the
    warnings about the server it runs under (CGI, several workers with a memory store), and
    whether the metrics may flush from a thread of their own (not under CGI).

    The one reader of ``sys.argv``, ``os.environ`` and ``/proc`` in the gateway.

    :param make_worker: returns a delivery worker, not started (``Gateway.worker``).
    :param metrics: the gateway's :class:`_Metrics`, told when no thread may flush them
        (the gateway flushes them at the end of a CGI request).
    :param start_worker: whether this process runs delivery threads.
    :param queued: whether an app has ``delivery = queue`` and the gateway its own threads.
    :param shared: whether the store is shared between processes.
    """

    def __init__(self, make_worker, metrics, *, start_worker, queued, shared):
        self._make_worker, self.start_worker = make_worker, start_worker
        self._metrics = metrics
        self._queued, self._shared = queued, shared
        self._worker = None
        self._worker_pid = None
        self._worker_lock = threading.Lock()
        self._cgi_warned = False
        if not shared:
            workers = _worker_processes(sys.argv, os.environ, "gunicorn" in sys.modules)
            if workers:
                logger.warning("store = memory in one of several worker processes (%s): "
                               "each keeps its own memory, so a retry that lands on another "
                               "worker runs the handler again and every worker fetches its "
                               "own access_token; use store = sqlite:///path/to/wxgate.db "
                               "(one host) or redis://... (several)", workers)

    def on_request(self, environ):
        """Before each request: say what CGI cannot do, or start this process's threads."""
        if environ.get("wsgi.run_once"):
            self._under_cgi()
        elif self.start_worker and self._worker_pid != os.getpid():
            self.start_delivery()

    def start_delivery(self):
        """Start this process's delivery threads now, if it is to run any (idempotent)."""
        if self.start_worker and self._worker_pid != os.getpid():
            with self._worker_lock:
                if self._worker_pid != os.getpid():
                    self._worker = self._make_worker()
                    self._worker.start()
                    self._worker_pid = os.getpid()

    def stop(self):
        """Stop the delivery threads this process started."""
        if self._worker is not None:
            self._worker.stop()

    def _under_cgi(self):
        # One process per request (wsgiref's CGIHandler sets wsgi.run_once): nothing may
        # rely on a thread outliving the response, so the metrics flush at its end.
        self._metrics.without_thread()
        # Said once per process, which here is once per request, so that it shows in the
        # server's error log.
        if self._cgi_warned:
            return
        self._cgi_warned = True
        if self._queued:
            logger.warning("delivery = queue under CGI: a delivery thread would die with the "
                           "request's process, so none is started; set [wxgate] "
                           "delivery_threads = 0 and run `wxgate worker CONFIG` elsewhere")
        if not self._shared:
            logger.warning("store = memory under CGI: each request is a new process that "
                           "starts empty, so every retry runs the handler again and every "
                           "API call fetches a new access_token; use store = "
                           "sqlite:///path/to/wxgate.db")


###############################################################################
# Reading requests ############################################################
###############################################################################

_STATUS_LINES = {
    200: "200 OK", 204: "204 No Content", 400: "400 Bad Request", 401: "401 Unauthorized",
    403: "403 Forbidden", 404: "404 Not Found", 405: "405 Method Not Allowed",
    413: "413 Payload Too Large", 415: "415 Unsupported Media Type",
    500: "500 Internal Server Error", 502: "502 Bad Gateway", 503: "503 Service Unavailable",
}


# Cloud Hosting's headers as the environ names them, read for cloud apps only.
_CLOUD_ENVIRON = tuple((name, "HTTP_" + name.replace("-", "_"))
                       for name in _CLOUD_HEADERS + _CLOUD_SOURCE_HEADERS)


def _cloud_headers(environ):
    """The Cloud Hosting headers a request carries, by their names (``X-WX-OPENID``...)."""
    return {name: environ[key] for name, key in _CLOUD_ENVIRON if key in environ}


def _query(environ):
    """The query string as a dict of first values (WeChat never repeats a parameter).

    parse_qsl's rules (``&`` only, blank values kept, first value wins), with unquoting
    only for the parts that need it: this runs on every request.
    """
    text = environ.get("QUERY_STRING", "")
    if text.count("&") >= 64:
        raise MessageError("too many query parameters", code=None)
    query = {}
    quoted = "%" in text or "+" in text  # WeChat's own queries never are
    for part in text.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if quoted and ("%" in part or "+" in part):
            import urllib.parse
            name = urllib.parse.unquote_plus(name)
            value = urllib.parse.unquote_plus(value)
        if name not in query:
            query[name] = value
    return query


def _read_body(environ, limit):
    """Read at most ``limit`` + 1 bytes, whatever Content-Length claims."""
    length = environ.get("CONTENT_LENGTH") or ""
    if length:
        if not (length.isascii() and length.isdigit() and len(length) <= 18):
            raise MessageError(f"Content-Length {length[:20]!r} is not a number", code=None)
        wanted = int(length)
        if wanted > limit:
            raise PayloadTooLarge(f"body of {wanted} bytes is over max_body_bytes ({limit})")
    elif environ.get("wsgi.input_terminated"):
        wanted = limit + 1
    else:
        return b""
    try:
        body = environ["wsgi.input"].read(min(wanted, limit + 1)) if wanted else b""
    except Exception:  # a client that hangs up mid-body; servers raise various things
        raise MessageError("could not read the request body", code=None) from None
    if len(body) > limit:
        raise PayloadTooLarge(f"body is over max_body_bytes ({limit})")
    return body


###############################################################################
# WSGI application ############################################################
###############################################################################

class Gateway:
    """The WSGI application: one or more apps' push endpoints, plus the admin endpoints.

    Build it with :func:`make_app`. The callable never raises: a bad request gets its 4xx
    and one log line, a bug or a failing handler gets a 500 with an empty body (so WeChat
    retries) and a traceback in the log. It reads the request and runs the pipeline; what
    makes a push valid is push verification's (:func:`_verify_push`), what goes back on the
    wire the reply's (:func:`_render_reply`), the admin endpoints are :class:`_Admin`'s and
    the process's threads :class:`_Lifecycle`'s.

    :param config: a :class:`Config`.
    :param clock: returns the time in seconds (replay window, reply TimeStamp, expiry).
    :param random_bytes: returns n random bytes (reply random prefixes).
    :param store: a :class:`Store` to use instead of the configured one.
    :param sleep: waits (busy backoff, polling).
    :param reply_deadline: how long a duplicate waits for the first delivery's reply;
        WeChat's 5 s unless a test wants it shorter.
    :param start_worker: run the queue's delivery threads in this process (the default,
        when an app has ``delivery = queue`` and ``delivery_threads`` > 0). They start with
        :meth:`start_delivery` (``wxgate serve`` calls it at startup) or else with the
        first request, in the process that serves it; never under CGI.
    """

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time,
                 random_bytes: Callable[[int], bytes] = os.urandom, store: Store | None = None,
                 sleep: Callable[[float], object] = time.sleep,
                 reply_deadline: float = REPLY_DEADLINE, start_worker: bool = True) -> None:
        self.config = config
        self.reply_deadline = reply_deadline
        if not config.timestamp_window:
            logger.warning("%s", _WINDOW_OFF)
        self.metrics = _Metrics()
        self._clock, self._random_bytes, self._sleep = clock, random_bytes, sleep
        if store is None:
            store = open_store(config.store, clock=clock, max_entries=config.dedup_size,
                               prefix=config.store_prefix)
        self.store = store if not store.shared else _FallbackStore(
            store, clock=clock, max_entries=config.dedup_size, metrics=self.metrics)
        if self.store.shared:  # every worker's counts add up there, for every scrape
            self.metrics.share(self.store, f"{config.store_prefix}:metrics")
        # One _Dedup per app, so that no app's traffic evicts another app's records: a
        # memory store gives each app an LRU of dedup_size keys of its own (the store named
        # here keeps the token records), and over a shared store each app's recent answers
        # are an LRU of their own too. A Cloud Hosting app with public access takes pushes
        # from anyone: 10,100 of them pushed a safe app's record out of one shared LRU.
        self._dedups = {
            app.name: _Dedup(_dedup_store(self.store, clock), prefix=config.store_prefix,
                             ttl=config.dedup_ttl, clock=clock, sleep=sleep,
                             max_entries=config.dedup_size)
            for app in config.apps.values()}
        # Signed queries' binds get an LRU of their own in memory: sharing the dedup LRU,
        # one per push, they halved it, and a store sized as the README says (dedup_size
        # above the pushes of a window) evicted pushes still inside their window.
        self._binds = self.store if self.store.shared else MemoryStore(config.dedup_size,
                                                                       clock=clock)
        self._query_binds = _QueryBinds(self._binds, prefix=config.store_prefix,
                                        ttl=config.dedup_ttl, window=config.timestamp_window,
                                        clock=clock, metrics=self.metrics)
        self._routes = {app.path: app for app in config.apps.values()}
        # Refusal lines of requests that proved nothing, per app (None: the admin token).
        self._refusal_lines = _LineLimit(REFUSAL_LOG_BURST, REFUSAL_LOG_WINDOW, clock)
        self._notices = _Notices(self.metrics, clock)
        # The API clients (below the boundary) are built on first use: a gateway whose
        # handlers never call the API never makes one.
        self._clients: dict[str, WeChatClient] = {}
        self._clients_lock = threading.Lock()
        queued = any(app.delivery == "queue" for app in config.apps.values())
        self.queue = _open_queue(store, config.store_prefix) if queued else None
        self._admin = _Admin(self, self._refusal_lines)
        self._lifecycle = _Lifecycle(
            self.worker, self.metrics,
            start_worker=start_worker and queued and config.delivery_threads > 0,
            queued=queued and config.delivery_threads > 0, shared=store.shared)

    def now(self) -> float:
        """The gateway's clock: the time in seconds."""
        return self._clock()

    def client(self, name: str) -> WeChatClient:
        """The :class:`WeChatClient` of app ``name``, made on first use."""
        client = self._clients.get(name)
        if client is not None:
            return client
        app = self.config.apps.get(name)
        if app is None:
            raise KeyError(f"no app named {name!r}; configured: {sorted(self.config.apps)}")
        with self._clients_lock:  # one client per app, however many threads ask first
            client = self._clients.get(name)
            if client is None:
                client = self._clients[name] = _app_client(
                    self.config, app, self.store, clock=self._clock, sleep=self._sleep,
                    metrics=self.metrics)
        return client

    def worker(self, threads: int | None = None) -> _DeliveryWorker:
        """A delivery worker for the durable queue (not started).

        :param threads: delivery threads; by default ``delivery_threads``, and at least
            one: ``delivery_threads = 0`` turns off the gateway's own threads so that a
            separate ``wxgate worker`` delivers, which then needs a thread of its own.
        """
        if self.queue is None:
            raise WxgateError("no app has delivery = queue")
        if threads is None:
            threads = max(1, self.config.delivery_threads)
        return _DeliveryWorker(self, self.queue, threads=threads)

    def start_delivery(self) -> None:
        """Start this process's delivery threads now, if it is to run any.

        Idempotent, and per process: threads do not survive a fork, so a forked child (the
        app built before gunicorn --preload forks its workers) starts its own on its first
        request.
        """
        self._lifecycle.start_delivery()

    def close(self) -> None:
        """Stop the delivery and claim-keeping threads, and release the store's connections."""
        self._lifecycle.stop()
        for dedup in self._dedups.values():
            dedup.close()
        self.metrics.close()  # adds this process's last counts to the shared totals
        if self.queue is not None:
            self.queue.close()
        self.store.close()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> list[bytes]:
        self._lifecycle.on_request(environ)
        try:
            app = self._routes.get(environ.get("PATH_INFO") or "/")
            if app is not None and environ.get("REQUEST_METHOD") == "POST":
                try:  # a push, on every message's path: routed here, in one call less
                    status, headers, body = self._push(app, environ, time.monotonic())
                except WxgateError as exc:
                    status, headers, body = self._refuse(app, "POST", exc, environ)
            else:
                status, headers, body = self._respond(environ, app)
        except Exception:  # a bug of ours: never let it escape to the server
            logger.exception("internal error on %s %s", _loggable(environ.get("REQUEST_METHOD")),
                             _loggable(environ.get("PATH_INFO")))
            status, headers, body = 500, [("Content-Type", _TEXT)], b""
        # A raw reply's Content-Type is a backend's or a handler's choice, and refusals quote
        # what the request sent: no client may guess another type from the bytes.
        headers += (("Content-Length", str(len(body))), ("X-Content-Type-Options", "nosniff"))
        if environ.get("wsgi.run_once"):
            self.metrics.flush()  # the process ends with this request: add its counts now
        start_response(_STATUS_LINES.get(status) or f"{status} Error", headers)
        return [body]

    def _respond(self, environ, app):
        """Any request but a POST to an app's own path (``app``, else None)."""
        path = environ.get("PATH_INFO") or "/"
        if app is None and environ.get("SCRIPT_NAME"):
            # Mounted below a prefix (mod_wsgi's WSGIScriptAlias /wechat ...): match the
            # whole path, so the ini's path means the same URL under every server.
            whole = (environ["SCRIPT_NAME"] + environ.get("PATH_INFO", "")).rstrip("/")
            app = self._routes.get(whole or "/")
        if app is None:
            # admin_path, like an app's path, is the whole URL path under every server: under
            # WSGIScriptAlias /wechat the admin endpoints are served only if admin_path
            # starts with /wechat, never at /wechat/_wxgate by surprise.
            full_path = environ.get("SCRIPT_NAME", "") + path
            admin = self.config.admin_path + "/"
            if full_path.startswith(admin):
                return self._admin.respond(environ, full_path[len(admin) - 1:])
            return 404, [("Content-Type", _TEXT)], _NO_APP_BODY
        method = environ.get("REQUEST_METHOD", "")
        try:
            if method == "POST":
                return self._push(app, environ, time.monotonic())
            if method == "GET":
                echostr = _verify_handshake(app, _query(environ), self._clock(),
                                            self.config.timestamp_window,
                                            self._query_binds.bind, self.config.admin_path)
                logger.info("app=%s handshake ok", app.name)
                # The body must be echostr exactly: no newline, no JSON, no encryption.
                return 200, [("Content-Type", _TEXT)], echostr.encode("utf-8")
            return 405, [("Content-Type", _TEXT), ("Allow", "GET, POST")], \
                b"method not allowed: WeChat sends GET (handshake) and POST (push)"
        except WxgateError as exc:
            return self._refuse(app, method, exc, environ)

    def _refuse(self, app, method, exc, environ):
        """Count a refused request and answer it; its WARNING line is held back past
        ``REFUSAL_LOG_BURST`` a window for one that proved nothing; a signed push's refusal
        (``exc.signed``) always goes out: only WeChat, or the one body of a captured query,
        can cause it."""
        self.metrics.count("wxgate_refused_total", app=app.name, status=exc.status,
                           code=exc.code or "")
        public = getattr(exc, "public", None) or exc.message
        answer = exc.status, [("Content-Type", _TEXT)], public.encode("utf-8")
        note = ""
        if not getattr(exc, "signed", False):
            allowed = self._refusal_lines.allow(app.name)
            if allowed is None:
                return answer
            note = _held_back_note(*allowed, f"app={app.name}")
        logger.warning("app=%s %s refused %d rid=%s: %s%s", app.name, method, exc.status,
                       _given_request_id(environ), _loggable(exc.message), note,
                       extra={"app": app.name, "outcome": f"refused-{exc.status}",
                              "request_id": _request_id(environ)})
        return answer

    def _push(self, app, environ, started):
        verified = _verify_push(
            app, _query(environ), _cloud_headers(environ) if app.mode == "cloud" else {},
            functools.partial(_read_body, environ, self.config.max_body_bytes), self._clock(),
            self.config.timestamp_window, self._query_binds.bind)
        if verified is None:
            # Cloud Hosting's path check wants 200 and success (or an empty body).
            logger.info("app=%s Cloud Hosting path check answered success", app.name)
            return 200, [("Content-Type", _TEXT)], b"success"
        if verified.previous_key:
            self._notices.previous_key(app)
        deadline = started + self.reply_deadline * 0.9  # API calls must leave time to answer
        message = Message(verified.fields, app=app.name, format=verified.format,
                          encrypted=verified.encrypted, cloud=verified.cloud,
                          client_factory=functools.partial(self._push_client, app, deadline))
        ttl = verified.ttl  # the bind's, when the push had a signed query to bind
        if ttl is None:
            ttl = self._query_binds.remember_for(app, verified.timestamp)
        if app.delivery == "queue":
            return self._enqueue(app, message, environ, started, ttl)
        work = (app, message, verified.nonce, deadline, verified.aes_key)  # _deliver's
        key = message.dedup_key
        try:
            if key is None:
                content_type, reply, duplicate = self._deliver(*work) + (False,)
            else:
                content_type, reply, duplicate = self._dedups[app.name].run(
                    key if message.encrypted else _store_key(message), self._deliver,
                    started + self.reply_deadline, ttl,
                    room=self.reply_deadline * TAKEOVER_ROOM, args=work)
        except _InFlightTimeout as exc:
            self._record_push(app, message, "in-flight-timeout", started, environ)
            return exc.status, [("Content-Type", _TEXT)], b""
        except DeliveryError as exc:  # the backend failed: its reason is the whole story
            logger.error("app=%s delivery of %s (key %s) failed: %s; answering 500 so "
                         "WeChat retries", app.name, _loggable(message.event or message.msg_type),
                         _loggable(key), _loggable(exc.message))
            self._record_push(app, message, "handler-error", started, environ)
            return 500, [("Content-Type", _TEXT)], b""
        except Exception:
            logger.exception("app=%s %s raised on %s (key %s); answering 500 so WeChat "
                             "retries", app.name, _business_name(app),
                             _loggable(message.event or message.msg_type), _loggable(key))
            self._record_push(app, message, "handler-error", started, environ)
            return 500, [("Content-Type", _TEXT)], b""
        if duplicate:
            self.metrics.count("wxgate_duplicates_total", app=app.name)
        self._record_push(app, message, "duplicate" if duplicate else "handled", started,
                          environ)
        return 200, [("Content-Type", content_type)], reply.encode("utf-8")

    def _push_client(self, app, deadline):
        """``message.client`` of a push: the app's client, its API calls bounded by the
        push's ``deadline`` in this thread (the handler's)."""
        client = self.client(app.name)
        client.tokens.set_deadline(deadline)
        return client

    def _enqueue(self, app, message, environ, started, ttl):
        """Queue mode: store the push durably, then answer ``success``.

        ``success`` is sent only for a message that is in the queue (or was delivered from
        it). The push claims its dedup key like a sync push (``queued:`` namespace), and
        the insert itself sets the key to done, in one transaction with the row. So:

        - a duplicate arriving during the insert finds the claim and waits for it, as a
          sync duplicate waits for the handler, until the reply deadline;
        - an insert that fails (a locked database, Redis down) releases the claim and
          answers 500, so WeChat retries; a copy waiting on it then takes the claim and
          tries the insert itself, answering ``success`` if it succeeds, 500 if it fails
          too (or if the reply deadline has passed);
        - a gateway killed during the insert leaves a claim that expires within
          ``CLAIM_TTL`` and a transaction that never committed: the retry queues it.
        """
        key = _store_key(message) if message.dedup_key else None
        payload = _dump_json(_backend_document(message, queued=True))
        partition = f"{app.name}:{message.from_user or ''}"
        done = _Dedup.done_value(_TEXT, "success")
        dedup = self._dedups[app.name]

        def work():
            marker = None if key is None else (dedup.store_key(key, "queued"), done, ttl)
            self.queue.push(partition, payload, self._clock(), marker)
            return _TEXT, "success"

        try:
            if key is None:  # nothing to deduplicate by: queue every copy
                work()
                duplicate = False
            else:
                duplicate = dedup.run(key, work, started + self.reply_deadline, ttl,
                                      kind="queued", recorded=True)[2]
        except _InFlightTimeout as exc:
            self._record_push(app, message, "in-flight-timeout", started, environ)
            return exc.status, [("Content-Type", _TEXT)], b""
        except Exception as exc:
            # Without the store nothing is durable: answer 500 so WeChat retries, rather
            # than acknowledge a message we might lose.
            logger.error("app=%s cannot queue %s (%s: %s); answering 500 so WeChat retries",
                         app.name, _loggable(key), type(exc).__name__, _loggable(_cause(exc)))
            self._record_push(app, message, "queue-error", started, environ)
            return 500, [("Content-Type", _TEXT)], b""
        if duplicate:
            self.metrics.count("wxgate_duplicates_total", app=app.name)
        self._record_push(app, message, "duplicate" if duplicate else "queued", started,
                          environ)
        return 200, [("Content-Type", _TEXT)], b"success"

    def _record_push(self, app, message, outcome, started, environ):
        kind = message.event or message.msg_type
        # A label from the push: known types by name, the rest as "other", so pushes cannot
        # grow the metrics without bound.
        label = kind if isinstance(kind, str) and kind in _KNOWN_TYPES else "other"
        self.metrics.count("wxgate_pushes_total", app=app.name, type=label, outcome=outcome)
        if logger.isEnabledFor(logging.INFO):
            _log_push(app.name, kind, message.dedup_key, outcome,
                           (time.monotonic() - started) * 1000, environ,
                           self.config.log_format == "json")

    def _deliver(self, app, message, nonce, deadline=None, aes_key=None):
        """Hand the message to business code and render its answer: ``(type, body)``.

        ``aes_key`` is the key that opened the push: an encrypted reply is sealed with it.
        """
        started = time.monotonic()
        client = self._clients.get(app.name)  # a handler may reach it without the message
        if client is not None:
            client.tokens.set_deadline(deadline)
        try:
            if app.forward or app.handler is None:
                reply = _business_reply(app, message, timestamp=self._clock())
            else:  # a handler alone, as most apps: no forward, so no timestamp to take
                reply = app.handler(message)
        finally:
            client = self._clients.get(app.name)
            if client is not None:
                client.tokens.set_deadline(None)
            self.metrics.observe("wxgate_handler_seconds", time.monotonic() - started,
                                 app=app.name)
        if reply is None:  # most handlers answer nothing: success, with no reply to seal
            return _TEXT, "success"
        if _reply_dropped(app, reply):
            self._notices.dropped_reply(app)
        content_type, body = _render_reply(
            app, message, reply, nonce=nonce, aes_key=aes_key, now=self._clock(),
            random_prefix=self._random_bytes(8).hex().encode("ascii")
            if message.encrypted else None)
        body.encode("utf-8")  # a reply that cannot be sent fails here, inside the dedup claim
        return content_type, body


def make_app(config: Config | str | os.PathLike[str], **options: Any) -> Gateway:
    """Build the WSGI application.

    :param config: a path to an ini file, or a :class:`Config`.
    :param options: ``clock``, ``random_bytes``, ``store``, ``sleep`` (see :class:`Gateway`).
    :raises ConfigError: the ini file is missing or wrong.
    """
    if not isinstance(config, Config):
        config = load_config(config)
    return Gateway(config, **options)


class _LazyApplication:
    """``wxgate:application``: builds the app on first use from ``WXGATE_CONFIG``.

    The variable is read from ``os.environ`` or, failing that, from the WSGI environ, so
    mod_wsgi's ``SetEnv WXGATE_CONFIG /etc/wxgate.ini`` works.
    """

    def __init__(self):
        self._app = None
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        app = self._app
        if app is None:
            with self._lock:  # one build, however many threads arrive first
                if self._app is None:
                    path = os.environ.get("WXGATE_CONFIG") or environ.get("WXGATE_CONFIG")
                    try:
                        if not path:
                            raise ConfigError("WXGATE_CONFIG is not set: point it at your "
                                              "wxgate ini file")
                        config = load_config(path)
                        _setup_logging(config.log_format)  # before the app logs anything
                        self._app = make_app(config)
                    except WxgateError as exc:
                        logger.error("cannot start: %s", exc.message)
                    except Exception:
                        logger.exception("cannot start")
                app = self._app
        if app is None:
            start_response("500 Internal Server Error",
                           [("Content-Type", _TEXT), ("Content-Length", "0")])
            return [b""]
        return app(environ, start_response)


application = _LazyApplication()


###############################################################################
# BOUNDARY: optional parts below ##############################################
###############################################################################

# Nothing above this line uses what follows when the module is imported, nor any private
# attribute of it. The gateway reaches the API client through Gateway.client (made on
# first use), the queue through _open_queue and the worker through Gateway.worker, both
# only when an app has delivery = queue; the worker uses the gateway's public methods.


###############################################################################
# WeChat HTTP #################################################################
###############################################################################

# The one HTTP call every API request goes through (the token endpoints and the business
# APIs alike), and the multipart body of an upload. Pure but for _http_json's socket.


class _Multipart:
    """A request body already encoded as ``multipart/form-data`` (an upload)."""

    __slots__ = ("data", "content_type")

    def __init__(self, data: bytes, content_type: str) -> None:
        self.data, self.content_type = data, content_type


def _form_quote(text):
    # What browsers do to a name or file name inside Content-Disposition's quotes (HTML's
    # form-data encoding): CR, LF and '"' are percent-escaped, the rest goes as UTF-8.
    return text.replace("\r", "%0D").replace("\n", "%0A").replace('"', "%22")


def _encode_multipart(fields, files, boundary):
    """Encode a ``multipart/form-data`` body (RFC 7578); return a :class:`_Multipart`.

    :param fields: ``{name: text}`` for plain form fields.
    :param files: ``{name: (filename, data, content_type)}``, ``data`` bytes, sent untouched.
    :param boundary: the boundary, ASCII letters and digits; the caller draws it at random.
    :raises ValueError: the boundary occurs in a value: draw another one.
    """
    if not re.fullmatch(r"[0-9A-Za-z'()+_,./:=?-]{1,70}", boundary):
        raise ValueError(f"not a valid multipart boundary: {boundary!r}")
    delimiter = b"--" + boundary.encode("ascii")
    parts = []
    for name, value in fields.items():
        parts.append((f'Content-Disposition: form-data; name="{_form_quote(name)}"\r\n',
                      value.encode("utf-8")))
    for name, (filename, data, content_type) in files.items():
        if "\r" in content_type or "\n" in content_type:
            raise ValueError(f"content type {content_type!r} holds a line break")
        parts.append((f'Content-Disposition: form-data; name="{_form_quote(name)}"; '
                      f'filename="{_form_quote(filename)}"\r\n'
                      f'Content-Type: {content_type}\r\n', bytes(data)))
    chunks = []
    for headers, data in parts:
        # A part ends where "CRLF--boundary" starts. We refuse "--boundary" anywhere, CRLF or
        # not, as lax parsers exist; with a random boundary this never happens by chance.
        if delimiter in data:
            raise ValueError("the multipart boundary occurs in the data")
        chunks += [delimiter, b"\r\n", headers.encode("utf-8"), b"\r\n", data, b"\r\n"]
    chunks += [delimiter, b"--\r\n"]
    return _Multipart(b"".join(chunks), f"multipart/form-data; boundary={boundary}")


def _http_json(method, url, *, params=None, body=None, timeout=DEFAULT_API_TIMEOUT, what="",
               limit="api_timeout"):
    """One HTTP call to WeChat's API; return the decoded JSON object.

    ``body`` is sent as JSON, or as it is when it is a :class:`_Multipart` (an upload).
    ``what`` names the endpoint in errors, and the URL appears only redacted (its query may
    carry the AppSecret or a token). ``limit`` names what set ``timeout``, for the message
    of a call that runs out of it.
    """
    import http.client
    import socket
    import urllib.error
    import urllib.parse
    import urllib.request
    shown = _redact_url(url)
    if params:
        url = f"{url}?{urllib.parse.urlencode(params)}"
    data = None
    headers = {"Accept": "application/json", "User-Agent": f"wxgate/{__version__}"}
    if isinstance(body, _Multipart):
        data, headers["Content-Type"] = body.data, body.content_type
    elif body is not None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers["Content-Type"] = "application/json; charset=utf-8"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read(1 << 20)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the connection: a proxy's 502 page is not read
        error = WeChatConnectionError(f"{what} answered HTTP {exc.code}")
        error.http_status = exc.code  # the sidecar's 502 means something (see WeChatClient)
        raise error from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            raise WeChatConnectionError(f"{what} timed out after {timeout:.3g} s ({limit})") \
                from None
        if isinstance(reason, socket.gaierror):  # DNS: a typo in api_base, or no resolver
            raise WeChatConnectionError(f"{what} unreachable: cannot resolve the host of "
                                        f"{shown} (check api_base, and this host's DNS)") \
                from None
        raise WeChatConnectionError(f"{what} unreachable at {shown}: {type(reason).__name__}") \
            from None
    except (ValueError, http.client.HTTPException) as exc:
        # Their text may quote the URL, and with it the secret or the access_token.
        raise WeChatConnectionError(f"{what} failed: {type(exc).__name__}") from None
    try:
        document = json.loads(raw)
    except ValueError:
        raise WeChatConnectionError(f"{what} answered something that is not JSON") from None
    if not isinstance(document, dict):
        raise WeChatConnectionError(f"{what} answered JSON that is not an object")
    return document


def _errcode(document):
    """WeChat's rule: a missing errcode means success."""
    try:
        return int(document.get("errcode") or 0)
    except (TypeError, ValueError):
        return -1


###############################################################################
# access_token ################################################################
###############################################################################

class TokenManager:
    """One app's access_token: cached in the store beside its expiry, fetched once at a time.

    Every thread in a process, every worker on a host (sqlite) and every host (Redis) share
    one token. Within a process a lock makes concurrent callers wait for one fetch; across
    processes a lock key in the store does the same, and a holder that crashes loses it
    when it expires.

    :param appid: the mini program's AppID.
    :param appsecret: its AppSecret; only needed when a token must be fetched.
    :param store: a :class:`Store`; a private :class:`MemoryStore` by default.
    :param api_base: WeChat's API base URL (a fake one in tests).
    :param api_timeout: seconds for each HTTP call.
    :param grant: ``"stable"`` (``POST /cgi-bin/stable_token``), ``"classic"``
        (``GET /cgi-bin/token``) or ``"cloud"`` (none: Cloud Hosting's 开放接口服务 adds the
        credential to each call, and :meth:`get_token` raises).
    :param refresh_margin: fetch a new token when the stored one expires within this many
        seconds.
    :param name: the app's name, for messages.
    :param prefix: store key prefix.
    :param clock: returns the time in seconds; ``sleep`` waits (both injectable).
    :param metrics: where fetches and errors are counted (the gateway's, by default none).
    """

    def __init__(self, appid: str, appsecret: str | None, *, store: Store | None = None,
                 api_base: str = DEFAULT_API_BASE, api_timeout: float = DEFAULT_API_TIMEOUT,
                 grant: str = "stable", refresh_margin: float = DEFAULT_REFRESH_MARGIN,
                 name: str | None = None, prefix: str = "wxgate",
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], object] = time.sleep, metrics: Any = None) -> None:
        if grant not in TOKEN_GRANTS:
            raise ValueError(f"grant must be one of {TOKEN_GRANTS}, got {grant!r}")
        self.appid, self._appsecret = appid, appsecret
        self.store = store if store is not None else MemoryStore(clock=clock)
        self.api_base, self.api_timeout = api_base.rstrip("/"), api_timeout
        self.grant, self.refresh_margin = grant, refresh_margin
        self.name = name or appid
        self._clock, self._sleep = clock, sleep
        self._key = f"{prefix}:token:{grant}:{appid}"
        self._lock_key = self._key + ":lock"
        self._force_key = self._key + ":forced"
        self._local_lock = threading.Lock()
        self._metrics = metrics
        # (error, time until which it is raised again)
        self._failure: tuple[WeChatAPIError, float] | None = None
        self._deadlines = threading.local()
        self._last_replacement = (None, 0.0)
        #: How many times this manager called a token endpoint (for tests and metrics).
        self.fetches = 0

    def __repr__(self):
        return f"<TokenManager {self.name} appid={self.appid} grant={self.grant}>"

    # A handler answering a push has WeChat's 5 seconds, not api_timeout per request: the
    # gateway sets a per-thread deadline around the handler, and every request, backoff and
    # wait for the token below fits in what is left of it.
    @property
    def has_appsecret(self) -> bool:
        """Whether the app has an AppSecret (it is never shown)."""
        return bool(self._appsecret)

    def session_query(self, js_code: str) -> dict[str, str]:
        """The query of ``jscode2session``, which carries the AppSecret itself."""
        return {"appid": self.appid, "secret": self._appsecret or "", "js_code": js_code,
                "grant_type": "authorization_code"}

    def set_deadline(self, deadline: float | None) -> None:
        """Bound this thread's API work by ``deadline`` (``time.monotonic()``; None: off)."""
        self._deadlines.value = deadline

    def time_left(self) -> float:
        """The timeout for the next request: ``api_timeout``, or less near the deadline.

        :raises WeChatConnectionError: this thread's push window is spent.
        """
        deadline = getattr(self._deadlines, "value", None)
        if deadline is None:
            return self.api_timeout
        remaining = deadline - time.monotonic()
        if remaining < 0.05:
            raise WeChatConnectionError(f"app {self.name}: WeChat's 5-second push window is "
                                        "spent; no time left for an API call "
                                        "(delivery = queue has no such limit)")
        return min(self.api_timeout, remaining)

    def timeout_reason(self, timeout: float) -> str:
        """What set ``timeout`` (from :meth:`time_left`), for a timeout's message."""
        if timeout < self.api_timeout:
            return "what was left of WeChat's 5-second push window; delivery = queue has " \
                "no such limit"
        return "api_timeout"

    def can_wait(self, seconds: float) -> bool:
        """Whether this thread's deadline leaves ``seconds`` to wait (a busy backoff)."""
        deadline = getattr(self._deadlines, "value", None)
        return deadline is None or time.monotonic() + seconds < deadline - 0.05

    # The record kept in the store: "expires_at refresh_at token" (a token holds no space).
    # refresh_at is decided once, by the fetcher, and read by every process: a stable_token
    # fetched with less life left than the margin (the same token comes back until 300 s
    # before expiry) must not make every later call fetch again.
    def _read(self):
        """``(token, expires_at, refresh_at)`` from the store, or None."""
        value = self.store.get(self._key)
        if not value:
            return None
        try:
            expires_at, refresh_at, token = value.split(" ", 2)
            return token, float(expires_at), float(refresh_at)
        except ValueError:
            return None

    def _fresh(self, record):
        return record is not None and record[2] > self._clock()

    def token_info(self) -> dict[str, Any]:
        """``{"access_token": ..., "expires_at": ...}`` for a valid token, fetching if needed."""
        token = self.get_token()
        record = self._read()
        expires_at = record[1] if record and record[0] == token else self._clock()
        return {"access_token": token, "expires_at": int(expires_at)}

    def get_token(self) -> str:
        """Return a valid access_token, fetching one when none is stored or it nearly expired.

        :raises WeChatAPIError: the token endpoint refused (40001: wrong AppSecret).
        :raises WeChatConnectionError: the endpoint could not be reached in time.
        :raises WxgateError: the app has no AppSecret configured, or ``token_grant = cloud``.
        """
        if self.grant == "cloud":
            raise WxgateError(f"app {self.name!r} has token_grant = cloud: Cloud Hosting's "
                              "开放接口服务 adds the credential to each call, so wxgate holds "
                              "no access_token", status=500)
        record = self._read()
        if self._fresh(record):
            return record[0]
        failure = self._failure
        if failure is not None and failure[1] > self._clock():
            raise failure[0]  # a wrong AppSecret or an empty quota: do not ask again yet
        # Single flight in this process: the first caller fetches. The others use the
        # current token while it still works (a refresh ahead of expiry must not stall
        # every handler), or wait on the lock and then find the new token in the store.
        if record is not None and record[1] > self._clock():
            if not self._local_lock.acquire(blocking=False):
                return record[0]
        else:
            self._local_lock.acquire()
        try:
            record = self._read()
            if self._fresh(record):
                return record[0]
            try:
                return self._refresh(record)
            except WeChatAPIError as exc:
                if exc.errcode in CREDENTIAL_ERRCODES or exc.errcode == 45009:
                    self._failure = (exc, self._clock() + FAILED_FETCH_PAUSE)
                raise
        finally:
            self._local_lock.release()

    def invalidate_token(self, token: str | None = None) -> None:
        """Forget the stored token (only if it is still ``token``, when given)."""
        record = self._read()
        if record and (token is None or record[0] == token):
            self.store.delete(self._key, f"{record[1]!r} {record[2]!r} {record[0]}")

    def replacement_for(self, rejected: str) -> str | None:
        """A token other than ``rejected``, after an API call said it is dead.

        Fetches once; with stable_token, a normal fetch returns the same token while WeChat
        thinks it is alive, so only then do we force a refresh, and at most once per 30 s
        (WeChat ignores closer ones). Returns None when nothing better can be had.
        """
        with self._local_lock:
            record = self._read()
            if record and record[0] != rejected and record[1] > self._clock():
                return record[0]  # another thread already replaced it
            last, when = self._last_replacement
            if last == rejected and self._clock() - when < STABLE_FORCE_GAP:
                # The token we fetched as a replacement is rejected too: something else is
                # wrong (another system holding the AppSecret?). Fetching on every call would
                # burn the quota, so give up until the gap has passed.
                return None
            self.invalidate_token(rejected)
            token = self._refresh(None)
            if token != rejected:
                self._last_replacement = (token, self._clock())
                return token
            if self.grant != "stable" or not self.store.add(self._force_key, "1",
                                                            STABLE_FORCE_GAP):
                return None
            logger.warning("app %s: WeChat rejects the current stable token; forcing a "
                           "refresh", self.name)
            self.invalidate_token(rejected)
            token = self._refresh(None, force=True)
            if token == rejected:
                return None
            self._last_replacement = (token, self._clock())
            return token

    def _refresh(self, stale, force=False):
        """Fetch under the store lock, or wait for the process holding it."""
        owner = os.urandom(16).hex()
        lock_ttl = self.api_timeout * (len(BUSY_BACKOFF) + 1) + sum(BUSY_BACKOFF) + 1
        deadline = time.monotonic() + lock_ttl
        while True:
            if self.store.add(self._lock_key, owner, lock_ttl):
                try:
                    record = self._read()
                    if not force and self._fresh(record):
                        return record[0]  # another process fetched while we waited
                    token, expires_in = self._fetch(force)
                    now = self._clock()
                    expires_at = now + expires_in
                    refresh_at = expires_at - min(self.refresh_margin, expires_in / 2)
                    self.store.set(self._key, f"{expires_at!r} {refresh_at!r} {token}",
                                   expires_in)
                    return token
                finally:
                    self.store.delete(self._lock_key, owner)
            # Another process is fetching. A token that still works is good enough meanwhile.
            now = self._clock()
            if stale and stale[1] > now and not force:
                return stale[0]
            record = self._read()
            if self._fresh(record):
                return record[0]
            if time.monotonic() > deadline:
                raise WeChatConnectionError(
                    f"app {self.name}: timed out waiting for another process to fetch the "
                    "access_token")
            self.time_left()  # gives up when the push that needs the token is out of time
            self._sleep(POLL_INTERVAL * 2)

    def _fetch(self, force=False):
        """Call the token endpoint; return ``(token, expires_in)``."""
        if not self._appsecret:
            raise WxgateError(f"app {self.name!r} has no appsecret: set appsecret in its "
                              f"[app:{self.name}] section to fetch access tokens", status=500)
        credentials = {"grant_type": "client_credential", "appid": self.appid,
                       "secret": self._appsecret}
        for attempt in range(len(BUSY_BACKOFF) + 1):
            self.fetches += 1
            timeout = self.time_left()
            if self.grant == "stable":
                document = _http_json(
                    "POST", self.api_base + "/cgi-bin/stable_token",
                    body=dict(credentials, force_refresh=force), timeout=timeout,
                    what="stable_token", limit=self.timeout_reason(timeout))
            else:
                document = _http_json("GET", self.api_base + "/cgi-bin/token",
                                      params=credentials, timeout=timeout, what="token",
                                      limit=self.timeout_reason(timeout))
            errcode = _errcode(document)
            if self._metrics is not None:
                self._metrics.count("wxgate_token_fetches_total", app=self.name)
                if errcode:
                    self._metrics.count("wxgate_token_errors_total", app=self.name,
                                        errcode=errcode)
            if errcode == BUSY_ERRCODE and attempt < len(BUSY_BACKOFF) and \
                    self.can_wait(BUSY_BACKOFF[attempt]):
                self._sleep(BUSY_BACKOFF[attempt])
                continue
            break
        if errcode in CREDENTIAL_ERRCODES:
            raise WeChatAPIError(errcode, f"the token endpoint refused app {self.name!r} "
                                 f"(appid {self.appid}): check its appid and appsecret "
                                 f"({document.get('errmsg', '')})")
        if errcode:
            raise WeChatAPIError(errcode, str(document.get("errmsg", "")))
        token = document.get("access_token")
        if not isinstance(token, str) or not token or " " in token:
            raise WeChatConnectionError("token endpoint answered without an access_token")
        try:
            expires_in = float(document.get("expires_in", 7200))
        except (TypeError, ValueError):
            expires_in = 7200.0
        logger.info("app %s: fetched a new access_token (%s, expires in %d s)",
                    self.name, self.grant, expires_in)
        return token, max(expires_in, 1.0)


###############################################################################
# WeChat API client ###########################################################
###############################################################################

# Magic numbers (offset, bytes) of the formats WeChat takes as temporary media, to name and
# type bytes handed over without a file name, or a name without an extension: WeChat judges
# an upload by its name's extension (community reports: 40004 / 40113 for a bare name).
_MEDIA_MAGIC = ((0, b"\xff\xd8\xff", "jpg", "image/jpeg"),
                (0, b"\x89PNG\r\n\x1a\n", "png", "image/png"),
                (0, b"GIF87a", "gif", "image/gif"), (0, b"GIF89a", "gif", "image/gif"),
                (0, b"#!AMR\n", "amr", "audio/amr"),
                (4, b"ftyp", "mp4", "video/mp4"))  # ISO base media: a box size, then ftyp


def _guess_media(data, filename):
    """``(filename, content_type)`` for an upload: from the name, else from the bytes.

    A name without an extension gets the bytes' own (``poster`` → ``poster.png``).
    """
    for offset, magic, extension, content_type in _MEDIA_MAGIC:
        if data.startswith(magic, offset):
            break
    else:
        extension, content_type = "", "application/octet-stream"
    if not filename:
        return f"media.{extension or 'bin'}", content_type
    if extension and not os.path.splitext(filename)[1]:
        filename = f"{filename}.{extension}"
    import mimetypes
    guessed = mimetypes.guess_type(filename)[0]
    return filename, guessed or content_type


def _sidecar_hint(path):
    """What to do when Cloud Hosting's 开放接口服务 does not pass a call to ``path``."""
    return (f"{path} did not pass Cloud Hosting's 开放接口服务: turn the service's 开放接口服务 "
            f"switch on and add {path} to its API whitelist (云托管 console → 服务设置 → "
            "云调用), then rebuild and publish a new version (the settings reach only "
            "versions built after them)")


class WeChatClient:
    """Calls to WeChat's backend API for one app, with its token injected.

    A call rejected for its token (40001, 40014, 42001) gets one replacement token and one
    retry, then the error: never a loop. ``-1`` (busy) gets a short bounded backoff.
    Handlers reach it as ``message.client``; other code as ``app.client(name)``.

    :param tokens: the app's :class:`TokenManager`.
    """

    def __init__(self, tokens: TokenManager, *,
                 sleep: Callable[[float], object] = time.sleep) -> None:
        self.tokens = tokens
        self._sleep = sleep

    def __repr__(self):
        return f"<WeChatClient {self.tokens.name}>"

    def call(self, method: str, path: str, params: Mapping[str, Any] | None = None,
             json: Any = None) -> dict[str, Any]:
        """Call ``path`` (e.g. ``/cgi-bin/message/custom/send``) and return the JSON answer.

        With ``token_grant = cloud`` the call goes to ``api_base`` (Cloud Hosting's
        ``http://api.weixin.qq.com``) with no ``access_token``: the 开放接口服务 sidecar adds
        the credential, and no token is ever fetched.

        :param method: ``"GET"`` or ``"POST"``.
        :param params: extra query parameters; ``access_token`` is added.
        :param json: the JSON body, for POST.
        :raises WeChatAPIError: WeChat answered a non-zero errcode (after the one retry, for
            token errors); with ``token_grant = cloud``, 41001 or 502 for an API the
            sidecar does not pass, explained.
        :raises WeChatConnectionError: WeChat could not be reached within ``api_timeout``.
        """
        if self.tokens.grant == "cloud":
            return self._call_through_sidecar(method, path, params, json)
        token = self.tokens.get_token()
        try:
            return self._call_with(token, method, path, params, json)
        except WeChatAPIError as exc:
            if exc.errcode not in TOKEN_REJECTED_ERRCODES:
                raise
            replacement = self.tokens.replacement_for(token)
            if replacement is None:
                raise
            logger.warning("app %s: %s rejected the access_token (%s); retrying once with "
                           "a new one", self.tokens.name, path, exc.errcode)
            return self._call_with(replacement, method, path, params, json)

    def _call_through_sidecar(self, method, path, params, body):
        # Cloud Hosting's 开放接口服务 takes calls over http with no access_token and adds
        # the credential. Its FAQ: "access_token missing" (41001) while the switch is off or
        # in a version built before it was turned on, and HTTP 502 for an API that is not on
        # the service's whitelist. Neither is a token to replace: one call.
        # https://developers.weixin.qq.com/miniprogram/dev/wxcloudrun/src/guide/weixin/open.html
        try:
            return self._request(method, path, dict(params or {}), body)
        except WeChatAPIError as exc:
            if exc.errcode != 41001:
                raise
            raise WeChatAPIError(41001, f"access_token missing: {_sidecar_hint(path)}") \
                from None
        except WeChatConnectionError as exc:
            if exc.http_status != 502:
                raise
            raise WeChatAPIError(502, f"HTTP 502 from 开放接口服务: {_sidecar_hint(path)}") \
                from None

    def _call_with(self, token, method, path, params, body):
        query = dict(params or {})
        query["access_token"] = token
        return self._request(method, path, query, body)

    def _request(self, method, path, query, body):
        for attempt in range(len(BUSY_BACKOFF) + 1):
            timeout = self.tokens.time_left()
            document = _http_json(method, self.tokens.api_base + path, params=query, body=body,
                                  timeout=timeout, what=path,
                                  limit=self.tokens.timeout_reason(timeout))
            errcode = _errcode(document)
            if errcode == BUSY_ERRCODE and attempt < len(BUSY_BACKOFF) and \
                    self.tokens.can_wait(BUSY_BACKOFF[attempt]):
                self._sleep(BUSY_BACKOFF[attempt])
                continue
            if errcode:
                raise WeChatAPIError(errcode, str(document.get("errmsg", "")))
            return document

    def code2session(self, js_code: str) -> dict[str, Any]:
        """Exchange a ``wx.login`` code for ``openid``, ``session_key`` (and ``unionid``).

        Never send ``session_key`` to the client.
        https://developers.weixin.qq.com/miniprogram/dev/server/API/user-login/api_code2session
        """
        if not self.tokens.has_appsecret:
            raise WxgateError(f"app {self.tokens.name!r} has no appsecret: set appsecret in "
                              f"its [app:{self.tokens.name}] section to call code2session",
                              status=500)
        document = self._request("GET", "/sns/jscode2session",
                                 self.tokens.session_query(js_code), None)
        if "openid" not in document:
            raise WeChatConnectionError("jscode2session answered without an openid")
        return document

    def send_customer_message(self, openid: str, msgtype: str, payload: dict[str, Any]
                              ) -> dict[str, Any]:
        """Send a customer-service message: ``{"touser", "msgtype", msgtype: payload}``."""
        return self.call("POST", "/cgi-bin/message/custom/send",
                         json={"touser": openid, "msgtype": msgtype, msgtype: payload})

    def send_text(self, openid: str, text: str) -> dict[str, Any]:
        """Send a text customer-service message."""
        return self.send_customer_message(openid, "text", {"content": text})

    def send_image(self, openid: str, media_id: str) -> dict[str, Any]:
        """Send an image customer-service message (an uploaded temporary media id)."""
        return self.send_customer_message(openid, "image", {"media_id": media_id})

    def send_link(self, openid: str, title: str, description: str, url: str, thumb_url: str
                  ) -> dict[str, Any]:
        """Send a link card."""
        return self.send_customer_message(openid, "link", {
            "title": title, "description": description, "url": url, "thumb_url": thumb_url})

    def send_miniprogrampage(self, openid: str, title: str, pagepath: str,
                             thumb_media_id: str) -> dict[str, Any]:
        """Send a mini program page card."""
        return self.send_customer_message(openid, "miniprogrampage", {
            "title": title, "pagepath": pagepath, "thumb_media_id": thumb_media_id})

    def upload_temp_media(self, file: str | os.PathLike[str] | bytes | BinaryIO,
                          media_type: str = "image", *, filename: str | None = None,
                          content_type: str | None = None) -> str:
        """Upload a temporary media file (kept 3 days) and return its ``media_id``.

        customerServiceMessage.uploadTempMedia: ``POST /cgi-bin/media/upload?type=image``
        with the file as the multipart field ``media``. Mini programs may upload images
        only; the ``media_id`` is what :meth:`send_image` and :meth:`send_miniprogrampage`
        take.
        https://developers.weixin.qq.com/miniprogram/en/dev/api-backend/open-api/
        customer-message/customerServiceMessage.uploadTempMedia.html

        :param file: a path, the file's bytes, or a binary file object.
        :param media_type: WeChat's ``type``; ``"image"`` is the only one mini programs have.
        :param filename: the name WeChat sees; by default the file's own, or ``media.jpg``
            (or ``.png``, ``.gif``) after the bytes' format. A name without an extension
            gets the one of the bytes' format (JPEG, PNG, GIF, AMR, MP4), as WeChat types
            an upload by its name.
        :param content_type: by default guessed from the name, then from the bytes.
        :raises WeChatAPIError: e.g. 40004 (not a media type WeChat accepts).
        :raises WeChatConnectionError: WeChat could not be reached, or sent no media_id.
        :raises OSError: the file cannot be read.
        """
        if not isinstance(media_type, str) or not re.fullmatch(r"[a-z]{1,16}", media_type):
            raise ValueError(f"media_type must be a word such as 'image', got {media_type!r}")
        if isinstance(file, (bytes, bytearray, memoryview)):
            data = bytes(file)
        elif isinstance(file, (str, os.PathLike)):
            with open(file, "rb") as opened:
                data = opened.read()
            filename = filename or os.path.basename(os.fspath(file))
        else:
            data = file.read()
            name = getattr(file, "name", None)
            filename = filename or (os.path.basename(name) if isinstance(name, str) else None)
        filename, guessed = _guess_media(data, filename)
        files = {"media": (filename, data, content_type or guessed)}
        boundary = os.urandom(MULTIPART_BOUNDARY_BYTES).hex()
        while b"--" + boundary.encode("ascii") in data:  # one file in 2**128: draw again
            boundary = os.urandom(MULTIPART_BOUNDARY_BYTES).hex()
        body = _encode_multipart({}, files, boundary)
        # call() hands its body to _http_json, which sends a _Multipart as it is: the upload
        # gets the token, the one retry on a rejected token and the busy backoff of JSON calls.
        document = self.call("POST", "/cgi-bin/media/upload", params={"type": media_type},
                             json=body)
        media_id = document.get("media_id")
        if not isinstance(media_id, str) or not media_id:
            raise WeChatConnectionError("media/upload answered without a media_id")
        return media_id

    def send_subscribe_message(self, openid: str, template_id: str, data: Mapping[str, Any],
                               page: str | None = None, miniprogram_state: str | None = None,
                               lang: str | None = None) -> dict[str, Any]:
        """Send a subscribe message; ``data`` maps keywords to values or ``{"value": ...}``."""
        body = {"touser": openid, "template_id": template_id,
                "data": {name: value if isinstance(value, dict) else {"value": value}
                         for name, value in data.items()}}
        for name, value in (("page", page), ("miniprogram_state", miniprogram_state),
                            ("lang", lang)):
            if value is not None:
                body[name] = value
        return self.call("POST", "/cgi-bin/message/subscribe/send", json=body)

    def set_typing(self, openid: str, on: bool = True) -> dict[str, Any]:
        """Show (or hide) "typing..." in the user's chat."""
        return self.call("POST", "/cgi-bin/message/custom/typing",
                         json={"touser": openid, "command": "Typing" if on else "CancelTyping"})


def _app_client(config, app, store, *, clock, sleep, metrics):
    """The :class:`WeChatClient` of ``app``, with its :class:`TokenManager` on ``store``:
    what ``Gateway.client`` makes on first use."""
    return WeChatClient(TokenManager(
        app.appid, app.appsecret, store=store, api_base=config.api_base,
        api_timeout=config.api_timeout, grant=app.token_grant,
        refresh_margin=app.token_refresh_margin, name=app.name, prefix=config.store_prefix,
        clock=clock, sleep=sleep, metrics=metrics), sleep=sleep)


###############################################################################
# Router ######################################################################
###############################################################################

# A routed function, as registered: the decorators hand it back with its own type.
_Routed = TypeVar("_Routed", bound=Callable[..., Any])


class Router:
    """A handler that calls one function per message type or event name.

    ::

        router = wxgate.Router()

        @router.message("text")
        def on_text(message): ...

        @router.event("user_enter_tempsession")
        def on_enter(message): ...

    Point ``handler = shopbot:router`` at it. An event goes to the function registered for
    its ``Event``, else to the one for ``router.message("event")``; any other push to the one
    for its ``MsgType``; what matches nothing goes to ``router.default``, or is answered
    ``success``. The routed function's return value is the reply, as a handler's is.
    Registering a type or an event twice raises ``ValueError`` when the module is imported,
    so one function cannot silently replace another.
    """

    def __init__(self) -> None:
        self._messages: dict[str, Callable[[Message], Any]] = {}
        self._events: dict[str, Callable[[Message], Any]] = {}
        self._default: Callable[[Message], Any] | None = None

    def __repr__(self) -> str:
        routes = [f"message:{name}" for name in self._messages]
        routes += [f"event:{name}" for name in self._events]
        routes += ["default"] if self._default is not None else []
        return f"<Router {' '.join(routes) or '(empty)'}>"

    def message(self, *types: str) -> Callable[[_Routed], _Routed]:
        """Route pushes whose ``MsgType`` is one of ``types`` (``"text"``, ``"image"``...)."""
        return self._register(self._messages, "message", types)

    def event(self, *names: str) -> Callable[[_Routed], _Routed]:
        """Route events whose ``Event`` is one of ``names`` (``"user_enter_tempsession"``...)."""
        return self._register(self._events, "event", names)

    def default(self, function: _Routed) -> _Routed:
        """Route what nothing else matches; without one, those pushes get ``success``."""
        if not callable(function):
            raise TypeError("use @router.default on a function, without parentheses")
        if self._default is not None:
            raise ValueError(f"router.default is already {_function_name(self._default)}; "
                             f"cannot also route to {_function_name(function)}")
        self._default = function
        return function

    def _register(self, table, kind, names):
        # Mistakes raise here, when the handler's module is imported (so at load_config, and
        # in `wxgate check`), not at the first push of the kind.
        if not names:
            example = "text" if kind == "message" else "user_enter_tempsession"
            raise TypeError(f"router.{kind}() needs at least one name, e.g. "
                            f"@router.{kind}({example!r})")
        for name in names:
            if not isinstance(name, str) or not name:
                raise TypeError(f"router.{kind}() takes names as strings, got {name!r}: "
                                f"write @router.{kind}('...') with the name in parentheses")
        if len(set(names)) != len(names):
            raise ValueError(f"router.{kind}() got the same name twice: {names!r}")

        def decorator(function):
            if not callable(function):
                raise TypeError(f"@router.{kind}(...) decorates a function, got "
                                f"{type(function).__name__}")
            for name in names:  # all checked before any is registered: no half routing
                if name in table:
                    raise ValueError(f"{kind} {name!r} is already routed to "
                                     f"{_function_name(table[name])}; cannot also route it "
                                     f"to {_function_name(function)}")
            for name in names:
                table[name] = function
            return function

        return decorator

    def __call__(self, message: Message) -> Any:
        """Handle ``message`` with the function routed to it; return that function's reply."""
        function = None
        kind = message.msg_type
        # From a hostile JSON push MsgType and Event may be objects or lists, which are not
        # names (and not hashable): they match nothing.
        if kind == "event" and isinstance(message.event, str):
            function = self._events.get(message.event)
        if function is None and isinstance(kind, str):
            function = self._messages.get(kind)
        if function is None:
            function = self._default
        if function is None:
            return "success"
        return function(message)


def _function_name(function):
    """``module.qualname`` of a routed function, for the message of a duplicate route."""
    module = getattr(function, "__module__", None)
    name = getattr(function, "__qualname__", None) or repr(function)
    return f"{module}.{name}" if module else name


###############################################################################
# Durable queue ###############################################################
###############################################################################

class _Queue:
    """A durable queue of pushes in a shared store, in order per partition (app + user).

    Only the oldest message of a partition can be claimed, so one user's messages reach the
    business code in order of arrival. A claim hides its message for ``visibility`` seconds;
    a worker that dies before acknowledging lets it reappear.
    """

    def push(self, partition, payload, now, marker=None):
        """Queue ``payload``; return its id.

        ``marker`` is ``(key, value, ttl)``, a push's dedup key in the store: the insert and
        setting ``key`` to ``value`` are one transaction, and a key already done (a value
        starting with "d") means the push is already queued: nothing is inserted and the
        result is None. So "queued" is never recorded for a message that is not in the
        queue, and a message is never queued twice under one key.
        """
        raise NotImplementedError

    def claim(self, now, visibility):
        """``(id, payload, attempt, claim, cut_offs)`` of a message due for delivery, or None.

        ``attempt`` is this attempt's number: one more than the attempts that ended (in
        :meth:`retry` or :meth:`bury`). An attempt cut off by a kill never ended, so it is
        not counted: it is noted in the message's errors, and counted in ``cut_offs`` (see
        ``MAX_CUT_OFFS``).
        """
        raise NotImplementedError

    def ack(self, item_id, claim, now):
        raise NotImplementedError

    def extend(self, item_id, claim, until):
        """Keep a claim hidden until ``until`` while its delivery still runs."""
        raise NotImplementedError

    def retry(self, item_id, claim, available_at, error, now):
        """End a failed attempt: count it, add ``error`` to the message's errors."""
        raise NotImplementedError

    def bury(self, item_id, claim, error, now):
        """End the last attempt: count it, and move the message to the dead letters."""
        raise NotImplementedError

    def stats(self, now):
        raise NotImplementedError

    def dead(self, limit=100):
        raise NotImplementedError

    def revive(self, ids, now):
        """Put dead letters (all when ``ids`` is empty) back in the queue; return the count."""
        raise NotImplementedError

    def purge_dead(self):
        raise NotImplementedError

    def close(self):
        """Release connections the queue opened itself (the shared store's stay open)."""


class _SqliteQueue(_Queue):
    """The queue as a table beside the store's key-value table."""

    def __init__(self, store):
        # Its own connection with synchronous=FULL: a push answered "success" must survive
        # a power cut, which WAL with synchronous=NORMAL (fine for dedup) does not promise.
        # Its tables are made by each new connection: a database file deleted while
        # serving is made anew, and the queue must be in the new one too.
        self.store = store.reopen(synchronous="FULL", schema=(
            "CREATE TABLE IF NOT EXISTS wxgate_queue (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " partition TEXT NOT NULL, payload TEXT NOT NULL, attempts INTEGER NOT NULL"
            " DEFAULT 0, available_at REAL NOT NULL, claim TEXT, dead INTEGER NOT NULL"
            " DEFAULT 0, error TEXT, enqueued_at REAL NOT NULL, cut_offs INTEGER NOT NULL"
            " DEFAULT 0)",
            "CREATE INDEX IF NOT EXISTS wxgate_queue_head ON wxgate_queue (dead, partition, id)"))
        columns = {row[1] for row in self.store.query("PRAGMA table_info(wxgate_queue)", ())}
        if "cut_offs" not in columns:  # a queue made before the column: add it in place
            try:
                self.store.execute("ALTER TABLE wxgate_queue ADD COLUMN cut_offs INTEGER NOT"
                                    " NULL DEFAULT 0")
            except sqlite3.OperationalError:  # another process added it first
                pass

    def close(self):
        self.store.close()

    def _execute(self, sql, parameters=()):
        """``(rowcount, lastrowid)`` of one statement in autocommit mode."""
        return self.store.execute(sql, parameters)

    def push(self, partition, payload, now, marker=None):
        # One transaction: durable (WAL, synchronous=FULL) once COMMIT returns. The marker
        # lives in the key-value table of the same file, so it commits with the row or not
        # at all; a duplicate's transaction waits for this one's write lock.
        return self.store.using(lambda connection: self._push(connection, partition,
                                                               payload, now, marker))

    def _push(self, connection, partition, payload, now, marker):
        connection.execute("BEGIN IMMEDIATE")
        try:
            if marker is not None:
                key, value, ttl = marker
                row = connection.execute("SELECT value FROM wxgate_kv WHERE key = ? AND"
                                         " expires_at > ?", (key, now)).fetchone()
                if row is not None and row[0].startswith("d"):
                    connection.execute("COMMIT")
                    return None
            item_id = connection.execute(
                "INSERT INTO wxgate_queue (partition, payload, available_at, enqueued_at)"
                " VALUES (?, ?, ?, ?)", (partition, payload, now, now)).lastrowid
            if marker is not None:
                connection.execute("INSERT OR REPLACE INTO wxgate_kv VALUES (?, ?, ?)",
                                   (key, value, now + ttl))
            connection.execute("COMMIT")
        except BaseException:
            _rollback(connection)
            raise
        return item_id

    def claim(self, now, visibility):
        claim = os.urandom(16).hex()
        for _ in range(3):
            # Read first, without the write lock, so idle polling never queues behind the
            # pushes. The head of each partition is its lowest live id; ids only grow, so a
            # head stays the head until it is settled.
            rows = self.store.query(
                "SELECT q.id, q.payload, q.attempts, q.cut_offs, q.claim FROM wxgate_queue q"
                " JOIN (SELECT MIN(id) AS head FROM wxgate_queue WHERE dead = 0 GROUP BY"
                " partition) h ON q.id = h.head WHERE q.available_at <= ? ORDER BY q.id"
                " LIMIT 1", (now,))
            if not rows:
                return None
            item_id, payload, attempts, cut_offs, previous = rows[0]
            # A claim moves available_at into the future, which hides the message; the
            # condition makes two workers racing for it agree on one winner, and on the
            # claim it replaces. A claim still set is one whose attempt never ended (its
            # worker was killed): noted and counted apart, not as an attempt, since the
            # backend may well have taken the message.
            cut_off = previous is not None
            if self._execute(
                    "UPDATE wxgate_queue SET available_at = ?, error = CASE WHEN claim IS NULL"
                    " THEN error ELSE COALESCE(error || char(10), '') || ? END, cut_offs ="
                    " cut_offs + ?, claim = ? WHERE id = ? AND available_at <= ? AND dead = 0"
                    " AND claim IS ?", (now + visibility, _CUT_OFF, int(cut_off), claim,
                                        item_id, now, previous))[0] == 1:
                return item_id, payload, attempts + 1, claim, cut_offs + cut_off
        return None

    def ack(self, item_id, claim, now):
        return self._execute("DELETE FROM wxgate_queue WHERE id = ? AND claim = ?",
                             (item_id, claim))[0] == 1

    def extend(self, item_id, claim, until):
        self._execute("UPDATE wxgate_queue SET available_at = ? WHERE id = ? AND claim = ?",
                      (until, item_id, claim))

    def retry(self, item_id, claim, available_at, error, now):
        self._execute("UPDATE wxgate_queue SET available_at = ?, claim = NULL, attempts ="
                      " attempts + 1, error = COALESCE(error || char(10), '') || 'attempt '"
                      " || (attempts + 1) || ': ' || ? WHERE id = ? AND claim = ?",
                      (available_at, error, item_id, claim))

    def bury(self, item_id, claim, error, now):
        self._execute("UPDATE wxgate_queue SET dead = 1, claim = NULL, attempts = attempts"
                      " + 1, error = COALESCE(error || char(10), '') || 'attempt '"
                      " || (attempts + 1) || ': ' || ? WHERE id = ? AND claim = ?",
                      (error, item_id, claim))

    def stats(self, now):
        ((pending, in_flight, dead),) = self.store.query(
            "SELECT COALESCE(SUM(dead = 0), 0), COALESCE(SUM(dead = 0 AND claim IS NOT NULL"
            " AND available_at > ?), 0), COALESCE(SUM(dead = 1), 0) FROM wxgate_queue",
            (now,))
        return {"pending": pending, "in_flight": in_flight, "dead": dead}

    def dead(self, limit=100):
        rows = self.store.query("SELECT id, partition, payload, attempts, error FROM"
                                " wxgate_queue WHERE dead = 1 ORDER BY id LIMIT ?", (limit,))
        return [_dead_letter(*row) for row in rows]

    def revive(self, ids, now):
        return self.store.using(lambda connection: self._revive(connection, ids, now))

    def _revive(self, connection, ids, now):
        where = "dead = 1" + (f" AND id IN ({','.join('?' * len(ids))})" if ids else "")
        connection.execute("BEGIN IMMEDIATE")
        try:
            # Re-inserted with a new id: a revived message goes after what is queued for its
            # user now, as it would in Redis.
            rows = connection.execute(f"SELECT id, partition, payload FROM wxgate_queue"
                                      f" WHERE {where}", [int(i) for i in ids]).fetchall()
            for item_id, partition, payload in rows:
                connection.execute("DELETE FROM wxgate_queue WHERE id = ?", (item_id,))
                connection.execute(
                    "INSERT INTO wxgate_queue (partition, payload, available_at, enqueued_at)"
                    " VALUES (?, ?, ?, ?)", (partition, payload, now, now))
            connection.execute("COMMIT")
        except BaseException:
            _rollback(connection)
            raise
        return len(rows)

    def purge_dead(self):
        return self._execute("DELETE FROM wxgate_queue WHERE dead = 1")[0]


# Noted in a message's errors when a claim on it expired before its attempt ended.
_CUT_OFF = "an attempt was cut off (its worker stopped, or its claim expired): not counted"


def _dead_letter(item_id, partition, payload, attempts, error):
    try:
        document = json.loads(payload)
    except ValueError:
        document = {}
    errors = (error or "").split("\n") if error else []
    return {"id": int(item_id), "partition": partition, "app": document.get("app"),
            "dedup_key": document.get("dedup_key"), "attempts": int(attempts),
            "error": errors[-1] if errors else None, "errors": errors}


class _RedisQueue(_Queue):
    """The queue in Redis: a list of ids per partition, a sorted set of partitions whose head
    is due, a sorted set of claimed ids by deadline, a hash per message, and a dead list.

    Every step is one Lua script, so it is atomic on the server however many gateways call.
    """

    _PUSH = """
local p = ARGV[1]
if ARGV[5] ~= '' then
  local done = redis.call('GET', ARGV[5])
  if done and string.sub(done, 1, 1) == 'd' then return false end
end
local id = redis.call('INCR', p .. ':q:seq')
redis.call('HSET', p .. ':q:msg:' .. id, 'partition', ARGV[2], 'payload', ARGV[3],
           'attempts', 0)
if redis.call('RPUSH', p .. ':q:part:' .. ARGV[2], id) == 1 then
  redis.call('ZADD', p .. ':q:ready', ARGV[4], ARGV[2])
end
redis.call('INCR', p .. ':q:pending')
if ARGV[5] ~= '' then redis.call('SET', ARGV[5], ARGV[6], 'PX', ARGV[7]) end
return id
"""
    _CLAIM = """
local p, now = ARGV[1], tonumber(ARGV[2])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. ':q:inflight', '-inf', now,
                               'LIMIT', 0, 100)) do
  redis.call('ZREM', p .. ':q:inflight', id)
  local part = redis.call('HGET', p .. ':q:msg:' .. id, 'partition')
  if part then redis.call('ZADD', p .. ':q:ready', now, part) end
end
local heads = redis.call('ZRANGEBYSCORE', p .. ':q:ready', '-inf', now, 'LIMIT', 0, 1)
if #heads == 0 then return false end
redis.call('ZREM', p .. ':q:ready', heads[1])
local id = redis.call('LINDEX', p .. ':q:part:' .. heads[1], 0)
if not id then return false end
local key = p .. ':q:msg:' .. id
local attempts = tonumber(redis.call('HGET', key, 'attempts') or 0) + 1
local cut_offs = tonumber(redis.call('HGET', key, 'cut_offs') or 0)
if redis.call('HEXISTS', key, 'claim') == 1 then
  local errors = redis.call('HGET', key, 'error')
  redis.call('HSET', key, 'error', (errors and errors .. '\\n' or '') .. ARGV[5])
  cut_offs = redis.call('HINCRBY', key, 'cut_offs', 1)
end
redis.call('HSET', key, 'claim', ARGV[4])
redis.call('ZADD', p .. ':q:inflight', now + tonumber(ARGV[3]), id)
return {id, redis.call('HGET', key, 'payload'), attempts, cut_offs}
"""
    # ARGV: prefix, id, claim, now, action ('ack', 'retry', 'bury'), available_at, error
    _SETTLE = """
local p, id = ARGV[1], ARGV[2]
local key = p .. ':q:msg:' .. id
if redis.call('HGET', key, 'claim') ~= ARGV[3] then return 0 end
local part = redis.call('HGET', key, 'partition')
local list = p .. ':q:part:' .. part
redis.call('ZREM', p .. ':q:inflight', id)
redis.call('HDEL', key, 'claim')
if ARGV[5] ~= 'ack' then
  local attempts = redis.call('HINCRBY', key, 'attempts', 1)
  local errors = redis.call('HGET', key, 'error')
  redis.call('HSET', key, 'error', (errors and errors .. '\\n' or '') .. 'attempt ' ..
             attempts .. ': ' .. ARGV[7])
end
if ARGV[5] == 'retry' then
  redis.call('ZADD', p .. ':q:ready', ARGV[6], part)
  return 1
end
redis.call('LREM', list, 1, id)
redis.call('DECR', p .. ':q:pending')
if ARGV[5] == 'bury' then
  redis.call('RPUSH', p .. ':q:dead', id)
else
  redis.call('DEL', key)
end
if redis.call('LLEN', list) > 0 then redis.call('ZADD', p .. ':q:ready', ARGV[4], part) end
return 1
"""
    _EXTEND = """
local key = ARGV[1] .. ':q:msg:' .. ARGV[2]
if redis.call('HGET', key, 'claim') ~= ARGV[3] then return 0 end
return redis.call('ZADD', ARGV[1] .. ':q:inflight', 'XX', ARGV[4], ARGV[2])
"""
    _PURGE = """
local p = ARGV[1]
local ids = redis.call('LRANGE', p .. ':q:dead', 0, -1)
for _, id in ipairs(ids) do redis.call('DEL', p .. ':q:msg:' .. id) end
redis.call('DEL', p .. ':q:dead')
return #ids
"""
    _REVIVE = """
local p, now = ARGV[1], ARGV[2]
local ids = {}
for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
if #ids == 0 then ids = redis.call('LRANGE', p .. ':q:dead', 0, -1) end
local count = 0
for _, id in ipairs(ids) do
  local key = p .. ':q:msg:' .. id
  local part = redis.call('HGET', key, 'partition')
  if part and redis.call('LREM', p .. ':q:dead', 1, id) > 0 then
    redis.call('HSET', key, 'attempts', 0)
    redis.call('HDEL', key, 'error', 'claim', 'cut_offs')
    if redis.call('RPUSH', p .. ':q:part:' .. part, id) == 1 then
      redis.call('ZADD', p .. ':q:ready', now, part)
    end
    redis.call('INCR', p .. ':q:pending')
    count = count + 1
  end
end
return count
"""

    def __init__(self, store, prefix):
        self.redis, self.prefix = store.client, prefix
        self._push = self.redis.register_script(self._PUSH)
        self._claim = self.redis.register_script(self._CLAIM)
        self._settle = self.redis.register_script(self._SETTLE)
        self._revive = self.redis.register_script(self._REVIVE)
        self._extend = self.redis.register_script(self._EXTEND)
        self._purge = self.redis.register_script(self._PURGE)

    def push(self, partition, payload, now, marker=None):
        key, value, ttl = marker or ("", "", 0)
        item_id = self._push(args=[self.prefix, partition, payload, repr(now), key, value,
                                   max(1, int(ttl * 1000))])
        return None if item_id is None else int(item_id)

    def claim(self, now, visibility):
        claim = os.urandom(16).hex()
        row = self._claim(args=[self.prefix, repr(now), repr(visibility), claim, _CUT_OFF])
        if not row:
            return None
        return int(row[0]), _text(row[1]), int(row[2]), claim, int(row[3])

    def ack(self, item_id, claim, now):
        return bool(self._settle(args=[self.prefix, item_id, claim, repr(now), "ack", 0, ""]))

    def extend(self, item_id, claim, until):
        self._extend(args=[self.prefix, item_id, claim, repr(until)])

    def retry(self, item_id, claim, available_at, error, now):
        self._settle(args=[self.prefix, item_id, claim, repr(now), "retry", repr(available_at),
                           error])

    def bury(self, item_id, claim, error, now):
        self._settle(args=[self.prefix, item_id, claim, repr(now), "bury", 0, error])

    def stats(self, now):
        return {"pending": int(self.redis.get(f"{self.prefix}:q:pending") or 0),
                "in_flight": self.redis.zcard(f"{self.prefix}:q:inflight"),
                "dead": self.redis.llen(f"{self.prefix}:q:dead")}

    def dead(self, limit=100):
        letters = []
        for item_id in self.redis.lrange(f"{self.prefix}:q:dead", 0, limit - 1):
            fields = {_text(k): _text(v) for k, v in
                      self.redis.hgetall(f"{self.prefix}:q:msg:{_text(item_id)}").items()}
            letters.append(_dead_letter(_text(item_id), fields.get("partition"),
                                        fields.get("payload", "{}"),
                                        fields.get("attempts", 0), fields.get("error")))
        return letters

    def revive(self, ids, now):
        return int(self._revive(args=[self.prefix, repr(now), *[str(i) for i in ids]]))

    def purge_dead(self):
        return int(self._purge(args=[self.prefix]))


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _open_queue(store, prefix):
    """The durable queue living in ``store`` (sqlite or Redis)."""
    primary = getattr(store, "primary", store)
    if isinstance(primary, SqliteStore):
        return _SqliteQueue(primary)
    if isinstance(primary, RedisStore):
        return _RedisQueue(primary, prefix)
    raise ConfigError("delivery = queue needs a durable store: set [wxgate] store to "
                      "sqlite:///path/to/wxgate.db or redis://host:port/db")


###############################################################################
# Delivery worker #############################################################
###############################################################################

class _DeliveryWorker:
    """Takes queued pushes and hands them to business code, with retries and dead letters.

    Runs as threads inside each gateway process, or alone as ``wxgate worker CONFIG``. Each
    message is delivered at least once. While a delivery runs, a keeper thread renews its
    claim, so a slow handler is never given to a second worker; a worker that dies stops
    renewing, and its message reappears after ``queue_visibility_timeout``. A Python
    handler's completed dedup keys are kept in the store, so a message re-delivered after a
    crash skips the handler; a forward backend gets the same ``dedup_key`` again and can
    drop the repeat.
    """

    def __init__(self, gateway, queue, *, threads=1, idle_sleep=0.05, random=None):
        import random as random_module
        self.gateway, self.queue, self.threads = gateway, queue, threads
        self.idle_sleep = idle_sleep
        self._random = random or random_module.random
        self._stop = threading.Event()
        self._threads = []
        self._working = {}  # item id -> claim, for the keeper
        self._working_lock = threading.Lock()
        self._raw_noted = set()  # apps whose RawReply we said was not sent

    def start(self):
        for index in range(self.threads):
            thread = threading.Thread(target=self.run, name=f"wxgate-delivery-{index}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        keeper = threading.Thread(target=self._keep_claims, name="wxgate-delivery-claims",
                                  daemon=True)
        keeper.start()
        self._threads.append(keeper)

    def stop(self, timeout=5.0):
        """Stop claiming, and let the deliveries running now finish for up to ``timeout``
        seconds in all (not per thread). One still running then is cut off: the process
        may exit under it, and its message reappears after ``queue_visibility_timeout``."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._working_lock:
            running = sorted(self._working)
        if running:
            logger.warning("delivery stopped with %d delivery(ies) still running after %g s "
                           "(messages %s): cut off, they are delivered again after "
                           "queue_visibility_timeout", len(running), timeout,
                           ", ".join(map(str, running)))

    def run(self):
        """Deliver until stopped; a failing store only makes the loop wait and try again."""
        idle = self.idle_sleep
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception:
                logger.exception("delivery loop error; retrying in 1 s")
                busy, idle = False, 1.0
            if busy:
                idle = self.idle_sleep
            else:
                self._stop.wait(idle)
                idle = min(idle * 2, 0.5)

    def _keep_claims(self):
        visibility = self.gateway.config.queue_visibility_timeout
        while not self._stop.wait(visibility / 3):
            with self._working_lock:
                working = list(self._working.items())
            for item_id, claim in working:
                try:
                    self.queue.extend(item_id, claim, self.gateway.now() + visibility)
                except Exception:
                    logger.exception("could not renew the claim on queued message %s", item_id)

    def run_once(self):
        """Claim and deliver one message; return whether there was one."""
        gateway = self.gateway
        item = self.queue.claim(gateway.now(), gateway.config.queue_visibility_timeout)
        if item is None:
            return False
        item_id, payload, attempts, claim, cut_offs = item
        with self._working_lock:
            self._working[item_id] = claim
        try:
            self._deliver(item_id, payload, attempts, claim, cut_offs)
        finally:
            with self._working_lock:
                self._working.pop(item_id, None)
        return True

    def _deliver(self, item_id, payload, attempts, claim, cut_offs=0):
        gateway = self.gateway
        try:
            document = json.loads(payload)
            app = gateway.config.apps[document["app"]]
            message = _queued_message(document, functools.partial(gateway.client, app.name))
        except Exception as exc:  # unreadable, or an app no longer configured: never retried
            self.queue.bury(item_id, claim, f"cannot read the queued message: "
                            f"{type(exc).__name__}", gateway.now())
            logger.error("queued message %s cannot be read (%s); moved to the dead letters",
                         item_id, type(exc).__name__)
            return
        if cut_offs >= MAX_CUT_OFFS:
            error = (f"cut off {cut_offs} times: probably a worker crash or kill while "
                     "delivering it (a handler that exhausts memory?); not delivered again")
            self.queue.bury(item_id, claim, error, gateway.now())
            logger.error("app=%s message %s (key %s) %s; moved to the dead letters",
                         app.name, item_id, _loggable(message.dedup_key), error)
            gateway.metrics.count("wxgate_queue_dead_letters_total", app=app.name)
            return
        key = _store_key(message) if message.dedup_key else item_id
        done_key = f"{gateway.config.store_prefix}:done:{key}"
        started = time.monotonic()
        try:
            if gateway.store.get(done_key) is None:
                reply = _business_reply(app, message, timestamp=gateway.now())
                gateway.store.set(done_key, "1", DONE_TTL)
                if isinstance(reply, RawReply) and app.name not in self._raw_noted:
                    # WeChat was answered success when the push was queued: a fixed body
                    # such as virtual payment's needs delivery = sync.
                    self._raw_noted.add(app.name)
                    logger.warning("app=%s delivery = queue: the RawReply was not sent (the "
                                   "push was answered success when queued); pushes that "
                                   "need a fixed reply need delivery = sync", app.name)
                outcome = "delivered"
            else:
                outcome = "already-delivered"
        except Exception as exc:
            # One line: the attempts' errors are stored one per line (list-dead splits
            # them), and many are several (pydantic's ValidationError, a client library's).
            error = " | ".join(line.strip() for line in
                               f"{type(exc).__name__}: {exc}".splitlines() if line.strip())
            error = error[:500]
            if attempts >= app.queue_max_attempts:
                self.queue.bury(item_id, claim, error, gateway.now())
                logger.error("app=%s message %s (key %s) failed %d times, moved to the "
                             "dead letters: %s", app.name, item_id,
                             _loggable(message.dedup_key), attempts, _loggable(error))
                gateway.metrics.count("wxgate_queue_dead_letters_total", app=app.name)
                return
            # Exponential backoff with jitter (0.5x to 1.5x), so a recovering backend is not
            # hit in lockstep; the exponent is capped before it can overflow.
            delay = min(app.queue_retry_max, app.queue_retry_base * 2 ** min(attempts - 1, 30))
            delay *= 0.5 + self._random()
            self.queue.retry(item_id, claim, gateway.now() + delay, error, gateway.now())
            logger.warning("app=%s message %s (key %s) attempt %d failed, retrying in %.1f s: "
                           "%s", app.name, item_id, _loggable(message.dedup_key), attempts,
                           delay, _loggable(error))
            return
        if not self.queue.ack(item_id, claim, gateway.now()):
            logger.warning("app=%s message %s (key %s): claim lost before the ack; another "
                           "worker will find it done", app.name, item_id,
                           _loggable(message.dedup_key))
        gateway.metrics.observe("wxgate_handler_seconds", time.monotonic() - started,
                                app=app.name)
        logger.info("queue app=%s type=%s key=%s outcome=%s attempt=%d ms=%.1f", app.name,
                    _loggable(message.event or message.msg_type), _loggable(message.dedup_key),
                    outcome, attempts, (time.monotonic() - started) * 1000)


###############################################################################
# Push simulator ##############################################################
###############################################################################

# What WeChat fills in and a test rarely cares about. The original id is the app's own
# (gh_ and 12 hex digits in real life), which the ini does not know.
SIMULATED_GH_ID = "gh_wxgatedemo"
SIMULATED_OPENID = "o_wxgate_demo_user"
# A passive reply is addressed and typed, or it is the four-field envelope.
# https://developers.weixin.qq.com/miniprogram/dev/framework/server-ability/message-push.html
_REPLY_ADDRESS = ("ToUserName", "FromUserName", "CreateTime", "MsgType")
_ENVELOPE_FIELDS = frozenset({"Encrypt", "MsgSignature", "TimeStamp", "Nonce"})
# Some pushes are answered with a fixed JSON body instead: virtual payment's
# {"ErrCode":0,"ErrMsg":"success"}, which WeChat takes in the clear in every mode
# ("回复微信服务器的消息不需要加密"), and the iOS refund query's result_code and result_info.
# https://developers.weixin.qq.com/minigame/dev/guide/open-ability/virtual-payment/message-push.md
# Each is the fields it must have, with their JSON types; others may come beside them.
_FIXED_REPLIES = ((("ErrCode", int), ("ErrMsg", str)),
                  (("result_code", int), ("result_info", str)))
_ASCII_DIGITS = re.compile(r"[0-9]+\Z")


def _is_fixed_reply(fields):
    """Whether a reply's fields are one of the fixed JSON bodies (``_FIXED_REPLIES``)."""
    return any(all(name in fields and isinstance(fields[name], kind) and
                   not isinstance(fields[name], bool) for name, kind in shape)
               for shape in _FIXED_REPLIES)


def _pick_app(config, name, how="choose one with --app"):
    """The app called ``name`` in ``config``, or its only app when ``name`` is None."""
    if name is None:
        if len(config.apps) > 1:
            raise WxgateError(f"several apps configured; {how} ({', '.join(config.apps)})")
        return next(iter(config.apps.values()))
    if name not in config.apps:
        raise WxgateError(f"no [app:{name}] in {config.source}")
    return config.apps[name]


class _Push(_Record):
    """A push as WeChat would send it: POST ``url`` with ``body`` and ``headers``.

    :ivar url: the app's path and query string (``/wechat?signature=...``), for WebTest.
    :ivar query_string: the query alone, to append to another base URL (``""`` in cloud
        mode, which signs nothing).
    :ivar body: the request body, bytes.
    :ivar headers: ``{"Content-Type": "text/xml"}``, as WeChat labels XML and JSON alike;
        in cloud mode, Cloud Hosting's ``X-WX-*`` headers too.
    :ivar fields: the push's fields in the clear, with what the simulator filled in.
    :ivar format: ``"xml"`` or ``"json"``.
    """

    url: str
    query_string: str
    body: bytes
    headers: dict[str, str]
    fields: dict[str, Any]
    format: str

    _defaults = dict.fromkeys(("url", "query_string", "body", "headers", "fields", "format"),
                              _REQUIRED)
    __slots__ = tuple(_defaults)
    __match_args__ = tuple(_defaults)


class _Handshake(_Record):
    """The console's URL check: GET ``url``; a correct server answers 200 and ``echostr``.

    :ivar url: the app's path and query string, for WebTest.
    :ivar query_string: the query alone.
    :ivar echostr: the text the body must be, exactly.
    """

    url: str
    query_string: str
    echostr: str

    _defaults = dict.fromkeys(("url", "query_string", "echostr"), _REQUIRED)
    __slots__ = tuple(_defaults)
    __match_args__ = tuple(_defaults)

    @property
    def expected(self) -> bytes:
        """The body a correct server answers, byte for byte."""
        return self.echostr.encode("ascii")


class Simulator:
    """Play WeChat for one configured app: build pushes and read replies as WeChat does.

    ::

        wechat = wxgate.Simulator(config, "shop")
        push = wechat.push({"MsgType": "text", "Content": "人工", "FromUserName": "o_user"})
        resp = webtest.TestApp(wxgate.make_app(config)).post(push.url, push.body,
                                                              headers=push.headers)
        assert wechat.open_reply(resp.body)["MsgType"] == "transfer_customer_service"

    It signs with the app's token and encrypts in its mode (plain, compat, safe) and format
    (``auto`` means XML). ``wxgate push`` and ``wxgate handshake`` are built on it. Each
    push gets its own nonce: the gateway binds a signed query to its first body. In
    ``mode = cloud`` a push is what Cloud Hosting's gateway passes on: no query, no
    signature, no encryption, and the ``X-WX-SOURCE``, ``X-WX-OPENID`` and ``X-WX-APPID``
    headers.

    :param config: a :class:`Config`, or the path of an ini file.
    :param name: the app's name (its ``[app:NAME]``); optional when there is one app.
    :param clock: returns the time in seconds (``CreateTime``, ``timestamp``).
    :param random_bytes: returns n random bytes (nonces, ``MsgId``, the AES prefix).
    :raises WxgateError: no app of that name, or several apps and no name.
    :raises ConfigError: ``config`` is a path and the file is missing or wrong.
    """

    def __init__(self, config: Config | str | os.PathLike[str], name: str | None = None, *,
                 clock: Callable[[], float] = time.time,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        if not isinstance(config, Config):
            config = load_config(config)
        self.config = config
        self.app: AppConfig = _pick_app(config, name, "name one: Simulator(config, NAME)")
        self._clock, self._random_bytes = clock, random_bytes

    def __repr__(self) -> str:
        return f"<Simulator {self.app.name} {self.app.mode} {self.app.format}>"

    def _random_digits(self, count):
        return str(int.from_bytes(self._random_bytes(8), "big") % 10 ** count).zfill(count)

    def push(self, fields: dict[str, Any], *, format: str | None = None) -> _Push:
        """Build the POST WeChat would send with these fields.

        ``ToUserName``, ``FromUserName`` (a demo openid), ``CreateTime`` (now) and, for
        messages, a fresh ``MsgId`` are filled in unless given. The gateway knows an event
        by all its fields: two events that differ in any field (another ``SessionFrom``,
        ``OutTradeNo``...) are both handled, while the same fields in the same second are
        one push sent again, as a retry of WeChat's is.

        :param fields: the push's fields under WeChat's names; nested dicts and lists are
            rendered as WeChat does (``List``, ``result``...).
        :param format: ``"xml"`` or ``"json"``; by default the app's (XML for ``auto``).
        :raises ValueError: ``format`` is neither, or a field cannot be rendered in it (a name
            that is no XML element name, nesting too deep).
        """
        import urllib.parse  # the simulator's: a push has no use for it
        app = self.app
        fmt = format or (app.format if app.format != "auto" else "xml")
        if fmt not in ("xml", "json"):
            raise ValueError(f"format must be 'xml' or 'json', got {fmt!r}")
        now = int(self._clock())
        filled: dict[str, Any] = {"ToUserName": SIMULATED_GH_ID,
                                  "FromUserName": SIMULATED_OPENID, "CreateTime": now}
        filled.update(fields)
        if filled.get("MsgType") not in (None, "event") and "MsgId" not in filled:
            # MsgId is a 64-bit number, sent as text.
            filled["MsgId"] = str(int.from_bytes(self._random_bytes(8), "big") >> 1)
        dump = _dump_json if fmt == "json" else _dump_xml
        try:
            rendered = dump(filled)
        except WxgateError as exc:
            # The codec words it for a reply (status 500, -40011): this is the caller's push.
            reason = exc.message.split(" (WeChat")[0]
            raise ValueError("push " + reason.split(" ", 1)[1]) from None
        if app.mode == "cloud":
            # What Cloud Hosting's gateway adds (CLOUD-HDR); the real X-WX-SOURCE value is
            # not documented, and only its presence is checked.
            headers = {"Content-Type": "application/json" if fmt == "json" else "text/xml",
                       "X-WX-SOURCE": "wxgate-simulator", "X-WX-APPID": app.appid}
            if isinstance(filled.get("FromUserName"), str) and filled["FromUserName"]:
                headers["X-WX-OPENID"] = filled["FromUserName"]
            return _Push(url=app.path, query_string="", body=rendered.encode("utf-8"),
                         headers=headers, fields=filled, format=fmt)
        timestamp, nonce = str(now), self._random_digits(9)
        query = {"signature": sign(app.token, timestamp, nonce), "timestamp": timestamp,
                 "nonce": nonce, "openid": str(filled.get("FromUserName", ""))}
        if app.mode == "plain":
            body = rendered
        else:
            # The 16-character hex prefix is the shape WeChat's own pushes have.
            encrypt = encrypt_message(rendered, app.encoding_aes_key, app.appid,
                                      random_prefix=self._random_bytes(8).hex())
            query.update(encrypt_type="aes",
                         msg_signature=sign(app.token, timestamp, nonce, encrypt))
            if app.mode == "compat":  # the clear fields beside Encrypt
                body = dump(dict(filled, Encrypt=encrypt))
            else:
                body = dump({"ToUserName": filled["ToUserName"], "Encrypt": encrypt})
        query_string = urllib.parse.urlencode(query)
        return _Push(url=f"{app.path}?{query_string}", query_string=query_string,
                     body=body.encode("utf-8"), headers={"Content-Type": "text/xml"},
                     fields=filled, format=fmt)

    def handshake(self, *, token: str | None = None) -> _Handshake:
        """Build the console's URL check (a signed GET with an ``echostr``).

        :param token: sign with this token instead of the app's: the console's, to see
            whether the two are the same (``wxgate handshake --token``).
        :raises WxgateError: the app has ``mode = cloud``, which has no handshake.
        """
        import urllib.parse  # the simulator's: a push has no use for it
        if self.app.mode == "cloud":
            raise WxgateError(f"app {self.app.name!r} has mode = cloud: Cloud Hosting has no "
                              "URL handshake (its console checks the path with a push, which "
                              "wxgate answers success); try wxgate push")
        timestamp, nonce = str(int(self._clock())), self._random_digits(9)
        echostr = self._random_digits(19)
        query_string = urllib.parse.urlencode({
            "signature": sign(self.app.token if token is None else token, timestamp, nonce),
            "timestamp": timestamp, "nonce": nonce, "echostr": echostr})
        return _Handshake(url=f"{self.app.path}?{query_string}", query_string=query_string,
                          echostr=echostr)

    def open_reply(self, body: bytes | str) -> Any:
        """Read a reply as WeChat would; return its fields, or the text ``success`` or ``""``.

        It returns one of two shapes: the reply's fields as a ``dict[str, Any]`` (so
        ``open_reply(body)["MsgType"]`` reads), or the ``str`` ``"success"`` or ``""``.
        It is typed ``Any`` so a test can index the reply it expects without a cast.

        An encrypted reply must be the four-field envelope, its ``MsgSignature`` must match
        and its content decrypt for this app; in safe mode a reply must be encrypted, in
        plain mode it must not be; ``success`` and the empty reply are never encrypted.
        A fixed JSON reply, as a ``RawReply`` sends it, is read in every mode, in the clear
        or encrypted: a payment push's ``{"ErrCode":0,"ErrMsg":"success"}`` (an integer
        ``ErrCode``, a string ``ErrMsg``), or ``result_code`` and ``result_info``. Any other
        reply must carry ``ToUserName``, ``FromUserName``, ``CreateTime`` (whole seconds)
        and ``MsgType`` (a string).

        :raises SignatureError: ``MsgSignature`` does not match (-40001).
        :raises DecryptError: ``Encrypt`` does not decrypt for this app (-400xx).
        :raises MessageError: anything else WeChat would refuse, said in the message.
        """
        text = self._reply_text(body)
        if text in ("success", ""):
            return text
        return self._reply_fields(text)

    def reply_text(self, body: bytes | str) -> str:
        """Verify a reply as :meth:`open_reply` does; return its text, decrypted (what
        ``wxgate push`` shows)."""
        text = self._reply_text(body)
        if text not in ("success", ""):
            self._reply_fields(text)  # addressed and typed, or it raises
        return text

    def _reply_text(self, body):
        """Verify a reply and return its text: decrypted when it was encrypted."""
        app = self.app
        if isinstance(body, str):
            body = body.encode("utf-8")
        if body in (b"", b"success"):
            return body.decode("ascii")
        fields = self._parse_reply(body, "reply")
        if "Encrypt" not in fields:
            if app.mode == "safe" and not _is_fixed_reply(fields):
                raise MessageError(f"reply is not encrypted, but app {app.name!r} is in safe "
                                   "mode: WeChat would refuse it (only success, the empty "
                                   "reply and a fixed JSON reply such as a payment push's "
                                   "go in the clear)", code=None)
            return body.decode("utf-8")
        if app.mode in ("plain", "cloud"):
            raise MessageError(f"reply is encrypted, but app {app.name!r} is in {app.mode} "
                               "mode", code=None)
        if set(fields) != _ENVELOPE_FIELDS:
            raise MessageError(f"reply envelope has fields {sorted(fields)}; expected "
                               f"{sorted(_ENVELOPE_FIELDS)}", code=None)
        timestamp, nonce = str(fields["TimeStamp"]), fields["Nonce"]
        # str.isdigit() would take "١٧١٤" (Arabic-Indic digits) or "²": WeChat reads ASCII.
        if not _ASCII_DIGITS.match(timestamp) or not isinstance(nonce, str) or \
                not isinstance(fields["Encrypt"], str):
            raise MessageError(f"reply envelope has TimeStamp {timestamp[:20]!r} and Nonce "
                               f"{str(nonce)[:20]!r}; expected a number and a string",
                               code=None)
        try:
            check_signature(str(fields["MsgSignature"]), app.token, timestamp, nonce,
                            fields["Encrypt"])
        except SignatureError:
            raise SignatureError("reply MsgSignature does not match its TimeStamp, Nonce and "
                                 f"Encrypt under app {app.name!r}'s token") from None
        text = decrypt_message(fields["Encrypt"], app.aes_key, app.appid)
        if text in ("success", ""):
            # success and the empty reply are never encrypted, in any mode.
            raise MessageError(f"reply is an encrypted {text!r}; WeChat takes success and the "
                               "empty reply only in the clear", code=None)
        return text

    def _parse_reply(self, data, what):
        try:
            fmt = _sniff_format(data)
            _check_format(self.app.format, fmt, what)
            return _parse_body(data, fmt)
        except MessageError as exc:
            # Our codes (-40002) are for pushes; "body is ..." reads "reply is ..." here.
            reason = exc.message.split(" (WeChat")[0]
            if exc.status != 415:  # the format check names what it read itself
                reason = reason[len("body "):] if reason.startswith("body ") else reason
                reason = f"{what} {reason}"
            raise MessageError(reason, code=None) from None

    def _reply_fields(self, text):
        """The fields of a (decrypted) reply, which must be addressed and typed."""
        fields = self._parse_reply(text.encode("utf-8"), "reply content")
        if _is_fixed_reply(fields):
            return fields
        missing = [name for name in _REPLY_ADDRESS if name not in fields]
        if missing:
            raise MessageError(f"reply lacks {', '.join(missing)}", code=None)
        if not isinstance(fields["MsgType"], str):
            raise MessageError(f"reply MsgType is {_shorten(fields['MsgType'])}; expected a "
                               "string", code=None)
        created = fields["CreateTime"]  # a JSON number, or XML's text of one
        if isinstance(created, bool) or not (isinstance(created, int) or (
                isinstance(created, str) and _ASCII_DIGITS.match(created))):
            raise MessageError(f"reply CreateTime is {_shorten(created)}; expected whole "
                               "seconds", code=None)
        return fields


###############################################################################
# Fake WeChat API #############################################################
###############################################################################

def _has_media_file(content_type, data):
    """Whether a request body is ``multipart/form-data`` with a file part named ``media``."""
    import email.parser  # only FakeAPI parses multipart: no cost on import
    import email.policy

    if not content_type.lower().startswith("multipart/form-data"):
        return False
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
    parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + data)
    if not parsed.is_multipart():
        return False
    return any(part.get_param("name", header="content-disposition") == "media"
               and part.get_filename() for part in parsed.iter_parts())


# One call FakeAPI received: the decoded JSON body, or None with the raw bytes in ``data``.
_APICall = collections.namedtuple("_APICall", "method path query json data")


class FakeAPI:
    """A stand-in for WeChat's API on 127.0.0.1, to test what a handler sends.

    ::

        with wxgate.FakeAPI() as api:
            config = api.configure(config)        # api_base -> the fake
            ...                                   # pushes whose handler calls message.client
            assert api.sent == [{"touser": "o_user", "msgtype": "text",
                                 "text": {"content": "收到"}}]

    It hands out an access_token for any AppID and AppSecret, requires it on every other
    call, records each call, and answers ``{"errcode": 0, "errmsg": "ok"}``; an upload
    also gets a ``media_id`` if, as WeChat requires, it is ``multipart/form-data`` with a
    file part named ``media`` (else 41005, media data missing). :meth:`answer` queues
    another answer, such as an error.
    It is a real HTTP server, so the client's own requests, tokens and retries are tested.
    """

    #: The access_token it hands out, and the only one it takes.
    TOKEN = "fake-access-token"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: list[_APICall] = []
        self._answers: dict[str, collections.deque] = collections.defaultdict(
            collections.deque)
        self._media_ids = itertools.count(1)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FakeAPI:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> FakeAPI:
        """Listen on a free port of 127.0.0.1, in a daemon thread; return self."""
        import http.server

        handle = self._handle

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self._answer("GET")

            def do_POST(self):
                self._answer("POST")

            def _answer(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length) if length else b""
                document = handle(method, self.path, self.headers.get("Content-Type", ""),
                                  data)
                raw = json.dumps(document, ensure_ascii=False).encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", "application/json; encoding=utf-8")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, format, *arguments):  # a test's output stays readable
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the server."""
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:41234``: the ``api_base`` to use."""
        if self._server is None:
            raise RuntimeError("FakeAPI is not started: use it in a with block")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def configure(self, config: Config) -> Config:
        """A copy of ``config`` whose apps call this fake (its ``api_base`` set to :attr:`url`).

        The apps still need an ``appsecret`` to fetch a token, as in production; any value
        works here.
        """
        import dataclasses  # the test tools' only use of it: not loaded by a push
        # mypy cannot see that a record takes dataclasses.replace (_DataclassFields).
        return dataclasses.replace(config, api_base=self.url)  # type: ignore[type-var]

    def answer(self, path: str, document: dict[str, Any]) -> None:
        """Answer the next call to ``path`` with ``document``, e.g. ``{"errcode": 45015}``."""
        with self._lock:
            self._answers[path].append(dict(document))

    @property
    def calls(self) -> list[_APICall]:
        """Every call but the token's, in order: ``(method, path, query, json, data)``."""
        with self._lock:
            return list(self._calls)

    @property
    def sent(self) -> list[Any]:
        """The bodies of customer-service messages sent (``/cgi-bin/message/custom/send``)."""
        return [call.json for call in self.calls if call.path == "/cgi-bin/message/custom/send"]

    def _handle(self, method, target, content_type, data):
        import urllib.parse
        split = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
        if split.path in ("/cgi-bin/token", "/cgi-bin/stable_token"):
            return {"access_token": self.TOKEN, "expires_in": 7200}
        document = None
        if content_type.split(";")[0].strip().lower() == "application/json":
            try:
                document = json.loads(data)
            except ValueError:
                return {"errcode": 47001, "errmsg": "data format error"}
        with self._lock:
            self._calls.append(_APICall(method, split.path, query, document, data))
            queued = self._answers.get(split.path)
            if queued:
                return queued.popleft()
        if query.get("access_token") != self.TOKEN:
            return {"errcode": 40001, "errmsg": "invalid credential, access_token is invalid "
                    "or not latest"}
        if split.path == "/cgi-bin/media/upload":
            if not _has_media_file(content_type, data):
                # As WeChat: the upload must be the multipart file field "media".
                return {"errcode": 41005, "errmsg": "media data missing"}
            return {"errcode": 0, "errmsg": "ok", "type": query.get("type", ""),
                    "media_id": f"fake-media-{next(self._media_ids)}",
                    "created_at": int(time.time())}
        return {"errcode": 0, "errmsg": "ok"}


###############################################################################
# Dev server and demo handler #################################################
###############################################################################

class _DeadlineReader(io.RawIOBase):
    """A socket's input that ends in TimeoutError once ``seconds`` have passed in all."""

    def __init__(self, sock, seconds):
        self._sock, self._seconds = sock, seconds
        self._deadline = time.monotonic() + seconds

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"request not read within {self._seconds:g} s")
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._seconds)  # for writing the response


def _listen_hint(error, host, source):
    """What to change after a failed bind, by its cause (empty when we cannot tell)."""
    import errno
    if error.errno == errno.EADDRINUSE:
        return ("; another process holds this port (another `wxgate serve`?): choose a free "
                f"one with --port, or change [wxgate] listen in {source} (wxgate push and "
                "handshake send to listen: after --port, give them --url)")
    if error.errno == errno.EACCES:
        return ("; ports below 1024 need root: choose one above with --port, or change "
                f"[wxgate] listen in {source}, and put a proxy on 80 or 443")
    if error.errno == errno.EADDRNOTAVAIL:
        return (f"; {host} is not an address of this host: choose one with --host, or change "
                f"[wxgate] listen in {source}")
    return ""


def _serve(args):
    """``wxgate serve CONFIG``: a threaded stdlib server, for development and the demo."""
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    read_timeout = args.read_timeout
    if not 0 < read_timeout < float("inf"):  # 0 or less would drop every request; nan too
        print(f"wxgate: --read-timeout must be a finite number of seconds above 0, got "
              f"{read_timeout:g}", file=sys.stderr)
        return 2

    class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            if isinstance(sys.exc_info()[1], (TimeoutError, ConnectionError)):
                logger.warning("%s: connection dropped: %s", client_address[0],
                               type(sys.exc_info()[1]).__name__)
                return
            super().handle_error(request, client_address)

    class QuietHandler(WSGIRequestHandler):
        def setup(self):
            super().setup()
            buffered, self.rfile = self.rfile, None
            buffered.close()  # only drops its reference to the socket
            # One deadline for the whole request, not a timeout per recv(): a client
            # sending a byte every few seconds would never trip the latter.
            self.rfile = io.BufferedReader(_DeadlineReader(self.connection, read_timeout))

        def get_environ(self):
            # "X_WX_SOURCE" and "X-WX-SOURCE" map to one environ key, HTTP_X_WX_SOURCE, so
            # a client's underscore spelling would pass for the header Cloud Hosting's
            # gateway adds. gunicorn drops such headers, and so do we.
            for name in {name for name in self.headers.keys() if "_" in name}:
                del self.headers[name]
            return super().get_environ()

        def log_message(self, format, *arguments):  # wxgate logs each push itself
            # The request line is the client's bytes read as latin-1: a CR or a NEL in it
            # would reach the log as it came.
            logger.debug("%s %s", self.address_string(), _loggable(format % arguments))

    level = logging.DEBUG if args.verbose else logging.INFO
    _logging_before_handlers(level)
    config = load_config(args.config)
    _setup_logging(config.log_format, level, root=True)
    listen = _parse_listen(config.listen)
    host, port = args.host or listen[0], args.port or listen[1]
    if not 0 <= port < 65536:
        print(f"wxgate: cannot listen on port {port}: a port is 1 to 65535", file=sys.stderr)
        return 2
    app = make_app(config)
    try:
        server = make_server(host, port, app, server_class=ThreadingWSGIServer,
                             handler_class=QuietHandler)
    except OSError as exc:  # in use, not an address of this host, or a privileged port
        app.close()
        print(f"wxgate: cannot listen on {host}:{port}: {exc.strerror or exc}"
              f"{_listen_hint(exc, host, config.source)}", file=sys.stderr)
        return 2
    app.start_delivery()  # now, not on the first request: queued messages wait for nobody
    for item in app.config.apps.values():
        logger.info("serving app %s (%s mode, %s) on http://%s:%d%s", item.name, item.mode,
                    item.format, host, server.server_port, item.path)
    if (host, server.server_port) != listen:
        # push and handshake read the ini, not this process: without --url they would
        # knock at listen, where another gateway (or nothing) answers.
        paths = [item.path for item in app.config.apps.values()]
        logger.info("not on [wxgate] listen (%s): give wxgate push and handshake --url %s",
                    config.listen, f"http://{host}:{server.server_port}{paths[0]}"
                    if len(paths) == 1 else "and the app's URL above")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.close()
    return 0


# WeChat's message-push page ends with this bot: each message a user sends gets "收到"
# through customerServiceMessage.send, and the push itself is answered success.
_DEMO_ACKNOWLEDGEMENT = "收到"
_USER_MESSAGE_TYPES = frozenset({"text", "image", "miniprogrampage"})


def demo_handler(message: Message) -> dict[str, Any] | None:
    """The demo handler of ``example.ini``: log each push, hand "人工"/"kf" chats to an agent.

    When the app has an AppSecret (or ``token_grant = cloud``) it is also the bot of
    WeChat's message-push page: every message a user sends (text, image, mini program card)
    is answered "收到" through customerServiceMessage.send. A failed send is logged, not
    raised: the 500 would make WeChat retry the push, and the retry only repeat a "收到" the
    user may already have.
    """
    logger.info("demo handler got %s from %s: %s", _loggable(message.event or message.msg_type),
                _loggable(message.from_user), dict(message))
    try:
        client: WeChatClient | None = message.client
    except WxgateError:  # a Message built by hand, without a client
        client = None
    if message.msg_type in _USER_MESSAGE_TYPES and message.from_user and client is not None \
            and (client.tokens.has_appsecret or client.tokens.grant == "cloud"):
        try:
            client.send_text(message.from_user, _DEMO_ACKNOWLEDGEMENT)
        except WxgateError as exc:
            logger.warning("demo handler could not send %r to %s: %s", _DEMO_ACKNOWLEDGEMENT,
                           _loggable(message.from_user), _loggable(exc.message))
    if message.msg_type == "text" and any(
            word in str(message.get("Content", "")).lower() for word in ("人工", "kf")):
        return {"MsgType": "transfer_customer_service"}
    return None


###############################################################################
# Command line: acting as WeChat ##############################################
###############################################################################

# The subscribe-message events carry their items in List, which XML wraps in an element of
# its own: the wrapper, and the fields of an item.
# https://developers.weixin.qq.com/miniprogram/dev/framework/open-ability/subscribe-message.html
_SUBSCRIBE_EVENTS = {
    "subscribe_msg_popup_event": (
        "SubscribeMsgPopupEvent", ("TemplateId", "SubscribeStatusString", "PopupScene")),
    "subscribe_msg_change_event": (
        "SubscribeMsgChangeEvent", ("TemplateId", "SubscribeStatusString")),
    "subscribe_msg_sent_event": (
        "SubscribeMsgSentEvent", ("TemplateId", "MsgID", "ErrorCode", "ErrorStatus")),
}
_FIELD_HELP = """\
fields (--field, repeated as needed):
  NAME=TEXT     a text field:  --field SessionFrom=contact-button
  NAME:=JSON    a JSON value (number, object, list):  --field CreateTime:=1714000000
  The subscribe events (subscribe_msg_popup_event, subscribe_msg_change_event,
  subscribe_msg_sent_event) carry their items in List, given as JSON:
    --field 'List:=[{"TemplateId": "T1", "SubscribeStatusString": "accept"}]'
  In XML, List is wrapped as WeChat does (<SubscribeMsgPopupEvent><List>...). A subscribe
  event without items is refused, as is an item's field given outside List."""


def _push_field(text):
    """One ``--field``: ``NAME=TEXT`` or ``NAME:=JSON``, as ``(name, value)``.

    :raises ValueError: neither, a dotted name, or JSON that does not parse.
    """
    name, equals, value = text.partition("=")
    as_json = name.endswith(":")
    name = name[:-1] if as_json else name
    if not equals or not name:
        raise ValueError(f"--field takes NAME=TEXT or NAME:=JSON, got {text!r}")
    if "." in name or "[" in name:
        # Nested fields are JSON values: a dotted name would go out as an element of that
        # name, which no handler reads.
        raise ValueError(
            f"--field {name!r}: a nested field is a JSON value of its top-level field, e.g. "
            """'List:=[{"TemplateId": "T1", "SubscribeStatusString": "accept"}]'""")
    if as_json:
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"--field {name}:= takes JSON, and {value!r} is not "
                             f"({exc})") from None
    return name, value


def _push_fields(args, fmt):
    """The fields ``wxgate push`` sends, from its options; the simulator fills in the rest.

    :raises ValueError: the options describe a push WeChat never sends (see _FIELD_HELP).
    """
    fields = None
    for path, parse in ((args.json, _parse_json), (args.xml, _parse_xml)):
        if path:
            try:
                with open(path, "rb") as file:
                    fields = parse(file.read())
            except OSError as exc:
                raise WxgateError(f"cannot read {path}: {exc.strerror}") from None
    if fields is None:
        fields = {"FromUserName": args.openid}
        if args.text is not None:
            fields.update(MsgType="text", Content=args.text)
        else:
            fields.update(MsgType="event", Event=args.event)
    fields.update(_push_field(text) for text in args.field or ())
    event = fields.get("Event")
    wrapper, item_fields = _SUBSCRIBE_EVENTS.get(event if isinstance(event, str) else "",
                                                 (None, ()))
    if wrapper is None:
        return fields
    stray = {name: fields[name] for name in item_fields if name in fields}
    if stray:
        raise ValueError(
            f"{', '.join(stray)} belong{'s' if len(stray) == 1 else ''} to the items of "
            f"{event}'s List, not to the push: --field "
            f"'List:={json.dumps([stray], ensure_ascii=False)}'")
    items = fields.get("List")
    if items is None and isinstance(fields.get(wrapper), dict):
        items = fields[wrapper].get("List")
    items = [items] if isinstance(items, dict) else items
    if not items or not isinstance(items, list) or not all(
            isinstance(item, dict) and item for item in items):
        # The handler would see message.items_list == [] and do nothing, without a word.
        raise ValueError(
            f"{event} carries its items in List, a list of objects with "
            f"{', '.join(item_fields)}: --field 'List:=[{{\"TemplateId\": \"T1\"}}]' and "
            "more (see wxgate push --help)")
    if fmt == "xml" and "List" in fields:
        fields = dict(fields)
        fields[wrapper] = {"List": fields.pop("List")}
    return fields


def _with_query(url, query_string):
    """``url`` with ``query_string`` added: after ``?``, or after ``&`` when it has a query.

    A proxy or a host may route on a query parameter of its own (``/wechat?x=1``): WeChat
    keeps it and appends its parameters, and so do we.
    """
    if not query_string:  # a cloud push: nothing to add
        return url
    base, _, fragment = url.partition("#")
    joiner = "" if base.endswith(("?", "&")) else "&" if "?" in base else "?"
    return f"{base}{joiner}{query_string}" + (f"#{fragment}" if fragment else "")


def _call_gateway(url, body=None, headers=None):
    """One request to a gateway, as WeChat makes it (a GET without ``body``): ``(status,
    body)``, whatever the status.

    :raises OSError: the gateway cannot be reached; the message names the URL redacted.
    :raises ValueError: the URL cannot be sent to at all (a bad port, say).
    """
    import http.client
    import urllib.error
    import urllib.request
    shown = _redact_url(url)
    request = urllib.request.Request(url, data=body, method="GET" if body is None else "POST",
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=REPLY_DEADLINE) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise OSError(f"cannot reach {shown}: {getattr(exc, 'reason', exc)}") from None
    except (ValueError, http.client.HTTPException) as exc:
        # http.client's InvalidURL quotes the URL, password included: its class only.
        raise ValueError(f"cannot send to {shown}: {type(exc).__name__} (is --url a whole "
                         "URL, with any password percent-encoded?)") from None


def _push(args):
    """``wxgate push CONFIG``: act as WeChat, send a push, and print the decrypted reply."""
    config = _load_config(args.config, unset=[])  # it needs the token and key only
    app = _pick_app(config, args.app)
    wechat = Simulator(config, app.name)
    host, port = _parse_listen(config.listen)
    url = args.url or f"http://{host}:{port}{app.path}"
    fmt = args.format or (app.format if app.format != "auto" else "xml")
    try:
        push = wechat.push(_push_fields(args, fmt), format=fmt)
    except ValueError as exc:
        print(f"wxgate: cannot build this push: {exc}", file=sys.stderr)
        return 2
    fields = push.fields
    origin = "" if args.url else "; the ini's listen and path"
    print(f"POST {_redact_url(url)} ({app.mode} mode, {push.format}{origin}): "
          f"{fields.get('MsgType')}{'/' + str(fields['Event']) if fields.get('Event') else ''}")
    failed = False
    # --repeat sends the very same request, as WeChat's retries do: one signed query, one
    # body, which the gateway's query binds accept and its dedup answers from memory.
    for attempt in range(1, args.repeat + 1):
        started = time.monotonic()
        try:
            status, reply = _call_gateway(_with_query(url, push.query_string), push.body,
                                          push.headers)
        except OSError as exc:
            print(f"wxgate: {exc} (is `wxgate serve` running?)", file=sys.stderr)
            return 1
        except ValueError as exc:
            print(f"wxgate: {exc}", file=sys.stderr)
            return 1
        elapsed = (time.monotonic() - started) * 1000
        try:
            if status == 200:
                shown = wechat.reply_text(reply)
            else:
                shown = reply.decode("utf-8", "replace")
        except WxgateError as exc:
            shown = f"reply does not verify: {exc.message}"
            failed = True
        failed = failed or status != 200
        print(f"[{attempt}] {status} in {elapsed:.1f} ms: {shown!r}")
    hint = _refusal_hint(status, reply, app, url, config.source, from_listen=not args.url)
    if hint:
        print(f"wxgate: {hint}", file=sys.stderr)
    return 1 if failed else 0


def _handshake_command(args):
    """``wxgate handshake CONFIG``: the URL check of WeChat's console, with a plain verdict.

    ``--token`` signs with the console's value instead of the ini's, which is how a token
    that differs between the two shows up: the console's check fails, and so does ours.
    """
    config = _load_config(args.config, unset=[])  # it needs the token only
    app = _pick_app(config, args.app)
    host, port = _parse_listen(config.listen)
    url = args.url or f"http://{host}:{port}{app.path}"
    check = Simulator(config, app.name).handshake(token=args.token)
    shown = _redact_url(url)
    # On stderr: stdout is the verdict, which scripts read from its first word.
    origin = "" if args.url else "; the ini's listen and path"
    print(f"GET {shown} (the console's URL check of [app:{app.name}]{origin})",
          file=sys.stderr)
    try:
        status, body = _call_gateway(_with_query(url, check.query_string))
    except (OSError, ValueError) as exc:
        print(f"FAIL: {exc}")
        return 1
    if status == 200 and body == check.expected:
        refused = _console_refuses(url)
        verdict = (f"but the console itself would refuse this URL ({refused}): it takes "
                   "http:// on port 80 or https:// on port 443, at a public address" if refused
                   else "WeChat's console would accept it")
        print(f"PASS: {shown} echoed echostr exactly; {verdict}")
        return 0
    hint = _refusal_hint(status, body, app, url, config.source, from_listen=not args.url,
                         signed_with=args.token)
    if status == 200:  # a wxgate gateway serving the app echoes, or refuses with a 4xx
        hint = (f"what answers there is not a wxgate gateway serving {config.source} "
                f"[app:{app.name}] ({_elsewhere(url, not args.url)})")
    print(f"FAIL: {shown} answered {status} {body[:200]!r}; WeChat expects 200 and exactly "
          f"{check.echostr!r}: {hint or _handshake_hint(status, app, args.token)}")
    return 1


def _console_refuses(url):
    """Why WeChat's console would not take ``url`` as the push URL (a short reason), or "".

    The console's form: "必须以http://或https://开头，分别支持80端口和443端口", and WeChat's
    servers must reach the host, which a loopback or private address is not.
    """
    import ipaddress
    import urllib.parse
    split = urllib.parse.urlsplit(url)
    try:
        port = split.port
    except ValueError:
        port = -1
    default = {"http": 80, "https": 443}.get(split.scheme)
    if default is None or port not in (None, default):
        return f"{split.scheme}:// on port {port or default}"
    if split.hostname in (None, "localhost"):
        return "a loopback name"
    try:
        address = ipaddress.ip_address(split.hostname)
    except ValueError:
        return ""  # a name: whether it is public, only DNS knows
    return "" if address.is_global else "a private or loopback address"


def _refusal_hint(status, body, app, url, source, *, from_listen, signed_with=None):
    """What a refusal says about the wxgate gateway at ``url``, or "" when it says nothing.

    push and handshake sign (and seal) with the values of ``source``, so a gateway serving
    that ini takes them. Three refusals are a wxgate gateway's own and each means that it
    holds something else at this path: no app (its 404), another token (-40001), or
    another key or appid (the one body of every failure past msg_signature). Either it
    serves another ini (another ``wxgate serve`` on the port) or it loaded this one before
    an edit; the CLI cannot tell which, so the hint names both.
    """
    import urllib.parse  # the command line's: a push has no use for it

    where = f"{source} [app:{app.name}]"
    split = urllib.parse.urlsplit(url)
    path = split.path
    if status == 404 and body == _NO_APP_BODY:
        if path != app.path:
            return (f"a wxgate gateway answers there, with no app at {path!r}: the URL's path "
                    f"must be {where} path {app.path!r}")
        held = f"has no app at {path!r}"
        if not from_listen:  # a URL of its own may cross a proxy that rewrites the path
            held += " (or a proxy in front of it passes another path)"
    elif (status == 403 and f"(WeChat {VALIDATE_SIGNATURE_ERROR})".encode() in body
          and signed_with in (None, app.token)):
        held = f"refuses a signature made with {where} token (it holds another one)"
    elif status == 400 and body == SEALED_REFUSAL.encode():
        held = (f"takes the signature, but cannot open a push sealed with {where} "
                "encoding_aes_key and appid (it holds another key or appid)")
    else:
        return ""
    gateway = f"{split.scheme}://{split.netloc.rpartition('@')[2]}"  # never a password
    return (f"the wxgate gateway at {gateway} {held}: either it is not the one serving "
            f"{source} ({_elsewhere(url, from_listen)}), or it loaded {source} before an "
            "edit (restart it)")


def _elsewhere(url, from_listen):
    """Where else the gateway serving the ini may be, and how to send there."""
    import urllib.parse  # the command line's: a push has no use for it

    if not from_listen:
        return "check --url's host and port: wxgate serve logs each app's URL"
    port = urllib.parse.urlsplit(url).port
    return (f"is another `wxgate serve` on [wxgate] listen's port {port}? if yours listens "
            "elsewhere, as after serve --port, give --url with the URL it logs")


def _handshake_hint(status, app, console_token):
    """What a failed handshake's status points at, for app ``app``."""
    where = f"[app:{app.name}]"
    if status == 404:
        return (f"nothing answers at this path: the URL's path must be the ini's {where} path "
                f"{app.path!r} (behind a proxy, check that it passes the path unchanged)")
    if status in (500, 502, 503, 504):
        return "the server failed: its log (wxgate serve's output, or the WSGI server's " \
               "error log) says why"
    if status == 403 and console_token is not None and console_token != app.token:
        return (f"the console's token (given with --token) is not the one in the ini's {where}: "
                f"copy the console's Token(令牌) into {where} token, or enter the ini's in the "
                "console (开发管理 → 开发设置 → 消息推送) and press 提交")
    if status == 403:
        return (f"the signature was refused: check that the token in the console and in "
                f"{where} are the same (try --token), or a clock far off (NTP)")
    return f"check the URL, and the token in the console and in {where}"


def _decrypt_command(args):
    """``wxgate decrypt CONFIG BODY_OR_FILE ...``: verify and decrypt a captured push."""
    config = _load_config(args.config, unset=[])  # it needs the token and key only
    app = _pick_app(config, args.app)
    if app.aes_key is None:
        raise WxgateError(f"app {app.name!r} has mode = {app.mode} and no encoding_aes_key: "
                          "there is nothing to decrypt with")
    body = args.body
    if os.path.isfile(body):
        try:
            with open(body, "rb") as file:
                raw = file.read()
        except OSError as exc:
            print(f"wxgate: cannot decrypt: cannot read {body}: {exc.strerror}",
                  file=sys.stderr)
            return 2
        what = "the file"
    elif _looks_like_a_path(body):
        print(f"wxgate: cannot decrypt: no such file: {body}", file=sys.stderr)
        return 2
    else:
        raw = body.encode("utf-8", "surrogateescape")
        what = "the argument"
    try:
        if raw.strip()[:1] in (b"<", b"{"):
            fields = _parse_body(raw, _sniff_format(raw))
            encrypt = fields.get("Encrypt")
            if not isinstance(encrypt, str):
                raise MessageError("the body has no Encrypt field: it is not encrypted",
                                   code=None)
        else:
            try:
                encrypt = raw.decode("utf-8").strip()  # the bare Encrypt value
            except UnicodeDecodeError:
                print(f"wxgate: cannot decrypt: {what} is not UTF-8, so neither a push body "
                      "nor an Encrypt value", file=sys.stderr)
                return 2
        if args.msg_signature:
            check_signature(args.msg_signature, app.token, args.timestamp, args.nonce, encrypt)
            print(f"msg_signature ok for app {app.name}", file=sys.stderr)
        else:
            print("no --msg-signature given: signature not checked", file=sys.stderr)
        # The gateway's rule: the previous key, during a rotation, and for the same failures.
        text, key = _open_encrypt(encrypt, app.aes_key, app.previous_aes_key, app.appid)
        if app.previous_aes_key is not None:
            option = "encoding_aes_key" if key == app.aes_key else "previous_encoding_aes_key"
            print(f"decrypted with {option}", file=sys.stderr)
        print(text)
    except WxgateError as exc:
        print(f"wxgate: cannot decrypt: {exc.message}", file=sys.stderr)
        return 1
    return 0


def _looks_like_a_path(text):
    """Whether a BODY_OR_FILE that is not a file was meant as one (a path, not a value).

    An ``Encrypt`` value is Base64, whose alphabet has ``/`` too: only text that is not
    Base64 and has a path's shape (a separator, or a file extension) counts.
    """
    stripped = text.strip()
    if stripped[:1] in ("<", "{"):
        return False
    try:
        _strict_b64decode(stripped)
        return False
    except (binascii.Error, ValueError):
        pass
    return os.sep in stripped or bool(re.search(r"\.[A-Za-z0-9]{1,5}$", stripped))


###############################################################################
# Command line ################################################################
###############################################################################

def _genkey(args):
    """``wxgate genkey``: a fresh EncodingAESKey and Token for the console."""
    import secrets
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    # The console's alphabet is [A-Za-z0-9]; 43 such characters always decode to 32 bytes.
    key = "".join(secrets.choice(alphabet) for _ in range(ENCODING_AES_KEY_LENGTH))
    token = "".join(secrets.choice(alphabet) for _ in range(32))
    print(f"encoding_aes_key = {key}\ntoken = {token}")
    return 0


def _sign(args):
    """``wxgate sign TOKEN TIMESTAMP NONCE [ENCRYPT]``."""
    print(sign(args.token, args.timestamp, args.nonce, args.encrypt))
    return 0


def _check(args):
    """``wxgate check CONFIG``: load the config and print each app with secrets redacted.

    Offline, the server-only secrets may be unset (a shell without the systemd unit's
    EnvironmentFile): each one is named, since ``serve`` will need it. ``--online`` fetches
    a token, and needs the AppSecret.
    """
    unset = None if args.online else []
    config = _load_config(args.config, unset=unset)
    store = _redact_url(config.store) if "://" in config.store else config.store
    print(f"{config.source}: ok; store {store}, api_base "
          f"{_redact_url(config.api_base)}, admin_secret {_redact(config.admin_secret)}")
    if not config.timestamp_window:
        print(f"warning: {_WINDOW_OFF}")
    for app in config.apps.values():
        business = [f"handler {app.handler_spec}"] if app.handler_spec else []
        if app.forward:
            business.append(f"forward {_redact_url(app.forward)}")
        previous = (f", previous_encoding_aes_key {_redact(app.previous_encoding_aes_key)}"
                    if app.previous_encoding_aes_key else "")
        print(f"  [app:{app.name}] {app.path}: appid {app.appid}, {app.mode} mode, {app.format}, "
              f"{', '.join(business)}, {app.delivery} delivery, token {_redact(app.token)}, "
              f"encoding_aes_key {_redact(app.encoding_aes_key)}{previous}, appsecret "
              f"{_redact(app.appsecret)}")
        if app.previous_encoding_aes_key:
            print("    key rotation: pushes open with encoding_aes_key, else with "
                  "previous_encoding_aes_key; remove the latter once "
                  "wxgate_previous_key_total stops growing")
        if app.mode == "cloud":
            print("    cloud mode: Cloud Hosting pushes carry no signature and no encryption, "
                  "so there is no token or key to check (any in the section are unused)")
            if app.cloud_source_check:
                print("    a push without the X-WX-SOURCE header Cloud Hosting's gateway adds "
                      "is refused (403); it proves the origin only while the service's "
                      "public access is off")
            else:
                print("    cloud_source_check = no: X-WX-SOURCE is not checked, and any client "
                      "that reaches the service is believed; safe only with the service's "
                      "public access turned off")
            print("    not verifiable from here: the console's push settings (path, format) "
                  "and its path check; send one with wxgate push --url")
        if app.token_grant == "cloud":
            print("    token_grant = cloud: API calls go to api_base with no access_token, for "
                  "开放接口服务 to add the credential; its switch and API whitelist cannot be "
                  "read from here (an API off the whitelist fails with HTTP 502)")
            if not config.api_base.startswith("http://"):
                print(f"    warning: api_base is {_redact_url(config.api_base)}; in Cloud "
                      "Hosting set api_base = http://api.weixin.qq.com (http, as the "
                      "sidecar takes it)")
    cloud = [f"[app:{app.name}]" for app in config.apps.values() if app.mode == "cloud"]
    public = [f"[app:{app.name}]" for app in config.apps.values() if app.mode != "cloud"]
    if cloud and public:
        # WeChat's push servers reach a self-hosted URL over the internet, so a gateway that
        # serves one has public access on; X-WX-SOURCE proves nothing on such a service.
        print(f"warning: this gateway serves mode = cloud ({', '.join(cloud)}) beside "
              f"{', '.join(public)}, which WeChat reaches from the internet: its public "
              "access is then on, and any client can send an X-WX-SOURCE header of its own, "
              "so cloud_source_check = yes proves nothing; serve cloud apps from a Cloud "
              "Hosting service with public access off, and the others apart")
    for section, option, name in unset or ():
        print(f"warning: [{section}] {option}: environment variable {name} is not set here; "
              "serve, worker and token will need it")
    if args.online:
        gateway = Gateway(config)
        for name, app in config.apps.items():
            if app.token_grant == "cloud":
                print(f"  [app:{name}] no token to fetch: token_grant = cloud (开放接口服务 "
                      "adds the credential inside Cloud Hosting)")
                continue
            info = gateway.client(name).tokens.token_info()
            print(f"  [app:{name}] token fetched, expires at {info['expires_at']}")
    return 0


def _token(args):
    """``wxgate token CONFIG [--app NAME]``: print the app's current access_token."""
    gateway = make_app(args.config)
    print(gateway.client(_pick_app(gateway.config, args.app).name).tokens.get_token())
    return 0


def _worker_command(args):
    """``wxgate worker CONFIG``: deliver queued pushes in this process until interrupted."""
    level = logging.DEBUG if args.verbose else logging.INFO
    _logging_before_handlers(level)
    config = load_config(args.config)
    _setup_logging(config.log_format, level, root=True)
    import signal
    gateway = Gateway(config, start_worker=False)
    worker = gateway.worker(args.threads)
    stopping = threading.Event()

    def stop(number, _frame):
        logger.info("delivery worker stopping on %s", signal.Signals(number).name)
        stopping.set()

    # SIGTERM (systemd, docker stop, kill) as Ctrl-C: stop claiming, let the deliveries
    # running now finish (up to 5 s), then exit 0. A delivery cut off after that is not
    # counted as an attempt, and reappears after queue_visibility_timeout.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logger.info("delivery worker started with %d thread(s) on %s", worker.threads,
                _redact_url(gateway.config.store))
    worker.start()
    try:
        while not stopping.wait(3600):
            pass
    finally:
        # The worker first: it is not the gateway's own (gateway.close() stops only that
        # one), and closing the store under a running delivery would cut it off.
        worker.stop()
        gateway.close()
    return 0


def _queue_command(args):
    """``wxgate queue CONFIG stats|list-dead|retry-dead [ID...]|purge-dead``."""
    # It needs the store only: not the AppSecret, nor the admin or forward secrets.
    gateway = Gateway(_load_config(args.config, unset=[]), start_worker=False)
    if gateway.queue is None:
        raise WxgateError("no app has delivery = queue in this config")
    queue, now = gateway.queue, time.time()
    if args.action == "stats":
        print(_dump_json(queue.stats(now)))
    elif args.action == "list-dead":
        for letter in queue.dead(limit=args.limit):
            print(_dump_json(letter))
    elif args.action == "retry-dead":
        print(f"{queue.revive([int(i) for i in args.ids], now)} dead letter(s) queued again")
    elif args.action == "purge-dead":
        print(f"{queue.purge_dead()} dead letter(s) deleted")
    gateway.close()
    return 0


def _positive_int(text):
    import argparse
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """The ``wxgate`` command; returns the exit code (0 ok, 1 failed, 2 usage)."""
    import argparse

    parser = argparse.ArgumentParser(prog="wxgate", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"wxgate {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug lines")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    serve = commands.add_parser("serve", help="serve the gateway (development server)")
    serve.add_argument("config", help="the ini file")
    serve.add_argument("--host", help="listen address (default: [wxgate] listen)")
    serve.add_argument("--port", type=int, help="listen port (default: [wxgate] listen)")
    serve.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT,
                       metavar="SECONDS", help="time a client has to send its whole request "
                       f"(default: {DEFAULT_READ_TIMEOUT:g})")
    serve.set_defaults(run=_serve)

    genkey = commands.add_parser("genkey", help="print a fresh EncodingAESKey and Token")
    genkey.set_defaults(run=_genkey)

    signer = commands.add_parser("sign", help="print WeChat's signature of the arguments")
    signer.add_argument("token")
    signer.add_argument("timestamp")
    signer.add_argument("nonce")
    signer.add_argument("encrypt", nargs="?", help="the Encrypt field, for msg_signature")
    signer.set_defaults(run=_sign)

    check = commands.add_parser("check", help="validate a config file, secrets redacted")
    check.add_argument("config")
    check.add_argument("--online", action="store_true",
                       help="also fetch a token, to prove the appid/appsecret pair")
    check.set_defaults(run=_check)

    token = commands.add_parser("token", help="print an app's access_token")
    token.add_argument("config")
    token.add_argument("--app", help="the app's name (needed when there are several)")
    token.set_defaults(run=_token)

    push = commands.add_parser("push", help="act as WeChat: send a push, show the reply",
                               epilog=_FIELD_HELP,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    push.add_argument("config")
    push.add_argument("--app", help="the app's name (needed when there are several)")
    push.add_argument("--url", help="default: the app's path on [wxgate] listen")
    what = push.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a text message with this Content")
    what.add_argument("--event", help="an event with this Event name")
    what.add_argument("--json", metavar="FILE", help="the push's fields as a JSON file")
    what.add_argument("--xml", metavar="FILE", help="the push's fields as an XML file")
    push.add_argument("--field", action="append", metavar="NAME=TEXT",
                      help="a field to add or replace; NAME:=JSON for a number, object or "
                      "list (see below)")
    push.add_argument("--format", choices=("xml", "json"), help="default: the app's format")
    push.add_argument("--openid", default="o_wxgate_demo_user", help="the sender")
    push.add_argument("--repeat", type=_positive_int, default=1, metavar="N",
                      help="send the same push N times, as WeChat's retries do")
    push.set_defaults(run=_push)

    handshake = commands.add_parser("handshake", help="do the console's URL verification")
    handshake.add_argument("config")
    handshake.add_argument("--app", help="the app's name (needed when there are several)")
    handshake.add_argument("--url", help="default: the app's path on [wxgate] listen")
    handshake.add_argument("--token", help="sign with this token (the console's) instead of "
                           "the ini's, to check that the two are the same")
    handshake.set_defaults(run=_handshake_command)

    decrypt = commands.add_parser("decrypt", help="verify and decrypt a captured push")
    decrypt.add_argument("config")
    decrypt.add_argument("body", metavar="BODY_OR_FILE",
                         help="the push body (XML/JSON), its Encrypt value, or a file of it")
    decrypt.add_argument("--app", help="the app's name (needed when there are several)")
    decrypt.add_argument("--timestamp", default="", help="the push's timestamp parameter")
    decrypt.add_argument("--nonce", default="", help="the push's nonce parameter")
    decrypt.add_argument("--msg-signature", help="the push's msg_signature parameter")
    decrypt.set_defaults(run=_decrypt_command)

    worker = commands.add_parser("worker", help="deliver queued pushes (delivery = queue)")
    worker.add_argument("config")
    worker.add_argument("--threads", type=_positive_int,
                        help="default: [wxgate] delivery_threads")
    worker.set_defaults(run=_worker_command)

    queue = commands.add_parser("queue", help="inspect and replay the durable queue")
    queue.add_argument("config")
    queue.add_argument("action", choices=("stats", "list-dead", "retry-dead", "purge-dead"))
    queue.add_argument("ids", nargs="*", type=int,
                       help="dead letter ids for retry-dead (default: all)")
    queue.add_argument("--limit", type=int, default=100, help="for list-dead")
    queue.set_defaults(run=_queue_command)

    args = parser.parse_args(argv)
    if args.run not in (_serve, _worker_command):
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except WxgateError as exc:
        print(f"wxgate: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # Under `python -m wxgate` or `python wxgate.py` this module is __main__, and a handler's
    # `import wxgate` would load a second copy whose WeChatAPIError the client never raises:
    # the README's `except wxgate.WeChatAPIError` would then never catch. One module it is.
    sys.modules.setdefault("wxgate", sys.modules[__name__])
    sys.exit(main())
