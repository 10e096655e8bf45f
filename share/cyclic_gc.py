"""Pausing CPython's cyclic garbage collector around work that makes many objects and no reference cycles."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0  # bodies of ``paused`` running now, in every thread
_was_enabled = False  # whether the collector was on when the first of them entered


@contextmanager
def paused() -> Iterator[None]:
    """Run the body (a ``with`` block, or a function it decorates) with the cyclic collector off.

    A merge or publish of thousands of tasks makes a few small objects per task and module (tensor views,
    tuples, dicts) and no cycles; the collector would run many times over every live object meanwhile. Reference
    counting still frees everything. Nested and concurrent uses (several threads) are fine: a lock and a count
    of the bodies running make the first to enter turn the collector off and the last to leave turn it back on,
    if it was on when the first entered.
    """
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
