"""Tag names: deployment names for versions (``prod``, ``canary``, ...)."""

from __future__ import annotations

import re

from .errors import StoreError

_TAG = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,63}")  # used with fullmatch: no trailing newline
_RESERVED = {"head", "latest"}


def check_tag_name(name: str) -> str:
    if not isinstance(name, str) or not _TAG.fullmatch(name) or re.fullmatch(r"v[0-9]+", name):
        raise StoreError(
            f"invalid tag {name!r}: use 1-64 letters, digits, '_', '.', '-' starting with a letter, "
            "and not of the form v<number> (those are version ids)"
        )
    if name.lower() in _RESERVED:
        raise StoreError(f"tag {name!r} is reserved (it always means the head); choose another name")
    return name
