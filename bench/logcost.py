"""Where the per-push INFO log line's CPU goes, in-process, with the logging setup wxgate uses.

    python bench/logcost.py                 # text and JSON lines, today's code, ~30 s
    python bench/logcost.py --profile text  # cProfile of the pushes with the line on

The logging configuration is the one ``wxgate serve`` and ``wxgate:application`` under gunicorn
install: ``wxgate._setup_logging(log_format)``, a ``StreamHandler`` on ``sys.stderr`` with the
text or JSON formatter, the ``wxgate`` logger at INFO. Under gunicorn stderr is a file or a
pipe; here file descriptor 2 is pointed at a temporary file for the whole run, so
``sys.stderr`` is what it is under gunicorn: a line-buffered text stream on a file, and every
line is one ``write(2)``.

Two kinds of figures, both in CPU time (``time.process_time``, user + system, so the
``write(2)`` counts), best of several repeats:

- the whole line: µs per push through the WSGI callable (bench/pipeline.py's app and safe-mode
  XML text pushes, each new to wxgate) with the line on, minus the same with the ``wxgate``
  logger at WARNING;
- its parts, each timed alone on the same objects: ``findCaller``, ``makeRecord`` (the
  ``LogRecord``), the handler's lock, ``Formatter.format`` and inside it the message's
  %-formatting and the time formatting, the stream's ``write`` and the handler's ``flush``,
  and our own work in ``_log_push`` before the call (the ``extra`` fields, ``_request_id``).

To compare with an older wxgate, run this script twice, once with ``WXGATE_SRC`` pointing at
a folder holding the older wxgate.py.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, os.environ.get("WXGATE_SRC") or os.path.dirname(HERE))

import argparse
import dataclasses
import gc
import importlib.util
import logging
import platform
import tempfile
import time

import wxgate

_spec = importlib.util.spec_from_file_location("pipeline", os.path.join(HERE, "pipeline.py"))
pipeline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pipeline)

clock = time.process_time


def best_per_call(fn, n, repeats):
    """Best CPU seconds per call of ``fn()`` over ``repeats`` loops of ``n`` calls."""
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        t0 = clock()
        for _ in range(n):
            fn()
        best = min(best, (clock() - t0) / n)
    return best


def reset_logging():
    logger = logging.getLogger("wxgate")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)


def make_gateway(tmpdir, log_format):
    handler = pipeline.CountingHandler()
    gateway = pipeline.make_wxgate(tmpdir, handler)
    gateway.config = dataclasses.replace(gateway.config, log_format=log_format)
    return gateway, pipeline.wsgi_caller(gateway, "/wechat")


def measure_pushes(call, feed, n, repeats):
    """CPU µs per push with the line on and off, the two taking turns."""
    logger = logging.getLogger("wxgate")
    for item in feed.take(200):
        call(item)
    on, off = float("inf"), float("inf")
    for _ in range(repeats):
        for level in (logging.INFO, logging.WARNING):
            logger.setLevel(level)
            items = feed.take(n)
            gc.collect()
            t0 = clock()
            for item in items:
                call(item)
            per = (clock() - t0) / n
            if level == logging.INFO:
                on = min(on, per)
            else:
                off = min(off, per)
    logger.setLevel(logging.INFO)
    return on * 1e6, off * 1e6


def measure_parts(gateway, log_format, n, repeats):
    """µs of each step of one push line, timed alone on the objects wxgate's setup made."""
    logger = logging.getLogger("wxgate")
    handler = logger.handlers[0]
    stream = handler.stream
    app = next(iter(gateway.config.apps.values()))
    args = (app.name, "text", "6054768590064713728", "handled", 0.1234)
    fmt = "push app=%s type=%s key=%s outcome=%s ms=%.1f"
    extra = None
    environ = {"REMOTE_ADDR": "127.0.0.1"}
    if log_format == "json":
        extra = {"app": app.name, "dedup_key": args[2], "outcome": "handled",
                 "duration_ms": 0.12, "msg_type": "text", "request_id": "0123456789abcdef"}
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, fmt, args, None,
                               "_log_push", extra)
    line = handler.format(record) + handler.terminator
    formatter = handler.formatter
    parts = {}

    def ours():  # _log_push's own work before logger.info, beyond the metrics
        milliseconds = (time.monotonic() - 1.0) * 1000
        if logger.isEnabledFor(logging.INFO) and log_format == "json":
            return {"app": app.name, "dedup_key": args[2], "outcome": "handled",
                    "duration_ms": round(milliseconds, 2), "msg_type": "text",
                    "request_id": wxgate._request_id(environ)}
        return milliseconds

    parts["_log_push: isEnabledFor, ms" + (", extra dict, _request_id"
                                           if log_format == "json" else "")] = ours
    if log_format == "json":
        parts["  of which _request_id (uuid4, or random)"] = lambda: wxgate._request_id(environ)
    parts["Logger.findCaller (stack walk)"] = logger.findCaller
    parts["Logger.makeRecord (LogRecord, getpid...)"] = lambda: logger.makeRecord(
        logger.name, logging.INFO, __file__, 1, fmt, args, None, "_log_push", extra)
    parts["Handler lock acquire + release"] = lambda: (handler.acquire(), handler.release())
    parts["Formatter.format (whole)"] = lambda: formatter.format(record)
    parts["  of which getMessage (%-format)"] = record.getMessage
    parts["  of which formatTime (localtime, strftime)"] = lambda: formatter.formatTime(record)
    if log_format == "json":
        document = {"time": "2024-04-25 07:06:40,123", "level": "INFO", "logger": "wxgate",
                    "message": record.getMessage(), **extra}
        parts["  of which json.dumps"] = lambda: wxgate.json.dumps(document, ensure_ascii=False)
    parts["stream.write(line) (one write(2))"] = lambda: stream.write(line)
    parts["handler.flush() after it"] = handler.flush
    parts["logger.info(...) whole call (the old path)"] = lambda: logger.info(
        fmt, *args, extra=extra)
    parts["makeRecord + Logger.handle (wxgate's path)"] = lambda: logger.handle(
        logger.makeRecord(logger.name, logging.INFO, __file__, 1, fmt, args, None,
                          "_log_push", extra))
    return {name: best_per_call(fn, n, repeats) * 1e6 for name, fn in parts.items()}


