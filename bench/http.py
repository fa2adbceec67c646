"""wxgate under gunicorn on loopback beside its peers and two yardsticks, same settings for all.

    pip install -r bench/requirements.txt
    python bench/http.py                    # about two minutes
    python bench/http.py --quick            # about 30 s, rougher figures
    python bench/http.py --sqlite --redis   # also wxgate on the sqlite and Redis stores

Every server is started the same way: ``gunicorn -w 2 -k sync -b 127.0.0.1:PORT`` (gunicorn's
sync workers close the connection after each response, so every request opens one), access
log off, and every one writes one log line per push to stderr, as wxgate does:

- the trivial app (bench/trivial_app.py) reads the body, logs a line and answers ``success``;
- the floor app (same file) also does what a safe-mode push needs and nothing more: split the
  query, check msg_signature, decrypt, parse;
- wxgate (``wxgate:application``) in safe mode with a no-op handler, as deployed: its per-push
  INFO line on stderr, and once more with that line off; ``--sqlite`` and ``--redis`` add
  rows on those stores (``--redis`` starts its own redis-server on a free loopback port);
- what users would run instead: Flask + wechatpy, the hand-written view that checks,
  decrypts, parses, dedups in a dict and answers ``success`` (bench/flask_wechatpy_app.py),
  and WeRoBot's WSGI app with sessions off (bench/werobot_app.py); both with a no-op handler
  that logs a line.

Every push is new to every server. Each round builds its own pushes (a new nonce, so a new
signed query, and a new MsgId each; the round's timestamp): one set for the warm-up and
another for the measured run, so the measured run sends no push the warm-up sent. Every
server start begins with empty state (a new process; a new sqlite file; a new Redis key
prefix), and wxgate's ``dedup_size`` is above the pushes of a round, so its LRU never evicts
during one. A measured run that used up its pushes (and so would have resent some) stops the
script. The table says which rows deduplicate (and so remember every push) and which do not.

Besides requests per second and latency it reports the CPU time the gunicorn processes used
per request (from /proc), which a busy machine disturbs less than throughput, and the resident
memory (VmRSS) of each gunicorn worker, averaged over the workers, after the warm-up (the code
loaded, a few thousand pushes seen) and after the round (by then a row that deduplicates
holds the keys of every push it handled).

The client is wrk (``apt-get install wrk``) with one thread and a Lua script that sends the
prepared requests in order; where wrk is missing, Python threads on raw sockets send a fixed
number of requests (that client costs more CPU, which the servers then do not get: compare
ratios, not absolute figures, across clients). Rounds alternate between the servers; each row
shows its best round's req/s and latency and the lowest CPU per request of its rounds.
"""

import os
import sys

# This file is named http.py: keep its folder off sys.path, or it would shadow the standard
# library's http package for everything imported below.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

import argparse
import base64
import hashlib
import platform
import py_compile
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.parse
from importlib import metadata

from Crypto.Cipher import AES

REPO = os.environ.get("WXGATE_SRC") or os.path.dirname(HERE)
TOKEN = "benchtoken123"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
RAW_KEY = base64.b64decode(AES_KEY + "=")
APPID = "wx2c2769f8efd9abc2"
GH_ID = "gh_10f6c3c3ac5a"
OPENID = "oyORnuP8q7ou2gfYjqLzSIWZf0rs"


# -- the pushes ----------------------------------------------------------------------------

def sha1_sign(*parts):
    return hashlib.sha1("".join(sorted(parts)).encode("utf-8")).hexdigest()


def aes_encrypt(plaintext, prefix=b"a8eedb185eb2fecf"):
    message = plaintext.encode("utf-8")
    buffer = prefix + struct.pack(">I", len(message)) + message + APPID.encode()
    pad = 32 - len(buffer) % 32
    buffer += bytes([pad]) * pad
    return base64.b64encode(AES.new(RAW_KEY, AES.MODE_CBC, RAW_KEY[:16]).encrypt(buffer)).decode()


