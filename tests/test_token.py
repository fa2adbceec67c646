"""access_token and the WeChat API client, against the real fake WeChat over loopback HTTP.

Nothing patches urllib: :class:`fake_wechat.FakeWeChat` serves WeChat's backend API on
127.0.0.1 and counts every call, so a test can assert exactly how many token fetches and
business calls happened. The fake, the managers and the stores share one :class:`FakeClock`,
so expiry is reached by moving time, never by sleeping.
"""

import functools
import json
import logging
import threading
import urllib.request

import pytest
import webtest

import wxgate
from conftest import APPID, NOW, OPENID, build_push, make_config, text_message
from fake_wechat import (CODE2SESSION_PATH, CUSTOM_SEND_PATH, DEFAULT_APPID, DEFAULT_SECRET,
                         STABLE_TOKEN_PATH, SUBSCRIBE_SEND_PATH, TOKEN_PATH, TYPING_PATH,
                         FakeClock, FakeWeChat)
from serving import start_gunicorn, stop

GRANTS = ["stable", "classic"]
TOKEN_PATHS = {"stable": STABLE_TOKEN_PATH, "classic": TOKEN_PATH}
WRONG_SECRET = "f" * 32
ADMIN_SECRET = "s3cret-admin-bearer-0001"
ADMIN = "/_wxgate/token"


###############################################################################################
# Fixtures and helpers ########################################################################
###############################################################################################


@pytest.fixture
def clock():
    """One clock for the fake, the managers and the stores (conftest's store_factory too)."""
    return FakeClock(NOW)


@pytest.fixture
def fake(clock):
    with FakeWeChat(clock=clock) as wechat:
        wechat.add_app(APPID, DEFAULT_SECRET)  # conftest's app, for the gateway tests
        yield wechat
        assert wechat.errors == []


@pytest.fixture
def sleeps():
    """A ``sleep=`` that records instead of waiting, for the busy backoff tests."""
    return []


@pytest.fixture
def make_manager(fake, clock):
    return functools.partial(wxgate.TokenManager, appid=DEFAULT_APPID, appsecret=DEFAULT_SECRET,
                             api_base=fake.url, api_timeout=2.0, clock=clock, name="demo")


@pytest.fixture
def make_client(make_manager):
    def factory(sleep=None, **options):
        manager = make_manager(**options)
        if sleep is None:
            return wxgate.WeChatClient(manager)
        return wxgate.WeChatClient(manager, sleep=sleep)
    return factory


@pytest.fixture
def make_gateway(tmp_path, fake, clock):
    """A Gateway for conftest's app "test", pointed at the fake, its AppSecret set."""
    def factory(handler=None, *, admin_secret=ADMIN_SECRET, appsecret=DEFAULT_SECRET,
                mode="plain"):
        gateway_lines = [f"api_base = {fake.url}", "api_timeout = 2"]
        if admin_secret:
            gateway_lines.append(f"admin_secret = {admin_secret}")
        config = make_config(tmp_path, handler, mode=mode, extra_gateway="\n".join(gateway_lines),
                             extra_app=f"appsecret = {appsecret}" if appsecret else "")
        return wxgate.make_app(config, clock=clock)
    return factory


def run_threads(count, target):
    """Run ``target(i)`` in ``count`` threads released together; return the results in order."""
    barrier = threading.Barrier(count)
    results, errors = [None] * count, []

    def worker(index):
        try:
            barrier.wait(10)
            results[index] = target(index)
        except BaseException as exc:  # reported below, not as an unhandled-thread warning
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert not any(thread.is_alive() for thread in threads)
    return results


def forced_refreshes(fake):
    return sum(1 for request in fake.requests
               if request.path == STABLE_TOKEN_PATH and request.body.get("force_refresh") is True)


def tokens_sent(fake, path):
    """The access_token of each call to ``path``, in order."""
    return [request.query.get("access_token") for request in fake.requests
            if request.path == path]


def bearer(secret=ADMIN_SECRET):
    return {"Authorization": f"Bearer {secret}"}


###############################################################################################
# TokenManager ################################################################################
###############################################################################################


