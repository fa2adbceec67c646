"""Delivery to business code: HTTP forwarding (sync) and the durable queue (sqlite, Redis)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import webtest

import wxgate
from backend import Backend
from conftest import (APPID, GH_ID, OPENID, REPO, Clock, Recorder, build_push, event_message,
                      free_port, ini_text, make_config, open_reply, text_message, with_handler)

SECRET = "forward-secret-for-tests"


def forward_config(tmp_path, backend, *, extra_app="", extra_gateway="", handler=None,
                   mode="safe", **kwargs):
    app_lines = f"forward = {backend.url}\nforward_secret = {SECRET}\n{extra_app}"
    config = make_config(tmp_path, handler, mode=mode, extra_app=app_lines,
                         extra_gateway="timestamp_window = 0\n" + extra_gateway, **kwargs)
    if handler is None:  # forward only: drop the ini's demo handler
        import dataclasses
        apps = {name: dataclasses.replace(app, handler=None, handler_spec="")
                for name, app in config.apps.items()}
        config = dataclasses.replace(config, apps=apps)
    return config


@pytest.fixture
def backend():
    with Backend(SECRET) as server:
        yield server


def post(app, fields, status=200, **options):
    testapp = webtest.TestApp(app, lint=True)
    query, body = build_push(fields, **options)
    return testapp.post(f"/wechat?{query}", body, content_type="text/xml", status=status)


# -- forwarding, sync ------------------------------------------------------------------------

KINDS = [text_message("你好"), event_message("user_enter_tempsession", SessionFrom="btn"),
         event_message("wxa_media_check", trace_id="t1", result={"suggest": "pass"}),
         dict(event_message("subscribe_msg_popup_event"),
              List=[{"TemplateId": "T1", "SubscribeStatusString": "accept"}])]


@pytest.mark.parametrize("fmt", ["xml", "json"])
@pytest.mark.parametrize("fields", KINDS, ids=lambda f: f.get("Event") or f["MsgType"])
def test_each_kind_is_forwarded_with_a_valid_hmac(tmp_path, backend, fields, fmt):
    app = wxgate.make_app(forward_config(tmp_path, backend))
    assert post(app, fields, fmt=fmt).body == b"success"
    assert backend.rejected == 0
    (body,) = backend.received
    assert body["app"] == "test" and body["format"] == fmt
    assert body["dedup_key"].startswith("test:")
    assert body["message"]["MsgType"] == fields["MsgType"]
    assert body["message"]["FromUserName"] == OPENID
    if "List" in fields:
        assert body["message"]["List"][0]["TemplateId"] == "T1"


@pytest.mark.parametrize("fmt", ["xml", "json"])
def test_backend_reply_is_rendered_and_encrypted(tmp_path, backend, fmt):
    backend.reply = lambda body: {"MsgType": "transfer_customer_service"}
    app = wxgate.make_app(forward_config(tmp_path, backend))
    response = post(app, text_message(), fmt=fmt)
    plaintext, appid, _ = open_reply(response.body, fmt)
    assert appid == APPID
    reply = json.loads(plaintext) if fmt == "json" else plaintext
    if fmt == "json":
        assert reply["MsgType"] == "transfer_customer_service"
        assert reply["ToUserName"] == OPENID and reply["FromUserName"] == GH_ID
    else:
        assert "<MsgType><![CDATA[transfer_customer_service]]></MsgType>" in reply


def test_backend_error_is_a_500_and_the_retry_forwards_again(tmp_path, backend):
    app = wxgate.make_app(forward_config(tmp_path, backend))
    backend.status = 503
    assert post(app, text_message(msg_id="9"), status=500).body == b""
    backend.status = 200
    assert post(app, text_message(msg_id="9")).body == b"success"
    assert backend.keys() == ["test:m:9"]
    post(app, text_message(msg_id="9"))  # now remembered
    assert len(backend.received) == 1


def test_backend_timeout_is_a_500(tmp_path, backend):
    backend.delay = 1.0
    app = wxgate.make_app(forward_config(tmp_path, backend, extra_app="forward_timeout = 0.2"))
    post(app, text_message(), status=500)


def test_backend_checks_the_secret(tmp_path, backend):
    config = forward_config(tmp_path, backend)
    import dataclasses
    wrong = dataclasses.replace(config.apps["test"], forward_secret="not-the-secret")
    app = wxgate.make_app(dataclasses.replace(config, apps={"test": wrong}))
    post(app, text_message(), status=500)
    assert backend.rejected == 1 and backend.received == []


def test_handler_beside_forward_both_run_and_the_handler_reply_wins(tmp_path, backend):
    backend.reply = lambda body: "ignored"
    handler = Recorder(reply={"MsgType": "transfer_customer_service"})
    app = wxgate.make_app(forward_config(tmp_path, backend, handler=handler, mode="plain"))
    body = post(app, text_message(), mode="plain").body
    assert b"transfer_customer_service" in body
    assert handler.calls == 1 and len(backend.received) == 1


def test_forward_needs_a_secret(tmp_path):
    source = tmp_path / "w.ini"
    source.write_text(ini_text(extra_app="forward = http://127.0.0.1:9/wechat"))
    with pytest.raises(wxgate.ConfigError, match="forward_secret"):
        wxgate.load_config(source)


def test_queue_mode_refuses_the_memory_store(tmp_path):
    source = tmp_path / "w.ini"
    source.write_text(ini_text(extra_app="delivery = queue"))
    with pytest.raises(wxgate.ConfigError, match="durable store") as caught:
        wxgate.load_config(source)
    assert caught.value.option == "delivery"


# -- the durable queue -----------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def queue_store(request, tmp_path):
    """The ``store =`` line of a durable store, empty at the start of the test."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/queue.db"
    server = request.getfixturevalue("redis_server")
    import redis
    redis.Redis.from_url(server["url"]).flushdb()
    return server["url"]


