"""Operations: /_wxgate/healthz, /_wxgate/metrics (Prometheus text) and structured JSON logs."""

import json
import logging
import math
import re
import subprocess
import sys
import textwrap

import pytest
import webtest

import wxgate
from conftest import (AES_KEY, APPID, NOW, REPO, TOKEN, Recorder, build_push, event_message,
                      make_config, text_message)
from fake_wechat import DEFAULT_APPID, DEFAULT_SECRET, FakeWeChat

ADMIN_SECRET = "opsAdminSecretValue-9f8e7d"
APPSECRET = "opsAppSecretValue0123456789abcdef"
SECRETS = (TOKEN, AES_KEY, ADMIN_SECRET, APPSECRET)
REMOTE = {"REMOTE_ADDR": "203.0.113.7"}
LOOPBACK = {"REMOTE_ADDR": "127.0.0.1"}


def gateway(tmp_path, clock, handler=None, *, extra_gateway="", extra_app="", **options):
    config = make_config(tmp_path, handler or Recorder(),
                         extra_gateway=f"admin_secret = {ADMIN_SECRET}\n{extra_gateway}",
                         extra_app=f"appsecret = {APPSECRET}\n{extra_app}")
    app = wxgate.make_app(config, clock=clock, **options)
    return app, webtest.TestApp(app, lint=True)


@pytest.fixture
def ops(tmp_path, clock):
    app, testapp = gateway(tmp_path, clock)
    yield testapp
    app.close()


def push(testapp, fields, status=200, headers=None, **options):
    query, body = build_push(fields, **options)
    return testapp.post(f"/wechat?{query}", body, content_type="text/xml", status=status,
                        headers=headers or {}, extra_environ=REMOTE)


def bearer(secret=ADMIN_SECRET):
    return {"Authorization": f"Bearer {secret}"}


# -- a strict reader of the Prometheus text format ---------------------------------------------

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
SAMPLE = re.compile(rf"^({NAME})(?:\{{((?:{LABEL})(?:,{LABEL})*,?)?\}})? "
                    r"([-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+|Inf|NaN))(?: -?\d+)?$")
LABELS = re.compile(rf'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"')
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def parse_metrics(text):
    """``{(name, frozenset(labels.items())): value}``; asserts the exposition is well formed."""
    assert text.endswith("\n")
    types, samples, finished = {}, {}, set()
    current = None
    for line in text.splitlines():
        if not line:
            continue  # the format ignores empty lines
        if line.startswith("# HELP "):
            assert re.match(rf"^# HELP {NAME} .*$", line), line
            continue
        if line.startswith("# TYPE "):
            match = re.match(rf"^# TYPE ({NAME}) (\w+)$", line)
            assert match and match.group(2) in TYPES, line
            family = match.group(1)
            assert family not in types, f"second TYPE line for {family}"
            types[family] = match.group(2)
            if current is not None:
                finished.add(current)
            current = family
            continue
        assert not line.startswith("#"), line
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        family = name
        if current is not None and types[current] == "histogram":
            family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert family == current, f"{name} outside its family's block (TYPE {current})"
        assert family not in finished
        key = (name, frozenset(LABELS.findall(labels or "")))
        assert key not in samples, f"duplicate sample {line!r}"
        samples[key] = float(value)
    return types, samples


def scrape(testapp, **environ):
    response = testapp.get("/_wxgate/metrics", extra_environ=environ or LOOPBACK)
    assert response.status_int == 200
    assert response.content_type == "text/plain"
    assert "version=0.0.4" in response.headers["Content-Type"]
    for secret in SECRETS:
        assert secret not in response.text
    return parse_metrics(response.text)


def value(samples, name, **labels):
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())), 0.0)


# -- healthz -----------------------------------------------------------------------------------


def test_healthz_is_ok_without_a_secret_and_shows_only_the_status(ops):
    response = ops.get("/_wxgate/healthz", extra_environ=REMOTE)
    assert response.status_int == 200
    assert response.content_type == "application/json"
    assert response.json == {"status": "ok"}  # no app names, version or counts: anyone asks


