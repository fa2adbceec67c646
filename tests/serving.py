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

import pytest

from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
BOOT_LINE = b"Booting worker with pid"


def require(available, reason):
    """Skip with ``reason`` when a server is not installed; under CI, fail instead."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI must run the deployment tests (.ci/run installs it)")
    pytest.skip(reason)


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


# -- Apache httpd + mod_wsgi, and nginx, on loopback -----------------------------------------
#
# Both run in the foreground in their own session, so :func:`stop` ends them (and the workers,
# mod_wsgi daemons ... they forked) like gunicorn. Their configs live in ``workdir``, which
# must be readable by the unprivileged user the servers switch to when started as root (pytest's
# own tmp_path is 0700: use :func:`public_dir`).

APACHE_MODULES = Path("/usr/lib/apache2/modules")


def public_dir(prefix="wxgate-"):
    """A fresh directory in /tmp that every user may read (0755); remove it when done."""
    import tempfile
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def _apache_httpd():
    import shutil
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return shutil.which("apache2", path=path) or shutil.which("httpd", path=path)


def apache_binary():
    """The apache2/httpd binary and mod_wsgi.so, or None when either is missing."""
    binary = _apache_httpd()
    module = APACHE_MODULES / "mod_wsgi.so"
    if binary is None or not module.exists():
        return None
    return binary, module


def apache_cgi_binary():
    """The apache2/httpd binary when it and mod_cgid are installed, else None."""
    binary = _apache_httpd()
    if binary is None or not (APACHE_MODULES / "mod_cgid.so").exists():
        return None
    return binary


def _unprivileged_user():
    """The user and group a root-started server switches to (www-data, else nobody)."""
    import grp
    import pwd
    for user in ("www-data", "nobody"):
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            continue
        return user, grp.getgrgid(entry.pw_gid).gr_name
    raise RuntimeError("no www-data or nobody user to run the server as")


def _world_readable(path):
    """True when any user may read ``path``: o+r on it and o+x on every folder above it."""
    path = Path(path).resolve()
    if not path.stat().st_mode & 0o004:
        return False
    return all(parent.stat().st_mode & 0o001 for parent in path.parents)


def _public_copy(path, folder):
    """Copy ``path`` into ``folder`` (made 0755), readable by every user; return the copy."""
    import shutil
    folder.mkdir(mode=0o755, exist_ok=True)
    folder.chmod(0o755)
    copy = folder / Path(path).name
    shutil.copy2(path, copy)
    copy.chmod(0o644)
    return copy


def start_apache(workdir, ini_path, *, mount="/", script=REPO / "wxgate.py", python_path=REPO,
                 extra_conf="", wsgi=True, modules=(), env=None, envvars=None, timeout=20.0):
    """Serve ``script`` under Apache httpd + mod_wsgi (daemon mode) on a free loopback port.

    The config is the README's: ``WSGIDaemonProcess ... python-path=``, ``WSGIScriptAlias
    MOUNT SCRIPT``, ``WSGIPassAuthorization On``, ``SetEnv WXGATE_CONFIG`` (left out when ``ini_path`` is None: the script
    sets it). Returns ``(base_url, process)``; the error log, where wxgate's own log lines land
    too, is ``process.log_path``.

    :param python_path: the daemon's ``python-path``; None leaves the option out (a host
        that puts nothing on ``sys.path``).
    :param wsgi: False serves no WSGI script at all (a CGI-only server: ``extra_conf`` and
        ``modules`` say what to serve).
    :param modules: more modules to load by name (``"cgid"``, ``"alias"`` ...).
    :param env: variables of Apache's own process environment (what Debian's
        ``/etc/apache2/envvars`` exports), inherited by mod_wsgi's daemon processes.
    :param envvars: a shell file sourced before Apache starts, as ``apache2ctl`` sources
        ``/etc/apache2/envvars``.
    """
    binary = _apache_httpd()
    if binary is None or (wsgi and apache_binary() is None):
        raise RuntimeError("apache2 or mod_wsgi is not installed")
    workdir, script = Path(workdir), Path(script)
    if os.geteuid() == 0:
        # A clone under a 0700 folder (/root, mktemp -d) is closed to the user Apache
        # switches to: serve copies of the script and the module from the public workdir.
        if not _world_readable(script):
            script = _public_copy(script, workdir / "module")
        if python_path is not None and not _world_readable(Path(python_path) / "wxgate.py"):
            python_path = _public_copy(Path(python_path) / "wxgate.py", workdir / "module").parent
    port = free_port()
    user = ""
    if os.geteuid() == 0:  # Apache refuses to serve as root: switch to a plain user
        user = "User {}\nGroup {}".format(*_unprivileged_user())
    loads = "\n".join(f"LoadModule {name}_module {APACHE_MODULES}/mod_{name}.so"
                      for name in modules)
    served = ""
    if wsgi:
        set_env = f'SetEnv WXGATE_CONFIG "{ini_path}"' if ini_path else ""
        path_option = f" python-path={python_path}" if python_path else ""
        served = f"""\
