"""Versions as deltas (issue 14, items 2, 3 and 6): a delta version writes its bases, its rotations from the
parent's bases and only its new tasks; old tasks are read through the rotations since. Readers see the same
subspace as the full format (within 1e-6 relative), retention keeps exactly the payloads retained versions
name, compaction rewrites the head in full, format 1 stores stay readable, and tampered chains are refused.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import edit_randomly, json_paths
from helpers import small_adapter as _adapter

from share import KPolicy, Subspace, merge, remove_tasks
from subspace_store import CorruptPayloadError, StoreError, SubspaceStore, manifest_cache
from subspace_store.chains import MAX_CHAIN, relative_difference
from subspace_store.codec import decode_manifest, encode_subspace
from subspace_store.store import COMPACTION_KEY, _Publication

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODULES = ("enc.q", "enc.v")
TOL = 1e-6


def _assert_same(got: Subspace, want: Subspace, where: str) -> None:
    """Bases bit-equal, every task's coefficients within TOL relative, heads and metadata equal."""
    assert list(got.modules) == list(want.modules), where
    for m, basis in want.modules.items():
        assert torch.equal(got.modules[m].U_A, basis.U_A) and torch.equal(got.modules[m].U_B, basis.U_B), where
    assert list(got.tasks) == list(want.tasks), where
    for t, task in want.tasks.items():
        diff = relative_difference(got.tasks[t], task)
        assert diff <= TOL, f"{where}, task {t}: relative difference {diff:.3g}"
        assert got.tasks[t].E[MODULES[0]][0].dtype == task.E[MODULES[0]][0].dtype
        assert got.tasks[t].head.keys() == task.head.keys() and all(
            torch.equal(got.tasks[t].head[h], v) for h, v in task.head.items()
        ), where
        assert got.tasks[t].metadata == task.metadata, where


def _delta_chain(store: SubspaceStore, count: int, *, with_rotations: bool = True) -> tuple[list[str], list[Subspace]]:
    sub, _ = merge(None, {"t0": _adapter(0)}, KPolicy(k=6))
    versions, subs = [store.publish(sub, None, delta=True)], [sub]
    for i in range(1, count):
        sub, report = merge(sub, {f"t{i}": _adapter(i)}, KPolicy(k=6))
        rotations = report.rotations if with_rotations else None
        versions.append(store.publish(sub, versions[-1], delta=True, rotations=rotations))
        subs.append(sub)
    return versions, subs


def _namespace_payload_keys(store: SubspaceStore) -> set[str]:
    found = set()
    for prefix in (f"sharecl:{store.namespace}:v:", f"{store.keys.prefix}v:"):
        found |= {k.decode() for k in store.client.scan_iter(match=prefix + "*", count=1000)}
    return {k for k in found if not k.endswith(":manifest")}


def _named_payload_keys(store: SubspaceStore) -> set[str]:
    out = set()
    for info in store.list_versions():
        m = store.manifest(info.version)
        out |= {e["key"] for e in m["modules"].values()} | {e["key"] for e in m["tasks"].values()}
        out |= {r["key"] for element in m["rotations"] for r in element["rotations"].values()}
        if "numbers" in m:  # format 4: the entries payloads it reads and its numbers
            out |= {e["key"] for e in m["entries"]} | {m["numbers"]["key"]}
    return out


