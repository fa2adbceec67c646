"""The yardsticks of bench/http.py, served by gunicorn beside wxgate.

``app`` is the least a WSGI push endpoint can do: read the body, answer ``success``.
``floor_app`` adds the least a safe-mode endpoint must do: split the query, check
``msg_signature`` (sha1), Base64-decode and AES-CBC-decrypt ``Encrypt`` (pycryptodome), check
the appid and parse the message with ``xml.etree``; no dedup, no handler.
``noop_handler`` is wxgate's handler in the same benchmark, so no server runs business code.

Every server of the benchmark writes one log line per push to stderr, as wxgate does with its
per-push INFO line; :func:`push_logger` is the peers' (the standard ``StreamHandler`` and a
``Formatter`` of the same shape as wxgate's text line).
"""

import base64
import hashlib
import logging
import urllib.parse
import xml.etree.ElementTree as ET

# The bench app's secrets, as in bench/http.py.
TOKEN = "benchtoken123"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
APPID = b"wx2c2769f8efd9abc2"
_KEY = base64.b64decode(AES_KEY + "=")


def push_logger(name):
    """A logger that writes one INFO line per call to stderr (gunicorn's error log here)."""
    log = logging.getLogger(name)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


_log = push_logger("bench")


def app(environ, start_response):
    body = environ["wsgi.input"].read()
    _log.info("request path=%s bytes=%d outcome=answered", environ.get("PATH_INFO"), len(body))
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                              ("Content-Length", "7")])
    return [b"success"]


def floor_app(environ, start_response):
    from Crypto.Cipher import AES

    query = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", "")))
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    encrypt = ET.fromstring(body).find("Encrypt").text
    parts = sorted((TOKEN, query["timestamp"], query["nonce"], encrypt))
    if hashlib.sha1("".join(parts).encode()).hexdigest() != query["msg_signature"]:
        start_response("403 Forbidden", [("Content-Length", "0")])
        return [b""]
    buffer = AES.new(_KEY, AES.MODE_CBC, _KEY[:16]).decrypt(base64.b64decode(encrypt))
    buffer = buffer[:-buffer[-1]]
    length = int.from_bytes(buffer[16:20], "big")
    if buffer[20 + length:] != APPID:
        start_response("400 Bad Request", [("Content-Length", "0")])
        return [b""]
    fields = {child.tag: child.text for child in ET.fromstring(buffer[20:20 + length])}
    if not fields.get("MsgId"):
        start_response("400 Bad Request", [("Content-Length", "0")])
        return [b""]
    _log.info("push type=%s key=%s outcome=handled", fields.get("MsgType"), fields["MsgId"])
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                              ("Content-Length", "7")])
    return [b"success"]


def noop_handler(message):
    return None


def wxgate_quiet():
    """``wxgate:application`` without its per-push INFO line (gunicorn target
    ``trivial_app:wxgate_quiet()``): warnings still reach stderr."""
    import logging

    import wxgate

    log = logging.getLogger("wxgate")
    log.addHandler(logging.StreamHandler())  # a handler of ours: wxgate then adds none
    log.setLevel(logging.WARNING)
    return wxgate.application
