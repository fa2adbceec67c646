"""What one push costs in logging, counted rather than timed, so the guard cannot flake.

A per-push INFO line can cost more server CPU than all of wxgate's own work. Timing belongs
in bench/ (bench/logcost.py breaks the cost down), but the work that makes it slow can be
counted, and counts are the same on a busy CI machine as on an idle one:

- LogRecords made per push (through the record factory, so a user's factory still applies):
  exactly one, at INFO, in text and JSON; none when the logger is at WARNING;
- ``Logger.findCaller`` (a stack walk per line) per push;
- ``time.strftime`` per push with the record times pinned to one second: the time text of a
  second can be made once;
- ``write`` and ``flush`` on the stream of the handler wxgate installs itself, when that
  stream is line-buffered like ``sys.stderr`` (the newline already flushed it);
- ``os.urandom`` (a ``getrandom(2)``) per JSON push, spent on the request id.

Each ceiling below is the count since the fix (each was one per push before it, per line
for strftime), named; the exact counts (one record, one write) and the checks that nothing
is dropped and that a user's own logging configuration stays in charge must hold before and
after.
"""

import io
import json
import logging
import os
import sys
import time

import pytest
import webtest

import wxgate
from conftest import NOW, build_push, make_config, text_message

# The counts per push of the cheap push line; a line made the usual way (a Logger call,
# strftime per record, a flush per write, uuid4) costs 1, 10, 1 and 1.
FIND_CALLER_PER_PUSH = 0      # the line is made with makeRecord + handle
STRFTIME_PER_10_PUSHES = 1    # wxgate's own formatter caches the second's text
FLUSHES_PER_PUSH = 0          # wxgate's handler leaves a line-buffered stream alone
URANDOM_PER_JSON_PUSH = 0     # the request id comes from random, not uuid4

PINNED = NOW + 0.25  # every record in one second, whatever the wall clock does


class Counts:
    """Counters shared by the patched callables below."""

    def __init__(self):
        self.records = self.find_caller = self.strftime = self.urandom = 0


class CountingStream(io.TextIOWrapper):
    """A line-buffered text stream, as ``sys.stderr`` is, counting writes and flushes."""

    def __init__(self):
        super().__init__(io.BytesIO(), encoding="utf-8", line_buffering=True)
        self.writes = self.flushes = 0
        self.lines = []

    def write(self, text):
        self.writes += 1
        self.lines.extend(text.splitlines())
        return super().write(text)

    def flush(self):
        self.flushes += 1
        return super().flush()


@pytest.fixture
def counts(monkeypatch):
    """Count records, stack walks, strftime and urandom calls; pin every record's time."""
    counted = Counts()
    factory = logging.getLogRecordFactory()

    def counting_factory(*args, **kwargs):
        record = factory(*args, **kwargs)
        record.created, record.msecs = PINNED, 250.0
        counted.records += 1
        return record

    strftime, urandom = time.strftime, os.urandom

    def counting_currentframe():  # findCaller's first step, as logging defines it
        counted.find_caller += 1
        return sys._getframe(1)

    def counting_strftime(*args):
        counted.strftime += 1
        return strftime(*args)

    def counting_urandom(size):
        counted.urandom += 1
        return urandom(size)

    logging.setLogRecordFactory(counting_factory)
    monkeypatch.setattr(logging, "currentframe", counting_currentframe)
    monkeypatch.setattr(time, "strftime", counting_strftime)
    monkeypatch.setattr(os, "urandom", counting_urandom)
    yield counted
    logging.setLogRecordFactory(factory)


@pytest.fixture
def own_logging(monkeypatch):
    """Logging as under gunicorn: nothing configured, so wxgate installs its own handler on a
    line-buffered stream standing in for sys.stderr (see make_testapp). Returns that stream."""
    stream = CountingStream()
    monkeypatch.setattr(logging.getLogger(), "handlers", logging.getLogger().handlers)
    monkeypatch.setattr(wxgate.logger, "handlers", [])
    monkeypatch.setattr(wxgate.logger, "level", wxgate.logger.level)
    return stream