# -- the equivalence test of the issue ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("manifests", ["format3", "format4"])
def test_delta_and_full_formats_agree_over_200_random_merges(redis_client, namespace, manifests) -> None:
    """200 random merges (1-2 adapters of rank 1-3, sometimes a removal; at most ~40 tasks) published in both
    formats: every version of the delta store reads back as the full store's within 1e-6 relative; compaction
    when a chain reaches its bound; retention with tags and pins on the way; every retained version still reads
    back. ``format4``: the delta store writes task entries once (manifest format 4) from its first version on."""
    rng = random.Random(14)
    full = SubspaceStore(redis_client, namespace + "-full")
    delta = SubspaceStore(redis_client, namespace, shared_entries_from=1 if manifests == "format4" else 10**9)
    policy = KPolicy(k=8)
    sub, _ = merge(None, {"t0": _adapter(0)}, policy)
    vf, vd = full.publish(sub, None), delta.publish(sub, None, delta=True)
    published = {vd: sub}  # delta version -> the subspace it holds (what the full format stores bit for bit)
    next_task, deltas, compactions, removals = 1, 0, 0, 0
    for step in range(200):
        if len(sub.tasks) > 40 or (len(sub.tasks) >= 4 and rng.random() < 0.04):  # keeps the test fast
            gone = rng.sample(list(sub.tasks), 12 if len(sub.tasks) > 40 else 1)
            sub, _ = remove_tasks(sub, gone, policy)
            vf, vd = full.publish(sub, vf), delta.publish(sub, vd)  # removals are written in full
            removals += 1
        else:
            batch = {}
            for _ in range(rng.choice((1, 1, 2))):
                batch[f"t{next_task}"] = _adapter(next_task, rank=rng.choice((1, 2, 3)))
                next_task += 1
            sub, report = merge(sub, batch, policy)
            rotations = report.rotations if rng.random() < 0.7 else None  # else derived from the bases
            vf = full.publish(sub, vf)
            vd = delta.publish(sub, vd, delta=True, rotations=rotations, max_chain=16)
            deltas += bool(delta.manifest(vd)["rotations"])
        published[vd] = sub
        assert delta.manifest(vd)["format_version"] == (4 if manifests == "format4" else 3)
        got, want = delta.get(vd), full.get(vf)
        _assert_same(want, sub, f"full format at {vf}")  # the full format is the in-memory subspace
        _assert_same(got, want, f"step {step}: {vd} against {vf}")
        assert max(delta.chain_lengths(vd).values()) <= 16
        if max(delta.chain_lengths(vd).values()) >= 8:
            compacted = delta.compact()
            assert compacted is not None and max(delta.chain_lengths(compacted).values()) == 0
            _assert_same(delta.get(compacted), sub, f"compaction {compacted} of {vd}")
            published[compacted], vd = sub, compacted
            compactions += 1
        if step % 40 == 39:  # retention on the way: a tag and a pin on random older versions
            committed = [info.version for info in delta.list_versions()]
            delta.tag(rng.choice(committed[:-1]), f"keep{step}")
            delta.pin(rng.choice(committed[:-1]), f"job{step}", ttl_s=3600)
            delta.prune(keep=5)
            for version in [info.version for info in delta.list_versions()]:
                _assert_same(delta.get(version), published[version], f"{version} after prune at step {step}")
            assert _namespace_payload_keys(delta) == _named_payload_keys(delta)
    assert deltas > 120 and compactions >= 3 and removals >= 3, (deltas, compactions, removals)
    # Chains made of both kinds of rotations (the merge's and the bases'), read from a fresh process state.
    from subspace_store import chains

    chains.clear_caches()
    result = delta.prune(keep=3)
    assert result.removed
    for version in [info.version for info in delta.list_versions()]:
        _assert_same(delta.get(version), published[version], f"{version} after the last prune")
    assert _namespace_payload_keys(delta) == _named_payload_keys(delta)  # every payload kept is named, no more


# -- writing and reading deltas ----------------------------------------------------------------------
def test_a_delta_version_writes_only_its_new_task_and_reads_as_the_subspace(redis_client, namespace) -> None:
    store = SubspaceStore(redis_client, namespace)
    versions, subs = _delta_chain(store, 6)
    m = store.manifest(versions[-1])
    assert m["format_version"] == 3
    assert {t: e["written_in"] for t, e in m["tasks"].items()} == {f"t{i}": versions[i] for i in range(6)}
    assert [e["version"] for e in m["rotations"]] == versions[1:]  # the chain t0 needs, oldest first
    assert store.chain_lengths(versions[-1]) == {f"t{i}": 5 - i for i in range(6)}
    full_bytes = len(encode_subspace(subs[-1]).tasks["t0"])
    # Written: bases, rotations, one task; independent of how many old tasks there are.
    assert m["written_bytes"] == store.manifest(versions[-2])["written_bytes"]
    assert m["bytes"] > m["written_bytes"] > full_bytes
    for version, sub in zip(versions, subs, strict=True):
        _assert_same(store.get(version), sub, version)
        _assert_same(store.get(version, tasks=["t0"]), Subspace(sub.modules, {"t0": sub.tasks["t0"]}), version)
    # Derived from the bases instead of MergeReport.rotations: as exact.
    other = SubspaceStore(redis_client, namespace + "-bases")
    versions, subs = _delta_chain(other, 12, with_rotations=False)
    assert max(other.chain_lengths(versions[-1]).values()) == 11
    _assert_same(other.get(versions[-1]), subs[-1], "rotations from the bases")