LoadModule wsgi_module {APACHE_MODULES / "mod_wsgi.so"}
WSGISocketPrefix "{workdir}/wsgi"
WSGIRestrictEmbedded On
WSGIDaemonProcess wxgate processes=1 threads=4{path_option}
WSGIScriptAlias {mount} "{script}" process-group=wxgate application-group=%{{GLOBAL}}
WSGIPassAuthorization On
{set_env}
<Directory "{script.parent}">
    <Files "{script.name}">
        Require all granted
    </Files>
</Directory>
"""
    conf = workdir / "httpd.conf"
    conf.write_text(f"""\
ServerRoot "{workdir}"
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile "{workdir}/httpd.pid"
ErrorLog "{workdir}/error.log"
LogLevel info
DefaultRuntimeDir "{workdir}"
Mutex file:{workdir} default
{user}
LoadModule mpm_event_module {APACHE_MODULES}/mod_mpm_event.so
LoadModule authz_core_module {APACHE_MODULES}/mod_authz_core.so
LoadModule env_module {APACHE_MODULES}/mod_env.so
{loads}
{served}
{extra_conf}
""", "utf-8")
    log_path = workdir / "error.log"
    # Debian's system Python runs mod_wsgi: keep this interpreter's PYTHON* variables away.
    environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", **(env or {})}
    command = [binary, "-f", str(conf), "-DFOREGROUND"]
    if envvars is not None:  # what apache2ctl does with /etc/apache2/envvars
        command = ["/bin/sh", "-c", '. "$0" && exec "$@"', str(envvars), *command]
    with open(workdir / "apache.out", "wb") as out:
        process = subprocess.Popen(command, cwd=workdir, env=environment,
                                   stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    process.log_path = log_path
    _wait_started(process, port, "apache2", [workdir / "apache.out", log_path], timeout)
    return f"http://127.0.0.1:{port}", process


def start_nginx(workdir, upstream, *, client_max_body_size="64k", timeout=20.0):
    """Run nginx on a free loopback port as a reverse proxy to ``upstream`` (a base URL).

    The server block is the README's: ``client_max_body_size`` (align it with max_body_bytes),
    ``X-Forwarded-For``/``-Proto`` and ``X-Request-Id $request_id`` to the upstream; the
    request id is also sent back to the client and written in the access log
    (``workdir/access.log``, the README's ``log_format wxgate``: ``rid=$request_id``).
    Returns ``(base_url, process)``; ``process.log_path`` is nginx's error log.
    """
    import shutil
    binary = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if binary is None:
        raise RuntimeError("nginx is not installed")
    workdir = Path(workdir)
    port = free_port()
    user = "user {} {};".format(*_unprivileged_user()) if os.geteuid() == 0 else ""
    conf = workdir / "nginx.conf"
    temp = "\n".join(f"    {kind}_temp_path {workdir}/{kind}_temp;"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf.write_text(f"""\
{user}
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log info;
events {{ worker_connections 64; }}
http {{
    log_format wxgate '$remote_addr [$time_local] "$request" $status $body_bytes_sent '
                      '$request_time rid=$request_id';
    access_log {workdir}/access.log wxgate;
{temp}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size {client_max_body_size};
        location / {{
            proxy_pass {upstream.rstrip("/")};
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Request-Id $request_id;
            add_header X-Request-Id $request_id always;
        }}
    }}
}}
""", "utf-8")
    log_path = workdir / "error.log"
    with open(workdir / "nginx.out", "wb") as out:
        process = subprocess.Popen(
            [binary, "-e", str(log_path), "-p", str(workdir), "-c", str(conf),
             "-g", "daemon off;"], cwd=workdir, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    process.log_path = log_path
    _wait_started(process, port, "nginx", [workdir / "nginx.out", log_path], timeout)
    return f"http://127.0.0.1:{port}", process


def _wait_started(process, port, name, logs, timeout):
    deadline = time.monotonic() + timeout
    while not _accepts(port):
        if process.poll() is not None or time.monotonic() > deadline:
            failed = process.poll() is not None
            stop(process)
            tails = "\n".join(f"--- {path.name}:\n{_tail(path)}" for path in logs)
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{tails}" if failed
                               else f"{name} did not start within {timeout:g} s:\n{tails}")
        time.sleep(0.05)
