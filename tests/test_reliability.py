"""Reliability: nothing acknowledged is lost, nothing handled runs again.

Each test runs against real parts: a second sqlite connection holding the write lock, a
trigger that stalls the queue's insert, a redis-server the test kills and restarts, a tmpfs
that fills up in a private mount namespace (tests/faults.py), gunicorn, ``wxgate serve`` and
``wxgate worker`` processes killed with SIGKILL or sent SIGTERM. No hook inside wxgate; a
store whose writes fail on cue stands in for a full disk only where the fault must land at
one exact moment (as tests/test_stores.py's BrokenStore does).
bench/outage.py runs the same faults at a larger scale and prints the counts.
"""

import concurrent.futures
import http.client
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid

import pytest

import wxgate
from backend import Backend
from conftest import (REPO, Clock, Recorder, build_push, free_port, ini_text, make_config,
                      text_message, with_handler)
from faults import (STALL_QUEUE_INSERTS, UNSTALL_QUEUE_INSERTS, RedisServer, post, small_disk,
                    sqlite_locked, sqlite_rows, wait_for)
from serving import start_gunicorn, stop

SECRET = "forward-secret-for-tests"

HANDLER = '''
import os, time

def record(message):
    # One line per handler run, appended atomically: the test counts them per key.
    with open(os.environ["WXGATE_TEST_RECORD"], "a") as file:
        file.write(message.dedup_key + "\\n")
    time.sleep(float(os.environ.get("WXGATE_TEST_DELAY", "0")))
    return None
'''


def messages(count, start=0, prefix="r"):
    return [text_message(f"{prefix}{index}", msg_id=str(70_000 + index),
                         FromUserName=f"user-{index % 7}") for index in range(start, count)]


def key_of(fields):
    return f"test:m:{fields['MsgId']}"


def send(base_url, fields, timeout=10):
    """One push over a fresh connection; return (status, body), or (None, b"") when the
    connection failed or timed out (WeChat then retries)."""
    query, body = build_push(fields)
    host = urllib.parse.urlsplit(base_url).netloc
    connection = http.client.HTTPConnection(host, timeout=timeout)
    try:
        connection.request("POST", f"/wechat?{query}", body, {"Content-Type": "text/xml"})
        response = connection.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None, b""
    finally:
        connection.close()


