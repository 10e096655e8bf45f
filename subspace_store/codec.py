"""A ``share.Subspace`` <-> payloads (one per module basis, one per task), and a version's manifest.

Per module, one payload holds ``U_A`` and ``U_B``. Per task, one payload holds every module's
``E_A``/``E_B`` and the task's head tensors, so a deployment can pull one task without the others.
The manifest (JSON) lists them with their keys, sizes and sha256; ``decode_manifest`` checks every
field of one read back from Redis (names full-matched, keys the layout gives, a checksum for every
payload) before anything uses it. Pure functions: no Redis here.

Format 2 (delta versions, ``chains.py``): a task entry names the version it was written in
(``written_in``; its key is that version's) and the manifest's ``rotations`` lists, oldest first, the
versions whose basis rotations carry such payloads to this version's basis: each element names its
version and parent and, per module, the rotation payload's key, size, sha256 and shapes. A task
written in ``w`` is read through the elements after the one whose parent is ``w``. Format 1 (every
task written in its own version, no ``rotations``) is still read; ``decode_manifest`` fills in
``written_in`` and an empty ``rotations`` so readers see one layout.

Format 3 (``encode_manifest``) stores a task entry's module-keyed maps as lists in the order of the
manifest's ``modules``, since module names repeated per task were most of a manifest's bytes: ``p`` is
one integer when every module has the same p, else a list; a ``metadata`` map whose keys are exactly
the modules, in their order, with finite numbers as values (``share.merge``'s ``module_entry_norm`` and
``module_drift``) is stored as the list of its values, and the entry's ``module_values`` names those
metadata keys. Maps of another shape stay as they are. Reading an entry checks and unpacks it, so
readers see the layout formats 1 and 2 have (and a one-task pull unpacks one entry).

Format 4 (``shared_entries``) writes each task's entry once, in an entries payload part of the version that
wrote its payload, and per version only the numbers a merge changes (packed float64); the manifest maps
task names to entries parts. ``read_manifest`` checks the manifest; the store fetches the payloads that
``CheckedManifest.needs`` names for the tasks it reads and hands them over (``provide``); each entry is then
joined back into its format-3 form when it is first checked.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from torch import Tensor

from share import KPolicy, ModuleBasis, Subspace, TaskCoefficients
from share.errors import ShareClError
from share.subspace import check_task_name

from . import shared_entries
from .chains import MAX_CHAIN, Rotation, encode_rotation
from .errors import CorruptPayloadError, StoreError
from .keys import Keys, check_module_name, check_version, version_number
from .payloads import PayloadFormatError, decode_tensors, encode_tensors, sha256

MANIFEST_FORMAT = "share-cl-store-version"
MANIFEST_FORMAT_VERSION = 3
READABLE_FORMAT_VERSIONS = (1, 2, 3, shared_entries.SHARED_FORMAT_VERSION)
MODULE_VALUES = "module_values"  # format 3: the task metadata keys stored as lists in the modules' order
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
_FLOAT = frozenset({float})
_CONTAINERS = frozenset({dict, list})
E_A, E_B, HEAD = "E_A:", "E_B:", "head:"


@dataclass
class EncodedSubspace:
    """Serialized payloads plus the manifest entries describing them (keys are filled in by the store)."""

    bases: dict[str, bytes]  # module -> payload
    tasks: dict[str, bytes]  # task -> payload, only the tasks this version writes
    modules_manifest: dict[str, dict[str, Any]]
    tasks_manifest: dict[str, dict[str, Any]]  # every task; reused ones carry their key and ``written_in``
    rotations: dict[str, bytes] = field(default_factory=dict)  # module -> payload (a delta version)
    rotations_manifest: dict[str, dict[str, Any]] = field(default_factory=dict)  # module -> bytes, sha256, to, from
    chain: list[dict[str, Any]] = field(default_factory=list)  # the parent's rotation elements still needed
    # Format 4 (``share_entries``): the entries payload parts of the tasks this version writes, the numbers payload
    # (None: the version is written in format 3), the parent's entries elements kept, each task's position in the
    # manifest's entries list, and the reused tasks' checked entries in the parent.
    entries: list[bytes] = field(default_factory=list)
    numbers: bytes | None = None
    inherited: list[dict[str, Any]] = field(default_factory=list)
    positions: dict[str, int] = field(default_factory=dict)
    parents: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def written_bytes(self) -> int:
        """Bytes of the payloads this version writes."""
        return (
            sum(map(len, self.bases.values()))
            + sum(map(len, self.tasks.values()))
            + sum(map(len, self.rotations.values()))
            + sum(map(len, self.entries))
            + len(self.numbers or b"")
        )

    def share_entries(self, parent: shared_entries.Inherited | None = None) -> bool:
        """Make this a format-4 version: entries payload parts for the tasks it writes, a numbers payload for every
        task; ``parent`` (a delta of a format-4 parent) says where its reused tasks' entries are. False (nothing
        changed) when a task's numbers cannot be packed (``shared_entries``)."""
        modules = list(self.modules_manifest)
        numbers = shared_entries.number_rows(self.tasks_manifest, modules)
        if numbers is None:
            return False
        own = {
            t: shared_entries.static_entry(_packed_entry(e, modules))
            for t, e in self.tasks_manifest.items()
            if "written_in" not in e
        }
        kept = [t for t, e in self.tasks_manifest.items() if "written_in" in e]
        parent = parent or shared_entries.Inherited([], {}, {})
        used = sorted({parent.positions[t] for t in kept})
        renumber = {old: new for new, old in enumerate(used)}
        self.numbers = numbers
        self.entries = shared_entries.encode_parts(own)
        self.inherited = [dict(parent.elements[old]) for old in used]
        parts = {t: len(used) + i // shared_entries.ENTRIES_PART for i, t in enumerate(own)}
        # In task order, as the manifest lists them (the numbers' rows and every reader's name order).
        self.positions = {t: parts[t] if t in parts else renumber[parent.positions[t]] for t in self.tasks_manifest}
        self.parents = {t: parent.entries[t] for t in kept}
        return True


def encode_subspace(
    subspace: Subspace,
    reconstruction_error: dict[str, float] | None = None,
    *,
    reuse: dict[str, dict[str, Any]] | None = None,
    rotations: dict[str, Rotation] | None = None,
    chain: list[dict[str, Any]] | None = None,
) -> EncodedSubspace:
    """Validate and serialize; raises ValueError (naming the task/module) before anything is written.

    A delta version: ``reuse`` maps old tasks to their (checked) manifest entries in the parent, whose
    payloads it keeps (``key``, ``bytes``, ``sha256``, ``written_in``); ``rotations`` are the parent-to-this
    basis rotations per module; ``chain`` the parent's rotation elements those entries still need.
    """
    reuse = reuse or {}
    if reuse and rotations is None:
        raise StoreError("a delta version needs the rotations from its parent's bases (module -> (R_A, R_B))")
    encoded = _encode_subspace(subspace, reconstruction_error, set(reuse))
    for tname, old in reuse.items():
        entry = encoded.tasks_manifest[tname]
        entry.update({k: old[k] for k in ("bytes", "sha256", "key", "written_in")})
    if rotations is not None:
        for m, (ra, rb) in rotations.items():
            data = encode_rotation((ra, rb))
            encoded.rotations[m] = data
            encoded.rotations_manifest[m] = {
                "bytes": len(data),
                "sha256": sha256(data),
                "to": [int(ra.shape[0]), int(rb.shape[0])],
                "from": [int(ra.shape[1]), int(rb.shape[1])],
            }
        encoded.chain = [dict(e) for e in chain or []]
    return encoded


def _encode_subspace(
    subspace: Subspace, reconstruction_error: dict[str, float] | None, skip: set[str]
) -> EncodedSubspace:
    # What is written is validated: the bases and the tasks whose payloads this version writes (a delta
    # version's old tasks keep payloads validated when they were written; their shapes were compared).
    written = {t: task for t, task in subspace.tasks.items() if t not in skip}
    Subspace(subspace.modules, written, subspace.policy, subspace.metadata).validate()
    for name in subspace.modules:
        check_module_name(name)
    for tname, task in subspace.tasks.items():
        check_task_name(tname)
        for hname in task.head:
            check_module_name(hname, "head tensor")
    errors = reconstruction_error or {}
    bases, modules_manifest = {}, {}
    for name, basis in subspace.modules.items():
        data = encode_tensors({"U_A": basis.U_A, "U_B": basis.U_B})
        bases[name] = data
        modules_manifest[name] = {
            "in_features": basis.in_features,
            "out_features": basis.out_features,
            "k_A": basis.k_A,
            "k_B": basis.k_B,
            "dtype": str(basis.U_A.dtype).removeprefix("torch."),
            "bytes": len(data),
            "sha256": sha256(data),
        }
    tasks, tasks_manifest = {}, {}
    for tname, task in subspace.tasks.items():
        error = errors.get(tname, task.metadata.get("reconstruction_error"))
        tasks_manifest[tname] = {
            "p": task.widths(),
            "head": list(task.head),
            "reconstruction_error": float(error) if error is not None else None,
            "metadata": task.metadata,
        }
        if tname in skip:
            continue
        tensors: dict[str, Tensor] = {}
        for mname, (ea, eb) in task.E.items():
            tensors[E_A + mname] = ea
            tensors[E_B + mname] = eb
        for hname, value in task.head.items():
            tensors[HEAD + hname] = value
        data = encode_tensors(tensors)
        tasks[tname] = data
        tasks_manifest[tname].update({"bytes": len(data), "sha256": sha256(data)})
    return EncodedSubspace(bases, tasks, modules_manifest, tasks_manifest)


def _matrix(tensors: dict[str, Tensor], name: str) -> Tensor:
    if name not in tensors:
        raise PayloadFormatError(f"lacks tensor {name!r}")
    value = tensors[name]
    if value.ndim != 2 or not value.is_floating_point():
        raise PayloadFormatError(f"holds {name!r} as {value.dtype} of shape {tuple(value.shape)}, not a float matrix")
    return value


def decode_basis(data: bytes) -> ModuleBasis:
    tensors, _ = decode_tensors(data)
    return ModuleBasis(U_A=_matrix(tensors, "U_A"), U_B=_matrix(tensors, "U_B"))


def decode_task(data: bytes, modules: list[str], entry: dict[str, Any]) -> TaskCoefficients:
    """A task payload; ``entry`` is its (checked) manifest entry, which names its head tensors."""
    tensors, _ = decode_tensors(data)
    E = {m: (_matrix(tensors, E_A + m), _matrix(tensors, E_B + m)) for m in modules}
    head = {}
    for h in entry["head"]:
        if HEAD + h not in tensors:
            raise PayloadFormatError(f"lacks head tensor {HEAD + h!r}")
        head[h] = tensors[HEAD + h]
    return TaskCoefficients(E=E, head=head, metadata=json_copy(entry["metadata"]))


def assemble(manifest: dict[str, Any], bases: dict[str, ModuleBasis], tasks: dict[str, TaskCoefficients]) -> Subspace:
    """Build the Subspace in the manifest's module and task order, checking shapes against the manifest.

    No full ``validate()`` (NaN scans): the payloads passed their checksums, so they are the bytes
    that were validated at publish time.
    """
    version = manifest["version"]
    for m, entry in manifest["modules"].items():
        basis = bases[m]
        want = (entry["in_features"], entry["k_A"], entry["out_features"], entry["k_B"])
        if (*basis.U_A.shape, *basis.U_B.shape) != want:
            raise StoreError(f"version {version}, module {m!r}: basis shapes do not match the manifest")
    for t, task in tasks.items():
        p = manifest["tasks"][t]["p"]
        for m, (ea, eb) in task.E.items():
            entry = manifest["modules"][m]
            if tuple(ea.shape) != (entry["k_A"], p[m]) or tuple(eb.shape) != (entry["k_B"], p[m]):
                raise StoreError(f"version {version}, task {t!r}, module {m!r}: coefficient shapes do not match")
    return Subspace(
        modules={m: bases[m] for m in manifest["modules"]},
        tasks={t: tasks[t] for t in manifest["tasks"] if t in tasks},  # manifest order; names compared, not used
        policy=KPolicy.from_dict(manifest["policy"]),
        metadata=json_copy(manifest["subspace_metadata"]),
    )


# -- manifests ------------------------------------------------------------------------------------
def build_manifest(
    keys: Keys,
    version: str,
    subspace: Subspace,
    encoded: EncodedSubspace,
    parent: str | None,
    metadata: dict[str, Any],
    submissions: Sequence[str],
    now: float,
    format_version: int = MANIFEST_FORMAT_VERSION,
) -> dict[str, Any]:
    """The manifest of version ``version`` (``now``: the server's clock); ``decode_manifest`` reads it back.

    ``format_version=1`` writes the layout before delta versions (only for a full version; tests of old stores).
    The manifest returned is the layout readers see; ``encode_manifest`` makes the bytes to store.
    """
    modules = {m: {**e, "key": keys.basis(version, m)} for m, e in encoded.modules_manifest.items()}
    tasks = {}
    for t, e in encoded.tasks_manifest.items():
        entry = {**e} if "written_in" in e else {**e, "key": keys.task(version, t), "written_in": version}
        if format_version == 1:
            if entry.pop("written_in") != version:
                raise StoreError("format 1 cannot hold a delta version: publish it full")
        tasks[t] = entry
    chain = [dict(e) for e in encoded.chain]
    if encoded.rotations_manifest:
        own = {m: {"key": keys.rotation(version, m), **e} for m, e in encoded.rotations_manifest.items()}
        chain.append({"version": version, "parent": parent, "rotations": own})
    total = sum(e["bytes"] for e in modules.values()) + sum(e["bytes"] for e in tasks.values())
    total += sum(r["bytes"] for e in chain for r in e["rotations"].values())
    extra: dict[str, Any] = {}
    if format_version != 1:
        extra = {"rotations": chain, "written_bytes": encoded.written_bytes}
    elif chain:
        raise StoreError("format 1 cannot hold a delta version: publish it full")
    if encoded.numbers is not None and format_version == MANIFEST_FORMAT_VERSION:
        format_version = shared_entries.SHARED_FORMAT_VERSION
        elements = [dict(e) for e in encoded.inherited] + [
            {"version": version, "part": i, "key": keys.entries(version, i), "bytes": len(data), "sha256": sha256(data)}
            for i, data in enumerate(encoded.entries)
        ]
        numbers = {
            "key": keys.numbers(version),
            "bytes": len(encoded.numbers),
            "sha256": sha256(encoded.numbers),
            "fields": list(shared_entries.FIELDS),
            # The rows' task order and the columns' module order, which readers compare.
            "order_sha256": shared_entries.order_sha256(tasks, modules),
        }
        extra |= {"entries": elements, "numbers": numbers}
        total += sum(e["bytes"] for e in elements) + numbers["bytes"]
    return {
        "format": MANIFEST_FORMAT,
        "format_version": format_version,
        "namespace": keys.namespace,
        "version": version,
        "parent": parent,
        "created": now,
        "created_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "policy": subspace.policy.to_dict(),
        "modules": modules,
        "tasks": tasks,
        "submissions": list(submissions),
        "bytes": total,  # what reading every task transfers (payloads of older versions included)
        "subspace_metadata": subspace.metadata,
        "metadata": metadata,
        **extra,
    }


def encode_manifest(manifest: dict[str, Any], positions: dict[str, int] | None = None) -> bytes:
    """The bytes to store of a manifest ``build_manifest`` made (format 3: task entries packed, see above;
    format 4: each task the position of its entries payload, ``EncodedSubspace.positions``)."""
    if manifest["format_version"] < 3:
        return json.dumps(manifest).encode()
    if manifest["format_version"] == shared_entries.SHARED_FORMAT_VERSION:
        if positions is None or positions.keys() != manifest["tasks"].keys():
            raise StoreError("a format-4 manifest needs every task's entries position (EncodedSubspace.positions)")
        return json.dumps({**manifest, "tasks": {name: positions[name] for name in manifest["tasks"]}}).encode()
    modules = list(manifest["modules"])
    tasks = {name: _packed_entry(entry, modules) for name, entry in manifest["tasks"].items()}
    return json.dumps({**manifest, "tasks": tasks}).encode()


def _packed_entry(entry: dict[str, Any], modules: list[str]) -> dict[str, Any]:
    packed = dict(entry)
    p = entry["p"]
    if modules and list(p) == modules:
        values = list(p.values())
        packed["p"] = values[0] if len(set(values)) == 1 else values
    metadata = entry["metadata"]
    names = [key for key, value in metadata.items() if _per_module_numbers(value, modules)]
    if names:
        packed["metadata"] = values_of = dict(metadata)
        for key in names:
            values_of[key] = list(metadata[key].values())
        packed[MODULE_VALUES] = names
    return packed


def _per_module_numbers(value: Any, modules: list[str]) -> bool:
    # Cheapest checks first: most metadata values are not module maps.
    return (
        type(value) is dict and len(value) == len(modules) > 0 and list(value) == modules and _all_real(value.values())
    )


def _all_real(values: Any) -> bool:
    """``all(map(_real, values))``; values that are all floats (``share.merge``'s) are checked without a call each."""
    if set(map(type, values)) <= _FLOAT:
        return all(map(math.isfinite, values))
    return all(map(_real, values))


def decode_manifest(raw: bytes, keys: Keys, version: str) -> dict[str, Any]:
    """The manifest of ``version`` from its stored bytes, every field checked (``CorruptPayloadError`` if not).

    Names are full matches (task names by ``share.subspace.check_task_name``, module and head tensor
    names by ``keys.check_module_name``), every payload key is one this version's layout gives (current
    or legacy form), every payload has its size and sha256, and the manifest says it is ``version`` of
    this namespace.
    Unknown extra fields are ignored.
    """
    return read_manifest(raw, keys, version).full()


def read_manifest(raw: bytes, keys: Keys, version: str) -> CheckedManifest:
    """``raw`` parsed, every field but the task entries checked; ``CheckedManifest`` checks those on first use."""
    return _ManifestReader(keys, version).read(raw)


class CheckedManifest:
    """A parsed manifest whose fields are checked, the task entries each when first asked for.

    ``top`` is the manifest: everything but ``top["tasks"]``'s entries is checked on construction; use an
    entry (or a task name) only after ``task``/``tasks``/``full`` checked it. Checking an entry is what
    ``decode_manifest`` does to it (the same errors), so a pull of one task of a large version does no
    per-task work for the others. Thread-safe; shared by every reader of a process (``manifest_cache``),
    so never modify what it holds.
    """

    def __init__(
        self, reader: _ManifestReader, top: dict[str, Any], origins: set[str], index: dict[str, int] | None = None
    ) -> None:
        self.top = top
        self._reader = reader
        self._origins = origins
        self._checked: set[str] = set()
        self._complete = False
        self._lock = threading.Lock()
        self._index = index  # format 4: task -> the position of its entries payload in top["entries"]
        # Format 4 read from bytes (``_ManifestReader.read``): the entries parts and numbers fetched so far.
        self._sources: _Sources | None = None
        self._names_checked = False

    @classmethod
    def written(
        cls,
        manifest: dict[str, Any],
        keys: Keys,
        version: str,
        parents: dict[str, dict[str, Any]] | None = None,
        positions: dict[str, int] | None = None,
    ) -> CheckedManifest:
        """What checking the stored bytes of ``manifest`` (``build_manifest``'s, current format) gives, for the
        process that built and wrote it: every entry counted as checked, nothing parsed back.

        ``manifest`` is handed over: a task entry's ``p`` and ``head`` (made by ``encode_subspace`` for this
        manifest, used by nothing else) are kept as they are; everything else is copied, the task metadata (the
        caller's ``TaskCoefficients.metadata``) included. ``parents`` (format 4, ``EncodedSubspace.parents``):
        tasks whose entry is their checked entry in the parent (shared, never modified) but for the numbers,
        which are copied from ``manifest``; ``positions`` (format 4): each task's entries position."""
        parents = parents or {}
        tasks = {
            name: shared_entries.renumbered(parents[name], entry)
            if name in parents
            else {**entry, "metadata": json_copy(entry["metadata"])}
            for name, entry in manifest["tasks"].items()
        }
        top = {key: tasks if key == "tasks" else json_copy(value) for key, value in manifest.items()}
        checked = cls(_ManifestReader(keys, version), top, set(), positions)
        checked._checked = set(checked.top["tasks"])
        checked._complete = True
        return checked

    @property
    def version(self) -> str:
        return self.top["version"]

    @property
    def positions(self) -> dict[str, int] | None:
        """Format 4: task -> the position of its entries payload in ``top["entries"]``; else None."""
        return self._index

    def needs(self, names: Sequence[str] | None = None) -> list[tuple[str, str, int]]:
        """Format 4 read from bytes: (key, sha256, size) of the payloads the entries of ``names`` (None: every task)
        are joined from and that ``provide`` has not had yet; else nothing."""
        with self._lock:
            return [] if self._sources is None else self._sources.needs(names)

    def provide(self, payloads: dict[str, bytes | memoryview]) -> None:
        """Payloads ``needs`` named (key -> bytes, size and sha256 checked by the caller), decoded for the entries
        joined from them. ``CorruptPayloadError`` naming the payload if one is malformed."""
        with self._lock:
            if self._sources is not None:
                self._sources.provide(payloads)

    def payload_keys(self) -> list[str]:
        """Every payload key the version reads (bases, rotations, task payloads; format 4: its entries and numbers
        payloads), without fetching anything."""
        top = self.top
        out = [e["key"] for e in top["modules"].values()]
        out += [r["key"] for element in top["rotations"] for r in element["rotations"].values()]
        if self._index is None:
            return out + [e["key"] for e in self.full()["tasks"].values()]
        elements = top["entries"]
        out += [e["key"] for e in elements] + [top["numbers"]["key"]]
        names = self.names()  # a name becomes a key here: checked first (``read`` left it to the entry's check)
        return out + [self._reader.keys.task(elements[self._index[name]]["version"], name) for name in names]

    def names(self) -> list[str]:
        """The task names, checked, without their entries (format 4: nothing fetched; else every entry checked)."""
        if self._index is None:
            return list(self.full()["tasks"])
        if not self._names_checked:
            for name in self._index:
                self._reader._check(("tasks", name), check_task_name, name)
            self._names_checked = True
        return list(self._index)

    def held_bytes(self, raw: bytes) -> int | None:
        """Format 4: about how many bytes of JSON it holds once its entries are read (``manifest_cache``'s unit:
        the manifest, its entries parts, and per task a joined entry, about eight times its row of numbers);
        None for formats 1-3, which hold what ``raw`` says."""
        if self._index is None:
            return None
        top = self.top
        return len(raw) + sum(e["bytes"] for e in top["entries"]) + 8 * top["numbers"]["bytes"]

    def _require_entries(self, names: Sequence[str] | None = None) -> None:
        if self.needs(names):
            raise StoreError(
                f"version {self.version}: a format-4 manifest keeps its task entries in payloads; read it through "
                "SubspaceStore (which fetches them), not decode_manifest"
            )

    def task(self, name: str) -> dict[str, Any]:
        """The checked entry of task ``name`` (``KeyError`` if the manifest has none)."""
        self.tasks([name])
        return self.top["tasks"][name]

    def tasks(self, names: Sequence[str]) -> None:
        """Check the entries of ``names`` (each one the manifest holds; unknown names are left to the caller)."""
        entries = self.top["tasks"]
        self._require_entries([name for name in names if name in entries])
        with self._lock:
            for name in names:
                if name not in self._checked and name in entries:
                    self._check_task(name)

    def full(self) -> dict[str, Any]:
        """The manifest with every task entry checked (what ``decode_manifest`` returns)."""
        self._require_entries()
        if not self._complete:
            with self._lock:
                for name in self.top["tasks"]:
                    if name not in self._checked:
                        self._check_task(name)
                self._complete = True
        return self.top

    def _check_task(self, name: str) -> None:
        """Check one entry (format 4: joined from its sources first, a fault in it blamed on its entries part); the
        caller holds the lock."""
        if self._sources is not None:
            self.top["tasks"][name] = self._sources.entry(name)
        try:
            self._reader.task(self.top, name, self.top["tasks"][name], self._origins)
        except _FieldError as err:
            if self._sources is None:
                raise
            raise self._sources.blame(name, err) from None
        self._checked.add(name)


def json_copy(value: Any) -> Any:
    """A deep copy of a JSON tree (dicts, lists, scalars): what leaves a shared ``CheckedManifest``."""
    if type(value) is dict:
        return {k: json_copy(v) if type(v) in _CONTAINERS else v for k, v in value.items()}
    if type(value) is list:
        return [json_copy(v) if type(v) in _CONTAINERS else v for v in value]
    return value


class _ManifestReader:
    def __init__(self, keys: Keys, version: str) -> None:
        self.keys = keys
        self.version = version

    def read(self, raw: bytes) -> CheckedManifest:
        try:
            top = json.loads(raw)
        except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            self._fail((), f"is not valid JSON ({' '.join(str(err).split())[:120]})")
        top = self._object(top, ())
        fmt, fmt_version = self._field(top, "format"), self._field(top, "format_version")
        if fmt != MANIFEST_FORMAT or fmt_version not in READABLE_FORMAT_VERSIONS:
            self._fail(
                ("format",),
                f"is {str(fmt)[:40]!r} version {str(fmt_version)[:20]!r}; this share-cl reads "
                f"{MANIFEST_FORMAT!r} versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))} (a newer share-cl "
                "wrote it? upgrade share-cl)",
            )
        if type(top["format_version"]) is not int:
            self._fail(("format_version",), "must be an integer")
        for key, want in (("namespace", self.keys.namespace), ("version", self.version)):
            if self._field(top, key) != want:
                self._fail((key,), f"is {str(top[key])[:80]!r}, expected {want!r}")
        parent = self._field(top, "parent")
        if parent is not None:
            self._check(("parent",), check_version, parent, "parent")
        created = self._field(top, "created")
        if not _real(created):
            self._fail(("created",), f"must be a number of seconds, got {str(created)[:40]}")
        self._typed(top, "created_iso", str, ())
        try:
            KPolicy.from_dict(self._field(top, "policy"))
        except ShareClError as err:
            self._fail(("policy",), f"is not valid ({err})")
        modules = self._object(self._field(top, "modules"), ("modules",))
        for name, entry in modules.items():
            self._check(("modules", name), check_module_name, name)
            self._payload(name, entry, ("modules", name), self.keys.basis_keys(self.version, name))
            for key in ("in_features", "out_features", "k_A", "k_B"):
                self._count(entry, key, ("modules", name))
            if self._field(entry, "dtype", ("modules", name)) not in _FLOAT_DTYPES:
                self._fail(("modules", name, "dtype"), f"must be one of {', '.join(_FLOAT_DTYPES)}")
        delta = top["format_version"] >= 2
        origins = self._chain(top, modules, parent) if delta else set()
        if not delta:
            top["rotations"] = []
        index = None
        if top["format_version"] >= shared_entries.SHARED_FORMAT_VERSION:
            index = self._shared(top, modules, origins)
        else:
            self._object(self._field(top, "tasks"), ("tasks",))
        submissions = self._typed(top, "submissions", list, ())
        if not all(isinstance(sid, str) for sid in submissions):
            self._fail(("submissions",), "must be a list of submission ids (strings)")
        self._count(top, "bytes", ())
        self._typed(top, "subspace_metadata", dict, ())
        self._typed(top, "metadata", dict, ())
        checked = CheckedManifest(self, top, origins, index)
        if index is not None:
            checked._sources = _Sources(self, top, index)
            top["tasks"] = dict.fromkeys(index)  # the names; each entry joined from its payloads when first checked
        return checked

    def _shared(self, top: dict[str, Any], modules: dict[str, Any], origins: set[str]) -> dict[str, int]:
        """Check a format-4 manifest's ``entries``, ``numbers`` and task map; returns task -> entries position."""
        elements = self._typed(top, "entries", list, ())
        seen: set[tuple[str, int]] = set()
        for i, element in enumerate(elements):
            where = ("entries", str(i))
            element = self._object(element, where)
            written = self._field(element, "version", where)
            self._check((*where, "version"), check_version, written, "an entries payload's version")
            if written != self.version and written not in origins:
                self._fail(
                    (*where, "version"),
                    f"is {written!r}, which is neither this version nor the start of one of its rotation chains",
                )
            part = self._count(element, "part", where)
            if (written, part) in seen:
                self._fail(where, f"names part {part} of {written} a second time")
            seen.add((written, part))
            self._payload(f"entries {part} of {written}", element, where, (self.keys.entries(written, part),))
        numbers = self._object(self._field(top, "numbers"), ("numbers",))
        self._payload("numbers", numbers, ("numbers",), (self.keys.numbers(self.version),))
        if self._field(numbers, "fields", ("numbers",)) != shared_entries.FIELDS:
            self._fail(("numbers", "fields"), f"must be {shared_entries.FIELDS}")
        tasks = self._object(self._field(top, "tasks"), ("tasks",))
        for name, position in tasks.items():  # names are checked with their entries (or before they make a key)
            if type(position) is not int or not 0 <= position < len(elements):
                self._fail(("tasks", name), f"must be the position of one of the {len(elements)} entries payloads")
        # Rows are matched to tasks, and module_drift columns to modules, by the order of the task and module maps'
        # keys: before any row is used, both orders must be the ones written. Format-4 manifests written before
        # order_sha256 was recorded lack it: read unverified.
        if "order_sha256" in numbers and numbers["order_sha256"] != shared_entries.order_sha256(tasks, modules):
            self._fail(
                ("tasks",),
                "or ['modules'] no longer matches the numbers payload: their names (in their order) do not have the "
                "sha256 that ['numbers']['order_sha256'] records, so a map was reordered or edited (e.g. re-saved "
                "with sorted keys) after the version was written; restore its order or republish the version",
            )
        want = len(tasks) * shared_entries.columns(len(modules)) * 8
        if numbers["bytes"] != want:
            self._fail(
                ("numbers", "bytes"),
                f"is {numbers['bytes']}, but {len(tasks)} tasks of {shared_entries.columns(len(modules))} numbers "
                f"take {want}",
            )
        return dict(tasks)

    def task(self, top: dict[str, Any], name: str, entry: Any, origins: set[str]) -> None:
        """Check one task entry of a manifest ``read`` checked (format 1: fills in ``written_in``)."""
        where = ("tasks", name)
        self._check(where, check_task_name, name)
        written = self.version
        delta = top["format_version"] >= 2
        if delta:
            written = self._field(self._object(entry, where), "written_in", where)
            self._check((*where, "written_in"), check_version, written, "written_in")
            if written != self.version and written not in origins:
                self._fail(
                    (*where, "written_in"),
                    f"is {written!r}, which is neither this version nor the start of one of its rotation chains",
                )
        self._payload(name, entry, where, self.keys.task_keys(written, name))
        modules = top["modules"]
        packed = top["format_version"] >= 3
        p = self._field(entry, "p", where)
        if not (packed and isinstance(p, int | list)):
            p = self._object(p, (*where, "p"))
            if set(p) != set(modules):
                self._fail((*where, "p"), f"must give p for exactly the modules {sorted(modules)}")
            for module in p:
                self._count(p, module, (*where, "p"))
        elif type(p) is int:
            self._count(entry, "p", where)
        else:
            self._module_list(p, modules, (*where, "p"), "integers >= 0", lambda v: type(v) is int and v >= 0)
        head = self._typed(entry, "head", list, where)
        if len(set(map(str, head))) != len(head):
            self._fail((*where, "head"), "names a head tensor twice")
        for hname in head:
            self._check((*where, "head"), check_module_name, hname, "head tensor")
        error = self._field(entry, "reconstruction_error", where)
        if error is not None and (type(error) is bool or not isinstance(error, int | float)):
            self._fail((*where, "reconstruction_error"), f"must be a number or null, got {str(error)[:40]}")
        metadata = self._typed(entry, "metadata", dict, where)
        names = self._module_values(entry, metadata, modules, where) if packed else []
        # Last: a failed check leaves the entry as stored.
        if not delta:
            entry["written_in"] = self.version
        if packed:
            if not isinstance(p, dict):
                entry["p"] = dict(zip(modules, p if isinstance(p, list) else [p] * len(modules), strict=True))
            for key in names:
                metadata[key] = dict(zip(modules, metadata[key], strict=True))
            entry.pop(MODULE_VALUES, None)

    def _module_values(
        self, entry: dict[str, Any], metadata: dict[str, Any], modules: dict[str, Any], where: tuple[str, ...]
    ) -> list[str]:
        """Check a format 3 entry's ``module_values`` and the metadata lists it names; returns those names."""
        names = entry.get(MODULE_VALUES, [])
        if type(names) is not list or not all(isinstance(key, str) for key in names) or len(set(names)) != len(names):
            self._fail((*where, MODULE_VALUES), "must be a list of distinct metadata keys")
        for key in names:
            at = (*where, "metadata", key)
            self._module_list(self._field(metadata, key, (*where, "metadata")), modules, at, "finite numbers", _real)
        return names

    def _module_list(self, values: Any, modules: dict[str, Any], where: tuple[str, ...], kind: str, ok: Any) -> None:
        """A format 3 per-module list: one value per module of the manifest, each ``ok``."""
        if type(values) is not list or len(values) != len(modules):
            self._fail(where, f"must be a list of {len(modules)} values, one per module (got {str(values)[:40]})")
        for i, value in enumerate(values):
            if not ok(value):
                self._fail(where, f"must hold {kind}; value {i} (module {list(modules)[i]!r}) is {str(value)[:40]}")

    def _chain(self, top: dict[str, Any], modules: dict[str, Any], parent: str | None) -> set[str]:
        """Check ``rotations`` (format 2); returns the versions a task payload may be written in besides this one."""
        chain = self._typed(top, "rotations", list, ())
        if len(chain) > MAX_CHAIN:
            self._fail(("rotations",), f"is a chain of {len(chain)} versions; a reader takes at most {MAX_CHAIN}")
        origins: set[str] = set()
        number = version_number(self.version) or 0
        for i, element in enumerate(chain):
            where = ("rotations", str(i))
            element = self._object(element, where)
            version, before = self._field(element, "version", where), self._field(element, "parent", where)
            self._check((*where, "version"), check_version, version, "a chain's version")
            self._check((*where, "parent"), check_version, before, "a chain's parent")
            if not (version_number(before) or 0) < (version_number(version) or 0) <= number:
                self._fail(where, f"goes from {before} to {version}: a chain runs forward and ends at {self.version}")
            if i and before != chain[i - 1]["version"]:
                self._fail(
                    (*where, "parent"), f"is {before!r}, but the element before it is {chain[i - 1]['version']!r}"
                )
            if i == len(chain) - 1 and (version != self.version or before != parent):
                self._fail(where, f"must end with this version {self.version} (parent {parent})")
            origins.add(before)
            rotations = self._object(self._field(element, "rotations", where), (*where, "rotations"))
            if set(rotations) != set(modules):
                self._fail((*where, "rotations"), f"must hold a rotation for exactly the modules {sorted(modules)}")
            for m, entry in rotations.items():
                at = (*where, "rotations", m)
                self._payload(m, entry, at, (self.keys.rotation(version, m),))
                to = self._pair(entry, "to", at)
                self._pair(entry, "from", at)
                if i + 1 < len(chain):
                    following = chain[i + 1]
                    nxt = following.get("rotations") if isinstance(following, dict) else None
                    nxt = nxt.get(m) if isinstance(nxt, dict) else None
                    want = nxt.get("from") if isinstance(nxt, dict) else None
                else:
                    want = [modules[m]["k_A"], modules[m]["k_B"]]
                if to != want:
                    self._fail((*at, "to"), f"is {to}, but the next basis has k {str(want)[:40]}")
        return origins

    def _pair(self, entry: dict[str, Any], key: str, where: tuple[str, ...]) -> list[int]:
        value = self._typed(entry, key, list, where)
        if len(value) != 2 or not all(type(v) is int and 0 <= v < (1 << 24) for v in value):
            self._fail((*where, key), f"must be [k_A, k_B], two integers >= 0, got {str(value)[:40]}")
        return value

    def _payload(self, name: str, entry: Any, where: tuple[str, ...], keys: tuple[str, ...]) -> None:
        """``keys``: where this version may keep the payload (current form first, then the legacy one)."""
        entry = self._object(entry, where)
        if self._field(entry, "key", where) not in keys:
            self._fail(
                (*where, "key"), f"is {str(entry['key'])[:120]!r}, but this version keeps {name!r} at {keys[0]!r}"
            )
        self._count(entry, "bytes", where)
        digest = self._field(entry, "sha256", where)
        if not isinstance(digest, str) or _SHA256.fullmatch(digest) is None:
            self._fail((*where, "sha256"), f"must be a sha256 hex digest, got {str(digest)[:80]!r}")

    def _check(self, where: tuple[str, ...], check: Any, *args: Any) -> None:
        try:
            check(*args)
        except ShareClError as err:
            self._fail(where, f"is not valid: {err}")

    def _field(self, mapping: dict[str, Any], key: str, where: tuple[str, ...] = ()) -> Any:
        if key not in mapping:
            self._fail(
                (*where, key), "is missing" + (": every payload must have its checksum" if key == "sha256" else "")
            )
        return mapping[key]

    def _object(self, value: Any, where: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            self._fail(where, f"must be a JSON object, got {type(value).__name__}")
        return value

    def _typed(self, mapping: dict[str, Any], key: str, kind: type, where: tuple[str, ...]) -> Any:
        value = self._field(mapping, key, where)
        if not isinstance(value, kind):
            self._fail(
                (*where, key),
                f"must be a JSON {'object' if kind is dict else kind.__name__}, got {type(value).__name__}",
            )
        return value

    def _count(self, mapping: dict[str, Any], key: str, where: tuple[str, ...]) -> int:
        value = self._field(mapping, key, where)
        if type(value) is not int or value < 0:
            self._fail((*where, key), f"must be an integer >= 0, got {str(value)[:40]}")
        return value

    def _fail(self, where: tuple[str, ...], problem: str) -> NoReturn:
        detail = f"is not a valid manifest: {_path(where) if where else 'the manifest'} {problem}"
        raise _FieldError(self.version, self.keys.manifest(self.version), detail, where, problem)


class _FieldError(CorruptPayloadError):
    """A manifest field at fault; its path (``where``) and ``problem`` are kept so that a field of a format-4 entry
    can be blamed on the entries part it was joined from (``_Sources.blame``)."""

    def __init__(self, version: str, key: str, detail: str, where: tuple[str, ...], problem: str) -> None:
        super().__init__(version, key, detail)
        self.where = where
        self.problem = problem


def _path(where: tuple[str, ...]) -> str:
    return "".join(f"[{str(part)[:80]!r}]" for part in where)


def _real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class _Sources:
    """A format-4 manifest read from bytes: its entries payload parts and numbers as fetched so far (``needs``,
    ``provide``), and each task's format-3 entry joined from them (``entry``)."""

    def __init__(self, reader: _ManifestReader, top: dict[str, Any], index: dict[str, int]) -> None:
        self.reader = reader
        self.elements: list[dict[str, Any]] = top["entries"]
        self.numbers_item: dict[str, Any] = top["numbers"]
        self.index = index
        self.modules = list(top["modules"])
        self.width = shared_entries.columns(len(self.modules))
        self.blocks: list[dict[str, Any] | None] = [None] * len(self.elements)
        self.numbers: Any = None
        self.rows: dict[str, int] | None = None

    def needs(self, names: Sequence[str] | None) -> list[tuple[str, str, int]]:
        if self.numbers is not None and None not in self.blocks:  # everything provided: no O(T) pass per read
            return []
        wanted = set(self.index.values()) if names is None else {self.index[n] for n in names if n in self.index}
        out = [self.elements[i] for i in sorted(wanted) if self.blocks[i] is None]
        if self.numbers is None and wanted:
            out.append(self.numbers_item)
        return [(e["key"], e["sha256"], e["bytes"]) for e in out]

    def provide(self, payloads: dict[str, bytes | memoryview]) -> None:
        version = self.reader.version
        for i, element in enumerate(self.elements):
            if self.blocks[i] is None and element["key"] in payloads:
                try:
                    self.blocks[i] = shared_entries.decode_entries(payloads[element["key"]])
                except PayloadFormatError as err:
                    raise CorruptPayloadError(version, element["key"], f"cannot be decoded ({err})") from None
        key = self.numbers_item["key"]
        if self.numbers is None and key in payloads:
            try:
                self.numbers = shared_entries.decode_numbers(payloads[key], len(self.index), len(self.modules))
            except PayloadFormatError as err:
                raise CorruptPayloadError(version, key, f"cannot be decoded ({err})") from None

    def entry(self, name: str) -> dict[str, Any]:
        position = self.index[name]
        if self.rows is None:
            self.rows = {task: i for i, task in enumerate(self.index)}
        row = self.rows[name]
        element = self.elements[position]
        written = element["version"]
        block = self.blocks[position]
        assert block is not None and self.numbers is not None  # needs() -> provide() came first
        static = block.get(name)
        version = self.reader.version
        if static is None:
            raise CorruptPayloadError(version, element["key"], f"has no entry for task {name!r}")
        values = self.numbers[row * self.width : (row + 1) * self.width].tolist()
        if any(map(math.isinf, values)):
            raise CorruptPayloadError(version, self.numbers_item["key"], f"holds an infinite number for task {name!r}")
        try:
            return shared_entries.join(static, written, self.reader.keys.task(written, name), values, self.modules)
        except ValueError as err:
            raise CorruptPayloadError(version, element["key"], f"task {name!r}: its entry {err}") from None

    def blame(self, name: str, err: _FieldError) -> CorruptPayloadError:
        """A fault the manifest reader found in task ``name``'s joined entry, as an error of the entries part it
        came from: a field below ``['tasks'][name]`` is the part's (those the layout and the numbers give always
        pass); the name itself is the manifest's (``err`` unchanged)."""
        if len(err.where) <= 2:
            return err
        key = self.elements[self.index[name]]["key"]
        return CorruptPayloadError(
            self.reader.version, key, f"task {name!r}: its entry{_path(err.where[2:])} {err.problem}"
        )