@pytest.mark.parametrize("how", ["secret", "loopback"])
def test_healthz_details_for_the_admin_secret_or_loopback(ops, how):
    if how == "secret":
        response = ops.get("/_wxgate/healthz", headers=bearer(), extra_environ=REMOTE)
    else:
        response = ops.get("/_wxgate/healthz", extra_environ=LOOPBACK)
    document = response.json
    assert document["status"] == "ok"
    assert document["apps"] == ["test"]
    assert document["version"] == wxgate.__version__
    for secret in SECRETS:
        assert secret not in response.text
    assert not {"admin_secret", "token", "appsecret", "encoding_aes_key"} & set(document)


def test_healthz_refuses_other_methods(ops):
    ops.post("/_wxgate/healthz", "", extra_environ=REMOTE, status=405)


def test_admin_path_is_the_whole_url_path_under_a_mount_prefix(tmp_path, clock):
    # README's mod_wsgi recipe: WSGIScriptAlias /wechat .../wxgate.py. A request for
    # /wechat/_wxgate/healthz arrives as SCRIPT_NAME=/wechat, PATH_INFO=/_wxgate/healthz.
    # admin_path, like an app's path, names the whole URL: /_wxgate is outside the mount
    # (not served, as the README says), and admin_path = /wechat/_wxgate serves them there.
    mounted = dict(REMOTE, SCRIPT_NAME="/wechat")
    app, testapp = gateway(tmp_path, clock)
    testapp.get("/_wxgate/healthz", extra_environ=mounted, status=404)
    testapp.get("/_wxgate/metrics", headers=bearer(), extra_environ=mounted, status=404)
    app.close()
    app, testapp = gateway(tmp_path, clock, extra_gateway="admin_path = /wechat/_wxgate")
    response = testapp.get("/_wxgate/healthz", extra_environ=mounted)
    assert response.status_int == 200 and response.json == {"status": "ok"}
    testapp.get("/_wxgate/metrics", headers=bearer(), extra_environ=mounted, status=200)
    app.close()


class BrokenStore(wxgate.Store):
    """A shared store whose every call fails, like a Redis that went away."""

    shared = True

    def _fail(self, *_args):
        raise ConnectionError("store is down (BrokenStore)")

    add = get = set = delete = ping = _fail


def test_healthz_is_503_when_the_store_fails(tmp_path, clock):
    app, testapp = gateway(tmp_path, clock, store=BrokenStore())
    response = testapp.get("/_wxgate/healthz", extra_environ=REMOTE, status=503)
    assert response.json["status"] != "ok"
    for secret in SECRETS:
        assert secret not in response.text
    # Pushes still flow on the in-process fallback meanwhile.
    assert push(testapp, text_message()).body != b""
    testapp.get("/_wxgate/healthz", extra_environ=REMOTE, status=503)
    app.close()


def test_healthz_reports_the_queue_when_there_is_one(tmp_path, clock):
    app, testapp = gateway(tmp_path, clock, start_worker=False,
                           extra_gateway=f"store = sqlite://{tmp_path}/q.db",
                           extra_app="delivery = queue")
    try:
        push(testapp, text_message(msg_id="hq1"))
        document = testapp.get("/_wxgate/healthz", extra_environ=LOOPBACK).json
        assert document["status"] == "ok" and document["store"] == "sqlite"
        assert document["queue"] == {"pending": 1, "in_flight": 0, "dead": 0}
        assert str(tmp_path) not in json.dumps(document)  # no filesystem path either
    finally:
        app.close()


def test_healthz_reads_the_queue_only_for_callers_who_see_it(tmp_path, clock):
    # The open /healthz must not run queue.stats() (a scan of the queue) for every anonymous
    # probe only to throw the counts away. Its status is the store's write; the
    # queue is read for the admin secret or loopback only. A queue table that cannot be read
    # shows which callers read it.
    app, testapp = gateway(tmp_path, clock, start_worker=False,
                           extra_gateway=f"store = sqlite://{tmp_path}/q.db",
                           extra_app="delivery = queue")
    try:
        import contextlib
        import sqlite3
        # closing(): sqlite3's own context manager commits but leaves the connection open.
        with contextlib.closing(sqlite3.connect(tmp_path / "q.db")) as connection:
            connection.execute("ALTER TABLE wxgate_queue RENAME TO wxgate_queue_gone")
        assert testapp.get("/_wxgate/healthz", extra_environ=REMOTE).json == {"status": "ok"}
        response = testapp.get("/_wxgate/healthz", extra_environ=LOOPBACK, status=503)
        assert response.json["status"] == "queue unreachable"
    finally:
        app.close()


