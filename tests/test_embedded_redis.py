"""The embedded redis-server (issue 10, defect 3): exactly one server per data folder, always.

A server is found by scanning ``/proc`` for ``redis-server`` processes whose working directory is the
folder (the server runs in its data folder), so these tests count real processes, not what the
launcher believes.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import servers_on

from share import merge
from subspace_store.embedded import ensure_running, running_server, start_redis, stop_embedded
from subspace_store.errors import StoreError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]


def wait_until(predicate, timeout_s: float = 30.0) -> bool:
    """Poll ``predicate`` (a process needs a moment to exit); not a timing assertion."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    """A data folder whose redis-servers (any this test left) are killed afterwards, by pid."""
    path = tmp_path / "home" / "redis"
    yield path
    for pid in servers_on(path):
        os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not servers_on(path))


def sharecl(*argv: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SHARECL_REDIS_URL"}
    env["SHARECL_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *argv], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )


def test_sigkill_then_the_next_two_commands_share_one_server_and_the_data(folder, tmp_path, make_adapter) -> None:
    home = folder.parent
    sub, _ = merge(None, {"a": make_adapter(0)})
    sub.save(tmp_path / "sub")
    assert sharecl("store", "start", home=home).returncode == 0
    done = sharecl("push", str(tmp_path / "sub"), home=home)
    assert done.returncode == 0, done.stderr
    [first] = servers_on(folder)

    os.kill(first, signal.SIGKILL)  # kill -9, as a crash would
    assert wait_until(lambda: not servers_on(folder))

    for _ in range(2):  # the command after the crash, then the one after that
        done = sharecl("versions", "--json", home=home)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        assert [row["version"] for row in json.loads(done.stdout)] == ["v1"]
        assert len(servers_on(folder)) == 1
    [second] = servers_on(folder)
    assert second != first and int((folder / "redis.pid").read_text()) == second
    assert sharecl("store", "stop", home=home).returncode == 0
    assert wait_until(lambda: not servers_on(folder))


def test_concurrent_starts_on_one_folder_end_with_one_server(folder) -> None:
    script = textwrap.dedent(
        """
        import sys
        from subspace_store.embedded import ensure_running
        server = ensure_running(sys.argv[1])
        print(server.pid, server.port)
        """
    )
    children = [
        subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True, cwd=REPO)
        for _ in range(4)
    ]
    answers = {child.communicate(timeout=300)[0].strip() for child in children}
    assert all(child.returncode == 0 for child in children)
    assert len(answers) == 1
    assert servers_on(folder) == [int(answers.pop().split()[0])]


def test_a_lost_port_file_does_not_start_a_second_server(folder) -> None:
    server = ensure_running(folder)
    server.client().set("k", b"v")
    (folder / "redis.port").unlink()  # as the crash in the issue left it: running, but no port file
    again = ensure_running(folder)
    assert (again.pid, again.port) == (server.pid, server.port)
    assert servers_on(folder) == [server.pid] and again.client().get("k") == b"v"
    assert stop_embedded(folder) and wait_until(lambda: not servers_on(folder))


def test_a_stale_pid_of_another_process_is_recognised(folder, redis_server) -> None:
    folder.mkdir(parents=True)
    (folder / "redis.pid").write_text(f"{os.getpid()}\n")  # alive, but not a redis-server
    (folder / "redis.port").write_text(redis_server.rsplit(":", 1)[1].split("/")[0] + "\n")  # someone else's
    assert running_server(folder) is None
    server = ensure_running(folder)
    assert server.pid != os.getpid() and servers_on(folder) == [server.pid]
    assert running_server(folder) == server
    assert stop_embedded(folder) and wait_until(lambda: not servers_on(folder))


def test_the_folder_lock_is_held_for_the_servers_lifetime(folder) -> None:
    server = ensure_running(folder)
    with open(folder / "server.lock", "a") as handle:
        with pytest.raises(BlockingIOError):
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StoreError, match="already runs"):
            start_redis(folder, password=server.password)  # even the low-level launcher refuses
        os.kill(server.pid, signal.SIGKILL)
        assert wait_until(lambda: not servers_on(folder))
        # Released with the server, even by SIGKILL. Polled: /proc shows the main thread gone (a zombie)
        # while redis's background threads still share its descriptor table, and the lock goes with the last.
        assert wait_until(lambda: _try_lock(handle))
        fcntl.flock(handle, fcntl.LOCK_UN)


def _try_lock(handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def test_a_failed_start_leaves_no_server_running(folder) -> None:
    with pytest.raises(StoreError, match="stopped it"):
        start_redis(folder, detach=True, timeout_s=0.0)  # gives up before the server can answer
    assert wait_until(lambda: not servers_on(folder))
    server = ensure_running(folder)  # and the folder is usable right after
    assert servers_on(folder) == [server.pid]
    assert stop_embedded(folder)


def test_a_data_folder_path_cannot_inject_config(tmp_path) -> None:
    home = tmp_path / 'x"\nbind 0.0.0.0\nprotected-mode no\n#'
    folder = home / "redis"
    try:
        server = ensure_running(folder)
        config = server.client().config_get("*")  # redis-py decodes CONFIG GET's names and values
        assert config["bind"] == "127.0.0.1" and config["protected-mode"] == "yes"
        assert config["dir"] == str(folder.resolve()) and config["port"] == str(server.port)
        assert config["requirepass"] == server.password
    finally:
        stop_embedded(folder)
        for pid in servers_on(folder):
            os.kill(pid, signal.SIGKILL)