def test_get_token_fetches_once_and_caches(make_manager, fake, store_factory):
    manager = make_manager(store=store_factory())
    first = manager.get_token()
    assert manager.get_token() == first
    assert manager.get_token() == first
    assert fake.token_fetches == 1
    assert first == fake.current_stable_token()


@pytest.mark.parametrize("grant", GRANTS)
def test_refetches_only_within_the_refresh_margin(make_manager, fake, clock, store_factory,
                                                  grant):
    manager = make_manager(store=store_factory(), grant=grant, refresh_margin=300)
    first = manager.get_token()
    clock.advance(7200 - 300 - 1)  # 301 s left: still outside the margin
    assert manager.get_token() == first
    assert fake.token_fetches == 1
    clock.advance(2)  # 299 s left
    second = manager.get_token()
    assert second != first
    assert fake.token_fetches == 2
    assert manager.get_token() == second
    assert fake.token_fetches == 2


def test_a_larger_margin_with_stable_grant_does_not_fetch_on_every_call(make_manager, fake,
                                                                        clock):
    # stable_token returns the same token until it is 300 s from expiry; with a 600 s margin
    # the refetch at 550 s left brings back that same token with 550 s left, which is still
    # inside the margin. That must not turn every later get_token() into another fetch.
    manager = make_manager(grant="stable", refresh_margin=600)
    first = manager.get_token()
    clock.advance(7200 - 550)
    for _ in range(5):
        assert manager.get_token() == first
    assert fake.token_fetches <= 2


def test_expiry_is_stored_beside_the_token(make_manager, fake, clock, store_factory):
    first = make_manager(store=store_factory())
    token = first.get_token()
    # A second manager (another worker) on the same store: it neither fetches nor guesses.
    second = make_manager(store=store_factory())
    assert second.token_info() == {"access_token": token, "expires_at": NOW + 7200}
    assert fake.token_fetches == 1
    assert second.fetches == 0
    # Only the stored expiry can tell it the token is now within the margin.
    clock.advance(7200 - 299)
    assert second.get_token() != token
    assert second.fetches == 1
    assert fake.token_fetches == 2


@pytest.mark.parametrize("grant", GRANTS)
def test_grant_picks_the_token_endpoint(make_manager, fake, grant):
    token = make_manager(grant=grant).get_token()
    (request,) = fake.requests
    if grant == "stable":
        assert (request.method, request.path) == ("POST", STABLE_TOKEN_PATH)
        assert request.body == {"grant_type": "client_credential", "appid": DEFAULT_APPID,
                                "secret": DEFAULT_SECRET, "force_refresh": False}
        assert token == fake.current_stable_token()
    else:
        assert (request.method, request.path) == ("GET", TOKEN_PATH)
        assert request.query == {"grant_type": "client_credential", "appid": DEFAULT_APPID,
                                 "secret": DEFAULT_SECRET}
        assert fake.current_stable_token() is None
    assert fake.issued_tokens == [token]


def test_fifty_threads_cause_one_fetch(make_manager, fake, store_factory):
    manager = make_manager(store=store_factory())
    fake.hang(STABLE_TOKEN_PATH, 0.3)  # keep the fetch in flight while the others arrive
    tokens = run_threads(50, lambda _: manager.get_token())
    assert fake.token_fetches == 1
    assert set(tokens) == {fake.issued_tokens[0]}


def test_two_managers_on_one_store_cause_one_fetch(make_manager, fake, store_factory):
    # Two managers with their own stores on the same data: two processes, as far as the
    # in-process lock can tell, so only the lock in the store keeps them to one fetch.
    managers = [make_manager(store=store_factory()), make_manager(store=store_factory())]
    fake.hang(STABLE_TOKEN_PATH, 0.3)
    tokens = run_threads(50, lambda i: managers[i % 2].get_token())
    assert fake.token_fetches == 1
    assert managers[0].fetches + managers[1].fetches == 1
    assert set(tokens) == {fake.issued_tokens[0]}


@pytest.fixture
def gunicorn():
    """``gunicorn(ini_path, **options)`` starts a server; all are stopped at teardown."""
    processes = []

    def start(ini_path, **options):
        base_url, process = start_gunicorn(ini_path, **options)
        processes.append(process)
        return base_url, process

    yield start
    for process in processes:
        stop(process)


