"""Real faults for the reliability tests and bench/outage.py: a disk that fills up, a sqlite
database whose writes are locked out, a Redis server that can be killed and restarted.

Nothing here reaches into wxgate: each fault is made the way production meets it.

    with small_disk(tmp_path, ["python", "-m", "wxgate", "serve", ini]) as disk:
        ...                 # the gateway's ini puts its sqlite file under disk.inside
        disk.fill()         # ENOSPC from now on
        disk.free()

The tmpfs is mounted inside a private mount namespace (``unshare -m``) where the command
runs; this process reaches it through ``/proc/PID/root/...``, so the host's mount table
never changes and nothing is left mounted if the test dies.
"""

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import webtest

from conftest import build_push


class Disk:
    """A small tmpfs. ``path`` is where this process reaches it (for :meth:`fill`);
    ``inside`` is where the process living in the namespace sees it (for its config)."""

    def __init__(self, process, path, inside):
        self.process, self.path, self.inside = process, path, inside
        self._filler = path / "filler"

    def fill(self):
        """Write a file until the disk says ENOSPC; return the bytes written."""
        written = 0
        with open(self._filler, "ab", buffering=0) as file:
            for size in (65536, 4096, 512, 1):
                while True:
                    try:
                        written += file.write(b"\0" * size)
                    except OSError:
                        break
        return written

    def free(self):
        """Delete the filler: the disk has room again."""
        with contextlib.suppress(FileNotFoundError):
            self._filler.unlink()


def _skip_or_fail(reason):
    if os.environ.get("WXGATE_REQUIRE_FAULTS"):
        pytest.fail(reason)
    pytest.skip(reason)


@contextlib.contextmanager
def small_disk(directory, command, size="2m", log_path=None, env=None):
    """Run ``command`` (argv) in a private mount namespace with a ``size`` tmpfs mounted
    on ``directory/tmpfs``; yield a :class:`Disk` whose ``process`` is the command.

    SQLite resolves ``/proc/PID/root`` as a plain symlink (to this namespace's ``/``), so
    a database on the tmpfs must be opened by a process inside the namespace: ``command``.
    Skips, with the reason, where the machine does not allow it (not root, no ``unshare``,
    a container without CAP_SYS_ADMIN); ``WXGATE_REQUIRE_FAULTS=1`` turns that into a failure.
    """
    import shlex
    unshare = shutil.which("unshare")
    if unshare is None:
        _skip_or_fail("small_disk: no unshare binary (util-linux)")
    mountpoint = Path(directory).resolve() / "tmpfs"
    mountpoint.mkdir()
    log_path = Path(log_path or Path(directory) / "small-disk.log")
    script = (f"mount -t tmpfs -o size={size},mode=0700 wxgate-test {mountpoint} || exit 97; "
              f"exec {shlex.join(str(part) for part in command)}")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [unshare, "-m", "--propagation", "private", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, **(env or {})), start_new_session=True)
    process.log_path = log_path
    disk = Disk(process, Path(f"/proc/{process.pid}/root") / mountpoint.relative_to("/"),
                mountpoint)
    try:
        deadline = time.monotonic() + 10
        while not os.path.ismount(disk.path):
            if process.poll() is not None or time.monotonic() > deadline:
                error = log_path.read_text("utf-8", "replace").strip()
                _skip_or_fail("small_disk: cannot mount a tmpfs in a private mount namespace "
                              f"here: {error[-300:]}")
            time.sleep(0.02)
        yield disk
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def sqlite_locked(path):
    """Hold the write lock of the sqlite database at ``path`` (as a long transaction of
    another program would): every writer gets "database is locked" after its busy timeout."""
    connection = sqlite3.connect(str(path), isolation_level=None, timeout=10)
    try:
        connection.execute("BEGIN IMMEDIATE")
        yield connection
    finally:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")
        connection.close()


def sqlite_rows(path, sql, parameters=()):
    """Run one statement on its own autocommit connection; return its rows (a read in WAL
    mode never waits for the writer)."""
    connection = sqlite3.connect(str(path), timeout=10, isolation_level=None)
    try:
        return connection.execute(sql, parameters).fetchall()
    finally:
        connection.close()


# A trigger that stalls every insert into the queue table, holding sqlite's write lock, for as
# long as the inserting process lives: a recursive count far beyond any test's patience.
STALL_QUEUE_INSERTS = (
    "CREATE TRIGGER wxgate_test_stall BEFORE INSERT ON wxgate_queue BEGIN "
    "SELECT count(*) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
    "WHERE x < 1000000000000) SELECT x FROM c); END")
UNSTALL_QUEUE_INSERTS = "DROP TRIGGER IF EXISTS wxgate_test_stall"


class RedisServer:
    """A redis-server of the test's own, which it may kill, stop and restart on one port.

    With ``appendfsync always`` its data survive a SIGKILL, as a production Redis with AOF
    would, so a restart brings back what was written before the outage. With
    ``persistent=False`` it keeps nothing on disk, and a restart brings it back empty.
    ``password`` makes it require one (the URL then carries it).
    """

    def __init__(self, directory, *, persistent=True, password=None):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            _skip_or_fail("redis-server binary not installed (apt-get install redis-server)")
        from conftest import free_port
        self.port = free_port()
        self.directory = Path(directory)
        self.persistent, self.password = persistent, password
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.process = None

    def start(self):
        persistence = (["--appendonly", "yes", "--appendfsync", "always"] if self.persistent
                       else ["--appendonly", "no"])
        auth = ["--requirepass", self.password] if self.password else []
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *persistence, *auth, "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis
        client = redis.Redis.from_url(self.url)
        try:
            for _ in range(250):
                try:
                    client.ping()
                    return self
                except redis.exceptions.BusyLoadingError:
                    time.sleep(0.02)
                except redis.ConnectionError:
                    time.sleep(0.02)
        finally:
            client.close()
        raise RuntimeError("redis-server did not start")

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()

    def client(self):
        import redis
        return redis.Redis.from_url(self.url)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill()


def post(app, fields, status="*"):
    """Push ``fields`` to ``app`` as WeChat would (WebTest, lint on); any status is returned."""
    query, body = build_push(fields)
    return webtest.TestApp(app, lint=True).post(f"/wechat?{query}", body,
                                                content_type="text/xml", status=status)


def wait_for(condition, timeout=20.0, every=0.02):
    """Poll ``condition`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return False
