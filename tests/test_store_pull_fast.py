"""The small-payload pull path (issue 13 item 4): templates, pipelined raw reads, batched finite checks.

Every fast path here must give exactly what the plain path gives, on good and on damaged input.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pytest
import redis
import torch

import subspace_store.payloads as payloads
from share import KPolicy, ModuleBasis, Subspace, TaskCoefficients
from share.errors import ShareClError
from subspace_store import CorruptPayloadError, SubspaceStore, VersionNotFoundError
from subspace_store.payloads import PayloadFormatError, decode_tensors, encode_tensors
from subspace_store.rawget import RawGetter


def _task_tensors(seed: int, modules: int = 4) -> dict[str, torch.Tensor]:
    """A task payload's tensors: k_A != k_B, so E_A and E_B alternate between two shapes."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for m in range(modules):
        out[f"E_A:l{m}.q"] = torch.randn(6, 3, generator=gen)
        out[f"E_B:l{m}.q"] = torch.randn(5, 3, generator=gen)
    out["head:w"] = torch.randn(2, 7, generator=gen).to(torch.bfloat16)
    out["head:mask"] = torch.tensor([True, False, True])
    out["head:scale"] = torch.tensor(0.5, dtype=torch.float64)
    return out


def _outcome(data: bytes | bytearray | memoryview) -> tuple:
    try:
        tensors, meta = decode_tensors(data)
    except PayloadFormatError as err:
        return ("error", str(err))
    bits = {
        name: (t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).tolist() if t.numel() else [])
        for name, t in tensors.items()
    }
    return ("ok", list(tensors), bits, meta)


def _schema_meta(index: list) -> dict[bytes, bytes]:
    return {
        b"format": payloads.FORMAT,
        b"format_version": payloads.FORMAT_VERSION,
        b"tensors": json.dumps(index).encode(),
    }


def _reference_decode(data: bytes) -> dict[str, torch.Tensor]:
    """How the previous reader cut tensors: Arrow, then each tensor at its index offset, one by one."""
    reader = pa.ipc.open_stream(pa.py_buffer(data))
    batch = reader.read_next_batch()
    index = json.loads(reader.schema.metadata[b"tensors"])
    columns = {f.name: batch.column(i).flatten() for i, f in enumerate(reader.schema)}
    out = {}
    for name, dtype, shape, offset in index:
        np_dtype, torch_dtype = payloads._DTYPES[dtype]
        flat = torch.from_numpy(np.frombuffer(columns[dtype].buffers()[1], np_dtype).copy())
        out[name] = flat[offset : offset + int(np.prod(shape))].view(shape).view(torch_dtype)
    return out


