"""Manifest format 3 (issue 14, "Redis bytes per version"): a task entry's module-keyed maps are stored as lists
in the order of the manifest's modules (``p`` one integer when uniform; per-module numeric metadata such as
``share.merge``'s ``module_entry_norm``/``module_drift`` named by ``module_values``). Readers see exactly the
dicts formats 1 and 2 give, entries are unpacked only when checked, format 2 stays readable, and a packed entry
that is malformed is refused naming its task and field.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from helpers import FUZZ, edit_randomly, json_paths, json_strategy
from helpers import small_adapter as _adapter
from hypothesis import given
from hypothesis import strategies as st

from share import KPolicy, LoraAdapter, Subspace, TaskCoefficients, merge
from share.errors import ShareClError
from share.merge import MODULE_DRIFT, MODULE_ENTRY_NORM
from subspace_store import CorruptPayloadError, SubspaceStore
from subspace_store.codec import (
    MODULE_VALUES,
    build_manifest,
    decode_manifest,
    encode_manifest,
    encode_subspace,
    read_manifest,
)
from subspace_store.keys import Keys
from subspace_store.store import _Publication

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODULES = ("enc.q", "enc.v")
KEYS = Keys("fmt3")


def _subspace() -> Subspace:
    """Two merged tasks (one with a different p per module) and one whose maps must stay dicts."""
    sub, _ = merge(None, {"t0": _adapter(0), "t1": _adapter(1, (2, 3))}, KPolicy(k=6))
    t0 = sub.tasks["t0"]
    odd = TaskCoefficients(
        E={m: t0.E[m] for m in reversed(MODULES)},  # p keyed in another order than the modules: kept as a dict
        head=dict(t0.head),
        metadata={
            **t0.metadata,
            "labels": {"enc.q": "a", "enc.v": "b"},  # not numbers
            "reordered": {"enc.v": 1.0, "enc.q": 2.0},
            "partial": {"enc.q": 1.0},
            "infinite": {"enc.q": float("inf"), "enc.v": 0.0},
            "flags": {"enc.q": True, "enc.v": False},
        },
    )
    return Subspace(sub.modules, {**sub.tasks, "odd": odd}, sub.policy, sub.metadata)


def _manifest(sub: Subspace) -> dict[str, Any]:
    return build_manifest(KEYS, "v1", sub, encode_subspace(sub), None, {}, [], 1.0e9)


def _same(got: Any, want: Any) -> None:
    """Equal as JSON text: values, key order and int/float kinds."""
    assert json.dumps(got) == json.dumps(want)


def test_the_stored_layout_packs_module_maps_and_reads_back_exactly() -> None:
    manifest = _manifest(_subspace())
    raw = encode_manifest(manifest)
    stored = json.loads(raw)["tasks"]
    assert stored["t0"]["p"] == 2 and stored["t1"]["p"] == [2, 3]
    for name in ("t0", "t1"):
        assert stored[name][MODULE_VALUES] == [MODULE_ENTRY_NORM, MODULE_DRIFT]
        for key in (MODULE_ENTRY_NORM, MODULE_DRIFT):
            assert stored[name]["metadata"][key] == list(manifest["tasks"][name]["metadata"][key].values())
    odd = stored["odd"]
    assert odd["p"] == {"enc.v": 2, "enc.q": 2} and odd[MODULE_VALUES] == [MODULE_ENTRY_NORM, MODULE_DRIFT]
    for key in ("labels", "reordered", "partial", "infinite", "flags"):
        assert odd["metadata"][key] == manifest["tasks"]["odd"]["metadata"][key]
    assert list(odd["metadata"]) == list(manifest["tasks"]["odd"]["metadata"])  # packed keys keep their place
    _same(decode_manifest(raw, KEYS, "v1"), manifest)
    _same(read_manifest(raw, KEYS, "v1").full(), manifest)


def test_an_entry_is_unpacked_only_when_checked() -> None:
    manifest = _manifest(_subspace())
    checked = read_manifest(encode_manifest(manifest), KEYS, "v1")
    _same(checked.task("t1"), manifest["tasks"]["t1"])
    assert MODULE_VALUES in checked.top["tasks"]["t0"] and checked.top["tasks"]["t0"]["p"] == 2
    checked.tasks(["t1", "t0"])
    _same(checked.top["tasks"]["t0"], manifest["tasks"]["t0"])
    _same(checked.full(), manifest)


def test_a_published_version_is_smaller_and_pulls_the_same_metadata(redis_client, namespace) -> None:
    store = SubspaceStore(redis_client, namespace)
    sub = _subspace()
    version = store.publish(sub, None)
    raw = store.client.get(store.keys.manifest(version))
    manifest = store.manifest(version)
    assert json.loads(raw)["format_version"] == 3
    _same(manifest, decode_manifest(json.dumps(manifest).encode(), store.keys, version))  # the unpacked layout
    for name, task in sub.tasks.items():
        _same(store.get(version, tasks=[name]).tasks[name].metadata, task.metadata)
    pulled = store.get(version).tasks
    _same({t: task.metadata for t, task in pulled.items()}, {t: task.metadata for t, task in sub.tasks.items()})


def test_module_names_are_no_longer_repeated_per_task() -> None:
    names = [f"encoder.layer.{i}.attention.self.{p}" for i in range(6) for p in ("query", "value")]
    gen = torch.Generator().manual_seed(0)
    adapters = {
        f"t{t}": LoraAdapter(
            factors={m: (torch.randn(20, 2, generator=gen), torch.randn(2, 12, generator=gen)) for m in names}
        )
        for t in range(3)
    }
    manifest = _manifest(merge(None, adapters, KPolicy(k=6))[0])
    stored = json.loads(encode_manifest(manifest))["tasks"]
    for name, entry in manifest["tasks"].items():
        assert len(json.dumps(stored[name])) < 0.5 * len(json.dumps(entry))
        assert not any(m in json.dumps(stored[name]) for m in names)


def test_a_format_2_store_stays_readable_and_takes_a_format_3_delta(redis_client, namespace) -> None:
    store = SubspaceStore(redis_client, namespace)
    sub, _ = merge(None, {"t0": _adapter(0), "t1": _adapter(1, (2, 3))}, KPolicy(k=6))
    old = _Publication(store, encode_subspace(sub))
    old.format_version = 2  # delta versions, module maps keyed by name
    old.begin()
    old.write_payloads()
    v1 = old.commit(sub, None, None, {}, [], "coordinators")
    raw = json.loads(store.client.get(store.keys.manifest(v1)))
    assert raw["format_version"] == 2 and raw["tasks"]["t0"]["p"] == {"enc.q": 2, "enc.v": 2}
    assert all(MODULE_VALUES not in e and isinstance(e["metadata"][MODULE_DRIFT], dict) for e in raw["tasks"].values())
    assert store.get(v1).tasks["t1"].metadata == sub.tasks["t1"].metadata
    # A store object that did not publish v1 plans the delta from the manifest it reads.
    reader = SubspaceStore(redis_client, namespace)
    new, report = merge(sub, {"t2": _adapter(2)}, KPolicy(k=6))
    v2 = reader.publish(new, v1, delta=True, rotations=report.rotations)
    assert reader.chain_lengths(v2) == {"t0": 1, "t1": 1, "t2": 0}
    assert json.loads(store.client.get(store.keys.manifest(v2)))["format_version"] == 3
    # And on a format 3 parent it read back (not the one it kept in memory).
    newer, report = merge(new, {"t3": _adapter(3)}, KPolicy(k=6))
    v3 = SubspaceStore(redis_client, namespace).publish(newer, v2, delta=True, rotations=report.rotations)
    assert store.chain_lengths(v3) == {"t0": 2, "t1": 2, "t2": 1, "t3": 0}
    got = store.get(v3)
    assert {t: task.metadata for t, task in got.tasks.items()} == {t: task.metadata for t, task in newer.tasks.items()}
    assert store.compact() is not None and store.prune(keep=1).removed == [v1, v2, v3]
    assert store.get().tasks["t1"].metadata == newer.tasks["t1"].metadata


def _t0(m: dict[str, Any]) -> dict[str, Any]:
    return m["tasks"]["t0"]


BAD_ENTRIES = {
    "a short p list": (lambda m: _t0(m).update(p=[2]), "'p'"),
    "a negative p": (lambda m: _t0(m).update(p=-1), "'p'"),
    "a float in the p list": (lambda m: _t0(m).update(p=[2, 2.0]), "'p'"),
    "a boolean p": (lambda m: _t0(m).update(p=True), "'p'"),
    "a long metadata list": (lambda m: _t0(m)["metadata"][MODULE_DRIFT].append(0.5), MODULE_DRIFT),
    "a NaN in a metadata list": (lambda m: _t0(m)["metadata"][MODULE_DRIFT].__setitem__(0, float("nan")), "finite"),
    "a string in a metadata list": (lambda m: _t0(m)["metadata"][MODULE_ENTRY_NORM].__setitem__(1, "x"), "finite"),
    "a packed map left a dict": (
        lambda m: _t0(m)["metadata"].update({MODULE_DRIFT: {"enc.q": 0.1, "enc.v": 0.2}}),
        MODULE_DRIFT,
    ),
    "module_values naming a missing key": (lambda m: _t0(m).update({MODULE_VALUES: ["nope"]}), "'nope'"),
    "module_values not a list": (lambda m: _t0(m).update({MODULE_VALUES: MODULE_DRIFT}), MODULE_VALUES),
    "module_values twice a key": (lambda m: _t0(m).update({MODULE_VALUES: [MODULE_DRIFT] * 2}), MODULE_VALUES),
}


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_a_malformed_packed_entry_is_refused_naming_task_and_field(case: str) -> None:
    edit, field = BAD_ENTRIES[case]
    stored = json.loads(encode_manifest(_manifest(_subspace())))
    edit(stored)
    raw = json.dumps(stored).encode()
    checked = read_manifest(raw, KEYS, "v1")  # only the entries are wrong: read, then refused when used
    checked.task("t1")
    for _ in range(2):  # a failed check leaves the entry as stored: refused again
        with pytest.raises(CorruptPayloadError, match="not a valid manifest") as err:
            checked.task("t0")
        assert "['tasks']['t0']" in str(err.value) and field in str(err.value)
    _same(checked.top["tasks"]["t0"], stored["tasks"]["t0"])
    with pytest.raises(CorruptPayloadError, match=r"\['t0'\]"):
        decode_manifest(raw, KEYS, "v1")


STORED = json.loads(encode_manifest(_manifest(_subspace())))


@FUZZ
@given(st.data())
def test_edited_packed_manifests_decode_or_raise_a_project_error(data: st.DataObject) -> None:
    values = json_strategy(["p", "metadata", MODULE_VALUES, MODULE_DRIFT, MODULE_ENTRY_NORM, "enc.q", "t0"], 8)
    paths = [p for p in json_paths(STORED)[1:] if p[0] == "tasks"]
    manifest = edit_randomly(data, copy.deepcopy(STORED), paths, values)
    try:
        decode_manifest(json.dumps(manifest).encode(), KEYS, "v1")
    except ShareClError:
        pass
