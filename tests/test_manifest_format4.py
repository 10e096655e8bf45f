"""Manifest format 4 (issue 14, "Redis bytes per version"): each task's entry is written once, in an entries
payload of the version that wrote its payload; each version writes only its new tasks' entries and one float64
row of numbers per task (what a merge changes). Readers see exactly what format 3 gives; a delta's manifest and
what it writes stay small as tasks accumulate; retention keeps the entries payloads retained versions read and
no more; a tampered manifest, entries payload or numbers payload is refused naming what is wrong (a field of an
entry: the entries payload it is in; a task map in another order than the numbers' rows: the manifest).
"""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from helpers import FUZZ, edit_randomly, json_paths, json_strategy
from helpers import small_adapter as _adapter
from hypothesis import given
from hypothesis import strategies as st

from share import KPolicy, Subspace, TaskCoefficients, merge
from share.errors import ShareClError
from share.merge import MODULE_DRIFT
from subspace_store import (
    CorruptPayloadError,
    StoreError,
    SubspaceStore,
    TaskNotFoundError,
    manifest_cache,
    shared_entries,
)
from subspace_store.chains import relative_difference
from subspace_store.codec import build_manifest, encode_manifest, encode_subspace, read_manifest
from subspace_store.keys import Keys
from subspace_store.payloads import sha256
from subspace_store.shared_entries import FIELDS, decode_entries

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODULES = ("enc.q", "enc.v")
POLICY = KPolicy(k=6)


def _chain(store: SubspaceStore, tasks: int, merges: int, **publish) -> tuple[list[str], list[Subspace]]:
    """``tasks`` tasks published in full, then ``merges`` one-task delta versions."""
    sub, _ = merge(None, {f"t{i}": _adapter(i) for i in range(tasks)}, POLICY)
    versions, subs = [store.publish(sub, None)], [sub]
    for j in range(merges):
        sub, report = merge(sub, {f"n{j}": _adapter(1000 + j)}, POLICY)
        versions.append(store.publish(sub, versions[-1], delta=True, rotations=report.rotations, **publish))
        subs.append(sub)
    return versions, subs


def _same(got: Subspace, want: Subspace) -> None:
    assert list(got.tasks) == list(want.tasks)
    for t, task in want.tasks.items():
        assert relative_difference(got.tasks[t], task) <= 1e-6, t
        assert got.tasks[t].metadata == task.metadata, t
        assert all(torch.equal(got.tasks[t].head[h], v) for h, v in task.head.items()), t


def _raw(store: SubspaceStore, version: str) -> dict:
    return json.loads(store.client.get(store.keys.manifest(version)))


def test_format_4_reads_back_exactly_what_format_3_gives(redis_client, namespace) -> None:
    shared = SubspaceStore(redis_client, namespace, shared_entries_from=1)
    inline = SubspaceStore(redis_client, namespace + "-3")
    versions, subs = _chain(shared, 4, 5, max_chain=3)  # t0..t3 pass max_chain: rewritten (new entries too)
    v3, _ = _chain(inline, 4, 5, max_chain=3)
    as_built = {version: shared.manifest(version) for version in versions}  # the publisher's cached manifests
    built_names = {info.version: info.tasks for info in shared.list_versions()}
    manifest_cache.clear()  # read back from the stored bytes, not as built
    for version, old, sub in zip(versions, v3, subs, strict=True):
        got, want = shared.manifest(version), inline.manifest(old)
        assert got == as_built[version]
        assert list(got["tasks"]) == list(want["tasks"]) == built_names[version]  # one task order everywhere
        assert got["format_version"] == 4 and want["format_version"] == 3
        assert _raw(shared, version)["tasks"] == {
            t: got["entries"].index(next(e for e in got["entries"] if e["version"] == got["tasks"][t]["written_in"]))
            for t in got["tasks"]
        }
        for t, entry in want["tasks"].items():  # the same entries, keys aside (other namespace, other versions)
            mine = got["tasks"][t]
            assert {k: v for k, v in mine.items() if k not in ("key", "written_in")} == {
                k: v for k, v in entry.items() if k not in ("key", "written_in")
            }, (version, t)
            assert mine["key"] == shared.keys.task(mine["written_in"], t)
        _same(shared.get(version), sub)
        _same(shared.get(version, tasks=["t0"]), Subspace(sub.modules, {"t0": sub.tasks["t0"]}))
    assert shared.chain_lengths(versions[-1]) == inline.chain_lengths(v3[-1])
    # The process's manifest cache counts what a format-4 manifest holds, not only its few bytes.
    manifest_cache.clear()
    head = shared.manifest(versions[-1])
    raw = redis_client.get(shared.keys.manifest(versions[-1]))
    held = len(raw) + sum(e["bytes"] for e in head["entries"]) + 8 * head["numbers"]["bytes"]
    assert manifest_cache.MANIFESTS.bytes == held * manifest_cache.MEMORY_PER_BYTE