def make_pushes(count, now, first):
    """``(target, body)`` pairs: safe-mode XML text pushes ``first``, ``first + 1``, ...; each
    has its own nonce (its own signed query) and its own MsgId."""
    pushes = []
    timestamp = str(now)
    for i in range(first, first + count):
        nonce = str(415670741 + i)
        inner = (f"<xml><ToUserName><![CDATA[{GH_ID}]]></ToUserName>"
                 f"<FromUserName><![CDATA[{OPENID}]]></FromUserName>"
                 f"<CreateTime>{now}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
                 f"<Content><![CDATA[hello from the bench]]></Content>"
                 f"<MsgId>{6054768590064713728 + i}</MsgId></xml>")
        encrypt = aes_encrypt(inner)
        query = urllib.parse.urlencode({
            "signature": sha1_sign(TOKEN, timestamp, nonce), "timestamp": timestamp,
            "nonce": nonce, "openid": OPENID, "encrypt_type": "aes",
            "msg_signature": sha1_sign(TOKEN, timestamp, nonce, encrypt)})
        body = (f"<xml><ToUserName><![CDATA[{GH_ID}]]></ToUserName>"
                f"<Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>")
        pushes.append((f"/wechat?{query}", body))
    return pushes


def write_pushes(path, pushes):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{target}\t{body}\n" for target, body in pushes)


def write_config(path, store, dedup_size, prefix="wxgate"):
    """The ini of every wxgate row: the defaults but for the store and ``dedup_size``."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join([
            "[wxgate]", f"store = {store}", f"store_prefix = {prefix}",
            f"dedup_size = {dedup_size}", "",
            "[app:bench]", "path = /wechat", f"appid = {APPID}", f"token = {TOKEN}",
            f"encoding_aes_key = {AES_KEY}", "mode = safe", "format = auto",
            "handler = trivial_app:noop_handler", ""]))
    return path


def start_redis(folder):
    """A redis-server of our own on a free loopback port (no persistence); ``(process, url)``."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("--redis needs redis-server (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", folder], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return process, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("redis-server did not start")


# -- gunicorn ------------------------------------------------------------------------------

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(master):
    """CPU time (user + system) of a gunicorn master and its workers so far; Linux only."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(name) == master or int(fields[1]) == master:  # fields[1] is the ppid
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def process_cpu(pid):
    """CPU time (user + system) of one process so far; Linux only."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_rss(master):
    """Mean VmRSS in MiB of the master's child processes (the gunicorn workers); Linux only."""
    sizes = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", encoding="ascii") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except (OSError, ValueError):
            continue
        if int(fields.get("PPid", "0")) == master and "VmRSS" in fields:
            sizes.append(int(fields["VmRSS"].split()[0]) / 1024)  # kB
    return sum(sizes) / len(sizes) if sizes else float("nan")


class Server:
    """One gunicorn master started by us, stopped by its own pid."""

    def __init__(self, target, folder, workers, env=None):
        self.port = free_port()
        command = [sys.executable, "-m", "gunicorn", "-w", str(workers), "-k", "sync",
                   "-b", f"127.0.0.1:{self.port}", "--chdir", folder, "--pythonpath", REPO,
                   "--log-level", "warning", target]
        self.log = open(os.path.join(folder, f"gunicorn-{self.port}.log"), "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, **(env or {})))
        self.wait_ready()

    def wait_ready(self, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                    if sock.recv(64).startswith(b"HTTP/1."):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise SystemExit(f"gunicorn did not start:\n{self.log_tail()}")

    def log_tail(self, size=2000):
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()[-size:]

    def log_lines(self, marker):
        """Lines of the server's stderr holding ``marker``, once it has stopped."""
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return sum(marker in line for line in f)

    def stop(self):
        if self.process.poll() is None:  # our own master, by pid; its workers follow it
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


# -- clients -------------------------------------------------------------------------------

WRK_SCRIPT = r"""
local requests, index = {}, 0
local headers = {["Content-Type"] = "text/xml", ["Host"] = "127.0.0.1"}

function init(args)
  for line in io.lines(args[1]) do
    local target, body = line:match("^([^\t]*)\t(.*)$")
    requests[#requests + 1] = wrk.format("POST", target, headers, body)
  end
end

function request()
  index = index % #requests + 1
  return requests[index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.status,
    e.connect + e.read + e.write + e.timeout))
end
"""


def run_wrk(port, folder, requests_file, seconds, connections):
    script = os.path.join(folder, "pushes.lua")
    with open(script, "w", encoding="utf-8") as f:
        f.write(WRK_SCRIPT)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", script,
         f"http://127.0.0.1:{port}", "--", requests_file],
        capture_output=True, text=True, timeout=seconds + 60)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"wrk failed:\n{out.stdout}\n{out.stderr}")
    count, duration, p50, p99, bad_status, socket_errors = map(int, line.split()[1:])
    return {"requests": count, "rps": count / (duration / 1e6), "p50": p50 / 1000,
            "p99": p99 / 1000, "errors": bad_status + socket_errors}