QUEUE_APP = ("delivery = queue\nqueue_retry_base = 0.01\nqueue_retry_max = 0.1\n"
             "queue_max_attempts = 1000\n")


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def pushes(count, users=10):
    """``count`` distinct text pushes from ``users`` users, in arrival order."""
    return [text_message(f"n{index}", msg_id=str(10_000 + index),
                         FromUserName=f"user{index % users}") for index in range(count)]


def assert_in_order_per_user(received):
    last = {}
    for body in received:
        user, number = body["message"]["FromUserName"], int(body["message"]["MsgId"])
        assert number > last.get(user, -1), f"{user} got {number} after {last[user]}"
        last[user] = number


def test_500_pushes_acknowledged_while_down_then_delivered_once_in_order(tmp_path, backend,
                                                                         queue_store):
    config = forward_config(tmp_path, backend, extra_app=QUEUE_APP,
                            extra_gateway=f"store = {queue_store}\ndelivery_threads = 2")
    app = wxgate.make_app(config, start_worker=False)
    backend.status = 503
    worker = app.worker()
    worker.start()
    try:
        testapp = webtest.TestApp(app, lint=True)
        for fields in pushes(500):
            query, body = build_push(fields)
            assert testapp.post(f"/wechat?{query}", body, content_type="text/xml").body \
                == b"success"
        # A WeChat retry of an already-queued push is not queued twice.
        query, body = build_push(pushes(1)[0])
        testapp.post(f"/wechat?{query}", body, content_type="text/xml")
        assert backend.received == []
        backend.status = 200
        assert wait_for(lambda: len(backend.received) >= 500), len(backend.received)
        time.sleep(0.2)
    finally:
        worker.stop()
    keys = backend.keys()
    assert len(keys) == 500 and len(set(keys)) == 500
    assert_in_order_per_user(backend.received)
    assert app.queue.stats(time.time()) == {"pending": 0, "in_flight": 0, "dead": 0}
    app.close()