def test_a_delta_manifest_and_what_it_writes_stay_small_as_tasks_accumulate(redis_client, namespace) -> None:
    """Format 3 writes every task's entry into every version's manifest (about 0.5 KB each here); format 4 writes
    a task name and an index per task in the manifest and one row of numbers per task, plus the new task's entry."""
    sizes = {}
    for tasks in (8, 88):
        store = SubspaceStore(redis_client, f"{namespace}-{tasks}", shared_entries_from=1)
        versions, _ = _chain(store, tasks, 2)
        inline = SubspaceStore(redis_client, f"{namespace}-{tasks}-3")
        v3, _ = _chain(inline, tasks, 2)
        head = store.manifest(versions[-1])
        assert head["entries"][-1]["version"] == versions[-1]  # its own entries payload: the new task only
        assert list(decode_entries(redis_client.get(store.keys.entries(versions[-1], 0)))) == ["n1"]
        assert head["numbers"]["bytes"] == (tasks + 2) * (len(FIELDS) - 1 + len(MODULES)) * 8
        sizes[tasks] = (len(redis_client.get(store.keys.manifest(versions[-1]))), head["written_bytes"])
        sizes[(tasks, 3)] = len(redis_client.get(inline.keys.manifest(v3[-1])))
    per_task_manifest = (sizes[88][0] - sizes[8][0]) / 80
    per_task_written = (sizes[88][1] - sizes[8][1]) / 80
    per_task_format3 = (sizes[(88, 3)] - sizes[(8, 3)]) / 80
    # Written per task: its row of numbers (the new task's entry varies by a few bytes with its numbers' digits).
    assert per_task_manifest <= 16 and abs(per_task_written - (len(FIELDS) - 1 + len(MODULES)) * 8) < 1
    assert per_task_format3 > 20 * per_task_manifest


def test_a_task_whose_other_metadata_changed_is_written_again(redis_client, namespace) -> None:
    store = SubspaceStore(redis_client, namespace, shared_entries_from=1)
    versions, subs = _chain(store, 3, 1)
    sub, report = merge(subs[-1], {"n9": _adapter(9)}, POLICY)
    t1 = sub.tasks["t1"]
    sub.tasks["t1"] = TaskCoefficients(dict(t1.E), dict(t1.head), {**t1.metadata, "owner": "someone else"})
    version = store.publish(sub, versions[-1], delta=True, rotations=report.rotations)
    manifest_cache.clear()
    m = store.manifest(version)
    assert m["format_version"] == 4 and m["rotations"]
    assert m["tasks"]["t1"]["written_in"] == version and m["tasks"]["t0"]["written_in"] == versions[0]
    assert sorted(decode_entries(redis_client.get(store.keys.entries(version, 0)))) == ["n9", "t1"]
    _same(store.get(version), sub)


