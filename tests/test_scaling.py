"""Several gunicorn workers: retries land on other workers, and the shared store still
answers them once. Real gunicorn, real redis-server, loopback only."""

import concurrent.futures
import http.client
import shutil
import subprocess
import time
import urllib.parse
import uuid

import pytest

import wxgate
from conftest import build_push, free_port, ini_text, open_reply, text_message
from serving import start_gunicorn, stop

HANDLER = '''
import os, time

def record(message):
    # One line per handler run, appended atomically: the test counts them per key.
    with open(os.environ["WXGATE_TEST_RECORD"], "a") as file:
        file.write(message.dedup_key + "\\n")
    time.sleep(0.02)  # long enough for concurrent retries to arrive while it runs
    return {"MsgType": "transfer_customer_service"}
'''


def gateway(tmp_path, store, workers=4):
    module = f"scaling_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(HANDLER)
    ini = tmp_path / "scaling.ini"
    ini.write_text(ini_text(extra_gateway=f"timestamp_window = 0\nstore = {store}")
                   .replace("wxgate:demo_handler", f"{module}:record"))
    record = tmp_path / "record.txt"
    record.write_text("")
    base_url, process = start_gunicorn(ini, workers=workers,
                                       env={"WXGATE_TEST_RECORD": str(record)})
    return base_url, process, record


def send(base_url, fields):
    """One push over a fresh connection; return (status, body)."""
    query, body = build_push(fields)
    host = urllib.parse.urlsplit(base_url).netloc
    connection = http.client.HTTPConnection(host, timeout=10)
    try:
        connection.request("POST", f"/wechat?{query}", body, {"Content-Type": "text/xml"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def storm(base_url, messages):
    """Each message 3 times concurrently (WeChat's retries of a slow push), then 3 times in
    sequence; return every (message, status, body)."""
    results = []

    def deliver(fields):
        with concurrent.futures.ThreadPoolExecutor(3) as burst:
            answers = list(burst.map(lambda _: send(base_url, fields), range(3)))
        answers += [send(base_url, fields) for _ in range(3)]
        return [(fields, status, body) for status, body in answers]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        for answers in pool.map(deliver, messages):
            results.extend(answers)
    return results


def handler_runs(record):
    runs = {}
    for key in record.read_text().split():
        runs[key] = runs.get(key, 0) + 1
    return runs


def messages(count):
    return [text_message(f"m{index}", msg_id=str(90_000 + index),
                         FromUserName=f"user-{index}") for index in range(count)]


def test_four_workers_run_each_message_once_with_a_shared_store(tmp_path, shared_store):
    base_url, process, record = gateway(tmp_path, shared_store)
    try:
        sent = messages(100)  # 600 requests, 300 of them racing copies of one message
        results = storm(base_url, sent)
    finally:
        stop(process)
    assert len(results) == 600
    for fields, status, body in results:
        assert status == 200, body
        reply, _, _ = open_reply(body, "xml")
        # The right reply: addressed to this message's sender, not another's.
        assert f"<ToUserName><![CDATA[{fields['FromUserName']}]]></ToUserName>" in reply
    runs = handler_runs(record)
    assert set(runs) == {f"test:m:{90_000 + i}" for i in range(100)}
    assert set(runs.values()) == {1}


def test_four_workers_with_the_memory_store_show_why_it_exists(tmp_path):
    base_url, process, record = gateway(tmp_path, "memory")
    try:
        results = storm(base_url, messages(100))
    finally:
        stop(process)
    assert all(status == 200 for _, status, _ in results)
    runs = handler_runs(record)
    # Retries that land on another worker run the handler again.
    assert sum(runs.values()) > 100
    print(f"\nmemory store, 4 workers: {sum(runs.values())} handler runs for 100 messages")


def test_redis_killed_mid_run_no_request_fails_and_service_recovers(tmp_path):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary not installed (apt-get install redis-server)")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no"]
    redis_process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    base_url, process, record = gateway(tmp_path, f"redis://127.0.0.1:{port}/0", workers=2)
    statuses = []
    try:
        batches = [messages(75)[i:i + 25] for i in (0, 25, 50)]
        for index, batch in enumerate(batches):
            if index == 1:
                redis_process.kill()
                redis_process.wait()
            if index == 2:
                redis_process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.DEVNULL)
                # Workers leave a failed store alone for STORE_RETRY_AFTER seconds.
                time.sleep(0.5 + wxgate.STORE_RETRY_AFTER)
            for fields in batch:
                for _ in range(2):  # the push and one sequential retry
                    statuses.append(send(base_url, fields)[0])
    finally:
        stop(process)
        redis_process.kill()
        redis_process.wait()
    assert statuses == [200] * 150
    runs = handler_runs(record)
    assert len(runs) == 75  # every message reached the handler
    # Before the kill and after the restart, the shared store deduplicated every retry.
    for index in list(range(25)) + list(range(50, 75)):
        assert runs[f"test:m:{90_000 + index}"] == 1
    log = process.log_path.read_text()
    assert "continuing without cross-process dedup" in log
    assert "recovered" in log
