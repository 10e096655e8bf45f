"""Whole-folder writes that never leave a half-written folder at the target (subspaces, PEFT exports)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import ShareClError


class MissingFileError(ShareClError, FileNotFoundError):
    """A folder or file that the input names does not exist or is incomplete."""


class FolderExistsError(ShareClError, FileExistsError):
    """The output folder already holds something that a write would replace."""


def write_folder(target: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Run ``write`` into a temporary sibling of ``target``, then rename it into place.

    A non-empty ``target`` is replaced only with ``overwrite``. On any error the previous ``target``
    (if any) is left, or put back, as it was, and the temporary folder is removed.
    """
    if target.exists() and not target.is_dir():
        raise FolderExistsError(f"{target} exists and is not a folder; choose another output folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FolderExistsError(f"{target} exists and is not empty; pass overwrite=True or choose another folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        if not target.exists():
            os.rename(tmp, target)
            return target
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, backup / "old")
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(backup / "old", target)  # put the previous folder back
            backup.rmdir()
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return target