# -- metrics: who may scrape -------------------------------------------------------------------


@pytest.mark.parametrize("environ, headers", [
    (REMOTE, {}),
    (REMOTE, bearer("not-the-secret")),
    (REMOTE, {"Authorization": f"Basic {ADMIN_SECRET}"}),
    (REMOTE, {"Authorization": ADMIN_SECRET}),
    (LOOPBACK, {"X-Forwarded-For": "198.51.100.1"}),
    (LOOPBACK, {"X-Forwarded-For": "127.0.0.1"}),
    (LOOPBACK, {"Forwarded": "for=198.51.100.1"}),
    ({"REMOTE_ADDR": "::1"}, {"X-Forwarded-For": "198.51.100.1"}),
    ({"REMOTE_ADDR": "127.0.0.2"}, {}),
    ({}, {}),
], ids=["remote", "wrong-secret", "basic-scheme", "no-scheme", "loopback-forwarded",
        "loopback-forwarded-loopback", "loopback-Forwarded", "ipv6-loopback-forwarded",
        "other-127", "no-remote-addr"])
def test_metrics_refused_without_secret_or_direct_loopback(ops, environ, headers):
    response = ops.get("/_wxgate/metrics", headers=headers, extra_environ=environ, status=401)
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert b"wxgate_" not in response.body
    assert ADMIN_SECRET.encode() not in response.body


@pytest.mark.parametrize("environ, headers", [
    (REMOTE, bearer()),
    (REMOTE, {"Authorization": f"bearer {ADMIN_SECRET}"}),
    ({"REMOTE_ADDR": "198.51.100.1"}, dict(bearer(), **{"X-Forwarded-For": "1.2.3.4"})),
    (LOOPBACK, {}),
    ({"REMOTE_ADDR": "::1"}, {}),
], ids=["bearer", "bearer-lowercase", "bearer-through-proxy", "loopback", "ipv6-loopback"])
def test_metrics_allowed_with_secret_or_from_loopback(ops, environ, headers):
    response = ops.get("/_wxgate/metrics", headers=headers, extra_environ=environ)
    assert response.status_int == 200
    parse_metrics(response.text)


def test_metrics_from_loopback_needs_no_admin_secret_configured(tmp_path, clock):
    config = make_config(tmp_path, Recorder())
    assert config.admin_secret == ""
    testapp = webtest.TestApp(wxgate.make_app(config, clock=clock), lint=True)
    testapp.get("/_wxgate/metrics", extra_environ=LOOPBACK, status=200)
    testapp.get("/_wxgate/metrics", extra_environ=REMOTE, status=401)
    # An empty bearer must not match an unset secret.
    testapp.get("/_wxgate/metrics", headers={"Authorization": "Bearer "},
                extra_environ=REMOTE, status=401)


def test_metrics_refuses_post(ops):
    ops.post("/_wxgate/metrics", "", headers=bearer(), extra_environ=REMOTE, status=405)


# -- metrics: what they count ------------------------------------------------------------------


