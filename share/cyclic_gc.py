"""Pausing CPython's cyclic garbage collector around work that makes many objects and no reference cycles."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused() -> Iterator[None]:
    """Run the body (a ``with`` block, or a function it decorates) with the cyclic collector off.

    A merge or publish of thousands of tasks makes a few small objects per task and module (tensor views,
    tuples, dicts) and no cycles; the collector would run many times over every live object meanwhile. Reference
    counting still frees everything; nested uses are fine, and the collector is back on after if it was on.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