def test_numbers_that_cannot_be_packed_keep_the_version_in_format_3(redis_client, namespace) -> None:
    store = SubspaceStore(redis_client, namespace, shared_entries_from=1)
    sub, _ = merge(None, {"t0": _adapter(0), "t1": _adapter(1)}, POLICY)
    odd = sub.tasks["t1"]
    sub.tasks["t1"] = TaskCoefficients(dict(odd.E), dict(odd.head), {**odd.metadata, "energy_kept": 1})  # an int
    version = store.publish(sub, None)
    assert store.manifest(version)["format_version"] == 3
    _same(store.get(version), sub)
    assert type(store.get(version).tasks["t1"].metadata["energy_kept"]) is int
    with pytest.raises(StoreError, match="shared_entries_from"):
        SubspaceStore(redis_client, namespace, shared_entries_from=0)


def test_retention_keeps_the_entries_payloads_retained_versions_read_and_no_more(redis_client, namespace) -> None:
    store = SubspaceStore(redis_client, namespace, shared_entries_from=1)
    versions, subs = _chain(store, 3, 4)
    store.prune(keep=1)
    manifest_cache.clear()
    _same(store.get(versions[-1]), subs[-1])  # t0..t2 read through the entries payload of the pruned v1
    assert redis_client.exists(store.keys.entries(versions[0], 0))
    assert not redis_client.exists(store.keys.numbers(versions[0]))  # a pruned version's own numbers go
    compacted = store.compact()
    assert compacted is not None and store.manifest(compacted)["format_version"] == 4
    store.prune(keep=1)
    assert not redis_client.exists(store.keys.entries(versions[0], 0))  # nothing reads it any more
    left = {k.decode() for k in redis_client.scan_iter(match=f"sharecl:{namespace}:v:*", count=1000)}
    assert left == set(store._checked(compacted).payload_keys())
    _same(store.get(compacted), subs[-1])


def _set_payload(store: SubspaceStore, version: str, field: str, data: bytes, key: str) -> None:
    """Replace a payload and record its new size and checksum in the manifest (a consistent forgery)."""
    store.client.set(key, data)
    raw = _raw(store, version)
    element = raw["numbers"] if field == "numbers" else next(e for e in raw["entries"] if e["key"] == key)
    element["bytes"], element["sha256"] = len(data), sha256(data)
    store.client.set(store.keys.manifest(version), json.dumps(raw))


