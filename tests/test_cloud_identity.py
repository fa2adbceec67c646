"""Cloud Hosting's identity headers, as each server hands them over.

A client can spell a header with underscores (``X_WX_SOURCE``), which the CGI convention maps
onto the same environ key as the real one, and it can send a header twice, which servers join
with commas: ``{'X-WX-OPENID': 'o_forged,o_real'}``. Under ``wxgate serve`` as under gunicorn,
an underscore header is dropped, and an identity header that came twice is refused.
"""

import http.client
import json
import socket
import subprocess
import sys
import time
import uuid

import pytest
import webtest

import wxgate
from conftest import AES_KEY, APPID, OPENID, REPO, TOKEN, Recorder, free_port, render, \
    text_message
from test_cloud import HANDLER_SOURCE, cloud_config, cloud_ini

IDENTITY = ["X-WX-OPENID", "X-WX-APPID", "X-WX-UNIONID", "X-WX-ENV", "X-WX-FROM-OPENID",
            "X-WX-FROM-APPID", "X-WX-FROM-UNIONID"]


@pytest.mark.parametrize("name", IDENTITY)
def test_an_identity_header_that_came_twice_is_refused(tmp_path, clock, caplog, name):
    recorder = Recorder()
    app = wxgate.make_app(cloud_config(tmp_path, recorder), clock=clock)
    testapp = webtest.TestApp(app, lint=True)
    body = render(text_message(), "json").encode()
    environ_key = "HTTP_" + name.replace("-", "_")
    response = testapp.post("/wechat", body, content_type="application/json",
                            headers={"X-WX-SOURCE": "wechat-push"},
                            extra_environ={environ_key: "o_forged,o_real"}, status=400)
    assert name in response.text and "more than once" in response.text
    assert recorder.calls == 0
    assert name in caplog.text
    assert app.metrics.value("wxgate_refused_total", app="cloud", status=400, code="") == 1
    # The same push with the header once is handled.
    testapp.post("/wechat", body, content_type="application/json",
                 headers={"X-WX-SOURCE": "wechat-push"}, extra_environ={environ_key: "o_real"})
    assert [dict(message.cloud) for message in recorder.messages] == [{name: "o_real"}]
    app.close()


# -- real servers -----------------------------------------------------------------------------


def serve_cloud(tmp_path, port):
    """An ini and handler module for a cloud app whose handler writes each call to a file."""
    module = f"cloudid_{uuid.uuid4().hex[:12]}"
    calls = tmp_path / "calls.jsonl"
    (tmp_path / f"{module}.py").write_text(HANDLER_SOURCE.format(log=str(calls)), "utf-8")
    source = tmp_path / "cloud.ini"
    source.write_text(cloud_ini(path="/", handler=f"{module}:handle",
                                extra_gateway=f"listen = 127.0.0.1:{port}"), "utf-8")
    return source, calls


def post(port, headers, msg_id):
    """POST a cloud push with ``headers`` (pairs, so a name may repeat): its status."""
    body = render(text_message(msg_id=msg_id), "json").encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("POST", "/")
        for name, value in [("Content-Type", "application/json"), *headers]:
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        return connection.getresponse().status
    finally:
        connection.close()


def handled(calls):
    if not calls.exists():
        return {}
    lines = [json.loads(line) for line in calls.read_text("utf-8").splitlines()]
    return {line["fields"]["MsgId"]: line["cloud"] for line in lines}


def check_server(port, calls):
    # Only an underscore spelling of the source header: the header is not there.
    assert post(port, [("X_WX_SOURCE", "forged")], "underscore-source") == 403
    # The real source header, and an underscore openid: the openid is not there.
    assert post(port, [("X-WX-SOURCE", "wechat-push"), ("X_WX_OPENID", "o_forged")],
                "underscore-openid") == 200
    # The openid twice: refused, whatever the order.
    assert post(port, [("X-WX-SOURCE", "wechat-push"), ("X-WX-OPENID", "o_forged"),
                       ("X-WX-OPENID", OPENID)], "twice") == 400
    assert post(port, [("X-WX-SOURCE", "wechat-push"), ("X-WX-OPENID", OPENID)],
                "once") == 200
    seen = handled(calls)
    assert set(seen) == {"underscore-openid", "once"}
    assert seen["underscore-openid"] == {}
    assert seen["once"] == {"X-WX-OPENID": OPENID}


def test_under_wxgate_serve(tmp_path):
    port = free_port()
    source, calls = serve_cloud(tmp_path, port)
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "wxgate", "serve", str(source)],
                                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, log_path.read_text()
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "wxgate serve did not listen"
            time.sleep(0.05)
        check_server(port, calls)
    finally:
        process.terminate()
        process.wait(10)
    assert "X-WX-OPENID came more than once" in log_path.read_text()


def test_under_gunicorn(tmp_path):
    from serving import start_gunicorn, stop
    source, calls = serve_cloud(tmp_path, free_port())
    base_url, process = start_gunicorn(source, workers=1)
    try:
        check_server(int(base_url.rsplit(":", 1)[1]), calls)
    finally:
        stop(process)


# -- what the X-WX-SOURCE check proves: wxgate check ------------------------------------------


def mixed_ini(tmp_path, *modes):
    source = tmp_path / "mixed.ini"
    sections = [cloud_ini(path="/cloud")]
    for index, mode in enumerate(modes):
        sections.append(f"[app:self{index}]\npath = /self{index}\nappid = {APPID}\n"
                        f"token = {TOKEN}\nencoding_aes_key = {AES_KEY}\nmode = {mode}\n"
                        "handler = wxgate:demo_handler\n")
    source.write_text("\n".join(sections), "utf-8")
    return source


@pytest.mark.parametrize("modes", [("safe",), ("plain", "compat")], ids=["one", "two"])
def test_check_warns_when_a_cloud_app_shares_a_gateway_reachable_from_the_internet(
        tmp_path, capsys, modes):
    assert wxgate.main(["check", str(mixed_ini(tmp_path, *modes))]) == 0
    out = capsys.readouterr().out
    (warning,) = [line for line in out.splitlines()
                  if line.startswith("warning:") and "X-WX-SOURCE" in line]
    assert "[app:cloud]" in warning and "public access" in warning
    assert all(f"[app:self{index}]" in warning for index in range(len(modes)))
    assert "proves nothing" in warning


def test_check_does_not_warn_for_cloud_apps_alone(tmp_path, capsys):
    assert wxgate.main(["check", str(mixed_ini(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "X-WX-SOURCE" in out  # what the check says about one cloud app
    assert not [line for line in out.splitlines()
                if line.startswith("warning:") and "X-WX-SOURCE" in line]
