"""Retry dedup through the WSGI app, on every store: memory, sqlite and Redis."""

import threading

import pytest
import webtest

import wxgate
from conftest import (NOW, OPENID, Recorder, build_push, event_message, make_config,
                      open_reply, text_message)


@pytest.fixture
def gateway_factory(tmp_path, clock, store_factory):
    """Gateways sharing one store (as the workers of one deployment would)."""
    def factory(handler, **kwargs):
        options = {"clock": clock, "store": store_factory()}
        for name in ("reply_deadline", "sleep"):
            if name in kwargs:
                options[name] = kwargs.pop(name)
        return wxgate.make_app(make_config(tmp_path, handler, **kwargs), **options)
    factory.kind = store_factory.kind
    return factory


def send(app, fields, status=200, **push_options):
    testapp = webtest.TestApp(app, lint=True)
    query, body = build_push(fields, **push_options)
    return testapp.post(f"/wechat?{query}", body, content_type="text/xml", status=status)


TRANSFER = {"MsgType": "transfer_customer_service"}


def deliver_while_held(handler, deliver, count):
    """Run ``deliver`` in ``count`` threads; once the first is inside the (held) handler,
    let the handler go, and wait for all of them."""
    threads = [threading.Thread(target=deliver) for _ in range(count)]
    for thread in threads:
        thread.start()
    for _ in range(500):
        if handler.calls:
            break
        threading.Event().wait(0.01)
    handler.delay.set()
    for thread in threads:
        thread.join(10)


def test_same_msgid_twice_runs_the_handler_once(gateway_factory):
    handler = Recorder(reply=TRANSFER)
    app = gateway_factory(handler)
    first = send(app, text_message(msg_id="100"))
    second = send(app, text_message(msg_id="100"))
    assert handler.calls == 1
    assert second.body == first.body
    assert open_reply(second.body, "xml")[0] == open_reply(first.body, "xml")[0]


def test_same_event_twice_runs_the_handler_once(gateway_factory):
    handler = Recorder()
    app = gateway_factory(handler)
    event = event_message("user_enter_tempsession", SessionFrom="x")
    assert send(app, event).body == b"success"
    assert send(app, dict(event, CreateTime=str(NOW))).body == b"success"  # string CreateTime
    assert handler.calls == 1


def test_distinct_messages_each_run(gateway_factory):
    handler = Recorder()
    app = gateway_factory(handler)
    for msg_id in ("1", "2", "3"):
        send(app, text_message(msg_id=msg_id))
    send(app, event_message("user_enter_tempsession"))
    send(app, event_message("debug_demo"))  # same user and second, another event
    assert handler.calls == 5


def test_media_checks_in_one_second_are_told_apart_by_trace_id(gateway_factory):
    handler = Recorder()
    app = gateway_factory(handler)
    for trace in ("t1", "t2", "t1"):
        send(app, event_message("wxa_media_check", trace_id=trace), fmt="json")
    assert [m["trace_id"] for m in handler.messages] == ["t1", "t2"]


def test_duplicates_across_gateways_sharing_the_store(gateway_factory):
    if gateway_factory.kind == "memory":
        pytest.skip("two gateways share a memory store only inside one process")
    handler = Recorder(reply=TRANSFER)
    first = send(gateway_factory(handler), text_message(msg_id="200"))
    second = send(gateway_factory(handler), text_message(msg_id="200"))
    assert handler.calls == 1 and second.body == first.body


def test_concurrent_duplicates_wait_for_the_first_and_share_its_reply(gateway_factory):
    handler = Recorder(reply=TRANSFER)
    handler.delay = threading.Event()
    app = gateway_factory(handler)
    results = []

    def deliver():
        results.append(send(app, text_message(msg_id="300")).body)

    deliver_while_held(handler, deliver, 3)
    assert handler.calls == 1
    assert len(results) == 3 and len(set(results)) == 1
    assert b"<Encrypt>" in results[0]


def test_handler_failure_then_retry_runs_it_again(gateway_factory):
    handler = Recorder(reply=TRANSFER)
    handler.fail = 1
    app = gateway_factory(handler)
    failed = send(app, text_message(msg_id="400"), status=500)
    assert failed.body == b""
    retried = send(app, text_message(msg_id="400"))
    assert handler.calls == 2
    plaintext, _, _ = open_reply(retried.body, "xml")
    assert "transfer_customer_service" in plaintext
    # And the success is remembered from now on.
    send(app, text_message(msg_id="400"))
    assert handler.calls == 2