def test_gunicorn_workers_sharing_sqlite_fetch_once(tmp_path, gunicorn):
    with FakeWeChat() as fake:  # real time: the workers use the real clock
        source = tmp_path / "wxgate.ini"
        source.write_text("\n".join([
            "[wxgate]", f"store = sqlite://{tmp_path}/wxgate.db", f"api_base = {fake.url}",
            f"admin_secret = {ADMIN_SECRET}", "",
            "[app:shop]", "path = /wechat", f"appid = {DEFAULT_APPID}", "token = pushtoken",
            "mode = plain", f"appsecret = {DEFAULT_SECRET}", "handler = wxgate:demo_handler",
            ""]), "utf-8")
        access_log = tmp_path / "access.log"
        base_url, _ = gunicorn(source, workers=4, extra_args=(
            "--access-logfile", str(access_log), "--access-logformat", "%(p)s %(s)s %(U)s"))
        fake.hang(STABLE_TOKEN_PATH, 0.5)  # the first fetch stays in flight: others must wait

        def ask(_):
            request = urllib.request.Request(f"{base_url}{ADMIN}/shop", headers=bearer())
            with urllib.request.urlopen(request, timeout=15) as response:
                return response.status, json.load(response)

        answers = run_threads(40, ask)
        assert {status for status, _ in answers} == {200}
        assert {body["access_token"] for _, body in answers} == {fake.current_stable_token()}
        assert fake.token_fetches == 1
        assert fake.errors == []
    served_by = {line.split()[0] for line in access_log.read_text().splitlines()
                 if line.endswith(f"{ADMIN}/shop")}
    assert len(served_by) >= 2, "the requests did not reach several workers"


###############################################################################################
# WeChatClient: helpers #######################################################################
###############################################################################################


SENDS = [
    pytest.param("send_text", ("hello 你好",), "text", {"content": "hello 你好"}, id="text"),
    pytest.param("send_image", ("MEDIA_ID",), "image", {"media_id": "MEDIA_ID"}, id="image"),
    pytest.param("send_link", ("Title", "Desc", "https://example.com/a?b=1", "https://t/x.png"),
                 "link", {"title": "Title", "description": "Desc",
                          "url": "https://example.com/a?b=1", "thumb_url": "https://t/x.png"},
                 id="link"),
    pytest.param("send_miniprogrampage", ("Card", "pages/index?id=1", "THUMB"),
                 "miniprogrampage", {"title": "Card", "pagepath": "pages/index?id=1",
                                     "thumb_media_id": "THUMB"}, id="miniprogrampage"),
]


@pytest.mark.parametrize("method, args, msgtype, payload", SENDS)
def test_customer_messages_reach_wechat(make_client, fake, method, args, msgtype, payload):
    client = make_client()
    answer = getattr(client, method)(OPENID, *args)
    assert answer["errcode"] == 0
    assert fake.custom_messages == [{"touser": OPENID, "msgtype": msgtype, msgtype: payload}]
    assert tokens_sent(fake, CUSTOM_SEND_PATH) == [client.tokens.get_token()]
    assert fake.token_fetches == 1


def test_send_customer_message_is_the_generic_form(make_client, fake):
    make_client().send_customer_message(OPENID, "image", {"media_id": "M1"})
    assert fake.custom_messages == [{"touser": OPENID, "msgtype": "image",
                                     "image": {"media_id": "M1"}}]


def test_subscribe_message_with_every_option(make_client, fake):
    answer = make_client().send_subscribe_message(
        OPENID, "TEMPLATE_ID", {"thing1": "已发货", "time2": {"value": "2024-04-25 10:00"}},
        page="index?foo=bar", miniprogram_state="trial", lang="en_US")
    assert answer["errcode"] == 0 and isinstance(answer["msgid"], int)
    assert fake.subscribe_messages == [{
        "touser": OPENID, "template_id": "TEMPLATE_ID",
        "data": {"thing1": {"value": "已发货"}, "time2": {"value": "2024-04-25 10:00"}},
        "page": "index?foo=bar", "miniprogram_state": "trial", "lang": "en_US"}]
    assert fake.calls[SUBSCRIBE_SEND_PATH] == 1


