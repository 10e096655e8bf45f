"""``share.cyclic_gc.paused`` from two threads at once (a merge on the coordinator thread while a background
compaction publishes): the collector is off while any body runs and back on once the last one leaves.

The threads are held at exact points by ``threading.Event``s; nothing waits on time (each wait's timeout only
keeps a broken run from hanging).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest

from share import cyclic_gc

WAIT_S = 30.0


@pytest.fixture(autouse=True)
def collector_on() -> Iterator[None]:
    """Each test starts with the collector on and leaves it on, whatever it asserted."""
    assert gc.isenabled()
    yield
    gc.enable()


def _run(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_the_collector_stays_off_until_the_last_body_leaves() -> None:
    a_in, a_go, b_in, b_go = (threading.Event() for _ in range(4))

    def body(entered: threading.Event, go: threading.Event) -> Callable[[], None]:
        def run() -> None:
            with cyclic_gc.paused():
                entered.set()
                assert go.wait(WAIT_S)

        return run

    a = _run(body(a_in, a_go))
    assert a_in.wait(WAIT_S) and not gc.isenabled()
    b = _run(body(b_in, b_go))
    assert b_in.wait(WAIT_S)
    a_go.set()  # the first to enter leaves first: B is still inside
    a.join(WAIT_S)
    assert not a.is_alive() and not gc.isenabled()
    b_go.set()
    b.join(WAIT_S)
    assert not b.is_alive() and gc.isenabled()


def test_a_thread_entering_while_another_leaves_does_not_leave_the_collector_off(monkeypatch) -> None:
    """B reads the collector's state while A is inside (off), A leaves (on again), then B turns it off: B must not
    take "off" for the state to restore."""
    a_in, a_go, a_left, b_ready = (threading.Event() for _ in range(4))
    b_thread: list[threading.Thread] = []

    def isenabled() -> bool:
        """In B: read the state, then let A leave before B goes on (to ``gc.disable``)."""
        enabled = gc.isenabled()
        if b_thread and threading.current_thread() is b_thread[0]:
            b_ready.set()
            assert a_left.wait(WAIT_S)
        return enabled

    monkeypatch.setattr(cyclic_gc, "gc", SimpleNamespace(isenabled=isenabled, disable=gc.disable, enable=gc.enable))

    def run_a() -> None:
        with cyclic_gc.paused():
            a_in.set()
            assert a_go.wait(WAIT_S)
        a_left.set()

    def run_b() -> None:
        with cyclic_gc.paused():
            b_ready.set()  # inside (where B reads no state: A is still in)

    a = _run(run_a)
    assert a_in.wait(WAIT_S)
    b = threading.Thread(target=run_b, daemon=True)
    b_thread.append(b)
    b.start()
    assert b_ready.wait(WAIT_S)
    a_go.set()
    for thread in (a, b):
        thread.join(WAIT_S)
        assert not thread.is_alive()
    assert gc.isenabled()