@pytest.mark.parametrize(
    "case, match",
    [
        ("entries-checksum", "does not match its sha256"),
        ("entries-not-json", "cannot be decoded"),
        ("entries-lack-task", "has no entry for task 't1'"),
        ("entries-hold-numbers", "holds a field that the layout or the numbers payload gives"),
        ("entries-bad-p", r"entries:0' task 't1': its entry\['p'\] must be a list of 2 values"),
        ("entries-bad-bytes", r"entries:0' task 't1': its entry\['bytes'\] must be an integer >= 0, got -1"),
        ("numbers-short", "'bytes'.* tasks of"),
        ("numbers-infinite", "infinite number for task 't1'"),
        ("numbers-partial-drift", "module_drift for some modules only"),
        ("task-position", "must be the position of one of the"),
        ("entries-version", "neither this version nor the start of one of its rotation chains"),
        ("entries-key", "keeps 'entries 0 of"),
        ("fields", "'fields'.* must be"),
    ],
)
def test_tampered_format_4_versions_are_refused_naming_the_fault(redis_client, namespace, case, match) -> None:
    store = SubspaceStore(redis_client, namespace, shared_entries_from=1)
    versions, subs = _chain(store, 3, 2)
    head, first = versions[-1], versions[0]
    entries_key, numbers_key = store.keys.entries(first, 0), store.keys.numbers(head)
    numbers = redis_client.get(numbers_key)
    width = len(FIELDS) - 1 + len(MODULES)
    if case == "entries-checksum":
        redis_client.set(entries_key, redis_client.get(entries_key).replace(b'"p"', b'"q"', 1))
    elif case == "entries-not-json":
        _set_payload(store, head, "entries", b"{not json", entries_key)
    elif case in ("entries-lack-task", "entries-hold-numbers", "entries-bad-p", "entries-bad-bytes"):
        block = json.loads(redis_client.get(entries_key))
        entry = block["tasks"]["t1"]
        if case == "entries-lack-task":
            del block["tasks"]["t1"]
        elif case == "entries-hold-numbers":
            entry["metadata"]["drift_bound"] = 0.0
        elif case == "entries-bad-p":
            entry["p"] = [2]
        else:
            entry["bytes"] = -1
        _set_payload(store, head, "entries", json.dumps(block).encode(), entries_key)
    elif case == "numbers-short":
        _set_payload(store, head, "numbers", numbers[:-8], numbers_key)
    elif case in ("numbers-infinite", "numbers-partial-drift"):
        row, column = 1, (2 if case == "numbers-infinite" else width - 1)
        value = float("inf") if case == "numbers-infinite" else float("nan")
        at = (row * width + column) * 8
        _set_payload(store, head, "numbers", numbers[:at] + struct.pack("<d", value) + numbers[at + 8 :], numbers_key)
    else:
        raw = _raw(store, head)
        if case == "task-position":
            raw["tasks"]["t1"] = len(raw["entries"])
        elif case == "entries-version":
            raw["entries"][0]["version"] = "v999"
        elif case == "entries-key":
            raw["entries"][0]["key"] = store.keys.task(first, "t0")
        else:
            raw["numbers"]["fields"] = list(reversed(FIELDS))
        redis_client.set(store.keys.manifest(head), json.dumps(raw))
    manifest_cache.clear()
    with pytest.raises(CorruptPayloadError, match=match):
        store.get(head)
    if case.startswith("entries-") and case not in ("entries-version", "entries-key"):
        # The entries payload of v1 is every version's source of t0..t2: each refuses it, naming it.
        for version in versions[:-1]:
            with pytest.raises(CorruptPayloadError, match=entries_key):
                store.get(version)
    else:
        _same(store.get(versions[1]), subs[1])  # the other versions read as before


@pytest.mark.parametrize("resave", ["reversed", "sorted-keys", "modules-reversed"])
def test_a_task_or_module_map_in_another_order_is_refused_not_read_with_other_numbers(
    redis_client, namespace, resave
) -> None:
    """Numbers rows are matched to tasks, and module_drift columns to modules, by the order of the manifest's task
    and module maps: a map re-saved in another order (reversed; every key sorted, as ``jq -S`` does) is refused,
    where it gave tasks each other's numbers (or modules each other's drift)."""
    store = SubspaceStore(redis_client, namespace, shared_entries_from=1)
    versions, subs = _chain(store, 3, 2)
    head = versions[-1]
    raw = _raw(store, head)
    assert raw["numbers"]["order_sha256"] == shared_entries.order_sha256(raw["tasks"], raw["modules"])
    if resave == "reversed":
        raw["tasks"] = dict(reversed(list(raw["tasks"].items())))
    if resave == "modules-reversed":
        assert len(raw["modules"]) > 1
        raw["modules"] = dict(reversed(list(raw["modules"].items())))
    redis_client.set(store.keys.manifest(head), json.dumps(raw, sort_keys=resave == "sorted-keys"))
    manifest_cache.clear()
    match = rf"version {head}: .*\['tasks'\] or \['modules'\] no longer matches the numbers payload"
    with pytest.raises(CorruptPayloadError, match=match):
        store.get(head)
    with pytest.raises(CorruptPayloadError, match=match):
        store.get(head, tasks=["t0"])


def test_a_format_4_manifest_written_before_order_sha256_still_reads(redis_client, namespace) -> None:
    store = SubspaceStore(redis_client, namespace, shared_entries_from=1)
    versions, subs = _chain(store, 3, 2)
    for version, sub in zip(versions, subs, strict=True):
        raw = _raw(store, version)
        del raw["numbers"]["order_sha256"]
        redis_client.set(store.keys.manifest(version), json.dumps(raw))
        manifest_cache.clear()
        _same(store.get(version), sub)


