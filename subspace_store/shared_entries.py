"""Manifest format 4: task entries written once, the numbers a merge changes packed per version.

In formats 1-3 every version's manifest holds every task's whole entry (payload key, sha256, ``p``,
head names, metadata), so a version costs O(T) JSON even when it writes one task's payload. Most of an
entry never changes after the task's payload is written; what every merge changes is a few numbers
(``share.merge``'s reconstruction error, energy kept, drift bounds). Format 4 keeps them apart:

- **Entries payload parts** of version ``w`` (``Keys.entries(w, part)``, ``ENTRIES_PART`` tasks each): JSON
  ``{"format": ENTRIES_FORMAT, "tasks": {name: entry}}`` for the tasks whose payloads ``w`` wrote. An entry
  is the format-3 entry without ``key`` and ``written_in`` (the layout gives them: ``Keys.task(w, name)``,
  ``w``) and without the numbers below. Immutable like every payload; later versions name a part (version,
  part, key, size, sha256) instead of copying it, and a read fetches only the parts of the tasks it reads.
- **Numbers payload** of version ``v`` (``Keys.numbers(v)``): float64, little-endian, one row per task in
  the manifest's task order; columns ``NUMBER_FIELDS`` (the entry's ``reconstruction_error``, then the
  metadata's) and then ``module_drift`` once per module, in the manifest's module order. NaN means the
  field is absent (a stored value is always finite).
- **Manifest** ``tasks``: name -> position in ``entries``, the list of the parts its tasks' entries are in
  (parts of the versions that wrote its tasks' payloads: at most the rotation chain's length plus one
  versions), and ``numbers``: that payload with ``fields`` naming its columns and ``order_sha256`` the
  sha256 of the task names in row order and the module names in column order (``order_sha256()``): rows are
  matched to tasks, and ``module_drift`` columns to modules, by the order of ``tasks``' and ``modules``'
  keys, so a reader refuses a manifest re-saved in another order (manifests written before this field have
  none and are read unverified).

A version is written in format 4 when every task's numbers are finite floats or absent (what ``share.merge``
writes), and either it is written in full with at least ``SHARED_ENTRIES_FROM`` tasks or its parent is
format 4 (its tasks' entries payloads exist). Readers assemble each entry back into its format-3 form, so
every check of formats 1-3 applies to it unchanged. Pure functions: no Redis here.
"""

from __future__ import annotations

import json
import math
import sys
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from share.merge import DRIFT_BOUND, ENERGY_KEPT, ERROR_BOUND, MODULE_DRIFT, RECONSTRUCTION_ERROR

from .payloads import PayloadFormatError, sha256

SHARED_FORMAT_VERSION = 4
ENTRIES_FORMAT = "share-cl-task-entries"
SHARED_ENTRIES_FROM = 256  # a full version with this many tasks or more is written in format 4
ENTRIES_PART = 512  # tasks per entries payload part: a one-task read parses at most this many entries
ENTRY_ERROR = "entry." + RECONSTRUCTION_ERROR  # the entry's own reconstruction_error (not its metadata's)
_SCALARS = (RECONSTRUCTION_ERROR, ENERGY_KEPT, DRIFT_BOUND, ERROR_BOUND)
NUMBER_FIELDS = (ENTRY_ERROR, *_SCALARS)
FIELDS = [*NUMBER_FIELDS, MODULE_DRIFT]  # as a manifest's ``numbers`` names its columns
DYNAMIC_METADATA = frozenset({*_SCALARS, MODULE_DRIFT})
_NOT_STATIC = frozenset({"key", "written_in", "reconstruction_error"})
_FLOAT = frozenset({float})
_ABSENT: Any = object()  # a number a task does not have (stored as NaN)


def columns(modules: int) -> int:
    return len(NUMBER_FIELDS) + modules


def order_sha256(names: Iterable[str], modules: Iterable[str]) -> str:
    """The hex sha256 of the task names and the module names, in their order (as JSON): what a manifest's
    ``numbers.order_sha256`` records of its rows' task order and its ``module_drift`` columns' module order."""
    text = json.dumps([list(names), list(modules)])  # ASCII: a forged name may be any JSON string
    return sha256(text.encode())


def number_rows(entries: Mapping[str, dict[str, Any]], modules: list[str]) -> bytes | None:
    """The numbers payload of readers'-layout entries (module maps as dicts), in their order; None when some
    task's numbers are not finite floats or absent (such a version is written in format 3).

    Every row is laid end to end first and checked in bulk (what ``share.merge`` writes: all finite floats);
    only when that fails is each value looked at: absent (no entry error, no metadata key) becomes NaN."""
    if not modules:
        return None
    flat: list[Any] = []
    missing = [_ABSENT] * len(modules)
    for entry in entries.values():
        metadata = entry["metadata"]
        flat.append(entry["reconstruction_error"])
        flat.extend(metadata.get(key, _ABSENT) for key in _SCALARS)
        drift = metadata.get(MODULE_DRIFT, _ABSENT)
        if drift is _ABSENT:
            flat.extend(missing)
        elif type(drift) is dict and list(drift) == modules:
            flat.extend(drift.values())
        else:
            return None
    if not (set(map(type, flat)) <= _FLOAT and all(map(math.isfinite, flat))):
        width = columns(len(modules))
        for i, value in enumerate(flat):
            if value is _ABSENT or (value is None and i % width == 0):  # the entry's own error may be null
                flat[i] = math.nan
            elif type(value) is not float or not math.isfinite(value):
                return None
    out = array("d", flat)
    if sys.byteorder != "little":
        out.byteswap()
    return out.tobytes()


