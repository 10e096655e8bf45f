"""Whole-folder writes that never leave a half-written folder, or none, at the target (subspaces, PEFT exports),
and the file errors of reading such folders back (a JSON file that is not JSON is one ``MalformedFileError``).

The new folder is written to a temporary sibling and swapped in. Where the OS can exchange two paths
atomically (Linux ``renameat2(RENAME_EXCHANGE)``) the swap is one step and crash-safe: at every instant
the target names a complete folder, the old or the new one. Elsewhere (other systems, file systems
without the exchange) the swap takes two renames, and a crash between them leaves the previous folder
only as the hidden backup ``.<name>.old-<pid>-<random>/old``; :func:`recover_folder`, which the loaders
call (``Subspace.load``, ``load_peft_adapter``), puts it back once that process is gone.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ShareClError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}
_BACKUP = "old"  # the previous folder inside its backup folder


class MissingFileError(ShareClError, FileNotFoundError):
    """A folder or file that the input names does not exist or is incomplete."""


class FolderExistsError(ShareClError, FileExistsError):
    """The output folder already holds something that a write would replace."""


class MalformedFileError(ShareClError):
    """A file's content breaks its format (not JSON, a key missing or of the wrong type); names the file and key."""


def read_json(path: Path, fix: str) -> Any:
    """The parsed content of JSON file ``path``; one ``ShareClError`` naming the file and ending in ``fix`` if it
    cannot be read or is not JSON (bad bytes, cut off, nested too deep, a number too long)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise MissingFileError(f"{path} cannot be read ({err.strerror or err}); {fix}") from err
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = " ".join(str(err).split())[:200]
        raise MalformedFileError(f"{path} is not valid JSON ({reason}); {fix}") from err


def describe(value: Any) -> str:
    """A short one-line description of a decoded JSON value for an error message: its type and repr."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}..." if len(text) > 60 else f"{type(value).__name__} {text}"


def _find_renameat2() -> Callable[..., int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _find_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Swap paths ``a`` and ``b`` in one atomic step; ``False`` (nothing changed) where the OS cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def write_folder(target: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Run ``write`` into a temporary sibling of ``target``, then swap it into place (see the module doc).

    A non-empty ``target`` is replaced only with ``overwrite``. On any error the previous ``target``
    (if any) is left, or put back, as it was, and the temporary folder is removed. A crash (no
    exception handler runs) leaves the old or the new folder at ``target``, or, where the swap takes
    two renames, the old one in a backup that :func:`recover_folder` restores.
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
        if _exchange(tmp, target):
            if tmp.is_symlink():  # the target was a link to a folder: the link goes, the folder stays
                tmp.unlink()
            else:
                shutil.rmtree(tmp, ignore_errors=True)  # now the previous folder
            return target
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
        os.rename(target, backup / _BACKUP)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(backup / _BACKUP, target)  # put the previous folder back
            backup.rmdir()
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return target


def recover_folder(target: Path) -> None:
    """Put back the previous folder that a save killed between its two renames left as a backup.

    Only when ``target`` is absent and the backup's process is gone (a live one is still saving); of
    several such backups the newest wins. Does nothing otherwise, so loaders call it first.
    """
    if target.exists() or target.is_symlink() or not target.parent.is_dir():
        return
    prefix = f".{target.name}.old-"
    candidates = []
    for backup in target.parent.iterdir():
        pid = backup.name[len(prefix) :].partition("-")[0] if backup.name.startswith(prefix) else ""
        if pid.isdecimal() and (backup / _BACKUP).is_dir() and not _alive(int(pid)):
            try:
                candidates.append((backup.stat().st_mtime_ns, backup))
            except FileNotFoundError:  # another process recovered it meanwhile
                continue
    if not candidates:
        return
    backup = max(candidates)[1]
    try:
        os.rename(backup / _BACKUP, target)
    except FileExistsError:  # another process recovered or saved it first
        return
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.ENOENT):
            return
        raise
    try:
        backup.rmdir()
    except OSError:
        pass  # left for a person to inspect; the folder itself is back


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or a number no process can have: keep the backup)
    return True