def test_failing_message_goes_to_dead_letters_and_retry_dead_delivers_it(tmp_path, backend,
                                                                         queue_store):
    backend.status = 500
    config_text = ini_text(extra_gateway=f"timestamp_window = 0\nstore = {queue_store}",
                           extra_app=f"forward = {backend.url}\nforward_secret = {SECRET}\n"
                           "delivery = queue\nqueue_max_attempts = 3\nqueue_retry_base = 0.01")
    source = tmp_path / "queue.ini"
    source.write_text(config_text.replace("handler = wxgate:demo_handler", ""))
    app = wxgate.make_app(str(source), start_worker=False)
    post(app, text_message(msg_id="dead-1"))
    worker = app.worker()
    assert wait_for(lambda: worker.run_once() is not None and
                    app.queue.stats(time.time())["dead"] == 1, 20)
    cli = [sys.executable, "-m", "wxgate", "queue", str(source)]
    listed = subprocess.run(cli + ["list-dead"], capture_output=True, text=True, cwd=REPO,
                            check=True).stdout
    letter = json.loads(listed.splitlines()[0])
    assert letter["dedup_key"] == "test:m:dead-1" and letter["attempts"] == 3
    assert "HTTP 500" in letter["error"]
    backend.status = 200
    revived = subprocess.run(cli + ["retry-dead", str(letter["id"])], capture_output=True,
                             text=True, cwd=REPO, check=True).stdout
    assert revived.startswith("1 dead letter")
    assert wait_for(lambda: worker.run_once() is not None and len(backend.received) == 1, 20)
    assert backend.keys() == ["test:m:dead-1"]
    stats = json.loads(subprocess.run(cli + ["stats"], capture_output=True, text=True, cwd=REPO,
                                      check=True).stdout)
    assert stats == {"pending": 0, "in_flight": 0, "dead": 0}
    app.close()


def test_python_handler_in_queue_mode_runs_once_per_message(tmp_path, queue_store):
    handler = Recorder()
    config = make_config(tmp_path, handler, extra_app=QUEUE_APP,
                         extra_gateway=f"timestamp_window = 0\nstore = {queue_store}")
    app = wxgate.make_app(config, start_worker=False)
    for fields in pushes(20, users=3):
        assert post(app, fields).body == b"success"
    assert handler.calls == 0  # nothing ran inline
    worker = app.worker()
    while worker.run_once():
        pass
    assert sorted(m["MsgId"] for m in handler.messages) == sorted(
        str(10_000 + i) for i in range(20))
    app.close()


def test_redelivery_after_a_lost_ack_skips_the_handler(tmp_path, queue_store, clock):
    # A worker ran the handler, then died before acknowledging: the claim expires and the
    # message is delivered again, but the done key in the store keeps the handler from
    # running twice.
    handler = Recorder()
    config = make_config(tmp_path, handler, extra_app=QUEUE_APP,
                         extra_gateway=f"timestamp_window = 0\nstore = {queue_store}\n"
                         "queue_visibility_timeout = 10")
    app = wxgate.make_app(config, start_worker=False, clock=clock)
    post(app, text_message(msg_id="lost-ack"))
    dying = app.worker()
    dying.queue = type("NoAck", (), {"claim": app.queue.claim, "ack": lambda *a: None})()
    assert dying.run_once() and handler.calls == 1
    survivor = app.worker()
    assert survivor.run_once() is False  # hidden while the dead worker's claim lives
    clock.advance(11)
    assert survivor.run_once() is True  # claimed again, attempt 2
    assert handler.calls == 1
    assert app.queue.stats(clock())["pending"] == 0
    app.close()


def test_slow_handler_in_queue_mode_gets_success_at_once(tmp_path, queue_store):
    handler = Recorder()
    handler.delay = threading.Event()  # stands for a 6-second handler
    config = make_config(tmp_path, handler, extra_app=QUEUE_APP,
                         extra_gateway=f"timestamp_window = 0\nstore = {queue_store}")
    app = wxgate.make_app(config)  # delivery threads start with the first request
    try:
        response = post(app, text_message(msg_id="slow"))
        assert response.body == b"success"
        assert wait_for(lambda: handler.calls == 1, 10)
        # The handler is still running and WeChat already has its answer: no retry comes.
        assert app.queue.stats(time.time())["in_flight"] == 1
    finally:
        handler.delay.set()
        assert wait_for(lambda: app.queue.stats(time.time())["pending"] == 0, 10)
        app.close()


# -- a gateway killed mid-delivery ------------------------------------------------------------