def profile(call, feed, n):
    import cProfile
    import pstats

    for item in feed.take(200):
        call(item)
    items = feed.take(n)
    profiler = cProfile.Profile()
    profiler.enable()
    for item in items:
        call(item)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(30)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=("text", "json"),
                        help="cProfile the pushes with the line on, then exit")
    parser.add_argument("--pushes", type=int, default=4000, help="pushes per repeat")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    # Point file descriptor 2 at a file, as gunicorn's stderr is; keep the terminal for us.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    tmp = tempfile.TemporaryDirectory(prefix="wxgate-logcost-")
    log_path = os.path.join(tmp.name, "stderr.log")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    saved_stderr = os.dup(2)
    os.dup2(log_fd, 2)
    results = {}
    try:
        for log_format in ("text", "json"):
            for variant in ("today",):
                reset_logging()
                try:
                    gateway, call = make_gateway(tmp.name, log_format)
                    wxgate._setup_logging(log_format)  # exactly what serve/gunicorn do
                    feed = pipeline.Fresh("safe-xml-text")  # every push new to wxgate
                    if args.profile:
                        if args.profile == log_format and variant == "today":
                            sys.stdout = out
                            profile(call, feed, args.pushes * 5)
                            return 0
                        continue
                    on, off = measure_pushes(call, feed, args.pushes, args.repeats)
                    parts = measure_parts(gateway, log_format, args.pushes * 5, args.repeats)
                    results[log_format, variant] = (on, off, parts)
                finally:
                    reset_logging()
        lines = sum(1 for _ in open(log_path, encoding="utf-8"))
    finally:
        os.dup2(saved_stderr, 2)
        os.close(log_fd)
        tmp.cleanup()
    report(results, out)
    print(f"\n{lines:,} lines written to the stderr file; Python {platform.python_version()}, "
          f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs: "
          f"{pipeline.cpu_model()}; CPU time (process_time), best of {args.repeats}", file=out)
    return 0


def report(results, out):
    for (log_format, variant), (on, off, parts) in results.items():
        print(f"\n== {log_format} line, {variant} ==", file=out)
        print(f"push with the line on  {on:7.2f} µs CPU", file=out)
        print(f"push with the line off {off:7.2f} µs CPU", file=out)
        print(f"the line costs         {on - off:7.2f} µs CPU", file=out)
        print("its parts, each timed alone (µs CPU):", file=out)
        for name, micros in parts.items():
            print(f"  {name:<52} {micros:6.2f}", file=out)


if __name__ == "__main__":
    sys.exit(main())