def run_python(port, pushes, count, connections):
    """``count`` requests from ``connections`` threads, a new connection each (sync workers)."""
    prepared = [(f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}").encode()
                for target, body in pushes[:count]]
    latencies, errors, lock, position = [], [0], threading.Lock(), iter(range(count))

    def worker():
        mine, failed = [], 0
        for i in position:  # a shared iterator: each request once
            started = time.perf_counter()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.sendall(prepared[i])
                    chunks = []
                    while True:
                        chunk = sock.recv(65536)
                        if not chunk:
                            break
                        chunks.append(chunk)
                ok = b"".join(chunks).startswith(b"HTTP/1.1 200")
            except OSError:
                ok = False
            mine.append(time.perf_counter() - started)
            failed += not ok
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {"requests": count, "rps": count / elapsed,
            "p50": latencies[len(latencies) // 2] * 1000,
            "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
            "errors": errors[0]}


# -- main ----------------------------------------------------------------------------------

def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


# name -> (key for --rows, gunicorn target, which store, what it deduplicates)
ROWS = {
    "trivial app": ("trivial", "trivial_app:app", None, "no"),
    "floor app": ("floor", "trivial_app:floor_app", None, "no"),
    "wxgate": ("wxgate", "wxgate:application", "memory", "yes, per worker (memory)"),
    "wxgate, push log off": ("wxgate-quiet", "trivial_app:wxgate_quiet()", "memory",
                             "yes, per worker (memory)"),
    "Flask + wechatpy": ("flask", "flask_wechatpy_app:app", None, "yes, per worker (dict)"),
    "WeRoBot, sessions off": ("werobot", "werobot_app:app", None, "no"),
    "wxgate, sqlite store": ("wxgate-sqlite", "wxgate:application", "sqlite",
                             "yes, shared (sqlite)"),
    "wxgate, Redis store": ("wxgate-redis", "wxgate:application", "redis",
                            "yes, shared (Redis)"),
}
# wrk sends at most this many requests per second here (the trivial app reaches about 6,500
# on the 2-core machine of bench/README.md); a measured run gets this many pushes per second.
MAX_RATE = 12000
WARMUP_SECONDS = 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, rougher figures")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn -w (default 2)")
    parser.add_argument("--connections", type=int, default=8,
                        help="concurrent connections (default 8)")
    parser.add_argument("--seconds", type=float, help="wrk: length of a round (default 6)")
    parser.add_argument("--requests", type=int,
                        help="python client: requests per round (default 6000)")
    parser.add_argument("--rounds", type=int, help="rounds per server, best kept (default 3)")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--sqlite", action="store_true",
                        help="also run wxgate with store = sqlite (shared by the workers)")
    parser.add_argument("--redis", action="store_true",
                        help="also run wxgate with store = redis (starts a redis-server)")
    parser.add_argument("--rows", help="comma-separated subset of: "
                        + ", ".join(key for key, *_ in ROWS.values()))
    args = parser.parse_args(argv)
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "python"
    seconds = args.seconds or (2 if args.quick else 6)
    count = args.requests or (1500 if args.quick else 6000)
    rounds = args.rounds or (1 if args.quick else 3)
    wanted = {name for name, (key, *_) in ROWS.items()
              if (args.rows and key in args.rows.split(","))
              or (not args.rows and (key not in ("wxgate-sqlite", "wxgate-redis")
                                     or (key == "wxgate-sqlite" and args.sqlite)
                                     or (key == "wxgate-redis" and args.redis)))}
    servers = {name: row for name, row in ROWS.items() if name in wanted}
    warmup_count = 400 if client == "python" else int(MAX_RATE * WARMUP_SECONDS)
    measured_count = count if client == "python" else int(MAX_RATE * seconds)
    # Above the pushes of a round, so no wxgate row evicts a key during one.
    dedup_size = warmup_count + measured_count + 1000

    folder = tempfile.mkdtemp(prefix="wxgate-http-bench-")
    for name in ("trivial_app.py", "flask_wechatpy_app.py", "werobot_app.py"):
        shutil.copy(os.path.join(HERE, name), folder)
        py_compile.compile(os.path.join(folder, name))
    # Bytecode compiled ahead, as an installed package has it: with PYTHONDONTWRITEBYTECODE
    # set, or a folder it cannot write to, each worker would compile wxgate.py itself and
    # keep about 10 MiB more for good.
    py_compile.compile(os.path.join(REPO, "wxgate.py"))
    redis_process = redis_url = None
    results = {name: [] for name in servers}
    started = time.perf_counter()
    starts = 0
    try:
        if any(store == "redis" for _, _, store, _ in servers.values()):
            redis_process, redis_url = start_redis(folder)
        serial = 0
        for _ in range(rounds):
            # This round's pushes, none sent before: the warm-up's, then the measured run's.
            now = int(time.time())
            warmup = make_pushes(warmup_count, now, serial)
            measured = make_pushes(measured_count, now, serial + warmup_count)
            serial += warmup_count + measured_count
            warmup_file = os.path.join(folder, "warmup.tsv")
            measured_file = os.path.join(folder, "measured.tsv")
            write_pushes(warmup_file, warmup)
            write_pushes(measured_file, measured)
            for name, (_, target, store, _) in servers.items():
                starts += 1  # every start gets empty state: a new file, a new key prefix
                env = {}
                if store is not None:
                    url = {"memory": "memory", "redis": redis_url,
                           "sqlite": f"sqlite://{folder}/wxgate-{starts}.db"}[store]
                    env["WXGATE_CONFIG"] = write_config(
                        os.path.join(folder, f"wxgate-{starts}.ini"), url, dedup_size,
                        prefix=f"bench{starts}")
                server = Server(target, folder, args.workers, env)
                try:
                    if client == "wrk":  # warm-up, then the round
                        run_wrk(server.port, folder, warmup_file, WARMUP_SECONDS,
                                args.connections)
                        rss = worker_rss(server.process.pid)
                        cpu = cpu_seconds(server.process.pid)
                        store_cpu = process_cpu(redis_process.pid) if redis_process else 0
                        result = run_wrk(server.port, folder, measured_file, seconds,
                                         args.connections)
                    else:
                        run_python(server.port, warmup, len(warmup), args.connections)
                        rss = worker_rss(server.process.pid)
                        cpu = cpu_seconds(server.process.pid)
                        store_cpu = process_cpu(redis_process.pid) if redis_process else 0
                        result = run_python(server.port, measured, count, args.connections)
                    result["cpu"] = (cpu_seconds(server.process.pid) - cpu) / result["requests"]
                    if redis_process is not None:  # redis-server's own work, not in "cpu"
                        result["store_cpu"] = (process_cpu(redis_process.pid)
                                               - store_cpu) / result["requests"]
                    result["rss"], result["rss_warm"] = worker_rss(server.process.pid), rss
                finally:
                    server.stop()
                if result["errors"]:
                    raise SystemExit(f"{name}: {result['errors']} requests failed; its log "
                                     f"ends:\n{server.log_tail()}")
                lines = server.log_lines(" INFO ")
                quiet = name == "wxgate, push log off"
                if (lines > 0) if quiet else (lines < result["requests"]):
                    raise SystemExit(f"{name}: {lines} INFO lines for {result['requests']} "
                                     "requests: the rows' logging would differ")
                if result["requests"] + args.connections > len(measured):
                    raise SystemExit(
                        f"{name}: the measured run used up its {len(measured)} pushes and "
                        "would have sent some again: raise MAX_RATE in bench/http.py")
                results[name].append(result)
                print(f"  {name:<24} {result['rps']:>9,.0f} req/s  p50 {result['p50']:.2f} ms"
                      f"  p99 {result['p99']:.2f} ms  errors {result['errors']}  server CPU "
                      f"{result['cpu'] * 1e6:.0f} µs/req  RSS {result['rss_warm']:.1f} → "
                      f"{result['rss']:.1f} MiB",
                      file=sys.stderr)
    finally:
        if redis_process is not None:  # ours, by its own handle
            redis_process.kill()
            redis_process.wait()
        shutil.rmtree(folder, ignore_errors=True)
    elapsed = time.perf_counter() - started
    report(servers, results, client, args, seconds, count, rounds, elapsed, dedup_size)