def test_subscribe_message_leaves_unset_options_out(make_client, fake):
    make_client().send_subscribe_message(OPENID, "TEMPLATE_ID", {"thing1": "x"})
    assert fake.subscribe_messages == [{"touser": OPENID, "template_id": "TEMPLATE_ID",
                                        "data": {"thing1": {"value": "x"}}}]


def test_set_typing_on_and_off(make_client, fake):
    client = make_client()
    client.set_typing(OPENID, True)
    client.set_typing(OPENID, False)
    client.set_typing(OPENID)
    assert fake.typing_commands == [{"touser": OPENID, "command": "Typing"},
                                    {"touser": OPENID, "command": "CancelTyping"},
                                    {"touser": OPENID, "command": "Typing"}]


def test_code2session_exchanges_a_code_once(make_client, fake):
    client = make_client()
    code = fake.issue_code(OPENID, session_key="c2Vzc2lvbmtleTEyMzQ1Ng==", unionid="oUNION")
    # code2Session's success carries no errcode at all: still a success.
    assert client.code2session(code) == {"openid": OPENID,
                                         "session_key": "c2Vzc2lvbmtleTEyMzQ1Ng==",
                                         "unionid": "oUNION"}
    (request,) = fake.requests
    assert request.query == {"appid": DEFAULT_APPID, "secret": DEFAULT_SECRET, "js_code": code,
                             "grant_type": "authorization_code"}
    with pytest.raises(wxgate.WeChatAPIError) as caught:
        client.code2session(code)
    assert caught.value.errcode == 40163
    assert fake.calls[CODE2SESSION_PATH] == 2  # no retry of a used code
    assert fake.token_fetches == 0  # code2session needs no access_token


def test_code2session_unknown_code(make_client, fake):
    with pytest.raises(wxgate.WeChatAPIError) as caught:
        make_client().code2session("not-a-code")
    assert caught.value.errcode == 40029


def test_call_returns_the_decoded_answer(make_client, fake):
    client = make_client()
    answer = client.call("POST", TYPING_PATH, params={"extra": "1"},
                         json={"touser": OPENID, "command": "Typing"})
    assert answer == {"errcode": 0, "errmsg": "ok"}
    (request,) = [r for r in fake.requests if r.path == TYPING_PATH]
    assert request.query == {"extra": "1", "access_token": client.tokens.get_token()}


###############################################################################################
# WeChatClient: token rejection, retries, errors ##############################################
###############################################################################################


@pytest.mark.parametrize("grant", GRANTS)
def test_revoked_token_gets_one_refresh_and_one_retry(make_client, fake, grant):
    client = make_client(grant=grant)
    old = client.tokens.get_token()
    fake.revoke(old)
    client.send_text(OPENID, "after revoke")
    assert fake.token_fetches == 2
    new = client.tokens.get_token()
    assert new != old
    assert tokens_sent(fake, CUSTOM_SEND_PATH) == [old, new]
    assert len(fake.custom_messages) == 1
    # A dead stable token is simply replaced on a normal call: no force_refresh is needed.
    assert forced_refreshes(fake) == 0


def test_concurrent_rejections_share_one_refresh(make_client, fake):
    client = make_client()
    old = client.tokens.get_token()
    fake.revoke(old)
    run_threads(20, lambda i: client.send_text(OPENID, f"message {i}"))
    assert fake.token_fetches == 2
    assert len(fake.custom_messages) == 20
    assert set(tokens_sent(fake, CUSTOM_SEND_PATH)) == {old, client.tokens.get_token()}


@pytest.mark.parametrize("errcode", [40001, 40014, 42001])
def test_each_token_errcode_triggers_the_refresh(make_client, fake, errcode):
    client = make_client(grant="classic")
    client.tokens.get_token()
    fake.fail_next(CUSTOM_SEND_PATH, errcode)
    client.send_text(OPENID, "hi")
    assert fake.calls[CUSTOM_SEND_PATH] == 2
    assert fake.token_fetches == 2
    assert len(fake.custom_messages) == 1


