"""Review of issue 14 and issue 15 point 2: each test here shows one problem left by the fix.

Each fails on the merge that closed the issues and passes once its problem is fixed. Real
parts where the fault can be made for real (a redis-server killed, a `wxgate worker` sent
SIGTERM, a real backend); a store whose writes fail on cue where the fault is a full disk at
one exact moment (the same kind of stand-in as tests/test_stores.py's BrokenStore).
"""

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import webtest

import wxgate
from backend import Backend
from conftest import REPO, Clock, Recorder, ini_text, make_config, text_message
from faults import RedisServer, post, wait_for

SECRET = "forward-secret-for-tests"


def queue_ini(tmp_path, store, backend, extra_gateway="", extra_app=""):
    text = ini_text(extra_gateway=f"timestamp_window = 0\nstore = {store}\n{extra_gateway}",
                    extra_app=f"forward = {backend.url}\nforward_secret = {SECRET}\n"
                              f"delivery = queue\nqueue_retry_base = 0.01\n"
                              f"queue_retry_max = 0.1\n{extra_app}")
    source = tmp_path / "review.ini"
    source.write_text(text.replace("handler = wxgate:demo_handler", ""))
    return source


@pytest.fixture
def backend():
    with Backend(SECRET) as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def queue_store(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/queue.db"
    server = request.getfixturevalue("redis_server")
    import redis
    redis.Redis.from_url(server["url"]).flushdb()
    return server["url"]


class WritesFailOnCue(wxgate.Store):
    """A real store whose writes raise sqlite's full-disk error while ``full`` is set
    (reads keep working, as sqlite's do on a full disk)."""

    shared = True

    def __init__(self, inner):
        self.inner, self.full = inner, False

    def _check(self):
        if self.full:
            raise sqlite3.OperationalError("database or disk is full")

    def add(self, key, value, ttl):
        self._check()
        return self.inner.add(key, value, ttl)

    def get(self, key):
        return self.inner.get(key)

    def set(self, key, value, ttl):
        self._check()
        self.inner.set(key, value, ttl)

    def delete(self, key, value=None):
        self._check()
        return self.inner.delete(key, value)

    def touch(self, key, value, ttl):
        self._check()
        return self.inner.touch(key, value, ttl)

    def close(self):
        self.inner.close()


# -- `wxgate worker` and SIGTERM ---------------------------------------------------------------


def test_worker_sigterm_lets_the_running_delivery_finish(tmp_path, backend, queue_store):
    # _worker_command stops on SIGTERM by closing the *gateway*, whose _worker is None (the
    # command's worker is a local variable): the delivery threads are never stopped, the
    # store is closed under them, and the process exits at once, cutting the delivery the
    # README says runs to its end ("letting running deliveries finish for up to 5 s").
    source = queue_ini(tmp_path, queue_store, backend)
    app = wxgate.make_app(str(source), start_worker=False)
    assert post(app, text_message(msg_id="term-1")).body == b"success"
    taken = threading.Event()

    def slow(body):
        taken.set()
        time.sleep(1.5)  # well inside the 5 s the README promises
        return None

    backend.reply = slow
    log = tmp_path / "worker.log"
    with open(log, "wb") as output:
        worker = subprocess.Popen([sys.executable, "-m", "wxgate", "worker", str(source)],
                                  cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
    try:
        assert taken.wait(20), log.read_text()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0
    finally:
        worker.kill()
        worker.wait(10)
    stats = app.queue.stats(time.time())
    print(f"\nafter SIGTERM mid-delivery: {stats}\n{log.read_text()}")
    # The backend answered 204 within 1.5 s: the message must be acknowledged, not left
    # claimed (to be delivered a second time after queue_visibility_timeout).
    assert stats["pending"] == 0, "SIGTERM cut the running delivery off"
    app.close()


# -- the write-back after an outage ------------------------------------------------------------


def test_write_back_replaces_this_process_own_claim(tmp_path, monkeypatch):
    # The disk fills while a handler runs: its claim is already in sqlite, its "done" is
    # not (the set fails, goes to the journal). The disk gets room again a moment later,
    # before the claim's CLAIM_TTL is over. The write-back uses add, which fails on the
    # process's own claim, so "done" never reaches the shared store: once the claim expires,
    # WeChat's retry on any other process runs the handler a second time.
    monkeypatch.setattr(wxgate, "STORE_RETRY_AFTER", 0.05)
    clock = Clock()
    database = str(tmp_path / "shared.db")
    flaky = WritesFailOnCue(wxgate.SqliteStore(database, clock=clock))
    config = make_config(tmp_path, extra_gateway="timestamp_window = 0")

    def fill_the_disk_meanwhile(message):
        if message["MsgId"] == "write-back-1":
            flaky.full = True  # the handler's work is done; the disk fills before its record
        return None

    first = wxgate.make_app(config_with(config, fill_the_disk_meanwhile), clock=clock,
                            store=flaky)
    fields = text_message(msg_id="write-back-1")
    assert post(first, fields).status_int == 200
    flaky.full = False
    time.sleep(0.1)
    assert post(first, text_message(msg_id="write-back-2")).status_int == 200  # recovery
    store_key = f"{config.store_prefix}:dedup:test:m:write-back-1"
    wait_for(lambda: not [t for t in threading.enumerate() if t.name == "wxgate-write-back"],
             5)
    clock.advance(wxgate.CLAIM_TTL + 1)  # the claim of the first copy has expired
    print(f"\nshared store after the write-back: {flaky.inner.get(store_key)!r}")
    other = Recorder()
    second = wxgate.make_app(config_with(config, other), clock=clock,
                             store=wxgate.SqliteStore(database, clock=clock))
    assert post(second, fields).status_int == 200  # WeChat's retry, on another process
    assert other.calls == 0, "handled during the outage, and run again after it"
    first.close()
    second.close()


def config_with(config, handler):
    import dataclasses
    apps = {name: dataclasses.replace(app, handler=handler, handler_spec="test:handler")
            for name, app in config.apps.items()}
    return dataclasses.replace(config, apps=apps)


# -- a retry on the same process while the first copy still runs --------------------------------


def test_redis_dies_while_a_handler_runs_and_its_retry_on_this_process_waits(tmp_path):
    # The issue: "a retry landing on the same process is always caught". _Dedup.run looks
    # in this process's memory only for answers already given; a copy still running is
    # found only through the store's claim. Redis dies while the handler runs (a slow
    # handler: WeChat's retry comes at 5 s): the retry's add falls back to the empty local
    # store, succeeds, and runs the handler a second time beside the first, in the very
    # process that is running it (self._owned knows it, but is asked only after add fails).
    handler = Recorder()
    handler.delay = threading.Event()
    with RedisServer(tmp_path) as server:
        config = make_config(tmp_path, handler, extra_gateway=f"timestamp_window = 0\n"
                             f"store = {server.url}")
        app = wxgate.make_app(config, reply_deadline=3.0)
        fields = text_message(msg_id="inflight-1")
        answers = []
        first = threading.Thread(target=lambda: answers.append(post(app, fields).status_int))
        first.start()
        assert wait_for(lambda: handler.calls == 1, 10)
        server.kill()
        retry = threading.Thread(target=lambda: answers.append(post(app, fields).status_int))
        retry.start()
        time.sleep(0.5)  # the retry either waits for the first copy or runs the handler
        runs_while_first_ran = handler.calls
        handler.delay.set()
        first.join(10)
        retry.join(10)
        app.close()
    print(f"\nhandler runs while the first copy ran: {runs_while_first_ran}; "
          f"answers {answers}")
    assert runs_while_first_ran == 1, "the retry ran the handler beside the first copy"


# -- attempts cut off by a kill -----------------------------------------------------------------


class WorkerKilled(BaseException):
    """What a kill does to a delivery, in-process: it ends it without settling its claim
    (no ack, retry or burial), as the OOM killer ends a worker mid-handler."""


def test_a_message_that_kills_every_worker_is_not_retried_for_ever(tmp_path, queue_store):
    # An attempt cut off (the worker OOM-killed by this message, a node lost) is no longer
    # counted. Nothing bounds them instead: a poison message is claimed again every
    # queue_visibility_timeout for ever, its user's later messages wait behind it for ever
    # (one at a time per user), its error text grows by a line per cut-off, and no
    # `wxgate queue` command can remove a pending message (the README says "until you
    # remove it").
    # Fixed on main with MAX_CUT_OFFS (5): the worker that claims a message cut off that
    # many times buries it instead of delivering it. So each "worker" here runs its
    # delivery for real and is killed in it, by the handler, rather than only claiming.
    runs = []

    def handler(message):
        runs.append(message["MsgId"])
        raise WorkerKilled()

    config = make_config(tmp_path, extra_gateway=f"timestamp_window = 0\nstore = {queue_store}",
                         extra_app="delivery = queue\nqueue_max_attempts = 3")
    clock = Clock(time.time())
    app = wxgate.make_app(config_with(config, handler), start_worker=False, clock=clock)
    assert post(app, text_message(msg_id="poison-1")).body == b"success"
    worker = app.worker()
    visibility = app.config.queue_visibility_timeout
    for _ in range(30):  # ten times queue_max_attempts, every attempt killed
        try:
            if not worker.run_once():
                break
        except WorkerKilled:
            pass
        clock.advance(visibility + 1)
    stats = app.queue.stats(clock())
    print(f"\nafter 30 workers, each killed by the message: {stats}; handler ran {len(runs)}")
    assert stats["pending"] == 0, "a message cut off 30 times is still being retried"
    assert len(runs) == wxgate.MAX_CUT_OFFS
    (letter,) = app.queue.dead()
    assert f"cut off {wxgate.MAX_CUT_OFFS} times" in letter["error"]
    app.close()


# -- the health check's write -------------------------------------------------------------------


class CountingWrites(wxgate.SqliteStore):
    """A real sqlite store that counts its write transactions."""

    writes = 0

    def _write(self, statements):
        CountingWrites.writes += 1
        return super()._write(statements)


def test_unauthenticated_health_checks_do_not_each_take_the_write_lock(tmp_path):
    # healthz needs no secret, and now writes on every call: each anonymous GET takes
    # sqlite's write lock (BEGIN IMMEDIATE ... COMMIT) that every push needs for its claim,
    # where it used to run SELECT 1. A flood of health checks from anywhere thus competes
    # with pushes for the lock (busy_timeout 2 s, then "database is locked" and 500s), and
    # during a Redis outage each one waits out a connect timeout. One write per interval
    # (say a second) proves the store writable just as well.
    store = CountingWrites(str(tmp_path / "health.db"))
    app = wxgate.make_app(make_config(tmp_path, extra_gateway="timestamp_window = 0"),
                          store=store)
    test = webtest.TestApp(app, lint=True)
    CountingWrites.writes = 0
    for _ in range(50):
        test.get("/_wxgate/healthz", extra_environ={"REMOTE_ADDR": "203.0.113.7"})
    print(f"\n50 anonymous health checks: {CountingWrites.writes} write transactions")
    assert CountingWrites.writes <= 5
    app.close()


# -- list-dead ----------------------------------------------------------------------------------


def test_list_dead_keeps_one_entry_per_attempt_when_an_error_spans_lines(tmp_path,
                                                                         queue_store):
    # Attempts' errors are joined with "\n" and split on "\n" again; the error itself is
    # not cleaned of newlines, and many are multi-line (pydantic's ValidationError, a
    # traceback-like message from a client library). list-dead then shows more "attempts"
    # than were made, and its "error" is only the last line of the last one.
    def handler(message):
        raise ValueError("1 validation error for Order\namount\n  field required")

    config = make_config(tmp_path, extra_gateway=f"timestamp_window = 0\nstore = {queue_store}",
                         extra_app="delivery = queue\nqueue_max_attempts = 2\n"
                                   "queue_retry_base = 0.01\nqueue_retry_max = 0.1")
    clock = Clock(time.time())
    app = wxgate.make_app(config_with(config, handler), start_worker=False, clock=clock)
    assert post(app, text_message(msg_id="multi-line-1")).body == b"success"
    worker = app.worker()
    for _ in range(2):
        assert worker.run_once() is True
        clock.advance(60)
    (letter,) = app.queue.dead()
    print(f"\n{json.dumps(letter, indent=1)}")
    assert letter["attempts"] == 2
    assert len(letter["errors"]) == 2, "one attempt's error was split into several"
    assert letter["error"].startswith("attempt 2: ValueError")
    app.close()


# -- `wxgate serve` starts delivering before it can serve ---------------------------------------


def test_serve_that_cannot_bind_delivers_nothing(tmp_path, backend, queue_store):
    # _serve calls app.start_delivery() before make_server: when the port is taken (a
    # second `wxgate serve` started by mistake, a restart racing the old process), the
    # delivery threads claim queued messages and hand them to the backend, then the
    # process dies of the bind error in the middle of those deliveries. Each is cut off:
    # its claim stays until queue_visibility_timeout, and the backend gets it again then.
    import socket
    source = queue_ini(tmp_path, queue_store, backend)
    app = wxgate.make_app(str(source), start_worker=False)
    for index in range(3):
        assert post(app, text_message(msg_id=f"bind-{index}")).body == b"success"
    backend.delay = 1.0  # a backend that takes a moment, as real ones do
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "wxgate", "serve", str(source),
                                 "--port", str(port)], cwd=REPO, capture_output=True,
                                text=True, timeout=30)
    time.sleep(1.5)  # what the backend was handed meanwhile has arrived
    stats = app.queue.stats(time.time())
    print(f"\nserve on a taken port: exit {result.returncode}; backend got "
          f"{len(backend.received)}; queue {stats}")
    assert result.returncode != 0  # the fault was real
    assert stats["in_flight"] == 0 and not backend.received, \
        "a gateway that never served started delivering, and was cut off"
    app.close()
