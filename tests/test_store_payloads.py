"""Arrow IPC tensor payloads: bit-exact round trips, dtype/shape kept, no pickle, damage detected."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from subspace_store.payloads import PayloadFormatError, decode_tensors, encode_tensors, sha256


def test_round_trip_is_bit_exact_for_every_dtype() -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(5, 3, generator=gen),
        "f64": torch.randn(2, 2, 2, generator=gen, dtype=torch.float64),
        "f16": torch.randn(4, generator=gen).half(),
        "bf16": torch.randn(3, 7, generator=gen).to(torch.bfloat16),
        "i64": torch.arange(6).reshape(2, 3),
        "bool": torch.tensor([[True, False], [False, True]]),
        "empty": torch.zeros(4, 0),
        "scalar": torch.tensor(3.5),
        "noncontig": torch.randn(4, 6, generator=gen).T,
        "module.with.dots:and:colons": torch.ones(1),
    }
    data = encode_tensors(tensors, metadata={"note": "x"})
    out, meta = decode_tensors(data)
    assert meta == {"note": "x"}
    assert list(out) == list(tensors)
    for name, value in tensors.items():
        assert out[name].dtype == value.dtype, name
        assert out[name].shape == value.shape, name
        assert torch.equal(out[name], value), name
    out["f32"][0, 0] = 1.0  # decoded tensors own writable memory


def test_payload_is_an_arrow_stream_not_a_pickle() -> None:
    data = encode_tensors({"x": torch.ones(2, 2)})
    reader = pa.ipc.open_stream(pa.py_buffer(data))
    assert reader.schema.metadata[b"format"] == b"share-cl-tensors"
    assert b"torch._utils" not in data and not data.startswith(b"\x80")


def test_damage_is_reported() -> None:
    data = encode_tensors({"x": torch.ones(8)})
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    assert sha256(data) != sha256(bytes(flipped))
    with pytest.raises(PayloadFormatError):
        decode_tensors(b"not arrow at all")
    with pytest.raises(ValueError, match="complex"):
        encode_tensors({"c": torch.zeros(2, dtype=torch.complex64)})
