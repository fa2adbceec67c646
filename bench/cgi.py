"""wxgate as a CGI program (one process per request) against wxgate under mod_wsgi.

    python bench/cgi.py            # about a minute
    python bench/cgi.py --quick    # about 20 s, rougher figures

One Apache httpd on 127.0.0.1 (Debian's apache2, mod_cgid and mod_wsgi, run by the test
suite's ``tests/serving.py``) serves the same ini two ways, side by side in the same run:

- CGI: the README's ``cgi-bin/wxgate.cgi``, ``wsgiref.handlers.CGIHandler``, started by
  mod_cgid for every request: a fresh ``/usr/bin/python3`` that imports wxgate, loads the ini,
  opens the sqlite store, answers, and exits;
- mod_wsgi: ``WSGIScriptAlias /wsgi wxgate.py`` in one daemon process (threads=4), the
  README's Apache recipe, where all that is done once.

Both use ``store = sqlite`` (CGI must: nothing else survives a request), safe mode, a handler
that does nothing, and log their per-push INFO line to Apache's error log, as deployed. The
client sends safe-mode XML text pushes one at a time (each with its own MsgId and nonce, so
none is a duplicate, in every round), a new connection each, and reports milliseconds per
request. Three more rows, the same interpreter started without Apache, split the CGI cost:
starting and exiting (``python3 -c pass``), importing what a push needs at the least
(pycryptodome's AES, hashlib, base64, json, sqlite3 and xml.etree: the yardstick of a CGI
push) and importing wxgate. Rounds take turns across all five rows, and the best round of each
is kept. Last, ``python3 -X importtime -c 'import wxgate'`` (five runs, the median one) lists
what the import spends its time on.
"""

import os
import sys

# This folder holds http.py and this cgi.py, which would shadow the standard library's modules
# of those names: keep it off sys.path.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

import argparse
import itertools
import platform
import pwd
import shutil
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

REPO = Path(HERE).parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from conftest import AES_KEY, APPID, TOKEN, build_push, text_message  # noqa: E402
from serving import (_unprivileged_user, apache_binary, apache_cgi_binary, public_dir,  # noqa
                     start_apache, stop)

SYSTEM_PYTHON = "/usr/bin/python3"  # the interpreter of the CGI program and of mod_wsgi
CGI_PROGRAM = """\
#!/usr/bin/python3
import os, sys
from wsgiref.handlers import CGIHandler

HOME = {home!r}
sys.path.insert(0, HOME)
os.environ["WXGATE_CONFIG"] = os.path.join(HOME, "wxgate.ini")
from wxgate import application  # noqa: E402

CGIHandler().run(application)
"""
_nonces = itertools.count(415670741)  # one per push: a signed query binds one body
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def layout(root):
    """The README's CGI layout plus a mod_wsgi mount of the same ini; the httpd.conf lines."""
    docroot, home = root / "public_html", root / "wxgate"
    (docroot / "cgi-bin").mkdir(parents=True)
    home.mkdir()
    shutil.copy(REPO / "wxgate.py", home / "wxgate.py")
    (home / "noop.py").write_text("def handler(message):\n    return None\n", "utf-8")
    (home / "wxgate.ini").write_text(f"""\
[wxgate]
store = sqlite://{home}/wxgate.db

[app:bench]
path = /wechat
appid = {APPID}
token = {TOKEN}
encoding_aes_key = {AES_KEY}
mode = safe
handler = noop:handler
""", "utf-8")
    program = docroot / "cgi-bin" / "wxgate.cgi"
    program.write_text(CGI_PROGRAM.format(home=str(home)), "utf-8")
    for path in (root, docroot, docroot / "cgi-bin", program):
        path.chmod(0o755)
    if os.geteuid() == 0:  # Apache runs CGI and the daemon as www-data: it writes the store
        entry = pwd.getpwnam(_unprivileged_user()[0])
        for path in [home, *home.iterdir()]:
            os.chown(path, entry.pw_uid, entry.pw_gid)
    return f"""\
ScriptSock "{root}/cgid.sock"
<Directory "{docroot}">
    Require all granted
</Directory>
ScriptAlias /cgi-bin/ "{docroot}/cgi-bin/"
""", home


def send(url, target, body):
    request = urllib.request.Request(url + target, data=body, method="POST",
                                     headers={"Content-Type": "text/xml"})
    with _opener.open(request, timeout=30) as response:
        answer = response.read()
    if answer != b"success":
        raise RuntimeError(f"unexpected answer from {url}: {answer[:200]!r}")


def one_round(url, count, first_id):
    pushes = []
    now = int(time.time())
    for i in range(count):  # a new MsgId and nonce each: no push is sent twice
        query, body = build_push(text_message("bench", msg_id=str(first_id + i)), fmt="xml",
                                 timestamp=now, nonce=str(next(_nonces)))
        pushes.append((f"/wechat?{query}", body))
    times = []
    for target, body in pushes:
        started = time.perf_counter()
        send(url, target, body)
        times.append((time.perf_counter() - started) * 1000)
    return times


# What a safe-mode push needs at the least, imported by a bare interpreter: the yardstick of a
# CGI push. Debian's python3-pycryptodome installs the library as Cryptodome.
PUSH_NEEDS = """\
try:
    from Crypto.Cipher import AES
except ImportError:
    from Cryptodome.Cipher import AES
import base64, hashlib, json, sqlite3, xml.etree.ElementTree
"""
STARTUPS = {"python3 -c pass": ["-c", "pass"],
            "python3 importing what a push needs": ["-c", PUSH_NEEDS],
            "python3 -c 'import wxgate'": ["-c", "import sys; sys.path.insert(0, '.'); "
                                           "import wxgate"]}