def _payload_in_index_order(tensors: dict[str, torch.Tensor]) -> bytes:
    """A payload packed the way the previous writer packed it (index order, shapes interleaved)."""
    groups: dict[str, list[np.ndarray]] = {}
    index, sizes = [], {}
    for name, tensor in tensors.items():
        values, dtype = payloads._to_numpy(name, tensor)
        index.append([name, dtype, list(tensor.shape), sizes.get(dtype, 0)])
        groups.setdefault(dtype, []).append(values)
        sizes[dtype] = sizes.get(dtype, 0) + values.size
    columns = {dtype: payloads._column(np.concatenate(parts)) for dtype, parts in groups.items()}
    meta = {
        b"format": payloads.FORMAT,
        b"format_version": payloads.FORMAT_VERSION,
        b"tensors": json.dumps(index).encode(),
    }
    schema = pa.schema([pa.field(d, c.type, nullable=False) for d, c in columns.items()], metadata=meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(pa.RecordBatch.from_arrays(list(columns.values()), schema=schema))
    return sink.getvalue().to_pybytes()


def test_payloads_read_both_ways() -> None:
    tensors = _task_tensors(0)
    new = encode_tensors(tensors)
    for name, value in _reference_decode(new).items():  # the previous reader reads what this writer packs
        assert value.dtype == tensors[name].dtype and torch.equal(value, tensors[name]), name
    old = _payload_in_index_order(tensors)
    assert old != new  # really another packing
    for data in (old, bytearray(old), new):
        out, _ = decode_tensors(data)
        assert list(out) == list(tensors)
        for name, value in tensors.items():
            assert out[name].dtype == value.dtype and out[name].shape == value.shape
            assert torch.equal(out[name], value), name


def test_decoded_tensors_are_separate_writable_tensors_over_the_payload() -> None:
    data = bytearray(encode_tensors(_task_tensors(1)))
    out, _ = decode_tensors(data)
    a, b = out["E_A:l0.q"], out["E_A:l1.q"]
    assert not a._is_view() and a.is_contiguous() and a.data_ptr() % 4 == 0
    a.add_(1.0)  # in place, with autograd on, as training code may do
    b.requires_grad_()
    (b * 2).sum().backward()
    before = bytes(data)
    out["E_B:l0.q"].zero_()
    assert bytes(data) != before  # the tensors are the buffer's bytes, not a copy


def test_template_path_equals_the_full_decode_on_damaged_payloads() -> None:
    rng = random.Random(0)
    clean = [encode_tensors(_task_tensors(s)) for s in range(2)]
    for trial in range(400):
        data = bytearray(clean[trial % 2])
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if trial % 5 == 0:
            data = data[: rng.randrange(len(data))]
        payloads._templates.clear()
        payloads._cached_layout.cache_clear()
        cold = [_outcome(bytes(data)), _outcome(bytearray(data))]
        decode_tensors(clean[0])  # leaves the template every clean task payload shares
        warm = [_outcome(bytes(data)), _outcome(bytearray(data))]
        assert warm == cold, trial


def test_a_payload_shaped_like_a_decoded_one_skips_arrow(monkeypatch) -> None:
    payloads._templates.clear()
    first, second = _task_tensors(2), _task_tensors(3)
    decode_tensors(encode_tensors(first))

    def no_arrow(*_: object) -> None:
        raise AssertionError("the template path must not read Arrow")

    monkeypatch.setattr(payloads.pa.ipc, "open_stream", no_arrow)
    out, _ = decode_tensors(bytearray(encode_tensors(second)))
    assert all(torch.equal(out[n], second[n]) for n in second)
    other = encode_tensors({**second, "extra": torch.ones(2)})  # another layout: Arrow again
    with pytest.raises(AssertionError, match="template path"):
        decode_tensors(other)


def test_hostile_indexes_are_refused_or_cut_like_before() -> None:
    values = np.arange(20, dtype=np.float32)

    def payload(index: list) -> bytes:
        column = payloads._column(values)
        meta = {
            b"format": payloads.FORMAT,
            b"format_version": payloads.FORMAT_VERSION,
            b"tensors": json.dumps(index).encode(),
        }
        schema = pa.schema([pa.field("float32", column.type, nullable=False)], metadata=meta)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, schema) as writer:
            writer.write_batch(pa.RecordBatch.from_arrays([column], schema=schema))
        return sink.getvalue().to_pybytes()

    with pytest.raises(PayloadFormatError, match="'b' lies outside"):
        decode_tensors(payload([["a", "float32", [2, 2], 0], ["b", "float32", [2, 2], 17]]))
    with pytest.raises(PayloadFormatError, match="'a' names a float64 column"):
        decode_tensors(payload([["a", "float64", [1], 0]]))
    with pytest.raises(PayloadFormatError, match="outside"):
        decode_tensors(payload([["a", "float32", [2**47, 2**47], 0]]))
    out, _ = decode_tensors(
        payload([["a", "float32", [2, 2], 0], ["b", "float32", [2, 2], 2], ["c", "float32", [], 19]])
    )
    assert out["b"].flatten().tolist() == [2, 3, 4, 5] and out["c"].item() == 19 and out["c"].shape == ()
    reversed_order = [["b", "float32", [2, 3], 6], ["a", "float32", [2, 3], 0]]
    for index in (reversed_order, [*reversed_order, ["s", "float32", [], 12]]):
        for _ in range(2):  # the full decode, then the template path
            out, _ = decode_tensors(payload(index))
            assert list(out) == [entry[0] for entry in index] and out["a"].flatten().tolist() == [0, 1, 2, 3, 4, 5]
            assert out["b"].flatten().tolist() == [6, 7, 8, 9, 10, 11]
    out, _ = decode_tensors(payload([["z", "float32", [0, 2**40], 20]]))
    assert out["z"].shape == (0, 2**40)


def test_raw_many_reads_aligned_values_and_falls_back_on_anything_else(redis_client, namespace) -> None:
    values = [bytes([i]) * (1000 + 37 * i) for i in range(6)]
    keys = [f"{namespace}:k{i}" for i in range(6)]
    for key, value in zip(keys, values, strict=True):
        redis_client.set(key, value)
    sizes = [len(v) for v in values]
    with RawGetter(redis_client) as get:
        got = list(get.many(keys, sizes))
        assert [i for i, _ in got] == list(range(6)) and [bytes(v) for _, v in got] == values
        for _, view in got:
            assert isinstance(view, memoryview) and not view.readonly
            assert np.frombuffer(view, np.uint8).ctypes.data % 64 == 0
    assert redis_client.get(keys[0]) == values[0]  # the pooled connection is in sync

    redis_client.delete(keys[2])
    redis_client.set(keys[4], b"resized")
    with RawGetter(redis_client) as get:
        got = dict(get.many(keys, sizes))
    assert got[2] is None and bytes(got[4]) == b"resized" and bytes(got[5]) == values[5]
    assert redis_client.get(keys[1]) == values[1]

    redis_client.delete(keys[3])
    redis_client.hset(keys[3], "f", "v")
    with RawGetter(redis_client) as get, pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        list(get.many(keys, sizes))
    assert redis_client.get(keys[0]) == values[0]

    with RawGetter(redis_client) as get:  # left half-read: closing it drops the connection
        replies = get.many(keys[:2], sizes[:2])
        next(replies)
        replies.close()
    assert redis_client.get(keys[1]) == values[1]