def start_gateway(source, port):
    return subprocess.Popen([sys.executable, "-m", "wxgate", "serve", str(source), "--port",
                             str(port)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def port_open(port):
    import socket
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for_port(port, timeout=20):
    return wait_for(lambda: port_open(port), timeout)


def test_gateway_killed_mid_delivery_loses_nothing(tmp_path, backend, queue_store):
    backend.delay = 0.01  # deliveries are in flight when the kill lands
    port = free_port()
    source = tmp_path / "queue.ini"
    source.write_text(ini_text(
        extra_gateway=f"timestamp_window = 0\nstore = {queue_store}\nlisten = 127.0.0.1:{port}\n"
        "queue_visibility_timeout = 2\ndelivery_threads = 2",
        extra_app=f"forward = {backend.url}\nforward_secret = {SECRET}\n" + QUEUE_APP
        + "forward_timeout = 1").replace("handler = wxgate:demo_handler", ""))
    # The deliveries in flight at the kill reappear after queue_visibility_timeout: the
    # shortest the ini allows (above forward_timeout), so the test waits 2 s for them, not 5.
    process = start_gateway(source, port)
    try:
        assert wait_for_port(port)
        sent = pushes(200)  # enough that most are still queued when the kill lands
        for fields in sent:
            query, body = build_push(fields)
            request = urllib.request.Request(f"http://127.0.0.1:{port}/wechat?{query}",
                                             data=body, method="POST")
            with urllib.request.urlopen(request, timeout=5) as response:
                assert response.read() == b"success"
        assert wait_for(lambda: len(backend.received) >= 20, 30)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        delivered_before_restart = len(backend.received)
        assert delivered_before_restart < 200, "the kill came too late to prove anything"
        process = start_gateway(source, port)
        assert wait_for_port(port)
        # No request after the restart: `wxgate serve` starts its delivery threads at once,
        # not on the first request (which may never come while WeChat waits for nothing).
        assert wait_for(lambda: len(set(backend.keys())) == 200, 60), len(backend.received)
    finally:
        process.kill()
        process.wait(10)
    keys = backend.keys()
    repeats = len(keys) - len(set(keys))
    print(f"\nkilled after {delivered_before_restart} deliveries; 200 delivered, "
          f"{repeats} repeated (in flight at the kill, same dedup_key)")
    assert set(keys) == {f"test:m:{10_000 + i}" for i in range(200)}
    assert repeats <= 2  # at most one per delivery thread in flight at the kill


def test_worker_with_delivery_threads_0_delivers_and_stops_on_sigterm(tmp_path, backend,
                                                                      queue_store):
    # The README's advice, delivery_threads = 0 plus `wxgate worker`: the worker delivers
    # with its own thread (never "started with 0 thread(s)"), and stops on SIGTERM saying so.
    source = tmp_path / "queue.ini"
    source.write_text(ini_text(
        extra_gateway=f"timestamp_window = 0\nstore = {queue_store}\ndelivery_threads = 0",
        extra_app=f"forward = {backend.url}\nforward_secret = {SECRET}\n" + QUEUE_APP
    ).replace("handler = wxgate:demo_handler", ""))
    app = wxgate.make_app(str(source))
    for fields in pushes(5):
        post(app, fields)
    assert not [t for t in threading.enumerate() if t.name.startswith("wxgate-delivery")]
    log = tmp_path / "worker.log"
    with open(log, "wb") as output:
        worker = subprocess.Popen([sys.executable, "-m", "wxgate", "worker", str(source)],
                                  cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: len(backend.received) == 5, 20), log.read_text()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0
    finally:
        worker.kill()
        worker.wait(10)
    text = log.read_text()
    assert "started with 1 thread(s)" in text and "stopping on SIGTERM" in text
    assert "Traceback" not in text
    app.close()


def test_cgi_starts_no_delivery_thread_and_warns_once(tmp_path, backend, caplog):
    # Under CGI (wsgi.run_once) the process ends with the response: a delivery thread
    # would be cut off mid-delivery, so none starts, and the log says what to do instead.
    config = forward_config(tmp_path, backend, extra_app=QUEUE_APP,
                            extra_gateway=f"store = sqlite://{tmp_path}/cgi.db")
    app = wxgate.make_app(config)
    testapp = webtest.TestApp(app, lint=True, extra_environ={"wsgi.run_once": True})
    before = {t for t in threading.enumerate() if t.name.startswith("wxgate-delivery")}
    with caplog.at_level("WARNING", "wxgate"):
        for fields in pushes(2):
            query, body = build_push(fields)
            assert testapp.post(f"/wechat?{query}", body, content_type="text/xml").body \
                == b"success"
    started = {t for t in threading.enumerate() if t.name.startswith("wxgate-delivery")}
    assert started == before
    warnings = [r.getMessage() for r in caplog.records if "under CGI" in r.getMessage()]
    assert len(warnings) == 1 and "delivery_threads = 0" in warnings[0]
    app.close()


def test_memory_store_under_cgi_warns_once(tmp_path, caplog):
    app = wxgate.make_app(make_config(tmp_path, Recorder(),
                                      extra_gateway="timestamp_window = 0"))
    testapp = webtest.TestApp(app, lint=True, extra_environ={"wsgi.run_once": True})
    with caplog.at_level("WARNING", "wxgate"):
        for msg_id in ("cgi-1", "cgi-2"):
            query, body = build_push(text_message(msg_id=msg_id))
            testapp.post(f"/wechat?{query}", body, content_type="text/xml")
    warnings = [r.getMessage() for r in caplog.records if "under CGI" in r.getMessage()]
    assert len(warnings) == 1 and "store = sqlite" in warnings[0]


# -- `wxgate worker` and SIGTERM, and dead letters with multi-line errors -------------------


def queue_ini(tmp_path, store, backend):
    """An ini that forwards through the queue on ``store``, with no handler; its path."""
    text = ini_text(extra_gateway=f"timestamp_window = 0\nstore = {store}\n",
                    extra_app=f"forward = {backend.url}\nforward_secret = {SECRET}\n"
                              f"delivery = queue\nqueue_retry_base = 0.01\n"
                              f"queue_retry_max = 0.1\n")
    source = tmp_path / "queue.ini"
    source.write_text(text.replace("handler = wxgate:demo_handler", ""))
    return source


def test_worker_sigterm_lets_the_running_delivery_finish(tmp_path, backend, queue_store):
    # SIGTERM must stop the worker's own delivery threads and let the running delivery end,
    # as the README says ("letting running deliveries finish for up to 5 s"): closing the
    # store under them, or exiting at once, cuts the delivery off.
    source = queue_ini(tmp_path, queue_store, backend)
    app = wxgate.make_app(str(source), start_worker=False)
    assert post(app, text_message(msg_id="term-1")).body == b"success"
    taken = threading.Event()

    def slow(body):
        taken.set()
        time.sleep(0.5)  # well inside the 5 s the README promises
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
    # The backend answered 204 within 0.5 s: the message must be acknowledged, not left
    # claimed (to be delivered a second time after queue_visibility_timeout).
    assert stats["pending"] == 0, "SIGTERM cut the running delivery off"
    app.close()


def test_list_dead_keeps_one_entry_per_attempt_when_an_error_spans_lines(tmp_path,
                                                                         queue_store):
    # Attempts' errors are kept one per attempt, though many errors span lines (pydantic's
    # ValidationError, a traceback-like message from a client library): list-dead must not
    # show more "attempts" than were made, nor only the last line of the last one.
    def handler(message):
        raise ValueError("1 validation error for Order\namount\n  field required")

    config = make_config(tmp_path, extra_gateway=f"timestamp_window = 0\nstore = {queue_store}",
                         extra_app="delivery = queue\nqueue_max_attempts = 2\n"
                                   "queue_retry_base = 0.01\nqueue_retry_max = 0.1")
    clock = Clock(time.time())
    app = wxgate.make_app(with_handler(config, handler), start_worker=False, clock=clock)
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


# -- closing a gateway with a queue ------------------------------------------------------------


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_close_releases_the_sqlite_queue_connections(tmp_path, backend):
    # The queue keeps its own sqlite connections (synchronous=FULL): close() must release
    # them as it does the store's, or each gateway made and closed (a test, a reload) keeps
    # 3 descriptors (db, -wal, -shm) per idle connection until the garbage collector runs,
    # and Python 3.13 warns then ("unclosed database").
    database = tmp_path / "close.db"

    def descriptors_on_the_database():
        found = []
        for name in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{name}")
            except OSError:  # closed meanwhile (the listing's own descriptor, for one)
                continue
            if target.startswith(str(database)):
                found.append(target)
        return found

    config = forward_config(tmp_path, backend, extra_app=QUEUE_APP,
                            extra_gateway=f"store = sqlite://{database}")
    app = wxgate.make_app(config, start_worker=False)
    post(app, pushes(1)[0])
    assert app.queue.stats(time.time())["pending"] == 1
    assert descriptors_on_the_database()  # the gateway has the file open
    app.close()
    assert descriptors_on_the_database() == []