def test_an_unknown_task_is_named_without_fetching_any_entries_part(redis_client, namespace) -> None:
    store = SubspaceStore(redis_client, namespace, shared_entries_from=1)
    versions, _ = _chain(store, 3, 1)
    head = versions[-1]
    redis_client.set(store.keys.entries(versions[0], 0), b"{damaged")  # what reading t0..t2 would fail on
    manifest_cache.clear()
    with pytest.raises(TaskNotFoundError, match=f"^version {head} has no task 'nope'; it holds: t0, t1, t2, n0$"):
        store.get(head, tasks=["nope"])
    checked = store._decoded(head, redis_client.get(store.keys.manifest(head)))  # the one the read used (cached)
    assert len(checked.needs()) == len(checked.top["entries"]) + 1  # no entries part nor the numbers provided


def test_a_one_task_read_fetches_only_the_entries_part_that_holds_it(redis_client, namespace, monkeypatch) -> None:
    monkeypatch.setattr(shared_entries, "ENTRIES_PART", 2)
    store = SubspaceStore(redis_client, namespace, shared_entries_from=1)
    versions, subs = _chain(store, 7, 1)  # v1: 7 tasks in 4 parts of 2; v2: one more task in its own part
    head = store.manifest(versions[-1])
    assert [(e["version"], e["part"]) for e in head["entries"]] == [(versions[0], i) for i in range(4)] + [
        (versions[1], 0)
    ]
    manifest_cache.clear()
    infos = store.list_versions()  # names, k, sizes: no entry fetched
    assert [info.tasks for info in infos] == [list(sub.tasks) for sub in subs]
    raw = redis_client.get(store.keys.manifest(versions[-1]))
    assert len(store._decoded(versions[-1], raw).needs()) == len(head["entries"]) + 1
    got = store.get(versions[-1], tasks=["t5"])
    _same(got, Subspace(subs[-1].modules, {"t5": subs[-1].tasks["t5"]}))
    checked = store._checked(versions[-1], ["t5"])
    left = {key for key, _, _ in checked.needs()}
    assert left == {store.keys.entries(versions[0], i) for i in (0, 1, 3)} | {store.keys.entries(versions[1], 0)}
    _same(store.get(versions[-1]), subs[-1])  # the rest fetched when needed
    assert checked.needs() == []


# -- fuzzing the format-4 reader (no Redis: what the store would fetch is handed over) ---------------------
KEYS = Keys("fmt4")


def _stored_v2() -> tuple[bytes, dict[str, bytes], dict]:
    """A format-4 delta v2 on a format-4 v1, as stored: manifest bytes, payloads (entries parts, numbers) by key,
    and the readers' layout the store built."""
    sub1, _ = merge(None, {f"t{i}": _adapter(i) for i in range(3)}, POLICY)
    enc1 = encode_subspace(sub1)
    assert enc1.share_entries()
    m1 = build_manifest(KEYS, "v1", sub1, enc1, None, {}, [], 1.0e9)
    sub2, report = merge(sub1, {"n0": _adapter(7)}, POLICY)
    reuse = {t: m1["tasks"][t] for t in sub1.tasks}
    enc2 = encode_subspace(sub2, reuse=reuse, rotations=report.rotations, chain=m1["rotations"])
    assert enc2.share_entries(shared_entries.Inherited(m1["entries"], enc1.positions, reuse))
    m2 = build_manifest(KEYS, "v2", sub2, enc2, "v1", {}, [], 1.0e9 + 1)
    payloads = {KEYS.entries("v1", i): data for i, data in enumerate(enc1.entries)}
    payloads |= {KEYS.entries("v2", i): data for i, data in enumerate(enc2.entries)}
    payloads[KEYS.numbers("v2")] = enc2.numbers
    return encode_manifest(m2, enc2.positions), payloads, m2


STORED_V2, PAYLOADS_V2, BUILT_V2 = _stored_v2()