def test_push_counters_duplicates_and_handler_histogram(tmp_path, clock):
    app, testapp = gateway(tmp_path, clock)
    types, before = scrape(testapp)
    assert value(before, "wxgate_pushes_total", app="test", type="text", outcome="handled") == 0

    push(testapp, text_message(msg_id="m1"))
    push(testapp, text_message(msg_id="m1"))  # WeChat's retry
    push(testapp, text_message(msg_id="m1"))
    push(testapp, text_message(msg_id="m2"))
    push(testapp, event_message("user_enter_tempsession", SessionFrom="x"))

    types, samples = scrape(testapp)
    assert types["wxgate_pushes_total"] == "counter"
    assert types["wxgate_duplicates_total"] == "counter"
    assert types["wxgate_handler_seconds"] == "histogram"
    assert value(samples, "wxgate_pushes_total", app="test", type="text",
                 outcome="handled") == 2
    assert value(samples, "wxgate_pushes_total", app="test", type="text",
                 outcome="duplicate") == 2
    assert value(samples, "wxgate_pushes_total", app="test", type="user_enter_tempsession",
                 outcome="handled") == 1
    assert value(samples, "wxgate_duplicates_total", app="test") == 2
    # The handler ran three times: duplicates do not reach it, nor the histogram.
    assert value(samples, "wxgate_handler_seconds_count", app="test") == 3
    assert value(samples, "wxgate_handler_seconds_bucket", app="test", le="+Inf") == 3
    assert 0 <= value(samples, "wxgate_handler_seconds_sum", app="test") < 5
    buckets = sorted((float(dict(labels)["le"]), count) for (name, labels), count
                     in samples.items() if name == "wxgate_handler_seconds_bucket")
    assert buckets[-1][0] == math.inf
    counts = [count for _, count in buckets]
    assert counts == sorted(counts), "histogram buckets must be cumulative"
    app.close()


def test_refusals_are_counted_by_official_code(tmp_path, clock):
    app, testapp = gateway(tmp_path, clock)
    query, body = build_push(text_message(msg_id="bad-sig"), token="not-the-token")
    testapp.post(f"/wechat?{query}", body, content_type="text/xml", extra_environ=REMOTE,
                 status=403)
    push(testapp, text_message(msg_id="other-app"), appid="wx0000000000000000", status=400)
    push(testapp, text_message(msg_id="other-app-2"), appid="wx0000000000000000", status=400)
    types, samples = scrape(testapp)
    assert types["wxgate_refused_total"] == "counter"
    assert value(samples, "wxgate_refused_total", app="test", status=403, code="-40001") == 1
    assert value(samples, "wxgate_refused_total", app="test", status=400, code="-40005") == 2
    assert value(samples, "wxgate_pushes_total", app="test", type="text",
                 outcome="handled") == 0
    app.close()


def token_gateway(tmp_path, clock, wechat, secret):
    source = tmp_path / "token.ini"
    source.write_text(textwrap.dedent(f"""\
        [wxgate]
        api_base = {wechat.url}
        admin_secret = {ADMIN_SECRET}
        [app:live]
        path = /wechat
        appid = {DEFAULT_APPID}
        appsecret = {secret}
        token = {TOKEN}
        encoding_aes_key = {AES_KEY}
        handler = wxgate:demo_handler
        """), "utf-8")
    app = wxgate.make_app(str(source), clock=clock)
    return app, webtest.TestApp(app, lint=True)


def test_token_fetches_and_errors_are_counted(tmp_path, clock):
    with FakeWeChat() as wechat:
        app, testapp = token_gateway(tmp_path, clock, wechat, DEFAULT_SECRET)
        token = testapp.get("/_wxgate/token/live", headers=bearer(),
                            extra_environ=REMOTE).json["access_token"]
        testapp.get("/_wxgate/token/live", headers=bearer(), extra_environ=REMOTE)  # cached
        types, samples = scrape(testapp)
        assert wechat.token_fetches == 1
        assert types["wxgate_token_fetches_total"] == "counter"
        assert value(samples, "wxgate_token_fetches_total", app="live") == 1
        assert not any(name == "wxgate_token_errors_total" for name, _ in samples)
        response = testapp.get("/_wxgate/metrics", extra_environ=LOOPBACK)
        assert token not in response.text and DEFAULT_SECRET not in response.text
        app.close()

        wrong = "ffffffffffffffffffffffffffffffff"
        app, testapp = token_gateway(tmp_path, clock, wechat, wrong)
        testapp.get("/_wxgate/token/live", headers=bearer(), extra_environ=REMOTE, status=502)
        types, samples = scrape(testapp)
        assert types["wxgate_token_errors_total"] == "counter"
        assert value(samples, "wxgate_token_fetches_total", app="live") == 1
        assert value(samples, "wxgate_token_errors_total", app="live", errcode=40001) == 1
        app.close()