def test_a_published_version_is_read_in_its_process_as_built_and_equal_to_its_stored_bytes(
    redis_client, namespace
) -> None:
    """The commit leaves the manifest it built in the process's manifest cache under the bytes it wrote, so the
    coordinator's read right after a publish (and the next delta's plan) parses nothing back: what it gets is
    what checking the stored bytes gives, and bytes rewritten or deleted later are read and checked as always."""
    store = SubspaceStore(redis_client, namespace)
    versions, _ = _delta_chain(store, 3)
    misses = manifest_cache.MANIFESTS.misses
    for ref in (versions[-1], "head", versions[-2]):
        mine = store.manifest(ref)
        version = mine["version"]
        fresh = decode_manifest(redis_client.get(store.keys.manifest(version)), store.keys, version)
        assert json.dumps(mine, sort_keys=True) == json.dumps(fresh, sort_keys=True)
    assert manifest_cache.MANIFESTS.misses == misses  # every version this object wrote: nothing parsed back
    mine = store.manifest(versions[-1])
    mine["tasks"].clear()  # the caller's copy
    assert store.manifest(versions[-1])["tasks"]
    key = store.keys.manifest(versions[-1])
    changed = json.loads(redis_client.get(key))
    changed["metadata"] = {"rewritten": 1}
    redis_client.set(key, json.dumps(changed))
    assert store.manifest(versions[-1])["metadata"] == {"rewritten": 1}
    redis_client.delete(key)
    with pytest.raises(StoreError, match="pruned|no version|not found"):
        store.manifest(versions[-1])


def test_a_task_whose_chain_would_pass_max_chain_is_written_in_full(redis_client, namespace) -> None:
    store = SubspaceStore(redis_client, namespace)
    sub, _ = merge(None, {"t0": _adapter(0)}, KPolicy(k=6))
    version = store.publish(sub, None)
    for i in range(1, 6):
        sub, report = merge(sub, {f"t{i}": _adapter(i)}, KPolicy(k=6))
        version = store.publish(sub, version, delta=True, rotations=report.rotations, max_chain=3)
        assert max(store.chain_lengths(version).values()) <= 3
    assert store.chain_lengths(version) == {"t0": 1, "t1": 0, "t2": 3, "t3": 2, "t4": 1, "t5": 0}
    _assert_same(store.get(version), sub, version)
    with pytest.raises(StoreError, match="max_chain"):
        store.publish(sub, version, delta=True, max_chain=0)


def test_a_changed_old_task_or_head_makes_the_version_full(redis_client, namespace, caplog) -> None:
    store = SubspaceStore(redis_client, namespace)
    sub, _ = merge(None, {"t0": _adapter(0), "t1": _adapter(1)}, KPolicy(k=6))
    v1 = store.publish(sub, None)
    sub, report = merge(sub, {"t2": _adapter(2)}, KPolicy(k=6))
    changed = Subspace(sub.modules, dict(sub.tasks), sub.policy, sub.metadata)
    ea, eb = sub.tasks["t0"].E["enc.q"]
    changed.tasks["t0"] = type(sub.tasks["t0"])({**sub.tasks["t0"].E, "enc.q": (ea * 1.01, eb)}, sub.tasks["t0"].head)
    v2 = store.publish(changed, v1, delta=True, rotations=report.rotations)
    assert store.manifest(v2)["rotations"] == [] and set(store.chain_lengths(v2).values()) == {0}
    assert "publishing in full" in caplog.text
    _assert_same(store.get(v2), changed, v2)
    with pytest.raises(StoreError, match="rotations for module"):
        store.publish(sub, v2, delta=True, rotations={m: (r[0][:, :1], r[1]) for m, r in report.rotations.items()})