def test_waiting_duplicate_runs_the_handler_when_the_first_fails(gateway_factory):
    handler = Recorder()
    handler.fail = 1
    handler.delay = threading.Event()
    app = gateway_factory(handler)
    statuses = []

    def deliver():
        statuses.append(send(app, text_message(msg_id="500"), status="*").status_int)

    deliver_while_held(handler, deliver, 2)
    assert sorted(statuses) == [200, 500]
    assert handler.calls == 2


def test_duplicate_gives_up_at_the_deadline_while_the_first_still_runs(gateway_factory):
    handler = Recorder()
    handler.delay = threading.Event()
    app = gateway_factory(handler, reply_deadline=0.3)
    first = threading.Thread(target=send, args=(app, text_message(msg_id="600")))
    first.start()
    for _ in range(500):
        if handler.calls:
            break
        threading.Event().wait(0.01)
    # The injected clock does not move, so this duplicate's deadline is measured by the
    # store's waits, not by a timer in the test.
    duplicate = send(app, text_message(msg_id="600"), status=503,
                     timestamp=NOW)
    handler.delay.set()
    first.join(10)
    assert duplicate.body == b""
    assert handler.calls == 1


def test_seen_keys_expire_after_dedup_ttl(gateway_factory, clock):
    if gateway_factory.kind == "redis":
        pytest.skip("Redis expires keys on its own clock, not the injected one")
    handler = Recorder()
    app = gateway_factory(handler, extra_gateway="dedup_ttl = 60\ntimestamp_window = 0")
    send(app, text_message(msg_id="700"))
    clock.advance(59)
    send(app, text_message(msg_id="700"))
    assert handler.calls == 1
    clock.advance(2)
    send(app, text_message(msg_id="700"))
    assert handler.calls == 2


def test_memory_lru_is_bounded_by_dedup_size(tmp_path, clock):
    handler = Recorder()
    app = wxgate.make_app(make_config(tmp_path, handler, extra_gateway="dedup_size = 2"),
                          clock=clock)
    for msg_id in ("1", "2", "3", "1"):
        send(app, text_message(msg_id=msg_id))
    assert [m["MsgId"] for m in handler.messages] == ["1", "2", "3", "1"]
    assert len(app._dedups["test"].store) <= 2


def test_different_apps_do_not_share_keys(tmp_path, clock):
    handler = Recorder()
    text = make_config(tmp_path, handler)
    import dataclasses
    other = dataclasses.replace(text.apps["test"], name="other", path="/other")
    config = dataclasses.replace(text, apps={"test": text.apps["test"], "other": other})
    app = webtest.TestApp(wxgate.make_app(config, clock=clock), lint=True)
    query, body = build_push(text_message(msg_id="800"))
    app.post(f"/wechat?{query}", body, content_type="text/xml")
    app.post(f"/other?{query}", body, content_type="text/xml")
    assert [m.app for m in handler.messages] == ["test", "other"]
    assert handler.messages[0].dedup_key != handler.messages[1].dedup_key
    assert handler.messages[0].from_user == OPENID


# -- a push's identity: what it carries, not only who sent it when ----------------------------


def payment(out_trade_no, **extra):
    """A virtual payment push (JSON only), as xpay_goods_deliver_notify carries it."""
    return event_message("xpay_goods_deliver_notify", OpenId=OPENID, OutTradeNo=out_trade_no,
                         Env=0, WeChatPayInfo={"MchOrderNo": f"mch-{out_trade_no}",
                                               "TransactionId": f"tx-{out_trade_no}"},
                         GoodsInfo={"ProductId": "gold-100", "Quantity": 1,
                                    "OrigPrice": 600, "ActualPrice": 600}, **extra)


def test_two_payments_in_one_second_both_run(gateway_factory):
    # One user, one CreateTime, one Event, another OutTradeNo: WeChat's suggested key
    # (FromUserName + CreateTime) and its Event make them one push, and the second payment's
    # "success" told WeChat it was delivered while the handler never saw it.
    handler = Recorder()
    app = gateway_factory(handler, fmt="json")
    for order in ("order-1", "order-2"):
        assert send(app, payment(order), fmt="json").body == b"success"
    print(f"\npayments handled: {handler.calls}/2")
    assert [m["OutTradeNo"] for m in handler.messages] == ["order-1", "order-2"]


