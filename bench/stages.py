"""Where a safe-mode XML push's time goes in wxgate, stage by stage, beside the floor's steps.

    python bench/stages.py            # about 20 s
    python bench/stages.py --quick    # a few seconds, rougher figures

Each stage is one of the calls ``_verify_push`` / ``Gateway._push`` make, timed alone in a hot
loop on the pushes ``pipeline.py`` builds (10000 distinct safe-mode XML texts), with the
arguments the app would pass it; stateful stages (the query bind, the dedup claim) get a
fresh app per repeat so every key is new. Best of the repeats. The whole push through the
WSGI callable is timed the same way; "between the stages" is the whole minus the sum (call
frames, ``_respond``/``_push``/``__call__`` themselves, the headers). Stages in a hot loop
run with warm caches, so their sum is a little under the whole. Times are CPU time of the
process, so the time slices a shared machine gives to other work do not count.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, os.environ.get("WXGATE_SRC") or os.path.dirname(HERE))

import argparse
import base64
import hashlib
import importlib.util
import io
import logging
import tempfile
import time
import xml.etree.ElementTree as ET

from Crypto.Cipher import AES

import wxgate

_spec = importlib.util.spec_from_file_location("bench_pipeline",
                                              os.path.join(HERE, "pipeline.py"))
pipeline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pipeline)

# (stage, what it is for): "floor" does the same step; "query bind" keeps a logged signed
# query from carrying another body, "dedup" runs a push once across retries and workers: the
# floor does neither; "gateway" is wxgate's own bookkeeping.
WHY = {
    "query string → dict (_query) + _required": "floor + parse_qsl",
    "read body (_read_body, incl. BytesIO)": "floor (given)",
    "query bind (sha1 id + sha256 body + ttl + store add)": "query bind",
    "outer XML parse (_sniff_format + _parse_body)": "floor",
    "msg_signature (sha1, check_signature)": "floor",
    "base64 + AES + unpad + appid (_open_encrypt)": "floor",
    "inner XML parse (encode + sniff + _parse_body)": "floor",
    "Message(...)": "gateway",
    "dedup claim + answer (store add, recent memory, set)": "dedup",
    "handler call + metrics + reply (_deliver)": "gateway",
    "push metric, log line off (_record_push)": "gateway",
}


def best(fn, items, repeats, setup=None):
    times = []
    for _ in range(repeats):
        state = setup() if setup else None
        start = time.process_time()  # CPU time: other work's time slices do not count
        fn(items, state)
        times.append(time.process_time() - start)
    return min(times) / len(items) * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    count, repeats = (4000, 3) if args.quick else (10000, 7)
    logging.getLogger("wxgate").setLevel(logging.WARNING)
    tmp = tempfile.TemporaryDirectory(prefix="wxgate-stages-")
    pushes = pipeline.build_inputs(count)["safe-xml-text"]

    def new_gateway():  # quietly: make_app may warn about the memory store
        logging.getLogger("wxgate").setLevel(logging.ERROR)
        try:
            return pipeline.make_wxgate(tmp.name, pipeline.CountingHandler())
        finally:
            logging.getLogger("wxgate").setLevel(logging.WARNING)

    gateway = new_gateway()
    app = gateway.config.apps["bench"]

    def open_encrypt(encrypt):  # the key-rotation rule, with no previous key
        return wxgate._open_encrypt(encrypt, app.aes_key, app.previous_aes_key, app.appid)

    limit = gateway.config.max_body_bytes
    envs = [dict(pipeline.ENVIRON, PATH_INFO="/wechat", REQUEST_METHOD="POST",
                 QUERY_STRING=p.query_string, CONTENT_LENGTH=p.content_length) for p in pushes]
    queries = [wxgate._query(e) for e in envs]
    outer = [wxgate._parse_body(p.body, "xml")["Encrypt"] for p in pushes]
    texts = [open_encrypt(enc)[0] for enc in outer]
    key = app.aes_key
    fields = [wxgate._parse_body(t.encode(), "xml") for t in texts]
    client = gateway.client(app.name)
    messages = [wxgate.Message(f, app=app.name, format="xml", encrypted=True, client=client)
                for f in fields]
    store_keys = [wxgate._store_key(m) for m in messages]
    now = time.monotonic

    def s_query(items, _):
        for e in items:
            q = wxgate._query(e)
            wxgate._required(q, "timestamp", "nonce")
            wxgate._required(q, "msg_signature")

    def s_body(items, _):
        BytesIO, read = io.BytesIO, wxgate._read_body
        for e, p in items:
            e["wsgi.input"] = BytesIO(p.body)
            read(e, limit)

    def s_bind(items, gw):
        bind = gw._query_binds.bind
        for q, p in items:
            bind(app, q["timestamp"], q["nonce"], p.body)

    def s_outer(items, _):
        sniff, parse = wxgate._sniff_format, wxgate._parse_body
        for p in items:
            parse(p.body, sniff(p.body)).get("Encrypt")

    def s_msgsig(items, _):
        check = wxgate.check_signature
        for q, enc in items:
            check(q["msg_signature"], app.token, q["timestamp"], q["nonce"], enc)

    def s_decrypt(items, _):
        dec = open_encrypt
        for enc in items:
            dec(enc)

    def s_inner(items, _):
        sniff, parse = wxgate._sniff_format, wxgate._parse_body
        for t in items:
            inner = t.encode()
            parse(inner, sniff(inner))

    def s_message(items, _):
        M = wxgate.Message
        for f in items:
            M(f, app=app.name, format="xml", encrypted=True, client=client)

    answer = (wxgate._TEXT, "success")

    def s_dedup(items, gw):
        run, deadline = gw._dedups[app.name].run, now() + 5

        def work():
            return answer
        for k in items:
            run(k, work, deadline, 86400)

    def s_deliver(items, _):
        deliver, deadline = gateway._deliver, now() + 4.5
        for m, q in items:
            deliver(app, m, q["nonce"], deadline, key)

    def s_log(items, _):
        log, started = gateway._record_push, now()
        for m, e in items:
            log(app, m, "handled", started, e)

    stages = [
        ("query string → dict (_query) + _required", s_query, envs, None),
        ("read body (_read_body, incl. BytesIO)", s_body,
         list(zip([dict(e) for e in envs], pushes)), None),
        ("query bind (sha1 id + sha256 body + ttl + store add)", s_bind,
         list(zip(queries, pushes)), new_gateway),
        ("outer XML parse (_sniff_format + _parse_body)", s_outer, pushes, None),
        ("msg_signature (sha1, check_signature)", s_msgsig, list(zip(queries, outer)), None),
        ("base64 + AES + unpad + appid (_open_encrypt)", s_decrypt, outer, None),
        ("inner XML parse (encode + sniff + _parse_body)", s_inner, texts, None),
        ("Message(...)", s_message, fields, None),
        ("dedup claim + answer (store add, recent memory, set)", s_dedup, store_keys,
         new_gateway),
        ("handler call + metrics + reply (_deliver)", s_deliver, list(zip(messages, queries)),
         None),
        ("push metric, log line off (_record_push)", s_log, list(zip(messages, envs)),
         None),
    ]

    # The whole push, as pipeline.py calls it (a fresh app per repeat: every key new).
    def s_whole(items, gw):
        call = pipeline.wsgi_caller(gw, "/wechat")
        for p in items:
            call(p)

    # The floor's steps, as pipeline.py's floor does them.
    new, CBC, iv, b64decode = AES.new, AES.MODE_CBC, pipeline.RAW_KEY[:16], base64.b64decode
    sha1, fromstring, token = hashlib.sha1, ET.fromstring, pipeline.TOKEN

    def f_outer(items, _):
        for p in items:
            fromstring(p.body).find("Encrypt").text

    def f_sig(items, _):
        for q, enc in items:
            sha1("".join(sorted((token, q["timestamp"], q["nonce"], enc))).encode()
                 ).hexdigest() == q["msg_signature"]

    def f_aes(items, _):
        for enc in items:
            b = new(pipeline.RAW_KEY, CBC, iv).decrypt(b64decode(enc))
            b[:-b[-1]]

    def f_inner(items, _):
        for t in items:
            {c.tag: c.text for c in fromstring(t.encode())}

    floor_push = pipeline.floor_ops()["safe-xml-text"]

    def f_whole(items, _):
        fn = floor_push
        for p in items:
            fn(p)

    for _ in range(2):  # warm up
        for _name, fn, items, setup in stages:
            fn(items[:500], setup() if setup else None)
    rows = [(name, best(fn, items, repeats, setup)) for name, fn, items, setup in stages]
    whole = best(s_whole, pushes, repeats, new_gateway)
    floor = {
        "outer XML parse (_sniff_format + _parse_body)": best(f_outer, pushes, repeats),
        "base64 + AES + unpad + appid (_open_encrypt)": best(f_aes, outer, repeats),
        "msg_signature (sha1, check_signature)": best(f_sig, list(zip(queries, outer)),
                                                      repeats),
        "inner XML parse (encode + sniff + _parse_body)": best(f_inner, texts, repeats),
    }
    floor_whole = best(f_whole, pushes, repeats)

    print(f"{'stage':<56} {'µs':>6} {'floor µs':>9}  what for")
    total = 0.0
    for name, us in rows:
        total += us
        f = floor.get(name)
        print(f"{name:<56} {us:6.2f} {'' if f is None else f'{f:9.2f}':>9}  {WHY[name]}")
    print(f"{'sum of the stages':<56} {total:6.2f}")
    print(f"{'between the stages (whole − sum)':<56} {whole - total:6.2f}")
    print(f"{'whole push through the WSGI callable':<56} {whole:6.2f} "
          f"{floor_whole:9.2f}")


if __name__ == "__main__":
    main()
