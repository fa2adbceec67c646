"""/_wxgate/metrics adds up the counts of every worker process of a gateway.

Each process keeps its own counters and adds what it counted since its last flush to totals
in the shared store (sqlite or Redis), at most once a second and at exit; a scrape, from any
worker, shows those totals. Real gunicorn, real redis-server, real sqlite files.
"""

import http.client
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import uuid

import pytest
import webtest

import wxgate
from conftest import REPO, Recorder, build_push, ini_text, make_config, text_message
from faults import RedisServer
from serving import start_gunicorn, stop
from test_ops import parse_metrics, value

HANDLER = "def handle(message):\n    return None\n"
# The session's redis-server also serves other tests' gateways, whose metrics threads add to
# their own store_prefix's totals ("wxgate:metrics" by default): these tests keep a key apart.
KEY = f"metrics-{uuid.uuid4().hex[:8]}:metrics"
PUSHES = "wxgate_pushes_total"
HANDLED = {"app": "test", "type": "text", "outcome": "handled"}
LOOPBACK = {"REMOTE_ADDR": "127.0.0.1"}


def request(base_url, method, target, body=None):
    """One request over a fresh connection (gunicorn's sync workers close it anyway)."""
    connection = http.client.HTTPConnection(urllib.parse.urlsplit(base_url).netloc, timeout=10)
    try:
        connection.request(method, target, body, {"Content-Type": "text/xml"} if body else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def scrape(base_url):
    status, body = request(base_url, "GET", "/_wxgate/metrics")
    assert status == 200, body
    return parse_metrics(body.decode("utf-8"))


def counter_samples(scraped):
    """The samples that may only grow: counters, and histograms' buckets, sums and counts."""
    types, samples = scraped
    growing = {family for family, kind in types.items() if kind in ("counter", "histogram")}
    return {key: value for key, value in samples.items()
            if key[0] in growing or key[0].rsplit("_", 1)[0] in growing}


def family_sum(scraped, family="wxgate_pushes_total"):
    return sum(value for (name, _), value in scraped[1].items() if name == family)


def pushes_total(scraped):
    return family_sum(scraped)


def falls(scrapes, family):
    """How many times a family's sum went down from one scrape to the next."""
    sums = [family_sum(scraped, family) for scraped in scrapes]
    return sum(after < before for before, after in zip(sums, sums[1:]))


def decreases(scrapes):
    """``(series, before, after)`` for each sample lower than in the scrape before it (a
    sample that vanished counts as 0)."""
    found = []
    for before, after in zip(scrapes, scrapes[1:]):
        for key, value in before.items():
            if after.get(key, 0.0) < value:
                found.append((key, value, after.get(key, 0.0)))
    return found


# -- the exposition text ---------------------------------------------------------------------

# What one process that counted COUNTS renders (the text wxgate has always rendered).
RENDERED = (
    '# HELP wxgate_pushes_total Pushes answered, by app, message type and outcome.\n'
    '# TYPE wxgate_pushes_total counter\n'
    'wxgate_pushes_total{app="test",outcome="duplicate",type="other"} 1\n'
    'wxgate_pushes_total{app="test",outcome="handled",type="text"} 2\n'
    '# HELP wxgate_refused_total Requests refused, by app, status and WeChat code.\n'
    '# TYPE wxgate_refused_total counter\n'
    'wxgate_refused_total{app="test",code="",status="400"} 1\n'
    'wxgate_refused_total{app="test",code="-40001",status="403"} 1\n'
    '# HELP wxgate_handler_seconds Time in business code (handler or forward).\n'
    '# TYPE wxgate_handler_seconds histogram\n'
    'wxgate_handler_seconds_bucket{app="test",le="0.005"} 1\n'
    'wxgate_handler_seconds_bucket{app="test",le="0.01"} 1\n'
    'wxgate_handler_seconds_bucket{app="test",le="0.025"} 1\n'
    'wxgate_handler_seconds_bucket{app="test",le="0.05"} 1\n'
    'wxgate_handler_seconds_bucket{app="test",le="0.1"} 1\n'
    'wxgate_handler_seconds_bucket{app="test",le="0.25"} 1\n'
    'wxgate_handler_seconds_bucket{app="test",le="0.5"} 2\n'
    'wxgate_handler_seconds_bucket{app="test",le="1.0"} 2\n'
    'wxgate_handler_seconds_bucket{app="test",le="2.5"} 2\n'
    'wxgate_handler_seconds_bucket{app="test",le="5.0"} 2\n'
    'wxgate_handler_seconds_bucket{app="test",le="10.0"} 2\n'
    'wxgate_handler_seconds_bucket{app="test",le="+Inf"} 2\n'
    'wxgate_handler_seconds_sum{app="test"} 0.504\n'
    'wxgate_handler_seconds_count{app="test"} 2\n'
    'wxgate_handler_seconds_bucket{app="we\\"ird\\\\x\\n",le="0.005"} 0\n'
    'wxgate_handler_seconds_bucket{app="we\\"ird\\\\x\\n",le="0.01"} 0\n'
    'wxgate_handler_seconds_bucket{app="we\\"ird\\\\x\\n",le="0.025"} 0\n'
    'wxgate_handler_seconds_bucket{app="we\\"ird\\\\x\\n",le="0.05"} 0\n'
    'wxgate_handler_seconds_bucket{app="we\\"ird\\\\x\\n",le="0.1"} 0\n'
    'wxgate_handler_seconds_bucket{app="we\\"ird\\\\x\\n",le="0.25"} 1\n'
    'wxgate_handler_seconds_bucket{app="we\\"ird\\\\x\\n",le="0.5"} 1\n'
    'wxgate_handler_seconds_bucket{app="we\\"ird\\\\x\\n",le="1.0"} 1\n'
    'wxgate_handler_seconds_bucket{app="we\\"ird\\\\x\\n",le="2.5"} 1\n'
    'wxgate_handler_seconds_bucket{app="we\\"ird\\\\x\\n",le="5.0"} 1\n'
    'wxgate_handler_seconds_bucket{app="we\\"ird\\\\x\\n",le="10.0"} 1\n'
    'wxgate_handler_seconds_bucket{app="we\\"ird\\\\x\\n",le="+Inf"} 1\n'
    'wxgate_handler_seconds_sum{app="we\\"ird\\\\x\\n"} 0.25\n'
    'wxgate_handler_seconds_count{app="we\\"ird\\\\x\\n"} 1\n'
    '# HELP wxgate_queue_pending Messages waiting in the durable queue.\n'
    '# TYPE wxgate_queue_pending gauge\n'
    'wxgate_queue_pending{} 2\n'
    '# HELP wxgate_queue_dead Messages in the dead-letter list.\n'
    '# TYPE wxgate_queue_dead gauge\n'
    'wxgate_queue_dead{} 0\n'
)
ODD_APP = 'we"ird\\x\n'


def count_some(metrics, part=None):
    """COUNTS, or only every other one of them (``part`` 0 or 1): what one of two workers
    counted."""
    steps = [
        lambda: metrics.count(PUSHES, **HANDLED),
        lambda: metrics.count(PUSHES, **HANDLED),
        lambda: metrics.count(PUSHES, app="test", type="other", outcome="duplicate"),
        lambda: metrics.count("wxgate_refused_total", app="test", status=403, code=-40001),
        lambda: metrics.count("wxgate_refused_total", app="test", status=400, code=""),
        lambda: metrics.observe("wxgate_handler_seconds", 0.5, app="test"),
        lambda: metrics.observe("wxgate_handler_seconds", 0.004, app="test"),
        lambda: metrics.observe("wxgate_handler_seconds", 0.25, app=ODD_APP),
    ]
    for index, step in enumerate(steps):
        if part is None or index % 2 == part:
            step()


GAUGES = [("wxgate_queue_pending", {}, 2), ("wxgate_queue_dead", {}, 0)]


def test_one_process_renders_its_counts_as_before():
    metrics = wxgate._Metrics()
    count_some(metrics)
    assert metrics.render(GAUGES) == "".join(RENDERED)
    assert metrics.scrape(GAUGES) == "".join(RENDERED)  # no shared store: the same text


# -- two workers' counts, added up in a real store -------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def two_stores(request, tmp_path):
    """Two store objects on the same data, as two worker processes of a gateway hold."""
    if request.param == "sqlite":
        stores = [wxgate.SqliteStore(str(tmp_path / "shared.db")) for _ in range(2)]
    else:
        server = request.getfixturevalue("redis_server")
        import redis
        redis.Redis.from_url(server["url"]).flushdb()
        stores = [wxgate.RedisStore(server["url"]) for _ in range(2)]
    yield stores
    for store in stores:
        store.close()


def worker_metrics(store, key=KEY):
    metrics = wxgate._Metrics()
    metrics.share(store, key)
    return metrics


def test_two_workers_counters_and_histograms_add_up_in_the_store(two_stores):
    first, second = (worker_metrics(store) for store in two_stores)
    try:
        count_some(first, part=0)
        count_some(second, part=1)
        assert first.value(PUSHES, **HANDLED) == 1  # value() is this process's own count
        assert first.flush() and second.flush()
        # Either worker's scrape is the text one process that counted everything renders.
        assert first.scrape(GAUGES) == "".join(RENDERED)
        assert second.scrape(GAUGES) == "".join(RENDERED)
        count_some(second, part=1)
        assert second.flush()
        _, samples = parse_metrics(first.scrape())
        assert value(samples, PUSHES, **HANDLED) == 3
        assert value(samples, "wxgate_handler_seconds_count", app="test") == 3
        assert value(samples, "wxgate_handler_seconds_sum", app="test") == \
            pytest.approx(1.004)
        assert value(samples, "wxgate_handler_seconds_bucket", app="test", le="0.005") == 1
        assert value(samples, "wxgate_handler_seconds_bucket", app="test", le="0.5") == 3
    finally:
        first.close()
        second.close()


def test_a_scrape_adds_this_process_counts_first(two_stores):
    first, second = (worker_metrics(store) for store in two_stores)
    try:
        first.count(PUSHES, 2, **HANDLED)
        second.count(PUSHES, **HANDLED)
        # The second worker has not flushed yet: its own scrape shows its count, the
        # first's not yet (its thread adds it within METRICS_FLUSH_EVERY).
        _, samples = parse_metrics(first.scrape())
        assert value(samples, PUSHES, **HANDLED) == 2
        _, samples = parse_metrics(second.scrape())
        assert value(samples, PUSHES, **HANDLED) == 3
        assert two_stores[0].read_counts(KEY) == {
            'wxgate_pushes_total{app="test",outcome="handled",type="text"}': 3.0}
    finally:
        first.close()
        second.close()


def test_a_batch_sent_again_is_added_once(two_stores):
    store, other = two_stores
    a, b = "a_total{}", 'b_total{x="1"}'
    store.add_counts(KEY, {a: 2}, batch=("w1", 1))
    store.add_counts(KEY, {a: 2}, batch=("w1", 1))  # its answer was lost: sent again
    other.add_counts(KEY, {a: 5}, batch=("w2", 1))  # another writer's first batch
    store.add_counts(KEY, {a: 1.5, b: 1}, batch=("w1", 2))
    store.add_counts(KEY, {a: 2}, batch=("w1", 1))  # an old one, late
    other.add_counts(KEY, {b: 1})  # without a batch: added each time
    other.add_counts(KEY, {b: 1})
    assert store.read_counts(KEY) == other.read_counts(KEY) == {a: 8.5, b: 3.0}
    assert store.read_counts("another:metrics") == {}


class AnswerDropper:
    """A TCP proxy to a port; while ``dropping`` it passes requests on and throws the
    answers away, so the client times out on a command the server carried out."""

    def __init__(self, port):
        self.target, self.dropping, self.sockets = port, False, []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += (client, upstream)
            for source, sink, answers in ((client, upstream, False),
                                          (upstream, client, True)):
                threading.Thread(target=self._pipe, args=(source, sink, answers),
                                 daemon=True).start()

    def _pipe(self, source, sink, answers):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if not (answers and self.dropping):
                    sink.sendall(data)
        except OSError:
            pass
        finally:  # one side ended: end the other (closing twice is harmless)
            source.close()
            sink.close()

    def close(self):
        self.listener.close()
        for end in self.sockets:
            end.close()


def test_a_batch_whose_answer_was_lost_is_not_added_twice(redis_server):
    # Redis carried the batch out, but its answer never came back (a timeout): the process
    # cannot know, keeps its counts and sends the same batch again, which Redis skips.
    import redis
    reader = redis.Redis.from_url(redis_server["url"])
    reader.flushdb()
    proxy = AnswerDropper(redis_server["port"])
    store = wxgate.RedisStore(f"redis://127.0.0.1:{proxy.port}/0", socket_timeout=0.5)
    metrics = worker_metrics(store)
    metrics.without_thread()
    series = 'wxgate_pushes_total{app="test",outcome="handled",type="text"}'
    try:
        metrics.count(PUSHES, **HANDLED)
        assert metrics.flush()
        metrics.count(PUSHES, 2, **HANDLED)
        proxy.dropping = True
        assert not metrics.flush()
        assert metrics.scrape() is None  # no true total to show
        proxy.dropping = False
        assert float(reader.hget(KEY, series)) == 3  # carried out all the same
        metrics.count(PUSHES, **HANDLED)
        assert metrics.flush()  # the same batch again (skipped), then the new count
        assert float(reader.hget(KEY, series)) == 4
        assert metrics.value(PUSHES, **HANDLED) == 4
    finally:
        metrics.close()
        store.close()
        proxy.close()
        reader.close()


# -- gateways: workers, an outage, a store without totals, memory ----------------------------


def push(testapp, fields, status=200):
    query, body = build_push(fields)
    return testapp.post(f"/wechat?{query}", body, content_type="text/xml", status=status)


def scraped_pushes(testapp, **labels):
    _, samples = parse_metrics(testapp.get("/_wxgate/metrics", extra_environ=LOOPBACK).text)
    return value(samples, PUSHES, **(labels or HANDLED))


def worker(config):
    return webtest.TestApp(wxgate.make_app(config), lint=True)


def test_gateway_workers_scrape_the_same_totals(tmp_path, shared_store):
    # A store_prefix of its own: the session's Redis serves other tests' gateways too.
    config = make_config(tmp_path, Recorder(), extra_gateway=(
        f"timestamp_window = 0\nstore = {shared_store}\n"
        f"store_prefix = metrics-{uuid.uuid4().hex[:8]}"))
    first, second, third = worker(config), worker(config), worker(config)
    try:
        push(first, text_message(msg_id="w-1"))
        push(first, text_message(msg_id="w-2"))
        push(second, text_message(msg_id="w-3"))
        push(second, text_message(msg_id="w-1"))  # WeChat's retry, on another worker
        second.app.close()  # a worker that exits (--max-requests) adds its counts first
        for testapp in (first, third):  # the third never counted anything itself
            assert scraped_pushes(testapp) == 3
            assert scraped_pushes(testapp, app="test", type="text", outcome="duplicate") == 1
        assert first.app.metrics.value(PUSHES, **HANDLED) == 2
        assert third.app.metrics.value(PUSHES, **HANDLED) == 0
    finally:
        first.app.close()
        third.app.close()


def test_counts_made_while_the_store_is_down_are_added_once_it_is_back(tmp_path, monkeypatch,
                                                                       caplog):
    monkeypatch.setattr(wxgate, "STORE_RETRY_AFTER", 0.0)
    with RedisServer(tmp_path) as server:  # appendfsync always: a restart keeps the totals
        config = make_config(tmp_path, Recorder(), extra_gateway=(
            f"timestamp_window = 0\nstore = {server.url}"))
        testapp = worker(config)
        try:
            for index in range(3):
                push(testapp, text_message(msg_id=f"before-{index}"))
            assert scraped_pushes(testapp) == 3
            server.kill()
            with caplog.at_level(logging.WARNING, "wxgate"):
                for index in range(2):  # answered all the same, from the process's memory
                    push(testapp, text_message(msg_id=f"during-{index}"))
                response = testapp.get("/_wxgate/metrics", extra_environ=LOOPBACK,
                                       status=503)
            assert b"metrics unavailable" in response.body
            assert "keeping them until it can" in caplog.text
            server.start()
            assert scraped_pushes(testapp) == 5
            assert scraped_pushes(testapp) == 5  # added once
            assert not testapp.app.store.failing
        finally:
            testapp.app.close()


class SharedButNoTotals(wxgate.MemoryStore):
    """A store of a user's own that is shared but keeps no metric totals."""

    shared = True


def test_a_store_without_totals_leaves_each_process_its_own_counts(tmp_path, caplog):
    app = wxgate.make_app(make_config(tmp_path, Recorder(), extra_gateway="timestamp_window = 0"),
                          store=SharedButNoTotals())
    testapp = webtest.TestApp(app, lint=True)
    try:
        push(testapp, text_message(msg_id="own-1"))
        with caplog.at_level(logging.WARNING, "wxgate"):
            assert scraped_pushes(testapp) == 1
        assert "keeps no totals" in caplog.text
        assert not app.store.failing  # not taken for an outage
        push(testapp, text_message(msg_id="own-2"))
        assert scraped_pushes(testapp) == 2
    finally:
        app.close()


def test_memory_store_scrape_is_this_process_render_and_starts_no_thread(tmp_path):
    before = set(threading.enumerate())
    app = wxgate.make_app(make_config(tmp_path, Recorder(), extra_gateway="timestamp_window = 0"))
    testapp = webtest.TestApp(app, lint=True)
    try:
        push(testapp, text_message(msg_id="m-1"))
        push(testapp, text_message(msg_id="m-1"))
        text = testapp.get("/_wxgate/metrics", extra_environ=LOOPBACK).text
        assert text == app.metrics.render()
        assert scraped_pushes(testapp) == 1
        started = [thread.name for thread in set(threading.enumerate()) - before]
        assert "wxgate-metrics" not in started
    finally:
        app.close()


# -- processes: a fork, an exit, CGI ---------------------------------------------------------

FORKING = textwrap.dedent("""\
    import os, sys
    import wxgate

    store = wxgate.SqliteStore(sys.argv[1])
    metrics = wxgate._Metrics()
    metrics.share(store, "wxgate:metrics")
    metrics.without_thread()  # a single-threaded process may fork safely
    labels = {"app": "test", "type": "text", "outcome": "handled"}
    metrics.count("wxgate_pushes_total", 5, **labels)  # counted before the fork
    child = os.fork()
    if child == 0:  # a worker forked from it (gunicorn --preload) counts its own
        metrics.count("wxgate_pushes_total", 2, **labels)
        os._exit(0 if metrics.flush() else 1)
    assert os.waitpid(child, 0)[1] == 0
    idle = os.fork()
    if idle == 0:  # a child that counts nothing and exits normally (atexit) adds nothing
        sys.exit(0)
    assert os.waitpid(idle, 0)[1] == 0
    metrics.count("wxgate_pushes_total", **labels)
    # No flush, no close: the exit adds the parent's 6.
    """)


def test_a_forked_child_adds_only_its_own_counts_and_exit_adds_the_rest(tmp_path):
    database = tmp_path / "fork.db"
    script = tmp_path / "forking.py"
    script.write_text(FORKING)
    result = subprocess.run([sys.executable, str(script), str(database)], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    store = wxgate.SqliteStore(str(database))
    try:
        assert store.read_counts("wxgate:metrics") == {
            'wxgate_pushes_total{app="test",outcome="handled",type="text"}': 8.0}
    finally:
        store.close()


CGI_PROGRAM = ("import wsgiref.handlers, wxgate; "
               "wsgiref.handlers.CGIHandler().run(wxgate.application)")


def cgi(ini, method, path, query="", body=b""):
    """One request, one process: wsgiref's CGIHandler (``wsgi.run_once``) as a CGI server
    runs it; return ``(status, body)``."""
    environment = dict(os.environ, PYTHONPATH=str(REPO), WXGATE_CONFIG=str(ini),
                       GATEWAY_INTERFACE="CGI/1.1", REQUEST_METHOD=method, PATH_INFO=path,
                       QUERY_STRING=query, CONTENT_LENGTH=str(len(body)),
                       CONTENT_TYPE="text/xml", REMOTE_ADDR="127.0.0.1",
                       SERVER_NAME="127.0.0.1", SERVER_PORT="80", SERVER_PROTOCOL="HTTP/1.1")
    result = subprocess.run([sys.executable, "-c", CGI_PROGRAM], input=body,
                            env=environment, capture_output=True, timeout=60)
    head, _, content = result.stdout.partition(b"\r\n\r\n")
    return int(head.split(b"Status: ", 1)[1][:3]), content


def test_cgi_processes_add_up(tmp_path):
    # Each request is a process of its own, which ends with it: no thread may flush later.
    ini = tmp_path / "cgi.ini"
    ini.write_text(ini_text(extra_gateway=f"timestamp_window = 0\n"
                                          f"store = sqlite://{tmp_path}/cgi.db")
                   .replace("wxgate:demo_handler", "cgi_handler:handle"))
    (tmp_path / "cgi_handler.py").write_text(HANDLER)
    for index in range(3):
        query, body = build_push(text_message(msg_id=f"cgi-{index}"))
        assert cgi(ini, "POST", "/wechat", query, body)[0] == 200
    status, text = cgi(ini, "GET", "/_wxgate/metrics")
    assert status == 200
    _, samples = parse_metrics(text.decode("utf-8"))
    assert value(samples, PUSHES, **HANDLED) == 3


def test_counters_add_up_across_replaced_gunicorn_workers(tmp_path, shared_store):
    # Four workers, each replaced after 50 requests, under a steady push rate (with WeChat's
    # retries among them), scraped 20 times: every scrape lands on some worker.
    module = f"metrics_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(HANDLER)
    ini = tmp_path / "metrics.ini"
    ini.write_text(ini_text(extra_gateway=f"timestamp_window = 0\nstore = {shared_store}")
                   .replace("wxgate:demo_handler", f"{module}:handle"))
    base_url, process = start_gunicorn(ini, workers=4, extra_args=("--max-requests", "50"))
    answers, statuses, stopping = [], [], threading.Event()

    def push_steadily(client):
        index = 0
        while not stopping.is_set():
            fields = text_message(msg_id=f"{client}{index:06d}")
            query, body = build_push(fields)
            # Every third push is sent twice: the copy is answered as a duplicate.
            for _ in range(2 if index % 3 == 0 else 1):
                status, _ = request(base_url, "POST", f"/wechat?{query}", body)
                statuses.append(status)
                if status == 200:
                    answers.append(fields["MsgId"])
            index += 1
            time.sleep(0.005)

    clients = [threading.Thread(target=push_steadily, args=(client,)) for client in "12"]
    scrapes = []
    try:
        for client in clients:
            client.start()
        for _ in range(20):
            time.sleep(0.25)
            scrapes.append(scrape(base_url))
        stopping.set()
        for client in clients:
            client.join()
        # Each worker adds its counts within about a second; then every worker agrees.
        deadline = time.monotonic() + 15
        while True:
            time.sleep(0.5)
            idle = [scrape(base_url) for _ in range(8)]
            totals = [pushes_total(scraped) for scraped in idle]
            if set(totals) == {len(answers)} or time.monotonic() > deadline:
                break
        log = process.log_path.read_text()
    finally:
        stopping.set()
        stop(process)
    growing = [counter_samples(scraped) for scraped in scrapes + idle]
    went_down = decreases(growing)
    during = [pushes_total(scraped) for scraped in scrapes]
    print(f"\n{shared_store.split(':')[0]}: {len(answers)} answers, {statuses.count(200)} of "
          f"{len(statuses)} pushes 200, {log.count('Booting worker')} workers booted; "
          f"pushes_total during the load {during}; idle scrapes {totals}; sums fell: pushes "
          f"{falls(scrapes + idle, 'wxgate_pushes_total')}, duplicates "
          f"{falls(scrapes + idle, 'wxgate_duplicates_total')}; {len(went_down)} samples fell:"
          f" {sorted(set(key[0] for key, _, _ in went_down))}")
    assert log.count("Booting worker") > 4, "no worker was replaced"
    assert set(statuses) == {200}
    assert went_down == []
    assert totals == [len(answers)] * len(totals)
    duplicates = sum(value for (name, _), value in idle[-1][1].items()
                     if name == "wxgate_duplicates_total")
    assert duplicates == len(answers) - len(set(answers))
