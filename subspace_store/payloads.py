"""Named tensors <-> Arrow IPC bytes, and their checksums. Never pickle.

A payload is one Arrow IPC stream holding one record batch with one row. Each tensor is a
``large_list`` column (the flattened values); its field metadata records the torch dtype and shape,
so decoding restores both exactly (bit-exact, bfloat16 included).
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

FORMAT = b"share-cl-tensors"
FORMAT_VERSION = b"1"

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


class PayloadFormatError(ValueError):
    """The bytes are not a tensor payload written by ``encode_tensors``."""


def sha256(data: bytes) -> str:
    # hashlib releases the GIL on large buffers, so callers may hash in worker threads.
    return hashlib.sha256(data).hexdigest()


def _parse_shape(raw: bytes) -> list[int]:
    # Written by json.dumps(list_of_ints); parsed by hand because a task payload has many columns.
    inner = raw.strip()[1:-1].strip()
    return [int(x) for x in inner.split(b",")] if inner else []


def _to_numpy(name: str, tensor: Tensor) -> tuple[np.ndarray, str]:
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored; supported: {', '.join(_DTYPES)}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if dtype == "bfloat16":
        flat = flat.view(torch.int16)
    elif dtype == "bool":
        flat = flat.view(torch.uint8)
    return flat.numpy(), dtype


def encode_tensors(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialize ``tensors`` (name -> tensor) into one Arrow IPC payload."""
    fields, columns = [], []
    for name, tensor in tensors.items():
        values, dtype = _to_numpy(name, tensor)
        # from_buffers: zero-copy, and unlike pa.array(ndarray) it does not import pandas (~1 s).
        flat = pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), values.size, [None, pa.py_buffer(values)])
        offsets = pa.Array.from_buffers(pa.int64(), 2, [None, pa.py_buffer(np.array([0, values.size], np.int64))])
        column = pa.LargeListArray.from_arrays(offsets, flat)
        meta = {b"dtype": dtype.encode(), b"shape": json.dumps(list(tensor.shape)).encode()}
        fields.append(pa.field(name, column.type, nullable=False, metadata=meta))
        columns.append(column)
    schema_meta = {b"format": FORMAT, b"format_version": FORMAT_VERSION}
    for key, value in (metadata or {}).items():
        schema_meta[key.encode()] = value.encode()
    schema = pa.schema(fields, metadata=schema_meta)
    batch = pa.RecordBatch.from_arrays(columns, schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def decode_tensors(data: bytes) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Inverse of ``encode_tensors``: (name -> tensor, payload metadata). Tensors own their memory."""
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        schema = reader.schema
        batch = reader.read_next_batch()
    except (pa.ArrowInvalid, StopIteration, OSError) as err:
        raise PayloadFormatError(f"is not a readable Arrow IPC payload ({err})") from None
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    if meta.get("format") != FORMAT.decode():
        raise PayloadFormatError(f"has format {meta.get('format')!r}, expected {FORMAT.decode()!r}")
    tensors = {}
    for index, field in enumerate(schema):
        fmeta = field.metadata or {}
        try:
            dtype = fmeta[b"dtype"].decode()
            shape = _parse_shape(fmeta[b"shape"])
            np_dtype, torch_dtype = _DTYPES[dtype]
        except (KeyError, ValueError) as err:
            raise PayloadFormatError(f"tensor {field.name!r} lacks valid dtype/shape metadata ({err})") from None
        flat = batch.column(index).values
        if flat.type != pa.from_numpy_dtype(np_dtype) or len(flat) != math.prod(shape):
            raise PayloadFormatError(f"tensor {field.name!r} does not hold {shape} values of {dtype}")
        # A zero-copy view of the payload buffer (not to_numpy(), which imports pandas, ~1 s).
        if len(flat):
            values = np.frombuffer(flat.buffers()[1], np_dtype, len(flat), flat.offset * np_dtype.itemsize)
        else:
            values = np.empty(0, np_dtype)
        # Copy out of the (immutable) payload buffer so the tensor is writable and owns its memory.
        tensor = torch.from_numpy(values.copy())
        if torch_dtype in (torch.bfloat16, torch.bool):
            tensor = tensor.view(torch_dtype)
        tensors[field.name] = tensor.reshape(shape)
    meta.pop("format", None)
    meta.pop("format_version", None)
    return tensors, meta
