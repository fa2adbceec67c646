"""A real business backend for forwarding tests: an HTTP server on 127.0.0.1 that checks
wxgate's HMAC the way a user's backend would, records what it got, and can misbehave."""

import hashlib
import hmac
import http.server
import json
import threading
import time


class Backend:
    """``POST /wechat`` receiver.

    :ivar received: the JSON bodies accepted, in arrival order.
    :ivar rejected: how many requests failed the HMAC check.
    :ivar status: the HTTP status to answer (503 simulates a backend that is down).
    :ivar reply: a callable ``body -> object`` whose JSON is the answer (None: 204).
    :ivar delay: seconds to sleep before answering.
    """

    def __init__(self, secret, port=0):
        self.secret = secret.encode()
        self.received = []
        self.rejected = 0
        self.status = 200
        self.reply = lambda body: None
        self.delay = 0.0
        self.lock = threading.Lock()
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                timestamp = self.headers.get("X-Wxgate-Timestamp", "")
                given = self.headers.get("X-Wxgate-Signature", "")
                expected = hmac.new(backend.secret, timestamp.encode() + raw,
                                    hashlib.sha256).hexdigest()
                if not hmac.compare_digest(given, expected):
                    with backend.lock:
                        backend.rejected += 1
                    return self._answer(401, b"")
                if backend.delay:
                    time.sleep(backend.delay)
                if backend.status != 200:
                    return self._answer(backend.status, b"down")
                body = json.loads(raw)
                with backend.lock:
                    backend.received.append(body)
                answer = backend.reply(body)
                if answer is None:
                    return self._answer(204, b"")
                self._answer(200, json.dumps(answer).encode())

            def _answer(self, status, payload):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client killed mid-request (the crash tests do that on purpose)

        self.server = Server(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/wechat"
        # A short poll interval: shutdown() waits for the serve loop to notice, and the default
        # 0.5 s would cost half a second per test.
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def keys(self):
        with self.lock:
            return [body["dedup_key"] for body in self.received]