def test_queue_gauges(tmp_path, clock):
    app, testapp = gateway(tmp_path, clock, start_worker=False,
                           extra_gateway=f"store = sqlite://{tmp_path}/queue.db",
                           extra_app="delivery = queue")
    try:
        types, samples = scrape(testapp)
        for name in ("wxgate_queue_pending", "wxgate_queue_in_flight", "wxgate_queue_dead"):
            assert types[name] == "gauge"
            assert value(samples, name) == 0
        push(testapp, text_message(msg_id="q1"))
        push(testapp, text_message(msg_id="q1"))  # a retry is not queued twice
        push(testapp, text_message(msg_id="q2"))
        types, samples = scrape(testapp)
        assert value(samples, "wxgate_queue_pending") == 2
        assert value(samples, "wxgate_queue_in_flight") == 0
        assert value(samples, "wxgate_pushes_total", app="test", type="text",
                     outcome="queued") == 2
        assert value(samples, "wxgate_duplicates_total", app="test") == 1
        worker = app.worker()
        assert worker.run_once()
        types, samples = scrape(testapp)
        assert value(samples, "wxgate_queue_pending") == 1
    finally:
        app.close()


def test_queue_dead_letters_are_counted(tmp_path, clock):
    handler = Recorder()
    handler.fail = 10
    app, testapp = gateway(tmp_path, clock, handler, start_worker=False,
                           extra_gateway=f"store = sqlite://{tmp_path}/dead.db",
                           extra_app="delivery = queue\nqueue_max_attempts = 1")
    try:
        push(testapp, text_message(msg_id="dies"))
        assert app.worker().run_once()
        types, samples = scrape(testapp)
        assert value(samples, "wxgate_queue_dead") == 1
        assert value(samples, "wxgate_queue_pending") == 0
        assert types["wxgate_queue_dead_letters_total"] == "counter"
        assert sum(count for (name, _), count in samples.items()
                   if name == "wxgate_queue_dead_letters_total") == 1
    finally:
        app.close()


def test_label_values_are_escaped(tmp_path, clock):
    app, testapp = gateway(tmp_path, clock)
    push(testapp, event_message('we"ird\\ev\nent'), fmt="json")
    _, samples = scrape(testapp)
    # An event name from the push is not a label value: unknown ones count as "other", so
    # pushes cannot grow the metrics without bound.
    assert value(samples, "wxgate_pushes_total", app="test", type="other",
                 outcome="handled") == 1
    # Label text is still escaped as the exposition format requires.
    assert wxgate._escape_label('we"ird\\ev\nent') == 'we\\"ird\\\\ev\\nent'
    app.close()


# -- structured logs ---------------------------------------------------------------------------


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def records():
    logger = logging.getLogger("wxgate")
    capture = Capture()
    saved = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(capture)
    yield capture.records
    logger.removeHandler(capture)
    logger.setLevel(saved)


def json_gateway(tmp_path, clock, handler=None):
    app, testapp = gateway(tmp_path, clock, handler, extra_gateway="log_format = json")
    assert app.config.log_format == "json"
    return app, testapp


def push_records(records):
    return [record for record in records if getattr(record, "outcome", None) in
            ("handled", "duplicate")]


def test_json_log_of_a_push_carries_its_fields(tmp_path, clock, records):
    app, testapp = json_gateway(tmp_path, clock)
    push(testapp, text_message(msg_id="log-1"), headers={"X-Request-Id": "req-abc-123"})
    push(testapp, text_message(msg_id="log-1"))
    first, second = push_records(records)
    formatter = wxgate._JSONFormatter()
    document = json.loads(formatter.format(first))
    assert document["app"] == "test"
    assert document["dedup_key"] == "test:m:log-1"
    assert document["outcome"] == "handled"
    assert isinstance(document["duration_ms"], (int, float)) and document["duration_ms"] >= 0
    assert document["request_id"] == "req-abc-123"
    assert document["level"] == "INFO" and document["logger"] == "wxgate"
    assert "test:m:log-1" in document["message"]
    again = json.loads(formatter.format(second))
    assert again["outcome"] == "duplicate" and again["dedup_key"] == "test:m:log-1"
    assert re.fullmatch(r"[0-9a-f]{16}", again["request_id"])  # made up when none came
    assert again["request_id"] != document["request_id"]
    app.close()