@pytest.mark.parametrize("grant", GRANTS)
def test_token_rejected_for_good_is_retried_exactly_once(make_client, fake, grant):
    client = make_client(grant=grant)
    fake.reject_all_tokens = True
    with pytest.raises(wxgate.WeChatAPIError) as caught:
        client.send_text(OPENID, "hi")
    assert caught.value.errcode == 40001
    assert fake.calls[CUSTOM_SEND_PATH] == 2
    if grant == "classic":
        assert fake.token_fetches == 2
    else:  # the normal fetch returned the same token, so one forced refresh
        assert fake.token_fetches == 3
        assert forced_refreshes(fake) == 1
    assert fake.custom_messages == []


def test_stable_forces_a_refresh_when_the_rejected_token_comes_back(make_client, fake):
    client = make_client(grant="stable")
    old = client.tokens.get_token()
    # WeChat rejects a token that its stable API still hands out.
    fake.fail_next(CUSTOM_SEND_PATH, 40001)
    client.send_text(OPENID, "hi")
    assert forced_refreshes(fake) == 1
    new = client.tokens.get_token()
    assert new != old
    assert tokens_sent(fake, CUSTOM_SEND_PATH) == [old, new]
    assert fake.token_errcode(old) == 40001  # the force refresh killed it
    assert len(fake.custom_messages) == 1


def test_stable_force_refresh_at_most_once_per_30_seconds(make_client, fake, clock):
    client = make_client(grant="stable")
    fake.reject_all_tokens = True
    with pytest.raises(wxgate.WeChatAPIError):
        client.send_text(OPENID, "first")
    assert forced_refreshes(fake) == 1
    calls_before = fake.calls[CUSTOM_SEND_PATH]

    clock.advance(10)
    with pytest.raises(wxgate.WeChatAPIError) as caught:
        client.send_text(OPENID, "second")
    assert caught.value.errcode == 40001
    assert forced_refreshes(fake) == 1
    assert 1 <= fake.calls[CUSTOM_SEND_PATH] - calls_before <= 2

    clock.advance(21)  # 31 s after the first force
    with pytest.raises(wxgate.WeChatAPIError):
        client.send_text(OPENID, "third")
    assert forced_refreshes(fake) == 2


@pytest.mark.parametrize("errcode", [40003, 41001, 45009, 45011, 45015, 48001])
def test_other_errcodes_raise_without_retry(make_client, fake, errcode):
    client = make_client()
    fake.fail_next(CUSTOM_SEND_PATH, errcode, "from the fake")
    with pytest.raises(wxgate.WeChatAPIError) as caught:
        client.send_text(OPENID, "hi")
    assert (caught.value.errcode, caught.value.errmsg) == (errcode, "from the fake")
    assert str(errcode) in str(caught.value)
    assert fake.calls[CUSTOM_SEND_PATH] == 1
    assert fake.token_fetches == 1


def test_invalid_openid_from_the_real_check(make_client, fake):
    with pytest.raises(wxgate.WeChatAPIError) as caught:
        make_client().send_text("", "hi")
    assert caught.value.errcode == 40003
    assert fake.calls[CUSTOM_SEND_PATH] == 1


def test_busy_once_is_retried(make_client, fake, sleeps):
    client = make_client(sleep=sleeps.append)
    fake.fail_next(CUSTOM_SEND_PATH, -1)
    client.send_text(OPENID, "hi")
    assert fake.calls[CUSTOM_SEND_PATH] == 2
    assert len(fake.custom_messages) == 1
    assert len(sleeps) == 1 and 0 < sleeps[0] <= 1


def test_busy_on_the_token_endpoint_is_retried(make_manager, fake, sleeps):
    manager = make_manager(sleep=sleeps.append)
    fake.fail_next(STABLE_TOKEN_PATH, -1)
    assert manager.get_token() == fake.current_stable_token()
    assert fake.token_fetches == 2
    assert len(sleeps) == 1


