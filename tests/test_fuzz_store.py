"""Fuzzing the store's decoders of bytes read from Redis (issue 10): the Arrow tensor payload decoder (and the
basis/task decoders above it) and the version manifest decoder.

Arbitrary bytes, random edits of real payloads and manifests, and well-formed Arrow streams or JSON with a
hostile index either decode or raise a ``ShareClError``, never another exception. Bounded: 200 examples per
test, no example database.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pyarrow as pa
import pytest
import torch
from helpers import FUZZ, json_paths, json_strategy
from hypothesis import given
from hypothesis import strategies as st

from share import LoraAdapter, merge
from share.errors import ShareClError
from subspace_store.codec import build_manifest, decode_basis, decode_manifest, decode_task, encode_subspace
from subspace_store.keys import Keys
from subspace_store.payloads import decode_tensors

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEYS = Keys("fuzz")
WORDS = [
    "format", "format_version", "namespace", "version", "parent", "created", "created_iso", "policy", "modules",
    "tasks", "submissions", "bytes", "subspace_metadata", "metadata", "in_features", "out_features", "k_A", "k_B",
    "dtype", "sha256", "key", "p", "head", "reconstruction_error", "enc.q", "t0", "v1", "fuzz", "float32",
    "classifier.weight", "U_A", "U_B", "E_A:enc.q", "E_B:enc.q", "head:classifier.weight", "tensors", "",
]  # fmt: skip

json_values = json_strategy(WORDS, max_leaves=12)


def _subspace():
    gen = torch.Generator().manual_seed(0)
    adapter = LoraAdapter(
        factors={"enc.q": (torch.randn(6, 2, generator=gen), torch.randn(2, 5, generator=gen))},
        head={"classifier.weight": torch.randn(3, 5, generator=gen)},
    )
    sub, _ = merge(None, {"t0": adapter})
    return sub


SUB = _subspace()
ENCODED = encode_subspace(SUB)
MANIFEST = build_manifest(KEYS, "v1", SUB, ENCODED, None, {}, [], 1.0e9)
PAYLOADS = [ENCODED.bases["enc.q"], ENCODED.tasks["t0"]]


def _expect_project_error(call, *args: Any) -> None:
    try:
        call(*args)
    except ShareClError:
        pass


def _decode_all(data: bytes) -> None:
    _expect_project_error(decode_tensors, data)
    _expect_project_error(decode_tensors, bytearray(data))  # the in-place (writable buffer) path
    _expect_project_error(decode_basis, data)
    _expect_project_error(decode_task, data, ["enc.q"], MANIFEST["tasks"]["t0"])


# -- Arrow payloads -------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=600))
def test_arbitrary_bytes_into_the_payload_decoders(data: bytes) -> None:
    _decode_all(data)


@FUZZ
@given(st.sampled_from(PAYLOADS), st.data())
def test_edited_payloads_into_the_payload_decoders(payload: bytes, data: st.DataObject) -> None:
    edited = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(edited) - 1))
        edit = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        if edit == "flip":
            edited[at] ^= 1 << data.draw(st.integers(0, 7))
        elif edit == "set":
            edited[at] = data.draw(st.integers(0, 255))
        elif edit == "cut":
            del edited[at:]
            if not edited:
                break
        else:
            edited[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    _decode_all(bytes(edited))


def _arrow(columns: dict[str, pa.Array], metadata: dict[bytes, bytes]) -> bytes:
    schema = pa.schema([pa.field(name, column.type) for name, column in columns.items()], metadata=metadata)
    batch = pa.RecordBatch.from_arrays(list(columns.values()), schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


columns = st.sampled_from(
    [
        {"float32": pa.array([[1.0, 2.0, 3.0, 4.0]], pa.large_list(pa.float32()))},
        {"float32": pa.array([[1.0, 2.0], [3.0]], pa.large_list(pa.float32()))},  # two rows
        {"float32": pa.array([[1, 2]], pa.large_list(pa.int64()))},  # values of the wrong type
        {"float32": pa.array([1.0, 2.0], pa.float32())},  # not a list column
        {"float32": pa.array([None], pa.large_list(pa.float32()))},  # a null row
        {"complex": pa.array([[1.0]], pa.large_list(pa.float64()))},  # an unknown dtype name
        {"bool": pa.array([[1, 0, 1]], pa.large_list(pa.uint8())), "int8": pa.array([[1]], pa.large_list(pa.int8()))},
        {},
    ]
)
indexes = st.lists(
    st.tuples(
        st.sampled_from(["U_A", "U_B", "E_A:enc.q", "x"]) | st.text(max_size=4),
        st.sampled_from(["float32", "bool", "int8", "complex"]) | json_values,
        st.lists(st.integers(-3, 5), max_size=3) | json_values,
        st.integers(-2, 6) | json_values,
    ).map(list)
    | json_values,
    max_size=3,
)


@FUZZ
@given(columns, indexes | json_values, st.sampled_from([b"share-cl-tensors", b"other"]), st.sampled_from([b"2", b"1"]))
def test_arrow_streams_with_a_hostile_index(cols: dict[str, pa.Array], index: Any, fmt: bytes, version: bytes) -> None:
    metadata = {b"format": fmt, b"format_version": version, b"tensors": json.dumps(index).encode()}
    _decode_all(_arrow(cols, metadata))
    _decode_all(_arrow(cols, {**metadata, b"tensors": b"\xff\xfe not json"}))


# -- version manifests ----------------------------------------------------------------------------
def _decode_manifest(raw: bytes) -> None:
    _expect_project_error(decode_manifest, raw, KEYS, "v1")


def test_the_real_manifest_decodes() -> None:
    assert decode_manifest(json.dumps(MANIFEST).encode(), KEYS, "v1") == MANIFEST


@FUZZ
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_bytes_and_json_into_the_manifest_decoder(raw: bytes) -> None:
    _decode_manifest(raw)


@FUZZ
@given(st.data())
def test_edited_manifests_into_the_manifest_decoder(data: st.DataObject) -> None:
    manifest = copy.deepcopy(MANIFEST)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(json_paths(manifest)[1:]))
        parent = manifest
        for part in path[:-1]:
            parent = parent[part]
        action = data.draw(st.sampled_from(["delete", "replace", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "replace":
            parent[path[-1]] = data.draw(json_values)
        elif isinstance(parent, dict):
            parent[data.draw(st.sampled_from(WORDS) | st.text(max_size=6))] = data.draw(json_values)
        if not json_paths(manifest)[1:]:
            break
    _decode_manifest(json.dumps(manifest).encode())