@pytest.mark.parametrize("given", ["x" * 65, "caf\u00e9", ""])
def test_unusable_request_ids_are_replaced(tmp_path, clock, records, given):
    app, testapp = json_gateway(tmp_path, clock)
    environ = dict(REMOTE, HTTP_X_REQUEST_ID=given)
    query, body = build_push(text_message(msg_id="rid"))
    testapp.post(f"/wechat?{query}", body, content_type="text/xml", extra_environ=environ)
    (record,) = push_records(records)
    assert re.fullmatch(r"[0-9a-f]{16}", record.request_id)
    app.close()


def test_refusal_log_carries_the_request_id(tmp_path, clock, records):
    app, testapp = json_gateway(tmp_path, clock)
    query, body = build_push(text_message(), token="not-the-token")
    testapp.post(f"/wechat?{query}", body, content_type="text/xml", status=403,
                 headers={"X-Request-Id": "refused-1"}, extra_environ=REMOTE)
    refused = [r for r in records if str(getattr(r, "outcome", "")).startswith("refused")]
    (record,) = refused
    document = json.loads(wxgate._JSONFormatter().format(record))
    assert document["request_id"] == "refused-1" and document["app"] == "test"
    assert document["level"] == "WARNING"
    app.close()


def test_text_log_lines_carry_the_proxys_request_id(tmp_path, clock, records):
    # log_format = text: the push and refusal lines end their fields with rid=, the proxy's
    # X-Request-Id, to match nginx's access log (README: log_format wxgate ... rid=...).
    # Without the header there is nothing to match, and no id is made up: rid=-.
    app, testapp = gateway(tmp_path, clock)
    push(testapp, text_message(msg_id="rid-1"), headers={"X-Request-Id": "req-txt-1"})
    push(testapp, text_message(msg_id="rid-2"))
    push(testapp, text_message(msg_id="rid-3"), headers={"X-Request-Id": "two words"})
    query, body = build_push(text_message(), token="not-the-token")
    testapp.post(f"/wechat?{query}", body, content_type="text/xml", status=403,
                 headers={"X-Request-Id": "refused-2"}, extra_environ=REMOTE)
    lines = [record.getMessage() for record in records]
    pushes = [line for line in lines if line.startswith("push ")]
    assert [line.rsplit(" ", 1)[1] for line in pushes] == ["rid=req-txt-1", "rid=-", "rid=-"]
    (refused,) = [line for line in lines if "refused 403" in line]
    assert "refused 403 rid=refused-2:" in refused
    app.close()


def test_no_secret_in_any_log_record(tmp_path, clock, records):
    def reply(message):
        if message.get("Content") == "boom":
            raise RuntimeError("handler failure on purpose")
        return {"MsgType": "transfer_customer_service"}

    with FakeWeChat() as wechat:
        source = tmp_path / "all.ini"
        source.write_text(textwrap.dedent(f"""\
            [wxgate]
            api_base = {wechat.url}
            admin_secret = {ADMIN_SECRET}
            log_format = json
            [app:test]
            path = /wechat
            appid = {APPID}
            appsecret = {APPSECRET}
            token = {TOKEN}
            encoding_aes_key = {AES_KEY}
            handler = wxgate:demo_handler
            """), "utf-8")
        config = wxgate.load_config(source)
        import dataclasses
        config = dataclasses.replace(config, apps={"test": dataclasses.replace(
            config.apps["test"], handler=Recorder(reply=reply))})
        app = wxgate.make_app(config, clock=clock)
        testapp = webtest.TestApp(app, lint=True)
        push(testapp, text_message(msg_id="s1"))
        push(testapp, text_message(msg_id="s1"))
        push(testapp, text_message("boom", msg_id="s2"), status=500)
        push(testapp, text_message(msg_id="s3"), token="wrong-token", status=403)
        push(testapp, text_message(msg_id="s4"), appid="wx0000000000000000", status=400)
        testapp.get("/_wxgate/token/test", headers=bearer(), extra_environ=REMOTE,
                    status=502)  # the fake does not know this appid
        testapp.get("/_wxgate/token/test", headers=bearer("wrong"), extra_environ=REMOTE,
                    status=401)
        app.close()
    assert len(records) >= 6
    outcomes = {getattr(r, "outcome", None) for r in records}
    assert {"handled", "duplicate", "handler-error"} <= outcomes
    json_formatter, text_formatter = wxgate._JSONFormatter(), logging.Formatter()
    for record in records:
        for rendered in (json_formatter.format(record), text_formatter.format(record)):
            for secret in SECRETS:
                assert secret not in rendered, (secret, rendered)