def test_busy_forever_gives_up_after_a_few_tries(make_client, fake, sleeps):
    client = make_client(sleep=sleeps.append)
    client.tokens.get_token()
    fake.fail_next(CUSTOM_SEND_PATH, -1, times=10)
    with pytest.raises(wxgate.WeChatAPIError) as caught:
        client.send_text(OPENID, "hi")
    assert caught.value.errcode == -1
    assert 2 <= fake.calls[CUSTOM_SEND_PATH] <= 4
    assert len(sleeps) == fake.calls[CUSTOM_SEND_PATH] - 1
    assert sum(sleeps) < wxgate.REPLY_DEADLINE  # the backoff fits inside the push window
    assert fake.token_fetches == 1
    assert fake.custom_messages == []


def test_busy_token_endpoint_forever_gives_up(make_manager, fake, sleeps):
    manager = make_manager(sleep=sleeps.append)
    fake.fail_next(STABLE_TOKEN_PATH, -1, times=10)
    with pytest.raises(wxgate.WeChatAPIError) as caught:
        manager.get_token()
    assert caught.value.errcode == -1
    assert 2 <= fake.token_fetches <= 4
    assert sum(sleeps) < wxgate.REPLY_DEADLINE


def test_quota_exhausted_on_the_token_endpoint(make_manager, fake):
    manager = make_manager()
    fake.fail_next(STABLE_TOKEN_PATH, 45009)
    with pytest.raises(wxgate.WeChatAPIError) as caught:
        manager.get_token()
    assert caught.value.errcode == 45009
    assert fake.token_fetches == 1


@pytest.mark.parametrize("grant", GRANTS)
def test_wrong_appsecret_fails_at_once(make_client, fake, grant):
    client = make_client(grant=grant, appsecret=WRONG_SECRET)
    with pytest.raises(wxgate.WeChatAPIError) as caught:
        client.send_text(OPENID, "hi")
    assert caught.value.errcode == 40001
    message = str(caught.value)
    assert "demo" in message and "appsecret" in message.lower()
    assert WRONG_SECRET not in message
    assert fake.token_fetches == 1
    assert fake.calls[CUSTOM_SEND_PATH] == 0


def test_missing_appsecret_fails_when_the_token_is_needed(make_client, fake):
    client = make_client(appsecret="")
    for action in (client.tokens.get_token, lambda: client.send_text(OPENID, "hi"),
                   lambda: client.code2session("code")):
        with pytest.raises(wxgate.WxgateError) as caught:
            action()
        assert not isinstance(caught.value, wxgate.WeChatAPIError)
        assert "'demo'" in str(caught.value) and "appsecret" in str(caught.value)
    assert fake.requests == []


@pytest.mark.parametrize("path", [CUSTOM_SEND_PATH, STABLE_TOKEN_PATH])
def test_a_hanging_endpoint_times_out_with_a_clear_error(make_client, fake, path):
    client = make_client(api_timeout=0.5)
    fake.hang(path, 5)
    with pytest.raises(wxgate.WeChatConnectionError) as caught:
        client.send_text(OPENID, "hi")
    message = str(caught.value)
    assert "timed out" in message
    assert DEFAULT_SECRET not in message
    assert fake.calls[path] == 1  # a send that may have gone through is not repeated
    if path == CUSTOM_SEND_PATH:
        assert client.tokens.get_token() not in message


def test_a_token_fetch_that_timed_out_releases_the_lock(make_manager, fake):
    manager = make_manager(api_timeout=0.5)
    fake.hang(STABLE_TOKEN_PATH, 5)
    with pytest.raises(wxgate.WeChatConnectionError):
        manager.get_token()
    assert manager.get_token() == fake.current_stable_token()
    assert fake.token_fetches == 2


###############################################################################################
# The gateway: admin token endpoint, app.client, message.client ##############################
###############################################################################################


