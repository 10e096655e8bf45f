"""Code named by import path, ``"package.module:function"``: a job's model builder, an evaluator.

Only the name travels (in a job file, a stream entry, a version's metadata); the code is whatever is
installed where it is called. One loader, so every such name fails the same way: naming the path
and what to do.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from share.errors import ShareClError


class PluginImportError(ShareClError):
    """An import path is malformed, cannot be imported, or does not name a callable."""


def is_import_path(path: str) -> bool:
    """``"package.module:function"`` (both parts non-empty)."""
    module_name, sep, attr = path.partition(":")
    return bool(sep and module_name and attr)


def load_callable(path: str, what: str, fix: str) -> Callable[..., Any]:
    """Import ``path`` (``"package.module:function"``) and return the callable it names.

    ``what`` names it in messages (``"evaluator"``, ``"model builder"``); ``fix`` says what to do
    when it cannot be imported.
    """
    if not is_import_path(path):
        raise PluginImportError(f"{what} {path!r} must look like 'package.module:function'")
    module_name, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise PluginImportError(f"{what} {path!r} could not be imported ({err}); {fix}") from err
    if not callable(fn):
        raise PluginImportError(f"{what} {path!r} is not callable")
    return fn
