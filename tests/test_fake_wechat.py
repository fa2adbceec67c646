"""Tests of the fake WeChat itself, over real HTTP with urllib.

wxgate's token and client tests trust the fake to behave as WeChat's backend API does, so
each rule it imitates is pinned here first: if the fake drifted, those tests would pass
against a WeChat that does not exist.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest

from fake_wechat import DEFAULT_APPID, DEFAULT_SECRET, FakeClock, FakeWeChat

TOKEN = "/cgi-bin/token"
STABLE = "/cgi-bin/stable_token"
CUSTOM = "/cgi-bin/message/custom/send"
TYPING = "/cgi-bin/message/custom/typing"
SUBSCRIBE = "/cgi-bin/message/subscribe/send"
SESSION = "/sns/jscode2session"

OPENID = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"
TEXT = {"touser": OPENID, "msgtype": "text", "text": {"content": "hello"}}
TYPING_ON = {"touser": OPENID, "command": "Typing"}
SUBSCRIPTION = {
    "touser": OPENID,
    "template_id": "TEMPLATE_ID",
    "data": {"thing1": {"value": "order shipped"}},
}
# One valid body per business API, so the token rules can be checked on all three.
BUSINESS = [
    pytest.param(CUSTOM, TEXT, id="custom send"),
    pytest.param(TYPING, TYPING_ON, id="typing"),
    pytest.param(SUBSCRIBE, SUBSCRIPTION, id="subscribe send"),
]


###############################################################################################
# Fixtures and helpers ########################################################################
###############################################################################################


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def wechat(clock):
    with FakeWeChat(clock=clock) as fake:
        yield fake


def call(fake, method, path, query=None, body=None, *, timeout=2.0):
    """Send one request; return ``(status, content_type, decoded JSON)``, errors included."""
    url = fake.url + path
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers["Content-Type"], json.load(response)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], json.load(error)


def get_token(fake, appid=DEFAULT_APPID, secret=DEFAULT_SECRET, grant_type="client_credential"):
    query = {"grant_type": grant_type, "appid": appid, "secret": secret}
    return call(fake, "GET", TOKEN, query)[2]


def get_stable(fake, force_refresh=False, appid=DEFAULT_APPID, secret=DEFAULT_SECRET):
    body = {
        "grant_type": "client_credential",
        "appid": appid,
        "secret": secret,
        "force_refresh": force_refresh,
    }
    return call(fake, "POST", STABLE, body=body)[2]


def post(fake, path, token, body):
    """A business call; return its decoded answer."""
    query = {} if token is None else {"access_token": token}
    return call(fake, "POST", path, query, body)[2]


def send_text(fake, token):
    return post(fake, CUSTOM, token, TEXT)["errcode"]


def exchange(fake, js_code, appid=DEFAULT_APPID, secret=DEFAULT_SECRET):
    query = {
        "appid": appid,
        "secret": secret,
        "js_code": js_code,
        "grant_type": "authorization_code",
    }
    return call(fake, "GET", SESSION, query)[2]


###############################################################################################
# Classic access_token ########################################################################
###############################################################################################


def test_token_success_has_no_errcode(wechat):
    status, content_type, answer = call(
        wechat, "GET", TOKEN,
        {"grant_type": "client_credential", "appid": DEFAULT_APPID, "secret": DEFAULT_SECRET},
    )
    assert status == 200
    assert content_type.startswith("application/json")
    assert set(answer) == {"access_token", "expires_in"}
    assert answer["expires_in"] == 7200
    assert len(answer["access_token"]) >= 100


@pytest.mark.parametrize(
    "appid, secret, grant_type, errcode, errmsg",
    [
        pytest.param(DEFAULT_APPID, "0" * 32, "client_credential", 40001, "AppSecret error",
                     id="wrong secret"),
        pytest.param("wx0000000000000000", DEFAULT_SECRET, "client_credential", 40013,
                     "invalid appid", id="unknown appid"),
        pytest.param(DEFAULT_APPID, DEFAULT_SECRET, "password", 40002, "invalid grant_type",
                     id="bad grant_type"),
    ],
)
def test_token_errors(wechat, appid, secret, grant_type, errcode, errmsg):
    answer = get_token(wechat, appid, secret, grant_type)
    assert answer == {"errcode": errcode, "errmsg": errmsg}
    assert wechat.issued_tokens == []


def test_token_mints_a_new_token_each_call(wechat):
    first = get_token(wechat)["access_token"]
    second = get_token(wechat)["access_token"]
    assert first != second
    assert wechat.issued_tokens == [first, second]


def test_token_previous_one_lives_through_the_grace_then_dies(wechat, clock):
    old = get_token(wechat)["access_token"]
    clock.advance(1000)
    new = get_token(wechat)["access_token"]
    clock.advance(299)
    assert send_text(wechat, old) == 0
    clock.advance(1)
    assert send_text(wechat, old) == 40001
    assert send_text(wechat, new) == 0


def test_token_revoked_stays_dead_when_replaced(wechat):
    # Replacing a token grants it a grace period; a revoked one must not get that back.
    token = get_token(wechat)["access_token"]
    wechat.revoke(token)
    get_token(wechat)
    assert wechat.token_errcode(token) == 40001


def test_token_expires_after_expires_in(wechat, clock):
    token = get_token(wechat)["access_token"]
    clock.advance(7199)
    assert send_text(wechat, token) == 0
    clock.advance(1)
    assert send_text(wechat, token) == 42001


def test_token_lifetime_and_grace_are_settings(clock):
    with FakeWeChat(clock=clock, expires_in=60, grace=10) as fake:
        old = get_token(fake)
        assert old["expires_in"] == 60
        get_token(fake)
        clock.advance(10)
        assert fake.token_errcode(old["access_token"]) == 40001


def test_token_wants_get(wechat):
    query = {"grant_type": "client_credential", "appid": DEFAULT_APPID, "secret": DEFAULT_SECRET}
    assert call(wechat, "POST", TOKEN, query, {})[2]["errcode"] == 43001


def test_apps_are_separate(wechat):
    wechat.add_app("wx1111111111111111", "another secret")
    assert get_token(wechat, "wx1111111111111111", DEFAULT_SECRET)["errcode"] == 40001
    ours = get_token(wechat)["access_token"]
    get_token(wechat, "wx1111111111111111", "another secret")
    get_token(wechat, "wx1111111111111111", "another secret")
    # Two fetches for the other app leave ours as the latest of its own app.
    assert wechat.token_errcode(ours) == 0


###############################################################################################
# Stable access_token #########################################################################
###############################################################################################


def test_stable_returns_the_same_token_with_time_left(wechat, clock):
    first = get_stable(wechat)
    assert set(first) == {"access_token", "expires_in"}
    assert first["expires_in"] == 7200
    clock.advance(1000)
    second = get_stable(wechat)
    assert second == {"access_token": first["access_token"], "expires_in": 6200}
    assert len(wechat.issued_tokens) == 1


def test_stable_renews_within_five_minutes_of_expiry_with_overlap(wechat, clock):
    old = get_stable(wechat)["access_token"]
    clock.advance(7200 - 301)
    assert get_stable(wechat)["access_token"] == old
    clock.advance(1)  # exactly 300 s left: too little
    renewed = get_stable(wechat)
    assert renewed["access_token"] != old
    assert renewed["expires_in"] == 7200
    # Both work during the overlap; the old one then expires on its own.
    assert send_text(wechat, old) == 0
    assert send_text(wechat, renewed["access_token"]) == 0
    clock.advance(300)
    assert send_text(wechat, old) == 42001
    assert send_text(wechat, renewed["access_token"]) == 0


def test_stable_force_refresh_kills_the_old_token_at_once(wechat):
    old = get_stable(wechat)["access_token"]
    new = get_stable(wechat, force_refresh=True)["access_token"]
    assert new != old
    assert send_text(wechat, old) == 40001
    assert send_text(wechat, new) == 0
    assert wechat.current_stable_token() == new


def test_stable_force_refresh_within_30_s_returns_the_current_token(wechat, clock):
    first = get_stable(wechat, force_refresh=True)["access_token"]
    clock.advance(29)
    assert get_stable(wechat, force_refresh=True)["access_token"] == first
    clock.advance(1)
    second = get_stable(wechat, force_refresh=True)["access_token"]
    assert second != first
    assert wechat.token_errcode(first) == 40001


def test_stable_force_refresh_limit_is_20_a_day(wechat, clock):
    tokens = set()
    for _ in range(20):
        tokens.add(get_stable(wechat, force_refresh=True)["access_token"])
        clock.advance(30)
    assert len(tokens) == 20
    assert get_stable(wechat, force_refresh=True) == {
        "errcode": 45009, "errmsg": "reach max api daily quota limit",
    }
    # Normal mode still works, and the quota returns the next day.
    assert get_stable(wechat)["access_token"] in tokens
    clock.advance(86400)
    assert "access_token" in get_stable(wechat, force_refresh=True)


def test_stable_force_refresh_must_be_a_json_boolean(wechat):
    old = get_stable(wechat)["access_token"]
    assert get_stable(wechat, force_refresh="true")["access_token"] == old


def test_stable_and_classic_are_independent(wechat, clock):
    stable = get_stable(wechat)["access_token"]
    get_token(wechat)
    classic = get_token(wechat)["access_token"]
    clock.advance(300)
    # Classic fetches replace classic tokens only ...
    assert wechat.token_errcode(stable) == 0
    assert get_stable(wechat)["access_token"] == stable
    # ... and a forced stable refresh kills the stable token only.
    get_stable(wechat, force_refresh=True)
    assert wechat.token_errcode(stable) == 40001
    assert send_text(wechat, classic) == 0


@pytest.mark.parametrize(
    "body, errcode",
    [
        pytest.param({"grant_type": "client_credential", "appid": DEFAULT_APPID,
                      "secret": "bad"}, 40001, id="wrong secret"),
        pytest.param({"grant_type": "client_credential", "appid": "wx0000000000000000",
                      "secret": DEFAULT_SECRET}, 40013, id="unknown appid"),
        pytest.param({"grant_type": "authorization_code", "appid": DEFAULT_APPID,
                      "secret": DEFAULT_SECRET}, 40002, id="bad grant_type"),
        pytest.param(None, 47001, id="no body"),
        pytest.param(["client_credential"], 47001, id="not an object"),
    ],
)
def test_stable_errors(wechat, body, errcode):
    assert call(wechat, "POST", STABLE, body=body)[2]["errcode"] == errcode
    assert wechat.issued_tokens == []


def test_stable_wants_post(wechat):
    assert call(wechat, "GET", STABLE)[2] == {"errcode": 43002, "errmsg": "require POST method"}


###############################################################################################
# Business APIs ###############################################################################
###############################################################################################


@pytest.mark.parametrize("path, body", BUSINESS)
def test_business_accepts_a_valid_token(wechat, path, body):
    answer = post(wechat, path, get_stable(wechat)["access_token"], body)
    assert answer["errcode"] == 0
    assert answer["errmsg"] == "ok"


@pytest.mark.parametrize("path, body", BUSINESS)
def test_business_token_errors(wechat, clock, path, body):
    token = get_stable(wechat)["access_token"]
    assert post(wechat, path, None, body) == {"errcode": 41001, "errmsg": "access_token missing"}
    assert post(wechat, path, "", body)["errcode"] == 41001
    assert post(wechat, path, "not-a-token", body)["errcode"] == 40001
    clock.advance(7200)
    assert post(wechat, path, token, body) == {
        "errcode": 42001, "errmsg": "access_token expired",
    }
    assert wechat.custom_messages == wechat.typing_commands == wechat.subscribe_messages == []


def test_revoke_kills_a_token(wechat):
    token = get_stable(wechat)["access_token"]
    wechat.revoke(token)
    assert send_text(wechat, token) == 40001
    # A normal stable call no longer hands out the revoked token.
    assert get_stable(wechat)["access_token"] != token


def test_reject_all_tokens(wechat):
    token = get_stable(wechat)["access_token"]
    wechat.reject_all_tokens = True
    assert [send_text(wechat, token) for _ in range(3)] == [40001] * 3
    # A missing token is still a programming error, not a token to refresh.
    assert send_text(wechat, None) == 41001
    wechat.reject_all_tokens = False
    assert send_text(wechat, token) == 0
    assert len(wechat.custom_messages) == 1


def test_custom_send_records_accepted_bodies(wechat):
    token = get_stable(wechat)["access_token"]
    image = {"touser": OPENID, "msgtype": "image", "image": {"media_id": "MEDIA"}}
    assert post(wechat, CUSTOM, token, TEXT) == {"errcode": 0, "errmsg": "ok"}
    assert post(wechat, CUSTOM, token, image)["errcode"] == 0
    assert wechat.custom_messages == [TEXT, image]


@pytest.mark.parametrize(
    "body, errcode",
    [
        pytest.param({"msgtype": "text", "text": {"content": "hi"}}, 40003, id="no touser"),
        pytest.param({"touser": OPENID, "msgtype": "news", "news": {}}, 40008, id="news"),
        pytest.param({"touser": OPENID, "msgtype": "text"}, 47001, id="no text object"),
        pytest.param({"touser": OPENID, "msgtype": "text", "text": {"content": ""}}, 44004,
                     id="empty content"),
        pytest.param({"touser": OPENID, "msgtype": "link",
                      "link": {"title": "t", "description": "d", "url": "https://x"}}, 47001,
                     id="link without thumb_url"),
        pytest.param(None, 47001, id="no body"),
    ],
)
def test_custom_send_validates(wechat, body, errcode):
    token = get_stable(wechat)["access_token"]
    assert post(wechat, CUSTOM, token, body)["errcode"] == errcode
    assert wechat.custom_messages == []


def test_typing_commands(wechat):
    token = get_stable(wechat)["access_token"]
    cancel = {"touser": OPENID, "command": "CancelTyping"}
    assert post(wechat, TYPING, token, TYPING_ON) == {"errcode": 0, "errmsg": "ok"}
    assert post(wechat, TYPING, token, cancel)["errcode"] == 0
    assert post(wechat, TYPING, token, {"touser": OPENID, "command": "typing"})["errcode"] == 45072
    assert post(wechat, TYPING, token, {"touser": OPENID})["errcode"] == 45072
    assert wechat.typing_commands == [TYPING_ON, cancel]


def test_subscribe_send_answers_a_msgid(wechat):
    token = get_stable(wechat)["access_token"]
    first = post(wechat, SUBSCRIBE, token, SUBSCRIPTION)
    second = post(wechat, SUBSCRIBE, token, dict(SUBSCRIPTION, page="index?foo=bar"))
    assert first["errcode"] == 0
    assert isinstance(first["msgid"], int)
    assert second["msgid"] != first["msgid"]
    assert wechat.subscribe_messages[0] == SUBSCRIPTION
    assert wechat.subscribe_messages[1]["page"] == "index?foo=bar"


@pytest.mark.parametrize(
    "change, errcode",
    [
        pytest.param({"touser": ""}, 40003, id="empty touser"),
        pytest.param({"template_id": None}, 40037, id="no template_id"),
        pytest.param({"data": {}}, 47003, id="empty data"),
        pytest.param({"data": {"thing1": "order shipped"}}, 47003, id="value not wrapped"),
        pytest.param({"miniprogram_state": "production"}, 47003, id="bad state"),
        pytest.param({"lang": "fr_FR"}, 47003, id="bad lang"),
    ],
)
def test_subscribe_send_validates(wechat, change, errcode):
    token = get_stable(wechat)["access_token"]
    body = {k: v for k, v in dict(SUBSCRIPTION, **change).items() if v is not None}
    assert post(wechat, SUBSCRIBE, token, body)["errcode"] == errcode
    assert wechat.subscribe_messages == []


def test_business_wants_post(wechat):
    token = get_stable(wechat)["access_token"]
    assert call(wechat, "GET", CUSTOM, {"access_token": token})[2]["errcode"] == 43002


###############################################################################################
# code2Session ################################################################################
###############################################################################################


def test_code2session_success_has_no_errcode(wechat):
    code = wechat.issue_code(OPENID, session_key="c2Vzc2lvbmtleTEyMzQ1Ng==")
    assert exchange(wechat, code) == {
        "openid": OPENID, "session_key": "c2Vzc2lvbmtleTEyMzQ1Ng==",
    }


def test_code2session_unionid_only_when_set(wechat):
    answer = exchange(wechat, wechat.issue_code(OPENID, unionid="oUnion123"))
    assert answer["unionid"] == "oUnion123"
    assert len(answer["session_key"]) == 24  # Base64 of 16 bytes, as WeChat's


def test_code2session_codes_are_single_use(wechat):
    code = wechat.issue_code(OPENID)
    assert exchange(wechat, code)["openid"] == OPENID
    assert exchange(wechat, code) == {"errcode": 40163, "errmsg": "code been used"}


def test_code2session_errors(wechat, clock):
    code = wechat.issue_code(OPENID)
    assert exchange(wechat, "never-issued") == {"errcode": 40029, "errmsg": "invalid code"}
    assert exchange(wechat, code, secret="bad")["errcode"] == 40125
    assert exchange(wechat, code, appid="wx0000000000000000")["errcode"] == 40013
    assert exchange(wechat, "")["errcode"] == 41008
    clock.advance(300)
    # The failures above did not use the code; time did.
    assert exchange(wechat, code)["errcode"] == 40029


def test_code2session_code_bound_to_an_app(wechat):
    wechat.add_app("wx1111111111111111", "another secret")
    code = wechat.issue_code(OPENID, appid="wx1111111111111111")
    assert exchange(wechat, code)["errcode"] == 40029
    assert exchange(wechat, code, "wx1111111111111111", "another secret")["openid"] == OPENID


###############################################################################################
# Controls and counters #######################################################################
###############################################################################################


def test_fail_next_fails_that_many_calls(wechat):
    wechat.fail_next(TOKEN, -1, times=2)
    assert get_token(wechat) == {"errcode": -1, "errmsg": "system error"}
    assert get_token(wechat)["errcode"] == -1
    assert "access_token" in get_token(wechat)
    assert wechat.calls[TOKEN] == 3
    assert len(wechat.issued_tokens) == 1


def test_fail_next_has_no_side_effect_and_queues(wechat):
    token = get_stable(wechat)["access_token"]
    wechat.fail_next(CUSTOM, 45009)
    wechat.fail_next("cgi-bin/message/custom/send", 45015, "response out of time limit")
    assert post(wechat, CUSTOM, token, TEXT) == {
        "errcode": 45009, "errmsg": "reach max api daily quota limit",
    }
    assert post(wechat, CUSTOM, token, TEXT) == {
        "errcode": 45015, "errmsg": "response out of time limit",
    }
    assert post(wechat, CUSTOM, token, TEXT)["errcode"] == 0
    assert wechat.custom_messages == [TEXT]


def test_fail_next_with_a_proxy_status(wechat):
    wechat.fail_next(STABLE, -1, status=502)
    status, content_type, answer = call(wechat, "POST", STABLE, body={})
    assert status == 502
    assert answer["errcode"] == -1


def test_hang_times_out_the_client_then_recovers(wechat):
    wechat.hang(TOKEN, 5.0)
    with pytest.raises((socket.timeout, urllib.error.URLError)):
        call(wechat, "GET", TOKEN, {"grant_type": "client_credential"}, timeout=0.2)
    # One hang only: the next call is answered at once.
    assert get_token(wechat)["expires_in"] == 7200
    assert wechat.calls[TOKEN] == 2


def test_stop_does_not_wait_for_hung_handlers(clock):
    fake = FakeWeChat(clock=clock).start()
    fake.hang(TOKEN, 60.0)
    with pytest.raises((socket.timeout, urllib.error.URLError)):
        call(fake, "GET", TOKEN, timeout=0.2)
    stopper = threading.Thread(target=fake.stop)
    stopper.start()
    stopper.join(timeout=5.0)
    assert not stopper.is_alive()


def test_counters_and_request_log(wechat):
    token = get_token(wechat)["access_token"]
    get_stable(wechat)
    get_stable(wechat)
    post(wechat, CUSTOM, token, TEXT)
    assert wechat.token_fetches == 3
    assert wechat.calls[TOKEN] == 1
    assert wechat.calls[STABLE] == 2
    assert wechat.calls[CUSTOM] == 1
    assert wechat.calls[TYPING] == 0
    method, path, query, body = wechat.requests[-1]
    assert (method, path, body) == ("POST", CUSTOM, TEXT)
    assert query == {"access_token": token}
    assert wechat.requests[1].body["force_refresh"] is False
    wechat.clear_log()
    assert wechat.token_fetches == 0
    assert wechat.requests == []
    assert wechat.custom_messages == []


def test_counters_are_thread_safe(wechat, clock):
    tokens = []

    def fetch():
        tokens.append(get_token(wechat)["access_token"])

    threads = [threading.Thread(target=fetch) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wechat.calls[TOKEN] == 20
    assert sorted(tokens) == sorted(wechat.issued_tokens)
    assert len(set(tokens)) == 20
    # Each fetch replaced exactly one other, so once the grace is over one token is left.
    clock.advance(300)
    assert [wechat.token_errcode(token) for token in wechat.issued_tokens] == [40001] * 19 + [0]


def test_unknown_path_is_a_json_404(wechat):
    status, content_type, answer = call(wechat, "GET", "/cgi-bin/nope")
    assert status == 404
    assert content_type.startswith("application/json")
    assert answer["errcode"] == 404
    assert wechat.calls["/cgi-bin/nope"] == 1


def test_context_manager_stops_serving(clock):
    with FakeWeChat(clock=clock) as fake:
        url = fake.url
        assert url.startswith("http://127.0.0.1:")
        assert "access_token" in get_token(fake)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + TOKEN, timeout=1.0).close()
    with pytest.raises(RuntimeError):
        fake.url


def test_no_app_without_add_app(clock):
    with FakeWeChat(None, clock=clock) as fake:
        assert get_token(fake)["errcode"] == 40013
        fake.add_app(DEFAULT_APPID, DEFAULT_SECRET)
        assert "access_token" in get_token(fake)
        assert fake.errors == []


def test_fake_clock():
    clock = FakeClock(100.0)
    assert clock() == 100.0
    assert clock.advance(5) == 105.0
    clock.set(50.0)
    assert clock() == 50.0
    with pytest.raises(ValueError):
        clock.advance(-1)
