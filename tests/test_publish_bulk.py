"""What ``SubspaceStore.publish`` does per task, done in bulk (issue 14, T scaling), keeps its checks and bytes:
task metadata json.dumps would refuse still fails the publish naming the task before anything is written, the
fast test that spares most tasks the json.dumps never passes what json.dumps refuses, per-module numbers are
packed exactly as the format says, and the manifest the publisher caches is what reading its bytes gives and
stays so when the caller edits the subspace it published (real redis-server).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers import FUZZ
from hypothesis import given
from hypothesis import strategies as st

from share import merge
from subspace_store import StoreError, SubspaceStore, manifest_cache
from subspace_store.codec import MODULE_VALUES, decode_manifest
from subspace_store.store import _plain_json

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODULES = ("layer.0.query", "layer.0.value")


class _Opaque:
    pass


class _Float(float):
    pass


def _cycle() -> dict[str, Any]:
    loop: dict[str, Any] = {}
    loop["again"] = {"back": loop}
    return loop


# Values json.dumps refuses (TypeError or ValueError), each where a task's metadata may hold it.
REFUSED = {
    "object": _Opaque(),
    "bytes": b"x",
    "set": {1.0},
    "complex": 1j,
    "huge int": 10**5000,  # past Python's int-to-text digit limit
    "tuple key": {(1, 2): 1.0},
    "cycle": _cycle(),
}


def _all_keys(store: SubspaceStore, client) -> list[bytes]:  # noqa: ANN001
    return client.keys(store.keys.prefix.replace("{", "\\{").replace("}", "\\}") + "*")


@pytest.mark.parametrize("shared_entries_from", [256, 1], ids=["format3", "format4"])
@pytest.mark.parametrize("where", ["top", "module map", "list"])
@pytest.mark.parametrize("kind", list(REFUSED))
def test_task_metadata_json_refuses_names_the_task_and_writes_nothing(
    redis_client, namespace, make_adapter, kind: str, where: str, shared_entries_from: int
) -> None:
    store = SubspaceStore(redis_client, namespace, shared_entries_from=shared_entries_from)
    sub, _ = merge(None, {"a": make_adapter(0), "b": make_adapter(1), "c": make_adapter(2)})
    bad = REFUSED[kind]
    meta = sub.tasks["b"].metadata
    if where == "top":
        meta["bad"] = bad
    elif where == "module map":
        meta["module_drift"] = {**meta["module_drift"], MODULES[1]: bad}
    else:
        meta["bad"] = [1.0, bad]
    with pytest.raises(StoreError, match=r"task 'b' metadata is not JSON-serializable"):
        store.publish(sub, None)
    assert _all_keys(store, redis_client) == []

    first = store.publish(merge(None, {"a": make_adapter(0)})[0], None)  # a delta publish fails the same way
    written = set(_all_keys(store, redis_client))
    grown, report = merge(store.get(first), {"d": make_adapter(3)})
    grown.tasks["d"].metadata["bad"] = bad
    with pytest.raises(StoreError, match=r"task 'd' metadata"):
        store.publish(grown, first, delta=True, rotations=report.rotations)
    assert set(_all_keys(store, redis_client)) == written and store.head() == first


def test_metadata_json_takes_but_the_fast_test_does_not_is_published_as_json_writes_it(
    redis_client, namespace, make_adapter
) -> None:
    store = SubspaceStore(redis_client, namespace)
    sub, _ = merge(None, {"a": make_adapter(0), "b": make_adapter(1)})
    odd = {"tuple": (1, "x"), "int keys": {1: 2.0}, "subclass": _Float(0.5), "big": 2**70, "deep": [[{"x": [None]}]]}
    sub.tasks["b"].metadata.update(odd)
    assert _plain_json(sub.tasks["a"].metadata)  # what share.merge gives takes the fast test
    assert not _plain_json(sub.tasks["b"].metadata)  # this one is left to json.dumps, which takes it
    version = store.publish(sub, None)
    manifest_cache.clear()  # read back from the bytes, not the publisher's cached copy
    got = store.get(version).tasks["b"].metadata
    assert json.dumps({key: got[key] for key in odd}) == json.dumps(odd)


def _huge() -> int:
    return 10**5000


# Made when drawn: hypothesis's repr of a strategy holding a 5000-digit int itself hits the digit limit.
_REFUSED_LEAVES = st.sampled_from(
    [_Opaque, lambda: b"x", frozenset, lambda: 1j, _huge, lambda: -_huge(), lambda: (_Opaque(),)]
).map(lambda make: make())
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=4)
    | st.floats().map(_Float)
    | _REFUSED_LEAVES
)
_KEYS = st.text(max_size=3) | st.integers(-2, 2) | st.sampled_from([(1,), None, 1.5, b"k"])
_VALUES = st.recursive(
    _LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=3), max_leaves=8
)


@FUZZ
@given(st.dictionaries(_KEYS, _VALUES, max_size=5) | _VALUES)
def test_the_fast_test_passes_only_what_json_dumps_takes(value: Any) -> None:
    if _plain_json(value):
        json.dumps(value)  # raises if the fast test passed something json.dumps refuses


def test_per_module_numbers_are_packed_as_the_format_says_and_the_cached_manifest_is_the_stored_one(
    redis_client, namespace, make_adapter
) -> None:
    store = SubspaceStore(redis_client, namespace)
    sub, _ = merge(None, {"a": make_adapter(0), "b": make_adapter(1)})
    q, v = MODULES
    cases = {
        "floats": ({q: 1.5, v: -0.0}, True),
        "ints and floats": ({q: 1, v: 2.5}, True),
        "float subclass": ({q: _Float(1.0), v: 2.0}, True),
        "nan": ({q: float("nan"), v: 1.0}, False),
        "infinity": ({q: 1.0, v: float("-inf")}, False),
        "bool": ({q: True, v: 1.0}, False),
        "text": ({q: "1.0", v: 1.0}, False),
        "other order": ({v: 1.0, q: 2.0}, False),
        "one module": ({q: 1.0}, False),
    }
    sub.tasks["b"].metadata.update({key: value for key, (value, _) in cases.items()})
    version = store.publish(sub, None)
    raw = redis_client.get(store.keys.manifest(version))
    entry = json.loads(raw)["tasks"]["b"]
    packed = {key for key in cases if isinstance(entry["metadata"][key], list)}
    assert packed == {key for key, (_, want) in cases.items() if want}
    assert set(entry[MODULE_VALUES]) >= packed and {"module_drift", "module_entry_norm"} <= set(entry[MODULE_VALUES])

    # The publisher's cached manifest is what checking the stored bytes gives, key order included ...
    cached = store.manifest(version)
    assert json.dumps(cached) == json.dumps(decode_manifest(raw, store.keys, version))
    # ... and the caller's subspace is its own after the publish: editing it changes nothing cached.
    before = json.dumps(cached)
    for task in sub.tasks.values():
        task.metadata["module_drift"][q] = -1.0
        task.metadata["added"] = 1
    sub.tasks["b"].metadata["floats"][v] = 9.0
    sub.metadata["added"] = 1
    assert json.dumps(store.manifest(version)) == before
