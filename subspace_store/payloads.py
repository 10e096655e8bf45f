"""Named tensors <-> Arrow IPC bytes, and their checksums. Never pickle.

A payload is one Arrow IPC stream holding one record batch with one row. Tensors of the same dtype
are packed end to end into one ``large_list`` column named after the dtype; the schema metadata
``tensors`` lists every tensor as ``[name, dtype, shape, offset]`` (offset in elements within its
dtype's column). Packing matters: a task payload holds two small matrices per module, and decoding
one column per dtype and slicing views costs far less per tensor than one Arrow column each.
Decoding restores dtype, shape and bits exactly (bfloat16 and bool included).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

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
    """Serialize ``tensors`` (name -> tensor) into one Arrow IPC payload."""
    groups: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}
    index: list[list[Any]] = []
    for name, tensor in tensors.items():
        values, dtype = _to_numpy(name, tensor)
        index.append([name, dtype, list(tensor.shape), sizes.get(dtype, 0)])
        groups.setdefault(dtype, []).append(values)
        sizes[dtype] = sizes.get(dtype, 0) + values.size
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


def _flat_tensor(column: pa.Array, dtype: str, base: np.ndarray | None) -> Tensor:
    """One dtype's packed values as a writable tensor.

    ``base`` (a writable uint8 view of the whole payload, or None): the values are used in place
    (Arrow's reader hands out read-only views into the payload, so they are located by address).
    Otherwise, e.g. for immutable ``bytes``, they are copied once.
    """
    if dtype not in _DTYPES:
        raise PayloadFormatError(f"has a column {dtype!r}, which is no supported dtype ({', '.join(_DTYPES)})")
    np_dtype, torch_dtype = _DTYPES[dtype]
    if not isinstance(column, pa.LargeListArray) or len(column) != 1 or column.null_count:
        raise PayloadFormatError(f"column {dtype!r} is not one non-null large_list row (it is {column.type})")
    flat = column.flatten()
    if flat.type != pa.from_numpy_dtype(np_dtype):
        raise PayloadFormatError(f"column {dtype!r} holds {flat.type}, expected {np_dtype}")
    values = None
    if len(flat):
        buffer = flat.buffers()[1]
        start = flat.offset * np_dtype.itemsize
        nbytes = len(flat) * np_dtype.itemsize
        if buffer is None or start + nbytes > buffer.size:
            raise PayloadFormatError(f"column {dtype!r} is shorter than its length says")
        if base is not None:
            at = buffer.address - base.ctypes.data + start
            if 0 <= at and at + nbytes <= base.size and at % np_dtype.itemsize == 0:
                values = base[at : at + nbytes].view(np_dtype)
        if values is None:
            # Not np.asarray/to_numpy on the Arrow array: those import pandas (~1 s) on first use.
            values = np.frombuffer(buffer, np_dtype, len(flat), start).copy()
    else:
        values = np.empty(0, np_dtype)
    tensor = torch.from_numpy(values)
    return tensor.view(torch_dtype) if torch_dtype in (torch.bfloat16, torch.bool) else tensor


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


def decode_tensors(data: bytes | bytearray | memoryview) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Inverse of ``encode_tensors``: (name -> tensor, payload metadata).

    Tensors of one dtype are views of one writable buffer: a copy when ``data`` is immutable
    (``bytes``), else ``data`` itself, which the tensors then keep alive. Bytes that are not such a
    payload raise ``PayloadFormatError`` (a ``ShareClError``), whatever they hold.
    """
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
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
    index = _index(meta.pop("tensors", None))
    base = None if isinstance(data, bytes) else np.frombuffer(data, np.uint8)
    if base is not None and not base.flags.writeable:
        base = None
    flats = {name: _flat_tensor(column, name, base) for name, column in columns}
    tensors = {}
    for name, dtype, shape, offset in index:
        if dtype not in flats:
            raise PayloadFormatError(f"tensor {name!r} names a {dtype} column that the payload lacks")
        numel = math.prod(shape)
        flat = flats[dtype]
        if offset + numel > flat.numel():
            raise PayloadFormatError(f"tensor {name!r} lies outside its {dtype} column")
        try:
            tensors[name] = flat[offset : offset + numel].view(shape)
        except (RuntimeError, ValueError, OverflowError) as err:  # torch's own limits on shapes
            raise PayloadFormatError(f"tensor {name!r} cannot take shape {shape} ({err})") from None
    return tensors, meta