def make_testapp(tmp_path, log_format, stream, configured_by_user=False):
    config = make_config(tmp_path, lambda message: None,
                         extra_gateway=f"log_format = {log_format}")
    root = logging.getLogger()
    handlers, stderr = root.handlers, sys.stderr
    if not configured_by_user:  # hide pytest's capture handler, added when the test starts
        root.handlers = []
    sys.stderr = stream  # pytest's capture swaps sys.stderr between phases: set it here
    try:
        wxgate._setup_logging(log_format)  # what wxgate:application does on first use
    finally:
        root.handlers, sys.stderr = handlers, stderr
    return webtest.TestApp(wxgate.make_app(config, clock=lambda: NOW), lint=True)


def push(testapp, i):
    query, body = build_push(text_message(msg_id=str(6054768590064713728 + i)),
                             nonce=str(415670741 + i))
    response = testapp.post(f"/wechat?{query}", body, content_type="text/xml")
    assert response.text == "success"


def push_many(testapp, counts, stream, count=10):
    """Push ``count`` distinct messages after a warm-up; return the counters' increments."""
    push(testapp, 10_000)  # first-use work (imports, caches) is not per push
    before = (counts.records, counts.find_caller, counts.strftime, counts.urandom,
              stream.writes, stream.flushes, len(stream.lines))
    for i in range(count):
        push(testapp, i)
    after = (counts.records, counts.find_caller, counts.strftime, counts.urandom,
             stream.writes, stream.flushes, len(stream.lines))
    names = ("records", "find_caller", "strftime", "urandom", "writes", "flushes", "lines")
    return dict(zip(names, (b - a for a, b in zip(before, after))))


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_one_record_one_write_per_push(tmp_path, counts, own_logging, log_format):
    testapp = make_testapp(tmp_path, log_format, own_logging)
    made = push_many(testapp, counts, own_logging)
    assert made["records"] == 10 and made["lines"] == 10 and made["writes"] == 10
    assert made["find_caller"] <= 10 * FIND_CALLER_PER_PUSH
    assert made["flushes"] <= 10 * FLUSHES_PER_PUSH
    assert made["strftime"] <= STRFTIME_PER_10_PUSHES
    assert made["urandom"] <= (10 * URANDOM_PER_JSON_PUSH if log_format == "json" else 0)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_cheap_line_drops_nothing(tmp_path, counts, own_logging, log_format):
    """Whatever makes the line cheaper keeps every field and the time of every line."""
    testapp = make_testapp(tmp_path, log_format, own_logging)
    push_many(testapp, counts, own_logging, count=2)
    line = own_logging.lines[-1]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(PINNED)) + ",250"
    fields = ("app=test", "type=text", "key=", "6054768590064713729", "outcome=handled", "ms=")
    if log_format == "json":
        document = json.loads(line)
        assert document["time"] == stamp and document["level"] == "INFO"
        assert document["logger"] == "wxgate" and document["outcome"] == "handled"
        assert document["app"] == "test" and document["msg_type"] == "text"
        assert document["dedup_key"].endswith("6054768590064713729")
        assert isinstance(document["duration_ms"], float)
        assert len(document["request_id"]) == 16
        line = document["message"]
    else:
        assert line.startswith(f"{stamp} INFO wxgate: push ")
    assert all(field in line for field in fields)


def test_a_level_above_info_makes_no_record(tmp_path, counts, own_logging):
    testapp = make_testapp(tmp_path, "text", own_logging)
    wxgate.logger.setLevel(logging.WARNING)
    made = push_many(testapp, counts, own_logging)
    assert made["records"] == 0 and made["lines"] == 0 and made["find_caller"] == 0


def test_the_users_logging_configuration_stays_in_charge(tmp_path, counts, own_logging):
    """A user's basicConfig-style root handler gets the one record; wxgate adds no handler."""
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append((record.getMessage(), record.funcName, record.pathname))

    logging.getLogger().handlers = [Keep()]
    testapp = make_testapp(tmp_path, "text", own_logging, configured_by_user=True)
    assert wxgate.logger.handlers == []
    wxgate.logger.setLevel(logging.INFO)
    made = push_many(testapp, counts, own_logging)
    assert made["records"] == 10 and made["lines"] == 0  # nothing on wxgate's stream
    message, function, pathname = seen[-1]
    assert message.startswith("push app=test type=text key=") and "outcome=handled" in message
    assert function == "_log_push" and os.path.samefile(pathname, wxgate.__file__)


# -- wxgate's own formatters and handler: the same lines, made cheaper -------------------------


