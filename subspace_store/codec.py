"""A ``share.Subspace`` <-> payloads (one per module basis, one per task), and a version's manifest.

Per module, one payload holds ``U_A`` and ``U_B``. Per task, one payload holds every module's
``E_A``/``E_B`` and the task's head tensors, so a deployment can pull one task without the others.
The manifest (JSON) lists them with their keys, sizes and sha256; ``decode_manifest`` checks every
field of one read back from Redis (names full-matched, keys the version's own, a checksum for every
payload) before anything uses it. Pure functions: no Redis here.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from torch import Tensor

from share import KPolicy, ModuleBasis, Subspace, TaskCoefficients
from share.errors import ShareClError
from share.subspace import check_task_name

from .errors import CorruptPayloadError, StoreError
from .keys import Keys, check_module_name, check_version
from .payloads import PayloadFormatError, decode_tensors, encode_tensors, sha256

MANIFEST_FORMAT = "share-cl-store-version"
MANIFEST_FORMAT_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
E_A, E_B, HEAD = "E_A:", "E_B:", "head:"


@dataclass
class EncodedSubspace:
    """Serialized payloads plus the manifest entries describing them (keys are filled in by the store)."""

    bases: dict[str, bytes]  # module -> payload
    tasks: dict[str, bytes]  # task -> payload
    modules_manifest: dict[str, dict[str, Any]]
    tasks_manifest: dict[str, dict[str, Any]]


def encode_subspace(subspace: Subspace, reconstruction_error: dict[str, float] | None = None) -> EncodedSubspace:
    """Validate and serialize; raises ValueError (naming the task/module) before anything is written."""
    subspace.validate()
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
        tensors: dict[str, Tensor] = {}
        for mname, (ea, eb) in task.E.items():
            tensors[E_A + mname] = ea
            tensors[E_B + mname] = eb
        for hname, value in task.head.items():
            tensors[HEAD + hname] = value
        data = encode_tensors(tensors)
        tasks[tname] = data
        error = errors.get(tname, task.metadata.get("reconstruction_error"))
        tasks_manifest[tname] = {
            "p": {m: int(ea.shape[1]) for m, (ea, _) in task.E.items()},
            "head": list(task.head),
            "reconstruction_error": float(error) if error is not None else None,
            "metadata": task.metadata,
            "bytes": len(data),
            "sha256": sha256(data),
        }
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
    return TaskCoefficients(E=E, head=head, metadata=dict(entry["metadata"]))


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
        tasks={t: tasks[t] for t in manifest["tasks"] if t in tasks},
        policy=KPolicy.from_dict(manifest["policy"]),
        metadata=dict(manifest["subspace_metadata"]),
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
) -> dict[str, Any]:
    """The manifest of version ``version`` (``now``: the server's clock); ``decode_manifest`` reads it back."""
    modules = {m: {**e, "key": keys.basis(version, m)} for m, e in encoded.modules_manifest.items()}
    tasks = {t: {**e, "key": keys.task(version, t)} for t, e in encoded.tasks_manifest.items()}
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_FORMAT_VERSION,
        "namespace": keys.namespace,
        "version": version,
        "parent": parent,
        "created": now,
        "created_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "policy": subspace.policy.to_dict(),
        "modules": modules,
        "tasks": tasks,
        "submissions": list(submissions),
        "bytes": sum(len(d) for d in encoded.bases.values()) + sum(len(d) for d in encoded.tasks.values()),
        "subspace_metadata": subspace.metadata,
        "metadata": metadata,
    }


def decode_manifest(raw: bytes, keys: Keys, version: str) -> dict[str, Any]:
    """The manifest of ``version`` from its stored bytes, every field checked (``CorruptPayloadError`` if not).

    Names are full matches (task names by ``share.subspace.check_task_name``, module and head tensor
    names by ``keys.check_module_name``), every payload key is one this version's layout gives (current
    or legacy form), every payload has its size and sha256, and the manifest says it is ``version`` of
    this namespace.
    Unknown extra fields are ignored.
    """
    return _ManifestReader(keys, version).read(raw)


class _ManifestReader:
    def __init__(self, keys: Keys, version: str) -> None:
        self.keys = keys
        self.version = version

    def read(self, raw: bytes) -> dict[str, Any]:
        try:
            top = json.loads(raw)
        except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            self._fail((), f"is not valid JSON ({' '.join(str(err).split())[:120]})")
        top = self._object(top, ())
        fmt, fmt_version = self._field(top, "format"), self._field(top, "format_version")
        if fmt != MANIFEST_FORMAT or fmt_version != MANIFEST_FORMAT_VERSION:
            self._fail(
                ("format",),
                f"is {str(fmt)[:40]!r} version {str(fmt_version)[:20]!r}; this share-cl reads "
                f"{MANIFEST_FORMAT!r} version {MANIFEST_FORMAT_VERSION}",
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
        for name, entry in self._object(self._field(top, "tasks"), ("tasks",)).items():
            where = ("tasks", name)
            self._check(where, check_task_name, name)
            self._payload(name, entry, where, self.keys.task_keys(self.version, name))
            p = self._object(self._field(entry, "p", where), (*where, "p"))
            if set(p) != set(modules):
                self._fail((*where, "p"), f"must give p for exactly the modules {sorted(modules)}")
            for module in p:
                self._count(p, module, (*where, "p"))
            head = self._typed(entry, "head", list, where)
            if len(set(map(str, head))) != len(head):
                self._fail((*where, "head"), "names a head tensor twice")
            for hname in head:
                self._check((*where, "head"), check_module_name, hname, "head tensor")
            error = self._field(entry, "reconstruction_error", where)
            if error is not None and (type(error) is bool or not isinstance(error, int | float)):
                self._fail((*where, "reconstruction_error"), f"must be a number or null, got {str(error)[:40]}")
            self._typed(entry, "metadata", dict, where)
        submissions = self._typed(top, "submissions", list, ())
        if not all(isinstance(sid, str) for sid in submissions):
            self._fail(("submissions",), "must be a list of submission ids (strings)")
        self._count(top, "bytes", ())
        self._typed(top, "subspace_metadata", dict, ())
        self._typed(top, "metadata", dict, ())
        return top

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
        path = "".join(f"[{str(part)[:80]!r}]" for part in where) if where else "the manifest"
        detail = f"is not a valid manifest: {path} {problem}"
        raise CorruptPayloadError(self.version, self.keys.manifest(self.version), detail)


def _real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