def decode_numbers(data: bytes | memoryview, rows: int, modules: int) -> array:
    """A numbers payload as one flat array of ``rows`` rows; ``PayloadFormatError`` if its size is not that."""
    width = columns(modules)
    if len(data) != rows * width * 8:
        raise PayloadFormatError(f"holds {len(data)} bytes, not {rows} rows of {width} float64")
    values = array("d")
    values.frombytes(bytes(data))
    if sys.byteorder != "little":
        values.byteswap()
    return values  # an infinite value is refused with the row that holds it (``codec``)


def static_entry(packed: dict[str, Any]) -> dict[str, Any]:
    """A packed (format-3) entry less what the layout gives and the numbers: what an entries payload holds."""
    out = {k: v for k, v in packed.items() if k not in _NOT_STATIC}
    metadata = packed["metadata"]
    if DYNAMIC_METADATA.intersection(metadata):
        out["metadata"] = {k: v for k, v in metadata.items() if k not in DYNAMIC_METADATA}
    names = packed.get("module_values")
    if names is not None:
        kept = [name for name in names if name != MODULE_DRIFT]
        if kept:
            out["module_values"] = kept
        else:
            del out["module_values"]
    return out


def encode_entries(entries: Mapping[str, dict[str, Any]]) -> bytes:
    """An entries payload of ``static_entry`` dicts."""
    return json.dumps({"format": ENTRIES_FORMAT, "tasks": entries}).encode()


def encode_parts(entries: Mapping[str, dict[str, Any]]) -> list[bytes]:
    """``static_entry`` dicts as entries payload parts of ``ENTRIES_PART`` tasks each, in order."""
    names = list(entries)
    return [
        encode_entries({name: entries[name] for name in names[i : i + ENTRIES_PART]})
        for i in range(0, len(names), ENTRIES_PART)
    ]


@dataclass
class Inherited:
    """Where a format-4 parent keeps its tasks' entries: its ``entries`` elements, each task's position among them,
    and its checked (readers'-layout) entries."""

    elements: list[dict[str, Any]]
    positions: dict[str, int]
    entries: dict[str, dict[str, Any]]


def decode_entries(data: bytes | memoryview) -> dict[str, Any]:
    """An entries payload's task -> entry map; ``PayloadFormatError`` if it is not one."""
    try:
        top = json.loads(bytes(data))
    except (ValueError, RecursionError) as err:
        raise PayloadFormatError(f"is not valid JSON ({' '.join(str(err).split())[:120]})") from None
    if type(top) is not dict or top.get("format") != ENTRIES_FORMAT or type(top.get("tasks")) is not dict:
        raise PayloadFormatError(f"is not a {ENTRIES_FORMAT!r} object with a 'tasks' object")
    return top["tasks"]


def join(static: Any, written_in: str, key: str, row: list[float], modules: list[str]) -> dict[str, Any]:
    """The format-3 (packed) entry of a task from its entries payload's ``static`` entry and its numbers ``row``.

    Raises ``ValueError`` (the caller names the payload) for what only this format can get wrong: an entry that
    is not an object or that holds a number the numbers payload owns, or a module_drift row partly absent.
    """
    if type(static) is not dict or type(static.get("metadata")) is not dict:
        raise ValueError("is not an object with a 'metadata' object")
    metadata = static["metadata"]
    if _NOT_STATIC.intersection(static) or DYNAMIC_METADATA.intersection(metadata):
        raise ValueError("holds a field that the layout or the numbers payload gives")
    entry = dict(static)
    entry["key"] = key
    entry["written_in"] = written_in
    error = row[0]
    entry["reconstruction_error"] = None if math.isnan(error) else error
    metadata = dict(metadata)
    for name, value in zip(_SCALARS, row[1 : len(NUMBER_FIELDS)], strict=True):
        if not math.isnan(value):
            metadata[name] = value
    drift = row[len(NUMBER_FIELDS) :]
    absent = [math.isnan(v) for v in drift]
    if modules and not any(absent):
        metadata[MODULE_DRIFT] = drift
        names = static.get("module_values", [])
        entry["module_values"] = [*names, MODULE_DRIFT] if type(names) is list else names
    elif any(absent) and not all(absent):
        raise ValueError("has module_drift for some modules only")
    entry["metadata"] = metadata
    return entry


def same_static(metadata: Mapping[str, Any], stored: Mapping[str, Any]) -> bool:
    """Whether two tasks' metadata agree outside the numbers a merge changes (a task whose other metadata
    changed cannot keep its entries payload: its payload and entry are written again)."""
    if metadata.keys() - DYNAMIC_METADATA != stored.keys() - DYNAMIC_METADATA:
        return False
    return all(value == stored[key] for key, value in metadata.items() if key not in DYNAMIC_METADATA)


def renumbered(stored: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """A checked readers'-layout entry ``stored`` (shared, not modified) with the numbers of ``entry`` (a built
    entry whose metadata agrees with it outside them; ``number_rows`` accepted them: floats, module_drift a map)."""
    metadata = entry["metadata"]
    out = {k: v for k, v in stored["metadata"].items() if k not in DYNAMIC_METADATA}
    out.update((key, metadata[key]) for key in _SCALARS if key in metadata)
    if MODULE_DRIFT in metadata:
        out[MODULE_DRIFT] = dict(metadata[MODULE_DRIFT])
    return {**stored, "reconstruction_error": entry["reconstruction_error"], "metadata": out}