def import_times(runs=5):
    """``python3 -X importtime -c 'import wxgate'``, the run with the median total: a list of
    ``(cumulative µs, self µs, depth, module)`` in the order the imports finished (a module's
    line comes after those of the modules it imported; wxgate's is the last, depth 0)."""
    parsed = []
    for _ in range(runs):
        out = subprocess.run([SYSTEM_PYTHON, "-X", "importtime", "-c",
                              "import sys; sys.path.insert(0, '.'); import wxgate"],
                             cwd=REPO, env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                             text=True, check=True).stderr
        rows = []
        for line in out.splitlines():
            if not line.startswith("import time:") or "cumulative" in line:
                continue
            own, cumulative, name = line[len("import time:"):].split("|")
            depth = (len(name) - len(name.lstrip())) // 2
            rows.append((int(cumulative), int(own), depth, name.strip()))
            if depth == 0:  # a top-level import closes its subtree, which came before it
                if name.strip() == "wxgate":
                    break
                del rows[:]  # another's (site and its .pth files): not wxgate's
        parsed.append(rows)
    parsed.sort(key=lambda rows: sum(row[1] for row in rows))
    return parsed[len(parsed) // 2]


def startup(arguments, count):
    times = []
    for _ in range(count):
        started = time.perf_counter()
        subprocess.run([SYSTEM_PYTHON, *arguments], check=True, cwd=REPO,
                       env={"PATH": "/usr/bin:/bin"}, stdout=subprocess.DEVNULL)
        times.append((time.perf_counter() - started) * 1000)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if apache_binary() is None or apache_cgi_binary() is None:
        sys.exit("needs apache2 with mod_cgid and mod_wsgi "
                 "(apt-get install apache2 libapache2-mod-wsgi-py3 python3-pycryptodome)")
    per_round = {"CGI": 15 if args.quick else 40, "mod_wsgi": 50 if args.quick else 200}
    root = public_dir("wxgate-bench-cgi-")
    process = None
    try:
        conf, home = layout(root)
        base, process = start_apache(root, home / "wxgate.ini", mount="/wsgi",
                                     script=REPO / "wxgate.py", python_path=REPO,
                                     modules=("cgid", "alias"), extra_conf=conf)
        urls = {"CGI": f"{base}/cgi-bin/wxgate.cgi", "mod_wsgi": f"{base}/wsgi"}
        for name, url in urls.items():  # warm up: the daemon loads, the store is created
            one_round(url, 3, 7_000_000_000_000_000_000 + len(name))
        best = {}
        next_id = 6_000_000_000_000_000_000
        for _ in range(args.rounds):
            for name, url in urls.items():
                times = one_round(url, per_round[name], next_id)
                next_id += per_round[name]
                if name not in best or statistics.mean(times) < statistics.mean(best[name]):
                    best[name] = times
            for name, arguments in STARTUPS.items():
                times = startup(arguments, 10 if args.quick else 30)
                if name not in best or statistics.mean(times) < statistics.mean(best[name]):
                    best[name] = times
        imports = import_times()
    finally:
        if process is not None:
            stop(process)
        shutil.rmtree(root, ignore_errors=True)

    version = subprocess.run([SYSTEM_PYTHON, "-VV"], capture_output=True, text=True).stdout
    print(f"# {platform.node()}: {os.cpu_count()} CPUs, {platform.system()} "
          f"{platform.release()}; {SYSTEM_PYTHON}: {version.strip()}")
    print(f"# sequential safe-mode XML pushes, new connection each, best of {args.rounds} "
          "rounds\n")
    print("| served as | requests | mean ms/req | p50 ms | p90 ms | × mod_wsgi |")
    print("|---|---:|---:|---:|---:|---:|")
    base_mean = statistics.mean(best["mod_wsgi"])
    for name in ("CGI", "mod_wsgi"):
        times = sorted(best[name])
        mean = statistics.mean(times)
        print(f"| {name} | {len(times)} | {mean:.1f} | {statistics.median(times):.1f} | "
              f"{times[int(len(times) * 0.9) - 1]:.1f} | {mean / base_mean:.1f} |")
    for name in STARTUPS:
        times = best[name]
        print(f"| ({name}, no request) | {len(times)} | {statistics.mean(times):.1f} | "
              f"{statistics.median(times):.1f} | | |")
    needs = statistics.mean(best["python3 importing what a push needs"])
    print(f"\nA CGI push: {statistics.mean(best['CGI']) / needs:.2f}x an interpreter importing "
          "what a push needs (mean over mean).")
    total = next(row[0] for row in imports if row[3] == "wxgate")
    print(f"\n`{SYSTEM_PYTHON} -X importtime -c 'import wxgate'` (median of 5 runs): "
          f"{total / 1000:.1f} ms in all, of which wxgate's own body {imports[-1][1] / 1000:.1f}"
          " ms. The biggest imports, by cumulative time; \"via\": what wxgate imports that "
          "brought it in (a module is counted under the first that imported it):\n")
    print("| module | via | cumulative ms | self ms |")
    print("|---|---|---:|---:|")
    rows, ancestors = [], {}
    for cumulative, own, depth, name in reversed(imports):  # a parent's line follows its own
        ancestors[depth] = name
        if depth >= 1:
            via = ancestors[1] if depth > 1 else "(wxgate)"
            rows.append((cumulative, own, name, via))
    for cumulative, own, name, via in sorted(rows, key=lambda row: -row[0])[:20]:
        print(f"| {name} | {via} | {cumulative / 1000:.1f} | {own / 1000:.1f} |")


if __name__ == "__main__":
    main()