def get(base_url, path, timeout=10):
    host = urllib.parse.urlsplit(base_url).netloc
    connection = http.client.HTTPConnection(host, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def port_open(port):
    import socket
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def handler_module(tmp_path):
    """Write the recording handler beside the ini; return (module name, record file)."""
    module = f"reliability_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(HANDLER)
    record = tmp_path / "record.txt"
    record.write_text("")
    return module, record


def runs_of(record):
    runs = {}
    for key in record.read_text().split():
        runs[key] = runs.get(key, 0) + 1
    return runs


def write_ini(tmp_path, *, store, module=None, extra_gateway="", extra_app="", name="r.ini"):
    text = ini_text(extra_gateway=f"timestamp_window = 0\nstore = {store}\n{extra_gateway}",
                    extra_app=extra_app)
    handler = f"handler = {module}:record" if module else ""
    source = tmp_path / name
    source.write_text(text.replace("handler = wxgate:demo_handler", handler))
    return source


def serve_command(source, port):
    return [sys.executable, "-m", "wxgate", "serve", str(source), "--port", str(port)]


# -- success only once the message is durably queued -------------------------------------------


QUEUE_APP = (f"delivery = queue\nqueue_retry_base = 0.01\nqueue_retry_max = 0.1\n"
             f"forward_secret = {SECRET}\n")


def queue_app(tmp_path, backend, store_url, **options):
    source = write_ini(tmp_path, store=store_url,
                       extra_app=f"forward = {backend.url}\n{QUEUE_APP}")
    return wxgate.make_app(str(source), start_worker=False, **options), source


def queued_keys(app):
    """The dedup keys of every message in the queue, live or dead."""
    queue = app.queue
    if isinstance(queue, wxgate._SqliteQueue):
        rows = queue.store.query("SELECT payload FROM wxgate_queue")
        return [json.loads(payload)["dedup_key"] for (payload,) in rows]
    keys = []
    for name in queue.redis.scan_iter(f"{queue.prefix}:q:msg:*"):
        payload = queue.redis.hget(name, "payload")
        keys.append(json.loads(payload)["dedup_key"])
    return keys


def concurrent_pushes(app, fields, count=2, stagger=0.3):
    """Send ``count`` copies of one push from threads, ``stagger`` s apart (WeChat's retry
    of a slow answer, or a second worker's copy); return their (status, body)."""
    results = [None] * count

    def deliver(index):
        response = post(app, fields)
        results[index] = (response.status_int, response.body)

    threads = [threading.Thread(target=deliver, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
        time.sleep(stagger)
    for thread in threads:
        thread.join(30)
    return results


@pytest.fixture
def backend():
    with Backend(SECRET) as server:
        yield server


def test_success_only_once_durably_queued_sqlite_locked(tmp_path, backend):
    # Another program holds the database's write lock: the first copy's marker and insert
    # each wait the busy timeout, then fail ("database is locked"); a duplicate arriving
    # meanwhile must not be told success for a message that is not in the queue.
    # A short busy timeout (2 s by default; the copies 0.1 s apart instead of 0.3 s): how
    # long each write waits is not what is tested.
    store = wxgate.SqliteStore(str(tmp_path / "queue.db"), busy_timeout=0.4)
    app, _ = queue_app(tmp_path, backend, f"sqlite://{tmp_path}/queue.db", store=store)
    fields = text_message(msg_id="locked-1")
    with sqlite_locked(tmp_path / "queue.db"):
        results = concurrent_pushes(app, fields, stagger=0.1)
    queued = queued_keys(app)
    statuses = [status for status, _ in results]
    print(f"\nstatuses while locked: {statuses}; queued afterwards: {queued}")
    assert 500 in statuses  # the fault was real: the first copy could not be queued
    if any(status == 200 for status in statuses):
        assert queued.count(key_of(fields)) == 1, "success was sent for a message not queued"
    # WeChat's next retry, with the lock gone, queues it (or finds it queued): exactly once.
    assert post(app, fields).status_int == 200
    assert queued_keys(app).count(key_of(fields)) == 1
    app.close()


def test_success_only_once_durably_queued_redis_paused(tmp_path, backend, monkeypatch):
    # The gateway goes back to Redis sooner than STORE_RETRY_AFTER's 2 s: when is not tested.
    monkeypatch.setattr(wxgate, "STORE_RETRY_AFTER", 0.3)
    with RedisServer(tmp_path) as server:
        app, _ = queue_app(tmp_path, backend, server.url)
        fields = text_message(msg_id="paused-1")
        control = server.client()
        # Redis stops answering for 2.5 s (a failover, a fork on a big dataset): the
        # gateway's commands time out after its 1-s socket timeout.
        control.execute_command("CLIENT", "PAUSE", 2500)
        results = concurrent_pushes(app, fields)
        wait_for(lambda: control.ping(), 5)
        time.sleep(wxgate.STORE_RETRY_AFTER + 0.5)  # the gateway goes back to Redis
        queued = queued_keys(app)
        statuses = [status for status, _ in results]
        print(f"\nstatuses while paused: {statuses}; queued afterwards: {queued}")
        if any(status == 200 for status in statuses):
            assert queued.count(key_of(fields)) == 1, "success was sent for a message not queued"
        # WeChat retries until one answer is success; then it is in the queue, once.
        for _ in range(3):
            if post(app, fields).status_int == 200:
                break
        assert queued_keys(app).count(key_of(fields)) == 1
        app.close()
        control.close()


def test_gateway_killed_during_the_insert_loses_nothing_sqlite(tmp_path, backend):
    port = free_port()
    database = tmp_path / "queue.db"
    source = write_ini(tmp_path, store=f"sqlite://{database}",
                       extra_gateway="queue_visibility_timeout = 5\ndelivery_threads = 1",
                       extra_app=f"forward = {backend.url}\nforward_timeout = 2\n{QUEUE_APP}")
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen(serve_command(source, port), cwd=REPO, stdout=log,
                               stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    fields = text_message(msg_id="killed-1")
    try:
        assert wait_for(lambda: port_open(port))
        assert wait_for(lambda: sqlite_rows(database, "SELECT name FROM sqlite_master WHERE"
                                            " name = 'wxgate_queue'"))
        # Every insert into the queue now stalls, holding the write lock, until the process
        # doing it dies: the gateway is caught between acknowledging and queueing.
        sqlite_rows(database, STALL_QUEUE_INSERTS)
        first = concurrent.futures.ThreadPoolExecutor(1).submit(send, base_url, fields, 30)
        marker = "SELECT key FROM wxgate_kv WHERE key LIKE '%:queued:%'"
        assert wait_for(lambda: sqlite_rows(database, marker), 10), "no marker was written"
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        assert first.result(10)[0] is None  # the kill cut the first delivery off
        assert sqlite_rows(database, "SELECT count(*) FROM wxgate_queue") == [(0,)]
        sqlite_rows(database, UNSTALL_QUEUE_INSERTS)
        process = subprocess.Popen(serve_command(source, port), cwd=REPO, stdout=log,
                                   stderr=subprocess.STDOUT)
        assert wait_for(lambda: port_open(port))
        # WeChat's two retries: at least one must make the message reach the backend.
        statuses = [send(base_url, fields)[0] for _ in range(2)]
        print(f"\nretries after the kill: {statuses}")
        assert 200 in statuses
        assert wait_for(lambda: key_of(fields) in backend.keys(), 8), \
            f"answered {statuses}, but the backend never got the message"
    finally:
        process.kill()
        process.wait(10)
        log.close()


# -- while the shared store fails, nothing handled runs again ----------------------------------


def count_reruns(app, handler, batch):
    """Resend each message of ``batch`` once; return how many ran the handler again."""
    before = handler.calls
    for fields in batch:
        assert post(app, fields).status_int == 200
    return handler.calls - before


def test_redis_outage_runs_nothing_twice_on_one_process(tmp_path, monkeypatch):
    # The gateway goes back to Redis sooner than STORE_RETRY_AFTER's 2 s: when is not tested.
    monkeypatch.setattr(wxgate, "STORE_RETRY_AFTER", 0.3)
    handler = Recorder()
    with RedisServer(tmp_path) as server:
        config = make_config(tmp_path, handler, extra_gateway=f"timestamp_window = 0\n"
                             f"store = {server.url}")
        app = wxgate.make_app(config)
        before, during = messages(10), messages(20, 10)
        for fields in before:
            assert post(app, fields).status_int == 200
        assert handler.calls == 10
        server.kill()
        rerun_before = count_reruns(app, handler, before)  # WeChat's retries
        for fields in during:
            assert post(app, fields).status_int == 200  # availability is kept
        server.start()  # its append-only file brings back what it held
        time.sleep(wxgate.STORE_RETRY_AFTER + 0.5)
        rerun_during = count_reruns(app, handler, during)
        rerun_before_after = count_reruns(app, handler, before)
        app.close()
    print(f"\nhandled before the outage, ran again during it: {rerun_before}/10; handled "
          f"during it, ran again after recovery: {rerun_during}/10; before, after: "
          f"{rerun_before_after}/10")
    assert rerun_before_after == 0  # (holds today: Redis kept them)
    assert (rerun_before, rerun_during) == (0, 0)


def disk_gateway(tmp_path, module, record, **extra):
    """``wxgate serve`` with its sqlite store on a 2 MB tmpfs (see faults.small_disk)."""
    port = free_port()
    database = tmp_path.resolve() / "tmpfs" / "wxgate.db"
    source = write_ini(tmp_path, store=f"sqlite://{database}", module=module, **extra)
    return port, small_disk(tmp_path, serve_command(source, port), size="2m",
                            env={"WXGATE_TEST_RECORD": str(record), "PYTHONPATH": str(REPO)})


def test_full_disk_runs_nothing_twice_on_one_process(tmp_path):
    module, record = handler_module(tmp_path)
    port, disk_context = disk_gateway(tmp_path, module, record)
    base_url = f"http://127.0.0.1:{port}"
    with disk_context as disk:
        assert wait_for(lambda: port_open(port))
        before, during = messages(10), messages(20, 10)
        assert [send(base_url, fields)[0] for fields in before] == [200] * 10
        disk.fill()
        # New pushes keep coming (their writes fail), and WeChat's retries of the earlier.
        assert [send(base_url, fields)[0] for fields in during] == [200] * 10
        assert [send(base_url, fields)[0] for fields in before] == [200] * 10
        rerun_before = sum(runs_of(record).get(key_of(f), 0) - 1 for f in before)
        disk.free()
        time.sleep(wxgate.STORE_RETRY_AFTER + 0.5)
        assert [send(base_url, fields)[0] for fields in during] == [200] * 10
        rerun_during = sum(runs_of(record).get(key_of(f), 0) - 1 for f in during)
        log = disk.process.log_path.read_text("utf-8", "replace")
    print(f"\nhandled before the disk filled, ran again while full: {rerun_before}/10; "
          f"handled while full, ran again with room: {rerun_during}/10")
    assert "SqliteStore failed" in log  # the fault was real
    assert (rerun_before, rerun_during) == (0, 0)


# -- healthz while the sqlite disk is full -----------------------------------------------------


def test_healthz_is_not_200_while_the_disk_is_full(tmp_path):
    module, record = handler_module(tmp_path)
    port, disk_context = disk_gateway(tmp_path, module, record)
    base_url = f"http://127.0.0.1:{port}"
    with disk_context as disk:
        assert wait_for(lambda: port_open(port))
        assert send(base_url, messages(1)[0])[0] == 200
        assert get(base_url, "/_wxgate/healthz")[0] == 200
        disk.fill()
        # healthz writes at most once per HEALTH_CHECK_EVERY (a flood of probes must not
        # take sqlite's write lock from pushes): the next check past it is one that writes.
        time.sleep(wxgate.HEALTH_CHECK_EVERY + 0.1)
        full = [get(base_url, "/_wxgate/healthz")[0]]
        assert send(base_url, messages(2, 1)[0])[0] == 200  # a write fails (and falls back)
        full.append(get(base_url, "/_wxgate/healthz")[0])
        disk.free()
        # Back to 200 once a write succeeds again (a push's, or the check's own).
        send(base_url, messages(3, 2)[0])
        recovered = wait_for(lambda: (send(base_url, messages(4, 3)[0]) and
                                      get(base_url, "/_wxgate/healthz")[0] == 200), 10, 0.5)
    print(f"\nhealthz while the disk was full: {full}")
    assert 200 not in full
    assert recovered


# -- the log names the real cause --------------------------------------------------------------


def test_full_disk_log_names_the_real_cause(tmp_path):
    module, record = handler_module(tmp_path)
    port, disk_context = disk_gateway(tmp_path, module, record)
    base_url = f"http://127.0.0.1:{port}"
    with disk_context as disk:
        assert wait_for(lambda: port_open(port))
        assert send(base_url, messages(1)[0])[0] == 200
        disk.fill()
        assert send(base_url, messages(2, 1)[0])[0] == 200
        log = disk.process.log_path.read_text("utf-8", "replace")
    failures = [line for line in log.splitlines() if "failed" in line and "store" in line]
    print("\n" + "\n".join(failures))
    assert failures, log[-2000:]
    assert all("database or disk is full" in line for line in failures)
    assert "cannot rollback" not in log


# -- a takeover after the push deadline --------------------------------------------------------


def test_takeover_after_the_deadline_is_refused(tmp_path):
    # A worker claimed the message and was killed: its claim stays in the store until it
    # expires. WeChat's retry waits for it; the claim expires only once the retry's reply
    # deadline has passed (its last poll overslept: a busy machine, a slow store). WeChat
    # has stopped listening by then, so the retry must answer the deadline refusal (503)
    # and leave the message to the next retry, not run the handler for nobody.
    clock = Clock()
    handler = Recorder()
    config = make_config(tmp_path, handler, extra_gateway="store = sqlite://" +
                         str(tmp_path / "claims.db"))
    fields = text_message(msg_id="takeover-1")
    killed_worker = wxgate.SqliteStore(str(tmp_path / "claims.db"), clock=clock)
    store_key = f"{config.store_prefix}:dedup:{key_of(fields)}"
    assert killed_worker.add(store_key, "p999.dead.0", wxgate.CLAIM_TTL)
    deadline = 0.5
    sent_at = []

    def oversleeping(seconds):
        # Sleep as asked; the sleep that reaches the deadline overshoots it by far, and
        # the dead worker's claim expires meanwhile (the store's clock moves on).
        time.sleep(seconds)
        if time.monotonic() + wxgate.POLL_INTERVAL >= sent_at[0] + deadline:
            time.sleep(deadline + 0.5)
            clock.advance(wxgate.CLAIM_TTL + 1)

    app = wxgate.make_app(config, clock=clock, sleep=oversleeping, reply_deadline=deadline)
    sent_at.append(time.monotonic())
    response = post(app, fields)
    answered_after = time.monotonic() - sent_at[0]
    print(f"\nretry answered {response.status_int} after {answered_after:.2f} s "
          f"(deadline {deadline} s); handler runs: {handler.calls}")
    assert response.status_int == 503
    assert handler.calls == 0
    app.close()
    killed_worker.close()


# -- store = memory with several workers -------------------------------------------------------


def test_memory_store_under_several_workers_warns_at_start(tmp_path):
    module, record = handler_module(tmp_path)
    source = write_ini(tmp_path, store="memory", module=module)
    env = {"WXGATE_TEST_RECORD": str(record)}
    logs = {}
    for label, workers, extra in (("one", 1, ["--threads", "4"]), ("four", 4, [])):
        base_url, process = start_gunicorn(source, workers=workers, extra_args=extra,
                                           env=dict(env, GUNICORN_CMD_ARGS=f"-w {workers}"))
        try:
            # wxgate:application builds the app on its first request, in each worker.
            for fields in messages(8, prefix=label):
                send(base_url, fields)
            get(base_url, "/_wxgate/healthz")
        finally:
            stop(process)
        logs[label] = [line for line in process.log_path.read_text().splitlines()
                       if "WARNING" in line and "memory" in line.lower()]
    print(f"\nmemory-store warnings: {logs}")
    assert logs["one"] == []  # one process: memory is right, no warning
    assert logs["four"], "four workers with store = memory: expected a WARNING line"


@pytest.mark.parametrize("argv, environ, expected", [
    (["gunicorn", "-w", "4"], {}, "gunicorn with 4 workers"),
    (["gunicorn", "--workers=3"], {}, "gunicorn with 3 workers"),
    (["gunicorn"], {"GUNICORN_CMD_ARGS": "-w 2 --threads 4"}, "gunicorn with 2 workers"),
    (["gunicorn"], {"WEB_CONCURRENCY": "5"}, "gunicorn with 5 workers"),
    (["gunicorn", "-w", "1", "--threads", "4"], {"GUNICORN_CMD_ARGS": "-w 1"}, ""),
    (["gunicorn", "-w", "4"], {"GUNICORN_CMD_ARGS": "-w 1"}, ""),  # the environment's last
], ids=["-w 4", "--workers=3", "GUNICORN_CMD_ARGS", "WEB_CONCURRENCY", "one worker, threads",
        "last setting wins"])
def test_several_gunicorn_workers_are_recognised(argv, environ, expected):
    assert wxgate._worker_processes(argv, environ, True) == expected


# -- dead letters, and attempts cut off by a kill ----------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def queue_store(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/queue.db"
    server = request.getfixturevalue("redis_server")
    import redis
    redis.Redis.from_url(server["url"]).flushdb()
    return server["url"]


def test_attempt_cut_off_by_a_kill_does_not_count(tmp_path, backend, queue_store):
    source = write_ini(tmp_path, store=queue_store, extra_gateway="queue_visibility_timeout = 3",
                       extra_app=f"forward = {backend.url}\nforward_timeout = 2\n{QUEUE_APP}"
                       "queue_max_attempts = 2\n")
    app = wxgate.make_app(str(source), start_worker=False)
    fields = text_message(msg_id="cut-1")
    assert post(app, fields).body == b"success"
    taken = threading.Event()

    def accept_then_hang(body):
        taken.set()  # the backend has the message and will answer 204 ...
        time.sleep(2)  # ... to a worker that is killed before it reads the answer
        return None

    backend.reply = accept_then_hang
    worker = subprocess.Popen([sys.executable, "-m", "wxgate", "worker", str(source)],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert taken.wait(20), "the worker never delivered"
    finally:
        worker.kill()
        worker.wait(10)
    backend.reply = lambda body: None
    backend.status = 503  # the backend is flaky: the next attempt fails for real
    # The killed worker's claim is left to expire: this gateway's clock is past it.
    later = Clock(time.time() + 60)
    survivor = wxgate.make_app(str(source), start_worker=False, clock=later).worker()
    assert survivor.run_once() is True
    backend.status = 200
    later.advance(60)
    while survivor.run_once():
        later.advance(60)
    stats = survivor.queue.stats(later())
    dead = survivor.queue.dead()
    print(f"\nafter the kill, one 503 and a healthy backend: {stats}, dead letters {dead}")
    assert dead == [], "buried after one failed attempt: the cut-off attempt was counted"
    assert backend.keys().count(key_of(fields)) >= 2  # taken before the kill, then delivered
    app.close()


@pytest.mark.parametrize("cut_offs", [wxgate.MAX_CUT_OFFS - 1, wxgate.MAX_CUT_OFFS])
def test_a_message_cut_off_every_time_is_buried_after_max_cut_offs(tmp_path, backend,
                                                                    queue_store, cut_offs):
    # Cut-off attempts are not counted as attempts, so a message that kills its worker every
    # time (a handler that exhausts memory) must still end, buried after MAX_CUT_OFFS. Each
    # claim below is left as a killed worker leaves it: taken, never settled, expired by the
    # clock.
    source = write_ini(tmp_path, store=queue_store,
                       extra_app=f"forward = {backend.url}\n{QUEUE_APP}")
    clock = Clock(time.time())
    app = wxgate.make_app(str(source), start_worker=False, clock=clock)
    fields = text_message(msg_id=f"killer-{cut_offs}")
    assert post(app, fields).body == b"success"
    worker = app.worker()
    visibility = app.config.queue_visibility_timeout
    for _ in range(cut_offs):
        assert worker.queue.claim(clock(), visibility) is not None
        clock.advance(visibility + 1)
    assert worker.run_once() is True
    dead = worker.queue.dead()
    if cut_offs < wxgate.MAX_CUT_OFFS:  # still delivered: a deploy or two may cut it off
        assert dead == [] and backend.keys().count(key_of(fields)) == 1
    else:
        (letter,) = dead
        assert letter["dedup_key"] == key_of(fields) and backend.keys() == []
        assert f"cut off {cut_offs} times" in letter["error"]
        assert "worker crash or kill" in letter["error"]
        assert worker.run_once() is False  # gone from the queue, not retried
    app.close()


def test_list_dead_shows_the_error_of_each_attempt(tmp_path, backend, queue_store):
    source = write_ini(tmp_path, store=queue_store,
                       extra_app=f"forward = {backend.url}\n{QUEUE_APP}queue_max_attempts = 2\n")
    clock = Clock(time.time())
    app = wxgate.make_app(str(source), start_worker=False, clock=clock)
    assert post(app, text_message(msg_id="dead-errors")).body == b"success"
    worker = app.worker()
    for status in (500, 503):
        backend.status = status
        assert worker.run_once() is True
        clock.advance(60)
    listed = subprocess.run([sys.executable, "-m", "wxgate", "queue", str(source), "list-dead"],
                            capture_output=True, text=True, cwd=REPO, check=True).stdout
    print(f"\n{listed}")
    (line,) = listed.splitlines()
    assert "HTTP 500" in line and "HTTP 503" in line
    app.close()


# -- the write-back after an outage, and a retry while the first copy runs ------------------


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


def test_write_back_replaces_this_process_own_claim(tmp_path, monkeypatch):
    # The disk fills while a handler runs: its claim is already in sqlite, its "done" is
    # not (the set fails, goes to the journal). The disk gets room again a moment later,
    # before the claim's CLAIM_TTL is over. The write-back must replace the process's own
    # claim with "done" (an add would fail on it): otherwise, once the claim expires,
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

    first = wxgate.make_app(with_handler(config, fill_the_disk_meanwhile), clock=clock,
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
    second = wxgate.make_app(with_handler(config, other), clock=clock,
                             store=wxgate.SqliteStore(database, clock=clock))
    assert post(second, fields).status_int == 200  # WeChat's retry, on another process
    assert other.calls == 0, "handled during the outage, and run again after it"
    first.close()
    second.close()


def test_redis_dies_while_a_handler_runs_and_its_retry_on_this_process_waits(tmp_path):
    # A retry landing on the same process is always caught. Redis dies while the handler
    # runs (a slow handler: WeChat's retry comes at 5 s): the retry's add falls back to the
    # empty local store, and must still not run the handler a second time beside the first
    # in the very process that is running it (this process knows its own claims).
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


# -- a message that kills every worker, and `wxgate serve` on a taken port ------------------


class WorkerKilled(BaseException):
    """What a kill does to a delivery, in-process: it ends it without settling its claim
    (no ack, retry or burial), as the OOM killer ends a worker mid-handler."""


def test_a_message_that_kills_every_worker_is_not_retried_for_ever(tmp_path, queue_store):
    # An attempt cut off (the worker OOM-killed by this message, a node lost) is not counted
    # as an attempt. Were nothing to bound them instead, a poison message would be claimed
    # again every queue_visibility_timeout for ever, its user's later messages would wait
    # behind it for ever (one at a time per user), and its error text would grow by a line
    # per cut-off. The worker that claims a message cut off MAX_CUT_OFFS times buries it
    # instead of delivering it, so each "worker" here runs its delivery for real and is
    # killed in it, by the handler, rather than only claiming.
    runs = []

    def handler(message):
        runs.append(message["MsgId"])
        raise WorkerKilled()

    config = make_config(tmp_path, extra_gateway=f"timestamp_window = 0\nstore = {queue_store}",
                         extra_app="delivery = queue\nqueue_max_attempts = 3")
    clock = Clock(time.time())
    app = wxgate.make_app(with_handler(config, handler), start_worker=False, clock=clock)
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


def test_serve_that_cannot_bind_delivers_nothing(tmp_path, backend, queue_store):
    # When the port is taken (a second `wxgate serve` started by mistake, a restart racing
    # the old process), serve must fail before its delivery threads start: else they claim
    # queued messages and hand them to the backend, then the process dies of the bind error
    # in the middle of those deliveries. Each would be cut off, its claim left until
    # queue_visibility_timeout, and the backend would get it again then.
    import socket
    source = write_ini(tmp_path, store=queue_store,
                       extra_app=f"forward = {backend.url}\n{QUEUE_APP}")
    app = wxgate.make_app(str(source), start_worker=False)
    for index in range(3):
        assert post(app, text_message(msg_id=f"bind-{index}")).body == b"success"
    backend.delay = 0.3  # a backend that takes a moment, as real ones do
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "wxgate", "serve", str(source),
                                 "--port", str(port)], cwd=REPO, capture_output=True,
                                text=True, timeout=30)
    time.sleep(0.8)  # what the backend was handed meanwhile has arrived (after its delay)
    stats = app.queue.stats(time.time())
    print(f"\nserve on a taken port: exit {result.returncode}; backend got "
          f"{len(backend.received)}; queue {stats}")
    assert result.returncode != 0  # the fault was real
    assert stats["in_flight"] == 0 and not backend.received, \
        "a gateway that never served started delivering, and was cut off"
    app.close()