# -- format versioning ---------------------------------------------------------------------------------
def test_a_store_written_in_format_1_stays_readable_and_takes_deltas(redis_client, namespace) -> None:
    store = SubspaceStore(redis_client, namespace)
    sub, _ = merge(None, {"t0": _adapter(0), "t1": _adapter(1)}, KPolicy(k=6))
    old = _Publication(store, encode_subspace(sub))
    old.format_version = 1  # the layout before delta versions: no written_in, no rotations
    old.begin()
    old.write_payloads()
    v1 = old.commit(sub, None, None, {}, [], "coordinators")
    raw = json.loads(store.client.get(store.keys.manifest(v1)))
    assert raw["format_version"] == 1 and "rotations" not in raw
    assert all("written_in" not in e for e in raw["tasks"].values())
    _assert_same(store.get(v1), sub, "format 1")
    assert store.manifest(v1)["tasks"]["t0"]["written_in"] == v1  # the reader fills in the new fields
    new, report = merge(sub, {"t2": _adapter(2)}, KPolicy(k=6))
    v2 = store.publish(new, v1, delta=True, rotations=report.rotations)
    assert store.manifest(v2)["tasks"]["t0"]["written_in"] == v1
    _assert_same(store.get(v2), new, "a delta on a format 1 parent")
    assert store.prune(keep=1).removed == [v1]
    _assert_same(store.get(v2), new, "after pruning the format 1 parent")
    raw["format_version"] = 5
    with pytest.raises(CorruptPayloadError, match="upgrade share-cl"):
        decode_manifest(json.dumps(raw).encode(), store.keys, v1)


# -- tampering -----------------------------------------------------------------------------------------
def _tampered(store: SubspaceStore, version: str, edit) -> None:
    raw = json.loads(store.client.get(store.keys.manifest(version)))
    edit(raw)
    store.client.set(store.keys.manifest(version), json.dumps(raw))