def _read_v2(raw: bytes, payloads: dict[str, bytes]) -> dict | None:
    """What a store's read of v2 gives from these bytes (None: a payload it names is not there), or a project error."""
    checked = read_manifest(raw, KEYS, "v2")
    needs = checked.needs()
    if any(key not in payloads for key, _, _ in needs):
        return None  # the store would find the key missing: VersionNotFoundError
    checked.provide({key: payloads[key] for key, _, _ in needs})
    checked.payload_keys()
    return checked.full()


def test_the_pure_reader_gives_what_was_built() -> None:
    got = _read_v2(STORED_V2, PAYLOADS_V2)
    assert got is not None and got["tasks"] == BUILT_V2["tasks"] and got["entries"] == BUILT_V2["entries"]


@FUZZ
@given(st.data())
def test_edited_format_4_manifests_and_payloads_read_or_raise_a_project_error(data: st.DataObject) -> None:
    words = ["tasks", "entries", "numbers", "part", "version", "key", "fields", "v1", "v2", "t0", "metadata"]
    values = json_strategy(words + [MODULE_DRIFT, "drift_bound", "p", "head", "module_values"], 8)
    manifest, payloads = json.loads(STORED_V2), dict(PAYLOADS_V2)
    target = data.draw(st.sampled_from(["manifest", "entries", "numbers"]))
    if target == "manifest":
        paths = [p for p in json_paths(manifest)[1:] if p[0] in ("tasks", "entries", "numbers")]
        edit_randomly(data, manifest, paths, values)
    elif target == "entries":
        key = data.draw(st.sampled_from([k for k in payloads if ":entries:" in k]))
        part = json.loads(payloads[key])
        edit_randomly(data, part, json_paths(part)[1:], values)
        payloads[key] = json.dumps(part).encode()
    else:
        numbers = bytearray(payloads[KEYS.numbers("v2")])
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(numbers) // 8 - 1)) * 8
            numbers[at : at + 8] = struct.pack("<d", data.draw(st.floats(allow_nan=True, allow_infinity=True)))
        payloads[KEYS.numbers("v2")] = bytes(numbers)
    try:
        _read_v2(json.dumps(manifest).encode(), payloads)
    except ShareClError:
        pass


def test_numbers_rows_hold_each_tasks_numbers_and_nan_only_for_what_is_absent() -> None:
    sub, _ = merge(None, {f"t{i}": _adapter(i) for i in range(4)}, POLICY)
    sub, _ = merge(sub, {"n0": _adapter(9)}, POLICY)
    entries = encode_subspace(sub).tasks_manifest
    modules = list(sub.modules)
    width = shared_entries.columns(len(modules))

    def row(rows: bytes, i: int) -> list[float]:
        return list(struct.unpack_from(f"<{width}d", rows, i * width * 8))

    rows = shared_entries.number_rows(entries, modules)
    assert rows is not None and len(rows) == len(entries) * width * 8
    meta = entries["t1"]["metadata"]
    want = [entries["t1"]["reconstruction_error"], *(meta[k] for k in shared_entries.NUMBER_FIELDS[1:])]
    assert row(rows, 1) == want + list(meta[MODULE_DRIFT].values())
    entries["t1"] = {**entries["t1"], "reconstruction_error": None}  # absent: NaN
    entries["t2"] = {
        **entries["t2"],
        "metadata": {k: v for k, v in entries["t2"]["metadata"].items() if k != MODULE_DRIFT},
    }
    rows = shared_entries.number_rows(entries, modules)
    assert (
        rows is not None
        and math.isnan(row(rows, 1)[0])
        and row(rows, 1)[1:] == (want + list(meta[MODULE_DRIFT].values()))[1:]
    )
    assert all(math.isnan(v) for v in row(rows, 2)[len(shared_entries.NUMBER_FIELDS) :])
    for odd in (None, math.nan, 1):  # an explicit null, a NaN, an int: not packable
        bad = {**entries, "t3": {**entries["t3"], "metadata": {**entries["t3"]["metadata"], "energy_kept": odd}}}
        assert shared_entries.number_rows(bad, modules) is None