def _small_subspace(tasks: int = 5) -> Subspace:
    gen = torch.Generator().manual_seed(0)
    modules = {
        m: ModuleBasis(
            U_A=torch.linalg.qr(torch.randn(48, 6, generator=gen))[0].contiguous(),
            U_B=torch.linalg.qr(torch.randn(40, 4, generator=gen))[0].contiguous(),
        )
        for m in ("l0.q", "l0.v", "l1.q")
    }
    return Subspace(
        modules=modules,
        tasks={
            f"t{i}": TaskCoefficients(
                E={m: (torch.randn(6, 2, generator=gen), torch.randn(4, 2, generator=gen)) for m in modules},
                head={"w": torch.randn(3, 5, generator=gen)},
            )
            for i in range(tasks)
        },
        policy=KPolicy(k=6),
    )


def test_pull_of_small_payloads_is_exact_and_checks_in_order(redis_client, namespace) -> None:
    store = SubspaceStore(redis_client, namespace)
    sub = _small_subspace()
    version = store.publish(sub, None)
    for verify in (True, False):
        got = store.get(version, verify=verify)
        for name, task in sub.tasks.items():
            for m, (ea, eb) in task.E.items():
                assert torch.equal(got.tasks[name].E[m][0], ea) and torch.equal(got.tasks[name].E[m][1], eb)
            assert torch.equal(got.tasks[name].head["w"], task.head["w"])
        for m, basis in sub.modules.items():
            assert torch.equal(got.modules[m].U_A, basis.U_A) and torch.equal(got.modules[m].U_B, basis.U_B)
    manifest = store.manifest(version)
    # Damage that still decodes (a value byte) must be caught by the checksum; the same damage plus a
    # second, undecodable payload later still reports the first one first.
    key1, key3 = manifest["tasks"]["t1"]["key"], manifest["tasks"]["t3"]["key"]
    data1 = bytearray(redis_client.get(key1))
    data1[-40] ^= 0x04
    redis_client.set(key1, bytes(data1))
    redis_client.set(key3, b"\x00" * manifest["tasks"]["t3"]["bytes"])
    with pytest.raises(CorruptPayloadError, match="checksum") as info:
        store.get(version)
    assert info.value.key == key1
    with pytest.raises(CorruptPayloadError, match="cannot be decoded") as info:
        store.get(version, verify=False)
    assert info.value.key == key3
    redis_client.delete(manifest["tasks"]["t0"]["key"])
    with pytest.raises(VersionNotFoundError, match="gone"):
        store.get(version)


def test_validate_checks_finiteness_in_one_pass_and_names_the_culprit(monkeypatch) -> None:
    sub = _small_subspace(tasks=4)
    sub.tasks["t0"].E["l0.q"][0].requires_grad_()  # e.g. while training
    calls = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: (calls.append(t.shape), isfinite(t))[1])
    sub.validate()
    # One check per batch of same-shaped tensors (U_A, U_B, E_A, E_B, heads here), each on a sum, none per tensor.
    assert len(calls) == 5 and all(shape == () for shape in calls)

    sub.tasks["t2"].E["l0.v"][1][3, 1] = float("nan")
    with pytest.raises(ShareClError, match="task 't2', module 'l0.v': coefficients hold NaN or Inf"):
        sub.validate()
    sub = _small_subspace(tasks=2)
    sub.modules["l1.q"].U_A[0, 0] = float("-inf")
    with pytest.raises(ShareClError, match="module 'l1.q': U_A holds NaN or Inf"):
        sub.validate()
    sub = _small_subspace(tasks=3)  # a NaN head would make every answer of that task the same class
    sub.tasks["t1"].head["w"][2, 4] = float("nan")
    with pytest.raises(ShareClError, match="task 't1': head tensor 'w' holds NaN or Inf"):
        sub.validate()

    half = _small_subspace(tasks=2)  # finite values whose float16 norm overflows: not an error
    half.modules = {m: ModuleBasis(U_A=b.U_A.half(), U_B=b.U_B.half()) for m, b in half.modules.items()}
    for task in half.tasks.values():
        task.E = {m: (torch.full_like(ea, 60000.0).half(), eb.half()) for m, (ea, eb) in task.E.items()}
    half.validate()