@pytest.mark.parametrize("headers", [
    pytest.param({}, id="no header"),
    pytest.param(bearer("wrong"), id="wrong secret"),
    pytest.param(bearer(ADMIN_SECRET[:-1]), id="secret prefix"),
    pytest.param(bearer(ADMIN_SECRET + "x"), id="secret plus one"),
    pytest.param(bearer(""), id="empty bearer"),
    pytest.param({"Authorization": f"Basic {ADMIN_SECRET}"}, id="basic scheme"),
    pytest.param({"Authorization": ADMIN_SECRET}, id="no scheme"),
])
def test_admin_token_refuses_without_the_secret(make_gateway, fake, headers):
    testapp = webtest.TestApp(make_gateway(), lint=True)
    response = testapp.get(f"{ADMIN}/test", headers=headers, status=401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "access_token" not in response.text
    assert fake.token_fetches == 0
    # The next good request still works.
    testapp.get(f"{ADMIN}/test", headers=bearer(), status=200)


def test_admin_token_returns_the_token_and_its_expiry(make_gateway, fake):
    testapp = webtest.TestApp(make_gateway(), lint=True)
    response = testapp.get(f"{ADMIN}/test", headers=bearer(), status=200)
    assert response.content_type == "application/json"
    assert response.json == {"access_token": fake.current_stable_token(APPID),
                             "expires_at": NOW + 7200}
    assert testapp.get(f"{ADMIN}/test", headers=bearer()).json == response.json
    assert fake.token_fetches == 1


@pytest.mark.parametrize("headers", [{}, bearer()], ids=["no header", "with a bearer"])
def test_admin_token_is_404_when_no_secret_is_configured(make_gateway, fake, headers):
    testapp = webtest.TestApp(make_gateway(admin_secret=""), lint=True)
    testapp.get(f"{ADMIN}/test", headers=headers, status=404)
    testapp.get(f"{ADMIN}/test", headers=bearer(""), status=404)
    assert fake.token_fetches == 0


def test_admin_token_unknown_app_is_404(make_gateway, fake):
    testapp = webtest.TestApp(make_gateway(), lint=True)
    testapp.get(f"{ADMIN}/nope", headers=bearer(), status=404)
    testapp.get(f"{ADMIN}/", headers=bearer(), status=404)
    assert fake.token_fetches == 0


def test_admin_token_when_wechat_refuses_is_502_naming_the_app(make_gateway, fake, caplog):
    caplog.set_level(logging.DEBUG)
    testapp = webtest.TestApp(make_gateway(appsecret=WRONG_SECRET), lint=True)
    response = testapp.get(f"{ADMIN}/test", headers=bearer(), status=502)
    assert "'test'" in response.json["error"] and "40001" in response.json["error"]
    assert WRONG_SECRET not in response.text
    assert WRONG_SECRET not in caplog.text
    assert fake.token_fetches == 1


def test_admin_secret_and_token_never_reach_the_log(make_gateway, fake, caplog):
    caplog.set_level(logging.DEBUG)
    gateway = make_gateway()
    testapp = webtest.TestApp(gateway, lint=True)
    testapp.get(f"{ADMIN}/test", headers=bearer(ADMIN_SECRET + "-wrong"), status=401)
    token = testapp.get(f"{ADMIN}/test", headers=bearer(), status=200).json["access_token"]
    fake.revoke(token)
    wxgate_client = gateway.client("test")
    wxgate_client.send_text(OPENID, "logged refresh")  # the refresh and retry log too
    assert caplog.records  # the refusal and the refresh were logged...
    for secret in (ADMIN_SECRET, DEFAULT_SECRET, token, wxgate_client.tokens.get_token()):
        assert secret not in caplog.text  # ...without any secret


def test_gateway_client_returns_the_apps_client(make_gateway, fake):
    gateway = make_gateway()
    client = gateway.client("test")
    assert isinstance(client, wxgate.WeChatClient)
    assert gateway.client("test") is client
    client.send_text(OPENID, "from the app object")
    assert fake.custom_messages == [{"touser": OPENID, "msgtype": "text",
                                     "text": {"content": "from the app object"}}]
    # The admin endpoint lends the very same token: still one fetch.
    testapp = webtest.TestApp(gateway, lint=True)
    assert testapp.get(f"{ADMIN}/test", headers=bearer()).json["access_token"] == \
        tokens_sent(fake, CUSTOM_SEND_PATH)[0]
    assert fake.token_fetches == 1
    with pytest.raises(KeyError, match="nope"):
        gateway.client("nope")


def test_handler_sends_through_message_client(make_gateway, fake):
    seen = []

    def handler(message):
        seen.append(message.client)
        message.client.send_text(message.from_user, "hi")
        return None

    gateway = make_gateway(handler)
    testapp = webtest.TestApp(gateway, lint=True)
    query, body = build_push(text_message("hello"), mode="plain")
    response = testapp.post(f"/wechat?{query}", body, content_type="text/xml", status=200)
    assert response.body == b"success"
    assert seen == [gateway.client("test")]
    assert fake.custom_messages == [{"touser": OPENID, "msgtype": "text",
                                     "text": {"content": "hi"}}]


def test_api_calls_from_a_handler_fit_in_the_push_window(tmp_path, fake, clock):
    # api_timeout is 2 s per request, but a handler answering a push has WeChat's window: a
    # hanging API is given up on when the window (shortened here to 1 s) runs out, so the
    # push is still answered.
    errors = []

    def handler(message):
        try:
            message.client.send_text(message.from_user, "hi")
        except wxgate.WeChatConnectionError as exc:
            errors.append(str(exc))
        return None

    config = make_config(tmp_path, handler, mode="plain",
                         extra_gateway=f"api_base = {fake.url}\napi_timeout = 2",
                         extra_app=f"appsecret = {DEFAULT_SECRET}")
    gateway = wxgate.make_app(config, clock=clock, reply_deadline=1.0)
    gateway.client("test").tokens.get_token()  # fetched outside any push, with no deadline
    fake.hang(CUSTOM_SEND_PATH, 5)
    testapp = webtest.TestApp(gateway, lint=True)
    query, body = build_push(text_message("hello"), mode="plain")
    assert testapp.post(f"/wechat?{query}", body, content_type="text/xml").body == b"success"
    (error,) = errors
    assert "timed out after" in error and "after 2 s" not in error  # the window, not 2 s
    # Outside a push the same call has the full api_timeout again.
    fake.hang(CUSTOM_SEND_PATH, 0)
    gateway.client("test").send_text(OPENID, "later")
    assert fake.custom_messages[-1]["text"] == {"content": "later"}


# -- a host that does not resolve --------------------------------------------------------------

UNRESOLVABLE = "http://no-such-host.invalid"  # .invalid never resolves (RFC 6761)


def test_an_api_call_to_a_host_that_does_not_resolve_says_so():
    with FakeWeChat() as wechat:
        tokens = wxgate.TokenManager(DEFAULT_APPID, DEFAULT_SECRET, api_base=wechat.url)
        token = tokens.get_token()  # held in the store: the call below needs no fetch
    tokens.api_base = UNRESOLVABLE
    client = wxgate.WeChatClient(tokens)
    with pytest.raises(wxgate.WeChatConnectionError) as caught:
        client.send_text("o_user", "pong")
    message = caught.value.message
    assert f"cannot resolve the host of {UNRESOLVABLE}{CUSTOM_SEND_PATH}" in message, message
    assert "gaierror" not in message and token not in message and DEFAULT_SECRET not in message


# -- a send cut by the push window ------------------------------------------------------------


def test_a_send_cut_by_the_push_window_does_not_blame_api_timeout(tmp_path, fake, clock):
    # api_timeout alone would wait 30 s: the push window (WeChat's 5 s, shortened here to
    # 1 s) is what cuts the send, and the error a handler logs must say so.
    errors = []

    def handler(message):
        try:
            message.client.send_text(message["FromUserName"], "pong")
        # Any exception: the test reads whatever the send raised, expected or not.
        except Exception as exc:
            errors.append(getattr(exc, "message", repr(exc)))
        return None

    config = make_config(tmp_path, handler, mode="plain",
                         extra_gateway=f"api_base = {fake.url}\napi_timeout = 30",
                         extra_app=f"appsecret = {DEFAULT_SECRET}")
    gateway = wxgate.make_app(config, clock=clock, reply_deadline=1.0)
    fake.hang(CUSTOM_SEND_PATH, 8)
    testapp = webtest.TestApp(gateway, lint=True)
    query, body = build_push(text_message("ping"), mode="plain")
    assert testapp.post(f"/wechat?{query}", body, content_type="text/xml").body == b"success"
    gateway.close()
    (message,) = errors
    assert "api_timeout" not in message, message
    assert "push window" in message, message