def report(servers, results, client, args, seconds, count, rounds, elapsed, dedup_size):
    best = {name: max(runs, key=lambda r: r["rps"]) for name, runs in results.items()}
    cpu = {name: min(r["cpu"] for r in runs) for name, runs in results.items()}
    base = best.get("trivial app", {}).get("rps")
    header = (f"{'server':<24} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
              f"{'CPU µs/req':>11} {'of trivial':>11} {'RSS MiB':>13}  dedup")
    print(header)
    print("-" * len(header))
    for name, r in best.items():
        share = f"{r['rps'] / base:>10.0%}" if base else f"{'-':>10}"
        print(f"{name:<24} {r['rps']:>9,.0f} {r['p50']:>8.2f} {r['p99']:>8.2f} "
              f"{r['errors']:>7} {cpu[name] * 1e6:>11.0f} {share} "
              f"{r['rss_warm']:>6.1f} {r['rss']:>6.1f}  {servers[name][3]}")
    print()
    if rounds > 1:
        print("rounds (req/s, CPU µs/req):")
        for name, runs in results.items():
            print(f"  {name:<24} " + ", ".join(f"{x['rps']:,.0f} / {x['cpu'] * 1e6:.0f}"
                                                for x in runs))
        print()
    if "wxgate, Redis store" in results:
        redis_cpu = min(r["store_cpu"] for r in results["wxgate, Redis store"])
        print(f"wxgate, Redis store: redis-server spent {redis_cpu * 1e6:.0f} µs of CPU per "
              "request on top of the column (its lowest round)")
    if "wxgate" in cpu and "WeRoBot, sessions off" in cpu:
        print(f"wxgate's CPU per push over WeRoBot's: "
              f"{cpu['wxgate'] / cpu['WeRoBot, sessions off']:.2f}")
    if {"wxgate", "trivial app", "floor app"} <= set(cpu):
        above, floor = cpu["wxgate"] - cpu["trivial app"], cpu["floor app"] - cpu["trivial app"]
        ratio = f" ({above / floor:.2f}x)" if floor > 0 else ""
        print(f"CPU above the trivial app: wxgate {above * 1e6:.0f} µs, floor app "
              f"{floor * 1e6:.0f} µs{ratio}")
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout \
        if client == "wrk" else ""
    print(f"client: {client} {wrk.split()[1] if wrk else ''} with {args.connections} "
          f"connections; gunicorn {version('gunicorn')} -w {args.workers} -k sync; "
          f"best of {rounds} round(s) of "
          + (f"{seconds:g} s" if client == "wrk" else f"{count} requests")
          + f" (req/s and latency: the best round's; CPU: the lowest round's); "
          f"{elapsed:.0f} s in all")
    print(f"every push new to every server; wxgate dedup_size = {dedup_size} (no eviction "
          "within a round); every server logs one line per push to stderr, except the row "
          "'push log off'")
    print(f"Python {platform.python_version()} ({platform.python_implementation()}), "
          f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs: {cpu_model()}")
    print("peers: " + ", ".join(f"{name} {version(name)}" for name in (
        "Flask", "Werkzeug", "wechatpy", "WeRoBot", "bottle", "xmltodict", "cryptography")))
    print("RSS MiB: mean VmRSS of the gunicorn workers after the warm-up, then after the "
          "round (a row that deduplicates holds the keys of the round's pushes by then)")


if __name__ == "__main__":
    main()