def test_two_tempsession_entries_with_another_session_from_both_run(gateway_factory):
    handler = Recorder()
    app = gateway_factory(handler)
    for source in ("button-a", "button-b"):
        send(app, event_message("user_enter_tempsession", SessionFrom=source))
    assert [m["SessionFrom"] for m in handler.messages] == ["button-a", "button-b"]


def test_an_exact_retry_is_a_duplicate_however_it_is_encrypted(gateway_factory):
    # WeChat's retry repeats the message under a new nonce and a new random prefix, so its
    # body and query differ byte for byte from the first delivery's.
    handler = Recorder()
    app = gateway_factory(handler, fmt="json")
    first = send(app, payment("order-3"), fmt="json")
    retry = send(app, payment("order-3"), fmt="json", nonce="987654321",
                 prefix=b"fedcba9876543210")
    assert first.body == retry.body == b"success"
    assert handler.calls == 1


def test_a_payment_retry_and_another_payment_interleaved(gateway_factory):
    handler = Recorder()
    app = gateway_factory(handler, fmt="json")
    for order, nonce in (("order-4", "1"), ("order-5", "2"), ("order-4", "3"),
                         ("order-5", "4")):
        send(app, payment(order), fmt="json", nonce=nonce, prefix=nonce.encode() * 16)
    assert [m["OutTradeNo"] for m in handler.messages] == ["order-4", "order-5"]


def store_keys(app, kind):
    """Every key the gateway's store holds now."""
    if kind == "memory":
        return [key for dedup in app._dedups.values() for key in dedup.store._entries] + \
            list(app.store._entries)
    primary = app.store.primary
    if kind == "sqlite":
        return [key for (key,) in primary.query("SELECT key FROM wxgate_kv")]
    return [key.decode() for key in primary._redis.keys("*")]


def test_store_keys_stay_short_whatever_the_push_carries(gateway_factory):
    # Plain mode takes its body on the URL signature alone, and cloud mode on no signature
    # at all: whoever can send one chooses MsgId, FromUserName, trace_id, any field. A 60 KB
    # MsgId made a 60 KB key, which lived dedup_ttl seconds in Redis or sqlite.
    handler = Recorder()
    app = gateway_factory(handler, mode="plain", fmt="json",
                          extra_gateway="max_body_bytes = 200000")
    huge = "9" * 60_000
    pushes = [text_message(msg_id=huge), text_message(msg_id="1" + huge),
              text_message(msg_id="7", trace_id="t" * 30_000),
              text_message(msg_id={"nested": huge}),
              event_message("user_enter_tempsession", FromUserName="o" * 30_000,
                            SessionFrom="s" * 30_000)]
    for fields in pushes:
        send(app, fields, mode="plain", fmt="json")
    for fields in pushes:  # each is still recognised when it comes again
        send(app, fields, mode="plain", fmt="json")
    keys = store_keys(app, gateway_factory.kind)
    longest = max(len(key.encode()) for key in keys)
    print(f"\n{len(keys)} keys, the longest {longest} bytes")
    assert handler.calls == len(pushes)
    assert longest <= 200, [key[:120] for key in keys if len(key) > 200]


# -- one app's traffic and another app's records ----------------------------------------------


TWO_APPS = """\
[wxgate]
{gateway}

[app:shop]
path = /wechat
appid = {appid}
token = {token}
encoding_aes_key = {key}
mode = safe
handler = wxgate:demo_handler

[app:cloud]
path = /cloud
appid = {appid}
mode = cloud
format = json
handler = wxgate:demo_handler
"""


def two_apps(tmp_path, handler, gateway=""):
    from conftest import AES_KEY, APPID, TOKEN, load_ini
    return load_ini(tmp_path / "two.ini", TWO_APPS.format(gateway=gateway, appid=APPID,
                                                          token=TOKEN, key=AES_KEY), handler)


def wsgi_post(app, path, body, query="", headers=()):
    """One POST straight through the WSGI callable (a flood needs no lint): the status."""
    import io
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "QUERY_STRING": query,
               "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body),
               "REMOTE_ADDR": "127.0.0.1", **dict(headers)}
    statuses = []
    b"".join(app(environ, lambda status, _headers: statuses.append(status)))
    return statuses[0]


