"""The proposed cheap push log line, as code bench/logcost.py patches into wxgate in-process.

This is a prototype, not wxgate: bench/logcost_proposal.diff is the same change written
against wxgate.py (Logs and admin helpers, WSGI application). Everything stays inside standard
``logging``: the line is still one ``LogRecord`` from ``Logger.makeRecord`` (so a user's
record factory applies), handed to ``Logger.handle`` (so ``Logger.disabled``, the logger's
filters, its handlers and propagation to the root's handlers apply), after
``isEnabledFor(INFO)`` (levels, ``logging.disable``). A user's ``basicConfig`` or
``dictConfig`` handlers and formatters see the same record as today, with the same message,
arguments, ``pathname``/``lineno``/``funcName`` (of the call site, as ``findCaller`` gives)
and, in JSON mode, the same extra attributes. Only the handler wxgate installs itself (when
nobody configured logging) changes: a cached time prefix and a hand-built JSON line that is
byte for byte what ``json.dumps`` wrote.
"""

import json
import logging
import random
import sys
import time

import wxgate

logger = wxgate.logger
_encode_string = json.encoder.encode_basestring  # the C encoder, as json.dumps(ensure_ascii=False)
_PUSH_FORMAT = "push app=%s type=%s key=%s outcome=%s ms=%.1f"


def _request_id(environ):
    """The proxy's X-Request-Id when there is one, else 16 random hex digits.

    ``random`` is reseeded in every forked child, so gunicorn's workers draw different ids;
    ``uuid4`` cost a ``getrandom(2)`` and a UUID object per push for the same 64 bits.
    """
    given = environ.get("HTTP_X_REQUEST_ID", "")
    if given and len(given) <= 64 and given.isascii() and given.isprintable():
        return given
    return "%016x" % random.getrandbits(64)


def _log_push(self, app, message, outcome, started, environ):
    kind = message.event or message.msg_type
    label = kind if isinstance(kind, str) and kind in wxgate._KNOWN_TYPES else "other"
    self.metrics.count("wxgate_pushes_total", app=app.name, type=label, outcome=outcome)
    if logger.isEnabledFor(logging.INFO):
        milliseconds = (time.monotonic() - started) * 1000
        extra = None
        if self.config.log_format == "json":  # the fields only JSON lines show
            extra = {"app": app.name, "dedup_key": message.dedup_key, "outcome": outcome,
                     "duration_ms": round(milliseconds, 2), "msg_type": kind,
                     "request_id": _request_id(environ)}
        # Logger.info would walk the stack (findCaller) and go through Logger._log to learn
        # what this frame already knows; makeRecord + handle is the rest of the same path.
        frame = sys._getframe()
        logger.handle(logger.makeRecord(
            logger.name, logging.INFO, frame.f_code.co_filename, frame.f_lineno, _PUSH_FORMAT,
            (app.name, kind, message.dedup_key, outcome, milliseconds), None,
            frame.f_code.co_name, extra))


class _TextFormatter(logging.Formatter):
    """``%(asctime)s %(levelname)s %(name)s: %(message)s`` with the time text made once a
    second (``localtime`` + ``strftime`` cost more than the rest of the line)."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second, self._text = None, ""

    def formatTime(self, record, datefmt=None):
        second = int(record.created)
        if second != self._second:  # a race here only formats the same second twice
            self._text = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return self.default_msec_format % (self._text, record.msecs)


class _JSONFormatter(_TextFormatter):
    """One JSON object per line, with the push's fields when the record carries them."""

    _FIELDS = ("app", "dedup_key", "outcome", "duration_ms", "request_id", "msg_type")

    def format(self, record):
        # The same text json.dumps(document, ensure_ascii=False) wrote, built from parts:
        # strings through json's own C encoder, anything else through json.dumps.
        parts = ['{"time": ', _encode_string(self.formatTime(record)), ', "level": ',
                 _encode_string(record.levelname), ', "logger": ', _encode_string(record.name),
                 ', "message": ', _encode_string(record.getMessage())]
        values = record.__dict__
        for name in self._FIELDS:
            if name in values:
                value = values[name]
                parts += (', "', name, '": ', _encode_string(value) if type(value) is str
                          else json.dumps(value, ensure_ascii=False))
        if record.exc_info:
            parts += (', "exception": ',
                      _encode_string(self.formatException(record.exc_info)))
        parts.append("}")
        return "".join(parts)


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler that does not flush a stream that flushed itself at the newline.

    ``sys.stderr`` is line-buffered (Python >= 3.9), so the write already made the one
    ``write(2)``; ``StreamHandler.flush`` would take the lock again to flush an empty buffer.
    """

    def emit(self, record):
        try:
            stream = self.stream
            stream.write(self.format(record) + self.terminator)
            if not getattr(stream, "line_buffering", False):
                self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def _setup_logging(log_format, level=logging.INFO):
    """Give the ``wxgate`` logger a handler when nobody configured logging (as today)."""
    if logger.handlers or logging.getLogger().handlers:
        return  # logging is the deployer's: their handlers, their format
    handler = _StderrHandler()
    handler.setFormatter(_JSONFormatter() if log_format == "json" else _TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
