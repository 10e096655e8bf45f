"""A ``share.Subspace`` <-> payloads (one per module basis, one per task) and their manifest entries.

Per module, one payload holds ``U_A`` and ``U_B``. Per task, one payload holds every module's
``E_A``/``E_B`` and the task's head tensors, so a deployment can pull one task without the others.
Pure functions: no Redis here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from share import KPolicy, ModuleBasis, Subspace, TaskCoefficients

from .errors import StoreError
from .payloads import decode_tensors, encode_tensors, sha256

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


def decode_basis(data: bytes) -> ModuleBasis:
    tensors, _ = decode_tensors(data)
    return ModuleBasis(U_A=tensors["U_A"], U_B=tensors["U_B"])


def decode_task(data: bytes, modules: list[str], entry: dict[str, Any]) -> TaskCoefficients:
    tensors, _ = decode_tensors(data)
    E = {m: (tensors[E_A + m], tensors[E_B + m]) for m in modules}
    head = {h: tensors[HEAD + h] for h in entry["head"]}
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
