"""Named tensors <-> Arrow IPC bytes, and their checksums. Never pickle.

A payload is one Arrow IPC stream holding one record batch with one row. Tensors of the same dtype
are packed end to end into one ``large_list`` column named after the dtype; the schema metadata
``tensors`` lists every tensor as ``[name, dtype, shape, offset]`` (offset in elements within its
dtype's column). Packing matters: a task payload holds two small matrices per module, and decoding
one column per dtype costs far less per tensor than one Arrow column each. Within a column the
writer groups tensors of one shape (readers go by the offsets, so any packing reads back), and the
reader cuts each such run with one reshape. An index is parsed once per process, and a payload laid
out like one already decoded skips Arrow (see "decoding payloads shaped like one seen before").
Decoding restores dtype, shape and bits exactly (bfloat16 and bool included).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from .errors import StoreError

FORMAT = b"share-cl-tensors"
FORMAT_VERSION = b"2"

# torch dtype name -> (numpy dtype the bits are stored as, torch dtype to view them as after loading).
# bool is stored as uint8 (Arrow packs booleans into bits) and bfloat16 as int16 (numpy lacks it).
_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float64": (np.dtype(np.float64), torch.float64),
    "float32": (np.dtype(np.float32), torch.float32),
    "float16": (np.dtype(np.float16), torch.float16),
    "bfloat16": (np.dtype(np.int16), torch.bfloat16),
    "int64": (np.dtype(np.int64), torch.int64),
    "int32": (np.dtype(np.int32), torch.int32),
    "int16": (np.dtype(np.int16), torch.int16),
    "int8": (np.dtype(np.int8), torch.int8),
    "uint8": (np.dtype(np.uint8), torch.uint8),
    "bool": (np.dtype(np.uint8), torch.bool),
}


Decoded = tuple[dict[str, Tensor], dict[str, str]]  # name -> tensor, payload metadata


class PayloadFormatError(StoreError):
    """The bytes are not a tensor payload written by ``encode_tensors``.

    The message continues a sentence that names the payload (``f"payload {key!r} {err}"``).
    """


def sha256(data: bytes) -> str:
    # hashlib releases the GIL on large buffers, so callers may hash in worker threads.
    return hashlib.sha256(data).hexdigest()


def _to_numpy(name: str, tensor: Tensor) -> tuple[np.ndarray, str]:
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise StoreError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored; supported: {', '.join(_DTYPES)}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if dtype == "bfloat16":
        flat = flat.view(torch.int16)
    elif dtype == "bool":
        flat = flat.view(torch.uint8)
    return flat.numpy(), dtype


def _column(values: np.ndarray) -> pa.Array:
    # from_buffers: zero-copy, and unlike pa.array(ndarray) it does not import pandas (~1 s).
    flat = pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), values.size, [None, pa.py_buffer(values)])
    offsets = pa.Array.from_buffers(pa.int64(), 2, [None, pa.py_buffer(np.array([0, values.size], np.int64))])
    return pa.LargeListArray.from_arrays(offsets, flat)


def encode_tensors(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialize ``tensors`` (name -> tensor) into one Arrow IPC payload.

    The index keeps the order of ``tensors``; in its column, each dtype's tensors are packed grouped
    by shape (stable), so a reader cuts tensors of one shape out with one reshape. Offsets say where
    each tensor lies, so readers of any packing order decode it.
    """
    flat = {name: _to_numpy(name, tensor) for name, tensor in tensors.items()}
    shapes = {name: list(tensor.shape) for name, tensor in tensors.items()}
    groups: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}
    offsets: dict[str, int] = {}
    for name in sorted(flat, key=lambda n: (flat[n][1], len(shapes[n]), shapes[n])):
        values, dtype = flat[name]
        offsets[name] = sizes.get(dtype, 0)
        groups.setdefault(dtype, []).append(values)
        sizes[dtype] = offsets[name] + values.size
    index = [[name, flat[name][1], shapes[name], offsets[name]] for name in tensors]
    columns = {dtype: _column(np.concatenate(parts)) for dtype, parts in groups.items()}
    schema_meta = {b"format": FORMAT, b"format_version": FORMAT_VERSION, b"tensors": json.dumps(index).encode()}
    for key, value in (metadata or {}).items():
        schema_meta[key.encode()] = value.encode()
    fields = [pa.field(dtype, column.type, nullable=False) for dtype, column in columns.items()]
    schema = pa.schema(fields, metadata=schema_meta)
    batch = pa.RecordBatch.from_arrays(list(columns.values()), schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _column_values(column: pa.Array, dtype: str, source: pa.Buffer) -> tuple[int | None, int, np.ndarray | None]:
    """One dtype column, checked: (byte offset of its values in the payload or None, count, a copy if not).

    Arrow's reader hands out read-only views into the payload, so values inside it are located by
    address (``source``: the payload); values elsewhere (e.g. decompressed) are copied here.
    """
    if dtype not in _DTYPES:
        raise PayloadFormatError(f"has a column {dtype!r}, which is no supported dtype ({', '.join(_DTYPES)})")
    np_dtype = _DTYPES[dtype][0]
    if not isinstance(column, pa.LargeListArray) or len(column) != 1 or column.null_count:
        raise PayloadFormatError(f"column {dtype!r} is not one non-null large_list row (it is {column.type})")
    flat = column.flatten()
    if flat.type != pa.from_numpy_dtype(np_dtype):
        raise PayloadFormatError(f"column {dtype!r} holds {flat.type}, expected {np_dtype}")
    if not len(flat):
        return None, 0, np.empty(0, np_dtype)
    buffer = flat.buffers()[1]
    start = flat.offset * np_dtype.itemsize
    nbytes = len(flat) * np_dtype.itemsize
    if buffer is None or start + nbytes > buffer.size:
        raise PayloadFormatError(f"column {dtype!r} is shorter than its length says")
    at = buffer.address + start - source.address
    if 0 <= at and at + nbytes <= source.size:
        return at, len(flat), None
    # Not np.asarray/to_numpy on the Arrow array: those import pandas (~1 s) on first use.
    return None, len(flat), np.frombuffer(buffer, np_dtype, len(flat), start).copy()


def _array(data: bytes | bytearray | memoryview, dtype: str, at: int, count: int) -> np.ndarray:
    """``count`` values at byte ``at`` of ``data``: in place where ``data`` is writable and they are aligned."""
    values = np.frombuffer(data, _DTYPES[dtype][0], count, at)
    flags = values.flags
    return values if flags.writeable and flags.aligned else values.copy()


def _index(raw: str | None) -> list[tuple[str, str, list[int], int]]:
    """The ``tensors`` entry of the schema metadata: ``[name, dtype, shape, offset]`` each, checked."""
    if raw is None:
        raise PayloadFormatError("has no tensor index (schema metadata 'tensors')")
    try:
        index = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise PayloadFormatError(f"has a tensor index that is not JSON ({' '.join(str(err).split())[:120]})") from None
    if not isinstance(index, list):
        raise PayloadFormatError(f"has a tensor index that is not a list ({type(index).__name__})")
    out, names = [], set()
    for entry in index:
        if not (isinstance(entry, list) and len(entry) == 4):
            raise PayloadFormatError(
                f"has a tensor index entry {str(entry)[:80]!r} that is not [name, dtype, shape, offset]"
            )
        name, dtype, shape, offset = entry
        if not isinstance(name, str) or name in names:
            raise PayloadFormatError(f"has a tensor index entry with a bad or repeated name {str(name)[:80]!r}")
        names.add(name)
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise PayloadFormatError(f"tensor {name!r} has an unsupported dtype {str(dtype)[:40]!r}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_count(d) and d < _MAX_DIM for d in shape):
            raise PayloadFormatError(f"tensor {name!r} has an invalid shape {str(shape)[:80]}")
        if not _count(offset):
            raise PayloadFormatError(f"tensor {name!r} has an invalid offset {str(offset)[:40]}")
        out.append((name, dtype, shape, offset))
    return out


_MAX_DIM = 1 << 48


def _count(value: object) -> bool:
    return type(value) is int and value >= 0


@dataclass(frozen=True)
class _Run:
    """Tensors of one dtype and shape lying end to end in their column, cut out with one reshape."""

    dtype: str
    start: int  # element offset in the dtype's column
    stop: int
    shape: tuple[int, ...]  # of one tensor
    block: tuple[int, ...]  # the run's reshape: ``shape``, or (count, *shape) for several
    view: torch.dtype | None  # bfloat16/bool: the dtype the stored bits are viewed as
    slots: tuple[int, ...]  # their positions in the index


def _run(dtype: str, start: int, shape: tuple[int, ...], slots: tuple[int, ...]) -> _Run:
    stop = start + len(slots) * math.prod(shape)
    block = shape if len(slots) == 1 else (len(slots), *shape)
    view = _DTYPES[dtype][1] if dtype in ("bfloat16", "bool") else None
    return _Run(dtype, start, stop, shape, block, view, slots)


@dataclass(frozen=True)
class _Layout:
    """A checked tensor index and how to cut its tensors out of the dtype columns."""

    names: tuple[str, ...]  # index order
    entries: tuple[tuple[str, str, list[int], int], ...]  # [name, dtype, shape, offset] each
    runs: tuple[_Run, ...]
    extent: tuple[tuple[str, int], ...]  # (dtype, how many elements its column must hold)
    in_order: bool  # the runs' slots, concatenated, are 0, 1, 2, ...


# Payloads of one kind share their index (every task payload of a version has the same one), so an
# index is parsed and checked once per process; long ones (not ours) are parsed each time.
_CACHED_INDEX_CHARS = 64 << 10


@lru_cache(maxsize=256)
def _cached_layout(raw: str) -> _Layout:
    return _layout(raw)


def _layout_of(raw: str | None) -> _Layout:
    return _cached_layout(raw) if raw is not None and len(raw) <= _CACHED_INDEX_CHARS else _layout(raw)


def _layout(raw: str | None) -> _Layout:
    entries = _index(raw)
    groups: list[tuple[str, int, tuple[int, ...], list[int]]] = []  # (dtype, start, shape, slots)
    extent: dict[str, int] = {}
    end = 0  # where the last group ends in its column
    for i in sorted(range(len(entries)), key=lambda i: (entries[i][1], entries[i][3], i)):
        _, dtype, shape, offset = entries[i]
        numel = math.prod(shape)
        extent[dtype] = max(extent.get(dtype, 0), offset + numel)
        last = groups[-1] if groups else None
        if last and numel and shape and last[0] == dtype and last[2] == tuple(shape) and end == offset:
            last[3].append(i)
        else:
            groups.append((dtype, offset, tuple(shape), [i]))
        end = offset + numel
    runs = tuple(_run(dtype, start, shape, tuple(slots)) for dtype, start, shape, slots in groups)
    in_order = [slot for run in runs for slot in run.slots] == list(range(len(entries)))
    return _Layout(tuple(e[0] for e in entries), tuple(entries), runs, tuple(extent.items()), in_order)


def _cut(layout: _Layout, flats: dict[str, np.ndarray]) -> list[Tensor]:
    """Every tensor of ``layout`` (index order) as its own writable tensor over ``flats``' memory."""
    for dtype, need in layout.extent:
        if dtype not in flats or need > flats[dtype].size:
            for name, kind, shape, offset in layout.entries:  # the failure path: name the first culprit
                if kind not in flats:
                    raise PayloadFormatError(f"tensor {name!r} names a {kind} column that the payload lacks")
                if offset + math.prod(shape) > flats[kind].size:
                    raise PayloadFormatError(f"tensor {name!r} lies outside its {kind} column")
    pieces: list[list[Tensor]] = []
    for run in layout.runs:
        try:
            block = flats[run.dtype][run.start : run.stop].reshape(run.block)
            # One tensor per array: plain tensors sharing the payload's memory, not views of one another.
            # (A single tensor is reshaped on its own: iterating would turn a 0-d one into a numpy scalar.)
            cut = [torch.from_numpy(block)] if len(run.slots) == 1 else list(map(torch.from_numpy, block))
            if run.view is not None:
                cut = [t.view(run.view) for t in cut]
        except (ValueError, OverflowError, RuntimeError, TypeError) as err:  # numpy's and torch's limits on shapes
            name = layout.names[run.slots[0]]
            raise PayloadFormatError(f"tensor {name!r} cannot take shape {list(run.shape)} ({err})") from None
        pieces.append(cut)
    if layout.in_order:
        return pieces[0] if len(pieces) == 1 else [t for cut in pieces for t in cut]
    out: list[Tensor] = [None] * len(layout.names)  # type: ignore[list-item]
    for run, cut in zip(layout.runs, pieces, strict=True):
        for slot, tensor in zip(run.slots, cut, strict=True):
            out[slot] = tensor
    return out


# -- decoding payloads shaped like one seen before ------------------------------------------------
#
# Every task payload of a version has the same Arrow framing, schema and tensor index; only the tensor
# values differ. A payload that passed the full decode leaves a template: its bytes outside the tensor
# values. A later payload equal to it outside the values, byte for byte and in length, decodes to the
# same structure (nothing in the Arrow checks or the index depends on the values), so it takes the
# template's checked layout and is cut from its own bytes without Arrow.

_FRAME = struct.Struct("<iI")  # an IPC message starts: continuation marker (-1), metadata length
_TEMPLATE_HEADER_BYTES = 64 << 10
_TEMPLATE_FIXED_BYTES = 4 << 10  # body bytes outside the values (offsets, padding; ours hold a few dozen)


@dataclass(frozen=True)
class _Template:
    size: int  # payload bytes
    fixed: tuple[tuple[int, int, bytes], ...]  # (start, end, bytes) of the body outside the values
    columns: tuple[tuple[str, int, int], ...]  # (dtype, byte offset of its values, count)
    layout: _Layout
    meta: dict[str, str]


_TEMPLATES = 256
_templates: dict[bytes, _Template] = {}
_templates_lock = threading.Lock()


def _header_end(data: bytes | bytearray | memoryview) -> int:
    """Where the record batch's body starts (IPC stream framing: schema message, batch message); 0 if not so framed."""
    if len(data) < 16:
        return 0
    marker, length = _FRAME.unpack_from(data, 0)
    pos = 8 + length
    if marker != -1 or pos + 8 > len(data):
        return 0
    marker, length = _FRAME.unpack_from(data, pos)
    pos += 8 + length
    return pos if marker == -1 and pos <= len(data) else 0


def _from_template(
    template: _Template, data: bytes | bytearray | memoryview
) -> tuple[dict[str, Tensor], dict[str, str]] | None:
    if len(data) != template.size:
        return None
    for start, end, expected in template.fixed:
        if data[start:end] != expected:
            return None
    flats = {dtype: _array(data, dtype, at, count) for dtype, at, count in template.columns}
    return dict(zip(template.layout.names, _cut(template.layout, flats), strict=True)), dict(template.meta)


def _template(
    data: bytes | bytearray | memoryview,
    body: int,
    columns: list[tuple[str, pa.Array]],
    values: dict[str, tuple[int | None, int]],
    source: pa.Buffer,
    layout: _Layout,
    meta: dict[str, str],
) -> _Template | None:
    """The template a fully decoded payload leaves; None where its values are not separate ranges of its body."""
    spans = []
    for dtype, (at, count) in values.items():
        if count and at is None:
            return None
        if count:
            spans.append((at, at + count * _DTYPES[dtype][0].itemsize))
    structure = []  # offsets and validity buffers: none may lie among the values
    for _, column in columns:
        buffers = column.buffers()  # [validity, offsets, child validity, child values]
        if len(buffers) != 4:
            return None
        for buffer in buffers[:3]:
            if buffer is not None and buffer.size:
                structure.append((buffer.address - source.address, buffer.address - source.address + buffer.size))
    ranges, pos = [], body  # the body outside the values
    for at, end in sorted(spans):
        if at < pos or end > len(data) or any(s < end and at < e for s, e in structure):
            return None
        ranges.append((pos, at))
        pos = end
    ranges.append((pos, len(data)))
    if sum(end - start for start, end in ranges) > _TEMPLATE_FIXED_BYTES:  # not one of ours: not worth keeping
        return None
    fixed = [(start, end, bytes(data[start:end])) for start, end in ranges]
    kept = tuple((dtype, at, count) for dtype, (at, count) in values.items() if count)
    return _Template(len(data), tuple(fixed), kept, layout, meta)


def _remember(key: bytes, template: _Template) -> None:
    with _templates_lock:
        if len(_templates) >= _TEMPLATES:
            del _templates[next(iter(_templates))]  # the oldest
        _templates[key] = template


def decode_tensors(data: bytes | bytearray | memoryview) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Inverse of ``encode_tensors``: (name -> tensor, payload metadata).

    Tensors lie in ``data`` itself where it is writable (they then keep it alive), else in one copy
    per dtype. Bytes that are not such a payload raise ``PayloadFormatError`` (a ``ShareClError``),
    whatever they hold.
    """
    body = _header_end(data)
    key = bytes(data[:body]) if 0 < body <= _TEMPLATE_HEADER_BYTES else None
    template = _templates.get(key) if key is not None else None
    if template is not None:
        decoded = _from_template(template, data)
        if decoded is not None:
            return decoded
    source = pa.py_buffer(data)
    try:
        reader = pa.ipc.open_stream(source)
        schema = reader.schema
        batch = reader.read_next_batch()
        batch.validate(full=True)  # offsets and lengths within their buffers, before any is used
        meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
        columns = [(field.name, batch.column(i)) for i, field in enumerate(schema)]  # names decode as UTF-8
    except (pa.ArrowException, StopIteration, OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        reason = " ".join(str(err).split())[:200]
        raise PayloadFormatError(f"is not a readable Arrow IPC payload ({type(err).__name__}: {reason})") from None
    if meta.pop("format", None) != FORMAT.decode():
        raise PayloadFormatError(f"is not a {FORMAT.decode()} payload")
    version = meta.pop("format_version", None)
    if version != FORMAT_VERSION.decode():
        raise PayloadFormatError(f"has payload format version {version!r}; this code reads {FORMAT_VERSION.decode()}")
    layout = _layout_of(meta.pop("tensors", None))
    values: dict[str, tuple[int | None, int]] = {}
    flats: dict[str, np.ndarray] = {}
    for dtype, column in columns:
        at, count, copy = _column_values(column, dtype, source)
        values[dtype] = (at, count)
        flats[dtype] = copy if copy is not None else _array(data, dtype, at, count)
    tensors = dict(zip(layout.names, _cut(layout, flats), strict=True))
    if key is not None:
        template = _template(data, body, columns, values, source, layout, meta)
        if template is not None:
            _remember(key, template)
    return tensors, dict(meta)
