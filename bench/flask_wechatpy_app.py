"""Flask + wechatpy: the push view a user writes by hand, served by bench/http.py.

The usual recipe from wechatpy's documentation and a thousand blog posts: one Flask route,
``WeChatCrypto.decrypt_message`` (which checks msg_signature, Base64-decodes, AES-decrypts and
checks the appid), ``parse_message``, a dict of MsgIds already seen so WeChat's retries are
answered without running the business code twice, and ``success``. The business code does
nothing, like wxgate's no-op handler in the same benchmark. One log line per push, as wxgate
writes (gunicorn's access log is off for every server in the bench).
"""

import time

from flask import Flask, abort, request
from wechatpy import parse_message
from wechatpy.crypto import WeChatCrypto
from wechatpy.exceptions import InvalidAppIdException, InvalidSignatureException

from trivial_app import push_logger

# The bench app's secrets, as in bench/http.py.
TOKEN = "benchtoken123"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
APPID = "wx2c2769f8efd9abc2"

app = Flask(__name__)
crypto = WeChatCrypto(TOKEN, AES_KEY, APPID)
seen = {}  # MsgId (or FromUserName + CreateTime for events) -> when it was first seen
SEEN_LIMIT = 10000  # forget the oldest half past this, so the dict cannot grow without bound
log = push_logger("flask_wechatpy_app")


def handle(message):
    """The business code: nothing, as in every server of the bench."""
    return None


@app.route("/wechat", methods=["GET", "POST"])
def wechat():
    args = request.args
    signature, timestamp, nonce = args.get("msg_signature", ""), args.get("timestamp", ""), \
        args.get("nonce", "")
    try:
        xml = crypto.decrypt_message(request.data, signature, timestamp, nonce)
    except (InvalidSignatureException, InvalidAppIdException):
        abort(403)
    message = parse_message(xml)
    key = message.id or f"{message.source}{message.create_time}{message.type}"
    if key in seen:
        log.info("push type=%s key=%s outcome=duplicate", message.type, key)
        return "success"
    seen[key] = time.time()
    if len(seen) > SEEN_LIMIT:
        for old in list(seen)[:SEEN_LIMIT // 2]:  # dicts keep insertion order
            del seen[old]
    handle(message)
    log.info("push type=%s key=%s outcome=handled", message.type, key)
    return "success"


@app.route("/healthz")
def healthz():
    return "ok"