def make_record(message="push app=test key=%s", args=("k",), created=PINNED, extra=None,
                exc_info=None):
    record = logging.getLogger("wxgate").makeRecord(
        "wxgate", logging.INFO, __file__, 1, message, args, exc_info, "f", extra)
    record.created, record.msecs = created, (created - int(created)) * 1000
    return record


def the_json_dumps_line(record, formatter):
    """The usual JSON formatter's line: a dict through json.dumps."""
    document = {"time": logging.Formatter.formatTime(formatter, record),
                "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
    for name in wxgate._JSONFormatter._FIELDS:
        if hasattr(record, name):
            document[name] = getattr(record, name)
    if record.exc_info:
        document["exception"] = formatter.formatException(record.exc_info)
    return json.dumps(document, ensure_ascii=False)


def _raised():
    try:
        raise ValueError('a "quoted"\nmulti-line error: \u00e9\u4e2d')
    except ValueError:
        return sys.exc_info()


@pytest.mark.parametrize("extra, exc_info", [
    pytest.param(None, None, id="no fields"),
    pytest.param({"app": "test", "dedup_key": "test:m:1", "outcome": "handled",
                  "duration_ms": 0.12, "msg_type": "text", "request_id": "0123456789abcdef"},
                 None, id="a push's fields"),
    pytest.param({"app": "t\u00e9st \"q\" \\ \u2028", "dedup_key": None, "outcome": "x\ty",
                  "duration_ms": 12, "msg_type": ["list", 1.5, None], "request_id": "\x01"},
                 None, id="quotes, controls, non-ASCII, None, int, list"),
    pytest.param({"outcome": "handler-error", "msg_type": "\ud800"}, _raised(),
                 id="exception and a lone surrogate"),
])
def test_the_json_line_is_byte_for_byte_what_json_dumps_wrote(extra, exc_info):
    formatter = wxgate._JSONFormatter()
    record = make_record("push %s \u4e2d\u6587 \"%s\"", ("a\nb", "\u00e9"), extra=extra,
                         exc_info=exc_info)
    assert formatter.format(record) == the_json_dumps_line(record, formatter)


def test_the_text_time_is_logging_s_own_in_every_second():
    # The time text is cached per second: every line still shows its own second and
    # millisecond, across second boundaries, back and forth.
    ours, standard = wxgate._TextFormatter(), logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s")
    for created in (PINNED, PINNED + 0.5, PINNED + 0.999, PINNED + 1.0, PINNED - 3600.001,
                    PINNED + 86400 * 180 + 0.042, PINNED):
        record = make_record(created=created)
        assert ours.format(record) == standard.format(record)
    record = make_record()
    assert ours.formatTime(record, "%H:%M") == standard.formatTime(record, "%H:%M")


def test_wxgate_s_handler_still_flushes_a_stream_that_is_not_line_buffered():
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8")  # block-buffered, like a file
    handler = wxgate._StderrHandler(stream)
    handler.setFormatter(wxgate._TextFormatter())
    handler.handle(make_record())
    assert raw.getvalue().endswith(b"push app=test key=k\n")


def test_a_logger_filter_and_logging_disable_still_apply(tmp_path, counts, own_logging):
    """The line skips Logger.info, not the rest of its path: filters and disable() apply."""
    testapp = make_testapp(tmp_path, "text", own_logging)
    dropped = []

    def drop_pushes(record):
        dropped.append(record)
        return not record.getMessage().startswith("push ")

    wxgate.logger.addFilter(drop_pushes)
    try:
        made = push_many(testapp, counts, own_logging)
    finally:
        wxgate.logger.removeFilter(drop_pushes)
    assert made["lines"] == 0 and len(dropped) == 11  # the warm-up push, then ten
    logging.disable(logging.INFO)
    try:
        made = push_many(testapp, counts, own_logging)
    finally:
        logging.disable(logging.NOTSET)
    assert made["records"] == 0 and made["lines"] == 0


@pytest.mark.parametrize("value", [
    "", "caf\u00e9 \"\\\n\x00", 0.12, -0.0, 1e16, 1e-7, float("nan"), float("inf"),
    float("-inf"), 0, -12, 10 ** 30, True, False, None, [1, "a", None], {"k": 1.5},
], ids=repr)
def test_each_json_value_is_json_dumps_s(value):
    assert wxgate._json_value(value) == json.dumps(value, ensure_ascii=False)