def test_tampered_chains_and_rotations_are_refused(redis_client, namespace) -> None:
    store = SubspaceStore(redis_client, namespace)
    versions, _ = _delta_chain(store, 4)
    head = versions[-1]
    original = store.client.get(store.keys.manifest(head))
    cases = {
        "written in a version outside the chain": lambda m: m["tasks"]["t0"].update(written_in="v99"),
        "key of another task": lambda m: m["tasks"]["t0"].update(key=m["tasks"]["t1"]["key"]),
        "a broken link": lambda m: m["rotations"][1].update(parent="v9"),
        "a chain that does not end here": lambda m: m["rotations"].pop(),
        "shapes that do not compose": lambda m: m["rotations"][0]["rotations"]["enc.q"].update(to=[5, 6]),
        "a missing module": lambda m: m["rotations"][0]["rotations"].pop("enc.v"),
        "a foreign rotation key": lambda m: m["rotations"][0]["rotations"]["enc.q"].update(key="other:key"),
        "a chain going backwards": lambda m: m["rotations"][0].update(version="v1", parent="v2"),
        "too long a chain": lambda m: m.update(rotations=m["rotations"] * (MAX_CHAIN // 3 + 1)),
        "not a list": lambda m: m.update(rotations={"v2": 1}),
    }
    for edit in cases.values():
        _tampered(store, head, edit)
        with pytest.raises(CorruptPayloadError, match="not a valid manifest"):
            store.get(head)
        store.client.set(store.keys.manifest(head), original)
    store.get(head)

    from subspace_store import chains
    from subspace_store.payloads import sha256

    element = store.manifest(head)["rotations"][0]["rotations"]["enc.q"]
    key, good = element["key"], store.client.get(element["key"])
    chains.clear_caches()
    store.client.set(key, good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(CorruptPayloadError, match="sha256"):
        store.get(head)
    # Well-formed bytes of the wrong shape, with a matching checksum: refused by their decoder.
    wrong = chains.encode_rotation((torch.eye(6, 5, dtype=torch.float64), torch.eye(6, dtype=torch.float64)))
    store.client.set(key, wrong)
    _tampered(
        store, head, lambda m: m["rotations"][0]["rotations"]["enc.q"].update(bytes=len(wrong), sha256=sha256(wrong))
    )
    with pytest.raises(CorruptPayloadError, match="R_A"):
        store.get(head)
    # Non-finite rotations, read without checksums.
    (ta, tb), (fa, fb) = element["to"], element["from"]
    nan = chains.encode_rotation(
        (torch.full((ta, fa), float("nan"), dtype=torch.float64), torch.zeros(tb, fb, dtype=torch.float64))
    )
    store.client.set(key, nan)
    _tampered(store, head, lambda m: m["rotations"][0]["rotations"]["enc.q"].update(bytes=len(nan), sha256=sha256(nan)))
    with pytest.raises(CorruptPayloadError, match="non-finite"):
        store.get(head, verify=False)
    # A task payload of another basis' shape behind a valid checksum.
    store.client.set(store.keys.manifest(head), original)
    store.client.set(key, good)
    t0 = store.manifest(head)["tasks"]["t0"]
    t5 = store.manifest(head)["tasks"]["t3"]  # written in the head: k of the head, not of v1
    _tampered(store, head, lambda m: m["tasks"]["t0"].update(written_in=versions[1], key=m["tasks"]["t0"]["key"]))
    with pytest.raises(CorruptPayloadError):
        store.get(head, tasks=["t0"])
    store.client.set(store.keys.manifest(head), original)
    assert t0["written_in"] == versions[0] and t5["written_in"] == head
    store.get(head)


# -- compaction and retention --------------------------------------------------------------------------
def test_compaction_rewrites_the_head_in_full_and_prune_frees_the_chain(redis_client, namespace) -> None:
    store = SubspaceStore(redis_client, namespace)
    versions, subs = _delta_chain(store, 8)
    assert store.compact(min_chain=8) is None  # the longest chain is 7
    compacted = store.compact(metadata={"by": "test"})
    assert compacted is not None and store.head() == compacted
    m = store.manifest(compacted)
    assert m["parent"] == versions[-1] and m["rotations"] == []
    assert m["metadata"] == {"by": "test", COMPACTION_KEY: {"of": versions[-1], "longest_chain": 7}}
    assert set(store.chain_lengths(compacted).values()) == {0}
    _assert_same(store.get(compacted), subs[-1], "compaction")
    assert store.compact() is None  # nothing left to compact

    store.tag(versions[3], "old")
    store.prune(keep=1)
    # v4 (tagged) still reads through its chain: t0..t3 payloads and v2..v4 rotations stay, nothing else.
    _assert_same(store.get(versions[3]), subs[3], "tagged delta version after prune")
    assert _namespace_payload_keys(store) == _named_payload_keys(store)
    kept_old = {k for k in _namespace_payload_keys(store) if store.keys.payload_version(k) != compacted}
    assert kept_old and all(store.keys.payload_version(k) in versions[:4] for k in kept_old)
    store.untag("old")
    store.prune(keep=1)
    assert {store.keys.payload_version(k) for k in _namespace_payload_keys(store)} == {compacted}


def test_prune_after_a_long_delta_chain_keeps_what_retained_versions_read(redis_client, namespace) -> None:
    store = SubspaceStore(redis_client, namespace)
    versions, subs = _delta_chain(store, 14)
    store.pin(versions[5], "job-1", ttl_s=600)
    result = store.prune(keep=2)
    assert [info.version for info in store.list_versions()] == [versions[5], *versions[-2:]]
    assert result.removed == [v for v in versions if v not in (versions[5], *versions[-2:])]
    for i in (5, 12, 13):
        _assert_same(store.get(versions[i]), subs[i], versions[i])
    assert _namespace_payload_keys(store) == _named_payload_keys(store)
    # The head alone: t0's payload, written in v1, and every rotation since stay; v1's bases go.
    store.unpin(versions[5], "job-1")
    store.prune(keep=1)
    assert store.client.get(store.keys.basis(versions[0], MODULES[0])) is None
    assert store.client.get(store.keys.task(versions[0], "t0")) is not None
    _assert_same(store.get(versions[-1]), subs[-1], "head after pruning everything else")
    assert _namespace_payload_keys(store) == _named_payload_keys(store)


# -- the coordinator -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shared_entries_from", [256, 1], ids=["format3", "format4"])
def test_the_coordinator_publishes_deltas_and_compacts_after_the_publish(
    redis_client, namespace, shared_entries_from
) -> None:
    from coordinator import Coordinator
    from subspace_store import Submission, SubmissionStream

    store = SubspaceStore(redis_client, namespace, shared_entries_from=shared_entries_from)
    stream = SubmissionStream(redis_client, namespace)
    coordinator = Coordinator(store, stream, KPolicy(k=6), max_chain=3, keep_versions=3)
    steps = []
    for i in range(6):
        stream.submit(Submission(f"t{i}", _adapter(i), store.head()))
        steps.append(coordinator.step(block_ms=None))
        assert coordinator.wait_for_compaction(60)  # compacting runs in the background: let it land here
    # v1 full; v2..v4 deltas; v4 reaches the bound: v5 compacts it in the background, reported by the next step;
    # v6, v7 deltas on v5.
    assert [s.version for s in steps] == ["v1", "v2", "v3", "v4", "v6", "v7"]
    assert [s.parent for s in steps] == [None, "v1", "v2", "v3", "v5", "v6"]
    assert [s.compacted for s in steps] == [None, None, None, None, "v5", None]
    assert steps[4].compaction_seconds > 0 and coordinator.counters["compactions"] == 1
    assert store.manifest("v5")["metadata"]["compaction"] == {"of": "v4", "longest_chain": 3}
    assert store.manifest("v5")["parent"] == "v4" and store.chain_lengths("v5") == dict.fromkeys(
        ["t0", "t1", "t2", "t3"], 0
    )
    assert store.chain_lengths("v7") == {"t0": 2, "t1": 2, "t2": 2, "t3": 2, "t4": 1, "t5": 0}
    assert store.manifest("v7")["written_bytes"] < store.manifest("v5")["written_bytes"]
    held = coordinator._head
    assert coordinator._head_version == "v7" and held is not None
    got = store.get()
    for t, task in held.tasks.items():
        assert relative_difference(got.tasks[t], task) <= TOL
    assert [info.version for info in store.list_versions()] == ["v5", "v6", "v7"]  # keep_versions=3
    assert _namespace_payload_keys(store) == _named_payload_keys(store)
    # A restarted coordinator reads the head from the store and goes on with deltas.
    manifest_cache.clear()  # a new process: nothing cached
    again = Coordinator(store, stream, KPolicy(k=6), max_chain=3)
    stream.submit(Submission("t6", _adapter(6), "v7"))
    assert again.step(block_ms=None).version == "v8" and store.manifest("v8")["rotations"]
    again.close()  # v8 reaches the bound: close waits for its compaction
    assert store.head() == "v9" and store.manifest("v9")["metadata"]["compaction"]["of"] == "v8"
    assert {store.manifest(v)["format_version"] for v in ("v5", "v6", "v7", "v8", "v9")} == {
        4 if shared_entries_from == 1 else 3
    }
    with pytest.raises(Exception, match="max_chain"):
        Coordinator(store, stream, max_chain=0)


# -- fuzzing the chain part of the manifest decoder --------------------------------------------------------
def _delta_manifest() -> tuple[dict, object]:
    from subspace_store.codec import build_manifest
    from subspace_store.keys import Keys

    keys = Keys("fuzz")
    sub, _ = merge(None, {"t0": _adapter(0)}, KPolicy(k=6))
    first = build_manifest(keys, "v1", sub, encode_subspace(sub), None, {}, [], 1.0e9)
    sub, report = merge(sub, {"t1": _adapter(1)}, KPolicy(k=6))
    second = build_manifest(
        keys,
        "v2",
        sub,
        encode_subspace(sub, reuse={"t0": first["tasks"]["t0"]}, rotations=report.rotations),
        "v1",
        {},
        [],
        1.0e9,
    )
    assert decode_manifest(json.dumps(second).encode(), keys, "v2") == second
    return second, keys


DELTA_MANIFEST, FUZZ_KEYS = _delta_manifest()


def test_edited_delta_manifests_decode_or_raise_a_project_error() -> None:
    import copy

    from helpers import FUZZ, json_strategy
    from hypothesis import given
    from hypothesis import strategies as st

    from share.errors import ShareClError

    words = ["rotations", "written_in", "version", "parent", "to", "from", "key", "v1", "v2", "enc.q", "t0", "t1"]
    values = json_strategy(words, 8)
    chain_paths = [p for p in json_paths(DELTA_MANIFEST)[1:] if p[0] in ("rotations", "tasks")]

    @FUZZ
    @given(st.data())
    def run(data: st.DataObject) -> None:
        manifest = edit_randomly(data, copy.deepcopy(DELTA_MANIFEST), chain_paths, values)
        try:
            decode_manifest(json.dumps(manifest).encode(), FUZZ_KEYS, "v2")
        except ShareClError:
            pass

    run()


def test_the_coordinator_config_carries_max_chain_to_the_coordinator(redis_server, namespace) -> None:
    from coordinator.config import CoordinatorConfig, CoordinatorConfigError, build

    with pytest.raises(CoordinatorConfigError, match="max_chain must be an integer from 1 to"):
        CoordinatorConfig(namespace=namespace, redis_url=redis_server, max_chain=0)
    config = CoordinatorConfig(namespace=namespace, redis_url=redis_server, max_chain=3)
    assert CoordinatorConfig.from_dict(config.to_dict()).max_chain == 3
    assert build(config).max_chain == 3