def test_a_flood_to_one_app_does_not_evict_another_apps_records(tmp_path, clock):
    # A Cloud Hosting app with public access on takes pushes from anyone. 10,100 of them
    # pushed a safe app's record out of the one LRU every app shared, and the safe push's
    # byte-identical replay, 10 s later, ran its handler again.
    import json
    handler = Recorder()
    app = wxgate.make_app(two_apps(tmp_path, handler), clock=clock)
    query, body = build_push(text_message(msg_id="6054768590064713728"))
    assert wsgi_post(app, "/wechat", body, query) == "200 OK"
    for index in range(wxgate.DEFAULT_DEDUP_SIZE + 100):
        flood = json.dumps(text_message(msg_id=str(index), Content=f"flood {index}")).encode()
        assert wsgi_post(app, "/cloud", flood, headers={"HTTP_X_WX_SOURCE": "x"}) == "200 OK"
    clock.advance(10)
    assert wsgi_post(app, "/wechat", body, query) == "200 OK"
    shop_runs = [m for m in handler.messages if m.app == "shop"]
    print(f"\nshop handler runs after a flood of {handler.calls - len(shop_runs)} cloud "
          f"pushes and the shop push's replay: {len(shop_runs)}")
    assert len(shop_runs) == 1
    assert handler.calls == 1 + wxgate.DEFAULT_DEDUP_SIZE + 100
    app.close()


# -- a takeover needs time to run the handler -------------------------------------------------


def stalled_claim_gateway(tmp_path, clock, handler, expire_when_left, deadline=1.0):
    """A gateway on sqlite whose push finds the message claimed by a stalled worker; the
    claim expires (the shared clock jumps past it) once the push has ``expire_when_left``
    seconds left before its reply deadline. The injected sleep is the push's only wait."""
    import time
    config = make_config(tmp_path, handler,
                         extra_gateway=f"store = sqlite://{tmp_path / 'claims.db'}")
    stalled = wxgate.SqliteStore(str(tmp_path / "claims.db"), clock=clock)
    store_key = f"{config.store_prefix}:dedup:test:m:takeover-1"
    assert stalled.add(store_key, "p999.stalled.0", wxgate.CLAIM_TTL)
    sent_at = []

    def sleep(seconds):
        time.sleep(seconds)
        if time.monotonic() >= sent_at[0] + deadline - expire_when_left:
            clock.advance(wxgate.CLAIM_TTL + 1)

    app = wxgate.make_app(config, clock=clock, sleep=sleep, reply_deadline=deadline)
    return app, stalled, sent_at


def test_a_takeover_too_close_to_the_deadline_is_answered_as_late(tmp_path, clock):
    # A retry waited on a claim whose owner stalled (it stopped renewing, but may yet
    # finish). The claim expires with 15 % of the reply deadline left: the handler would
    # answer after WeChat has gone, beside the stalled owner. Answer as to any push that
    # cannot be answered in time (503, empty body), and give the key back for the retry.
    import time
    handler = Recorder()
    app, stalled, sent_at = stalled_claim_gateway(tmp_path, clock, handler, 0.15)
    sent_at.append(time.monotonic())
    response = send(app, text_message(msg_id="takeover-1"), status="*")
    print(f"\ntakeover with 0.15 s of 1.0 s left: {response.status_int}, "
          f"handler runs {handler.calls}")
    assert (response.status_int, response.body, handler.calls) == (503, b"", 0)
    assert stalled.get("wxgate:dedup:test:m:takeover-1") is None  # free for the retry
    sent_at[0] = time.monotonic()
    assert send(app, text_message(msg_id="takeover-1")).body == b"success"
    assert handler.calls == 1
    app.close()
    stalled.close()


def test_a_takeover_with_time_left_runs_the_handler(tmp_path, clock):
    # A worker killed mid-handler: its claim expires within CLAIM_TTL, which leaves a retry
    # most of its 5 seconds, and the retry runs the handler.
    import time
    handler = Recorder()
    app, stalled, sent_at = stalled_claim_gateway(tmp_path, clock, handler, 0.9)
    sent_at.append(time.monotonic())
    assert send(app, text_message(msg_id="takeover-1")).body == b"success"
    assert handler.calls == 1
    app.close()
    stalled.close()
