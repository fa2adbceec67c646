"""Retry storm with a crash: real gunicorn (4 workers) on 127.0.0.1, N distinct encrypted pushes,
each sent 3 times at once as WeChat's retries would be, while one worker is SIGKILLed mid-run.

    python bench/storm.py                       # sqlite store, 300 pushes
    python bench/storm.py --store redis --count 1000
    python bench/storm.py --store memory        # shows why a shared store exists

Prints: pushes sent, requests answered, 5xx, connection errors (the killed worker's requests),
handler runs per message, and p50/p99 latency. Bounded in count and time; loopback only.
tests/test_storm.py runs a short version and asserts on the report.
"""

import sys
from pathlib import Path

# bench/http.py would shadow the standard library's http package for scripts run from here.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import base64
import concurrent.futures
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import uuid

from Crypto.Cipher import AES

REPO = Path(__file__).resolve().parents[1]
TOKEN = "stormtoken"
KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
APPID = "wx2c2769f8efd9abc2"

HANDLER = '''
import os, time

def record(message):
    with open(os.environ["WXGATE_STORM_RECORD"], "a") as file:
        file.write(f"{message.dedup_key} {os.getpid()}\\n")
    time.sleep(0.01)
    return None
'''


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def encrypted_push(index, timestamp):
    """An encrypted safe-mode XML text push, built without wxgate."""
    plaintext = (f"<xml><ToUserName><![CDATA[gh_storm]]></ToUserName><FromUserName><![CDATA["
                 f"user{index % 50}]]></FromUserName><CreateTime>{timestamp}</CreateTime>"
                 f"<MsgType><![CDATA[text]]></MsgType><Content><![CDATA[storm {index}]]>"
                 f"</Content><MsgId>{700000 + index}</MsgId></xml>").encode()
    key = base64.b64decode(KEY + "=")
    buffer = os.urandom(8).hex().encode() + struct.pack(">I", len(plaintext)) + plaintext
    buffer += APPID.encode()
    pad = 32 - len(buffer) % 32
    buffer += bytes([pad]) * pad
    encrypt = base64.b64encode(AES.new(key, AES.MODE_CBC, key[:16]).encrypt(buffer)).decode()
    nonce = str(index)
    signature = hashlib.sha1("".join(sorted([TOKEN, str(timestamp), nonce, encrypt]))
                             .encode()).hexdigest()
    query = f"timestamp={timestamp}&nonce={nonce}&encrypt_type=aes&msg_signature={signature}"
    body = (f"<xml><ToUserName><![CDATA[gh_storm]]></ToUserName><Encrypt><![CDATA[{encrypt}]]>"
            f"</Encrypt></xml>").encode()
    return f"/wechat?{query}", body


def start_redis():
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    return f"redis://127.0.0.1:{port}/0", process


def worker_pids(master_pid):
    output = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master_pid)],
                            capture_output=True, text=True).stdout
    return [int(pid) for pid in output.split()]


def run_storm(store="sqlite", count=300, workers=4, kill=True, directory=None):
    """Run the storm; return a report dict."""
    directory = Path(directory or tempfile.mkdtemp(prefix="wxgate-storm-"))
    module = f"storm_{uuid.uuid4().hex[:8]}"
    (directory / f"{module}.py").write_text(HANDLER)
    record = directory / "record.txt"
    record.write_text("")
    redis_process = None
    if store == "sqlite":
        store_url = f"sqlite://{directory}/storm.db"
    elif store == "redis":
        store_url, redis_process = start_redis()
    else:
        store_url = "memory"
    ini = directory / "storm.ini"
    ini.write_text(f"[wxgate]\nstore = {store_url}\n\n[app:storm]\npath = /wechat\n"
                   f"appid = {APPID}\ntoken = {TOKEN}\nencoding_aes_key = {KEY}\n"
                   f"handler = {module}:record\n")
    port = free_port()
    log = open(directory / "gunicorn.log", "wb")
    env = dict(os.environ, WXGATE_CONFIG=str(ini), WXGATE_STORM_RECORD=str(record))
    gunicorn = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{port}",
         "wxgate:application"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while len(worker_pids(gunicorn.pid)) < workers or not _accepts(port):
            if time.monotonic() > deadline:
                raise RuntimeError("gunicorn did not start")
            time.sleep(0.05)
        timestamp = int(time.time())
        pushes = [encrypted_push(index, timestamp) for index in range(count)]
        results = []  # (index, status or None, seconds)
        lock = threading.Lock()
        killed = []

        def send(index):
            path, body = pushes[index]
            started = time.monotonic()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                connection.request("POST", path, body, {"Content-Type": "text/xml"})
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                status = None  # connection reset: the worker died under this request
            finally:
                connection.close()
            with lock:
                results.append((index, status, time.monotonic() - started))

        def deliver(index):
            with concurrent.futures.ThreadPoolExecutor(3) as burst:
                list(burst.map(send, [index] * 3))
            if kill and index == count // 3 and not killed:
                victim = worker_pids(gunicorn.pid)[0]
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(deliver, range(count)))
        elapsed = time.monotonic() - started
    finally:
        os.killpg(gunicorn.pid, signal.SIGTERM)
        gunicorn.wait(10)
        log.close()
        if redis_process:
            redis_process.kill()
            redis_process.wait()

    runs, runs_on_victim = {}, {}
    for line in record.read_text().splitlines():
        key, pid = line.split()
        runs[key] = runs.get(key, 0) + 1
        if killed and int(pid) == killed[0]:
            runs_on_victim[key] = runs_on_victim.get(key, 0) + 1
    acknowledged = {index for index, status, _ in results if status == 200}
    latencies = sorted(seconds for _, status, seconds in results if status == 200)
    per_message = {}
    for index in acknowledged:
        calls = runs.get(f"storm:m:{700000 + index}", 0)
        per_message[calls] = per_message.get(calls, 0) + 1
    twice = [key for key, calls in runs.items() if calls > 1]
    return {
        "store": store, "workers": workers, "pushes": count, "requests": len(results),
        "answered_200": sum(1 for _, s, _ in results if s == 200),
        "answered_5xx": sum(1 for _, s, _ in results if s is not None and s >= 500),
        "connection_errors": sum(1 for _, s, _ in results if s is None),
        "acknowledged_messages": len(acknowledged),
        "handler_runs_per_acknowledged_message": per_message,
        "messages_run_twice": len(twice),
        "run_twice_and_first_run_on_killed_worker": sum(1 for key in twice
                                                         if key in runs_on_victim),
        "killed_worker": killed[0] if killed else None,
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 1) if latencies else None,
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 1) if latencies else None,
        "seconds": round(elapsed, 1),
    }


def _accepts(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", choices=("sqlite", "redis", "memory"), default="sqlite")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--no-kill", action="store_true")
    args = parser.parse_args()
    report = run_storm(args.store, args.count, kill=not args.no_kill)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