APPLICATION_SCRIPT = r"""
import io, json, sys, wsgiref.util
import wxgate
query, body, request_id = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
environ = {}
wsgiref.util.setup_testing_defaults(environ)
environ.update(REQUEST_METHOD="POST", PATH_INFO="/wechat", QUERY_STRING=query,
               CONTENT_LENGTH=str(len(body)), CONTENT_TYPE="text/xml",
               HTTP_X_REQUEST_ID=request_id)
environ["wsgi.input"] = io.BytesIO(body)
statuses = []
for _ in range(2):
    environ["wsgi.input"] = io.BytesIO(body)
    b"".join(wxgate.application(environ, lambda status, headers: statuses.append(status)))
print(json.dumps(statuses))
"""


def test_application_under_wxgate_config_logs_json_lines(tmp_path):
    source = tmp_path / "wxgate.ini"
    source.write_text(textwrap.dedent(f"""\
        [wxgate]
        log_format = json
        timestamp_window = 0
        admin_secret = {ADMIN_SECRET}
        [app:test]
        path = /wechat
        appid = {APPID}
        appsecret = {APPSECRET}
        token = {TOKEN}
        encoding_aes_key = {AES_KEY}
        handler = wxgate:demo_handler
        """), "utf-8")
    query, body = build_push(text_message(msg_id="lazy-1"))
    environ = {"PATH": "/usr/bin:/bin", "WXGATE_CONFIG": str(source)}
    result = subprocess.run([sys.executable, "-c", APPLICATION_SCRIPT, query, body.decode(),
                             "lazy-req-7"], cwd=REPO, env=environ, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["200 OK", "200 OK"]
    lines = result.stderr.splitlines()
    assert lines, "no log lines"
    documents = [json.loads(line) for line in lines]  # every line is one JSON object
    pushes = [d for d in documents if d.get("outcome") in ("handled", "duplicate")]
    assert [d["outcome"] for d in pushes] == ["handled", "duplicate"]
    for document in pushes:
        assert document["app"] == "test" and document["dedup_key"] == "test:m:lazy-1"
        assert document["request_id"] == "lazy-req-7"
        assert isinstance(document["duration_ms"], (int, float))
        assert document["level"] == "INFO"
    for secret in SECRETS:
        assert secret not in result.stderr + result.stdout


# -- the health check's write ----------------------------------------------------------------


class CountingWrites(wxgate.SqliteStore):
    """A real sqlite store that counts its write transactions."""

    writes = 0

    def _write(self, statements):
        CountingWrites.writes += 1
        return super()._write(statements)


def test_unauthenticated_health_checks_do_not_each_take_the_write_lock(tmp_path):
    # healthz needs no secret, and proves the store writable by a write. Were each anonymous
    # GET to take sqlite's write lock (BEGIN IMMEDIATE ... COMMIT) that every push needs for
    # its claim, a flood of health checks from anywhere would compete with pushes for it
    # (busy_timeout 2 s, then "database is locked" and 500s), and during a Redis outage each
    # would wait out a connect timeout. One write per interval (a second) proves as much.
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
