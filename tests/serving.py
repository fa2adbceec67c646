"""Run ``wxgate:application`` under a real gunicorn on loopback, for multi-process tests.

    base_url, process = start_gunicorn(ini_path, workers=4)
    try:
        ...  # talk HTTP to base_url
    finally:
        stop(process)

gunicorn runs in its own session (process group), so :func:`stop` ends the master and every
worker it forked, and nothing outlives the test. Its output goes to a log file beside the ini
(``process.log_path``), quoted in the error when it fails to start.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
BOOT_LINE = b"Booting worker with pid"


def start_gunicorn(ini_path, workers=4, extra_args=(), env=None, *, timeout=20.0):
    """Start gunicorn with ``WXGATE_CONFIG=ini_path``; return ``(base_url, process)``.

    Returns once the port accepts connections and every worker has booted.

    :param extra_args: more gunicorn options, placed before the app (``--threads``, ...).
    :param env: variables added to (and overriding) this process's environment.
    :param timeout: seconds to wait for the start before giving up with the log's tail.
    """
    port = free_port()
    ini_path = Path(ini_path)
    log_path = ini_path.with_name(f"gunicorn-{port}.log")
    environment = dict(os.environ, WXGATE_CONFIG=str(ini_path))
    environment.update(env or {})
    command = [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{port}",
               "--log-level", "info", *extra_args, "wxgate:application"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=environment, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    process.log_path = log_path
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {process.returncode}:\n{_tail(log_path)}")
        if _accepts(port) and log_path.read_bytes().count(BOOT_LINE) >= workers:
            return f"http://127.0.0.1:{port}", process
        if time.monotonic() > deadline:
            stop(process)
            raise RuntimeError(f"gunicorn did not start within {timeout:g} s:\n"
                               f"{_tail(log_path)}")
        time.sleep(0.05)


def stop(process, timeout=10.0):
    """End gunicorn's whole process group (master and workers) and reap the master."""
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()
    # Workers share the group; a straggler that missed the master's TERM goes now.
    _signal_group(process, signal.SIGKILL)


def _signal_group(process, signum):
    try:
        os.killpg(process.pid, signum)  # start_new_session: the group id is the master's pid
    except (ProcessLookupError, PermissionError):
        pass


def _accepts(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _tail(log_path, size=4000):
    try:
        return log_path.read_bytes()[-size:].decode("utf-8", "replace")
    except OSError:
        return "(no log)"
