"""Pausing CPython's cyclic garbage collector around work that makes many objects and no reference cycles."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused() -> Iterator[None]:
    """Run the body with the cyclic collector off (and back on after, if it was on).

    A merge or publish of thousands of tasks makes a few small objects per task and module (tensor views,
    tuples, dicts) and no cycles; the collector would run many times over every live object meanwhile. Reference
    counting still frees everything; nested uses are fine.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
