"""The Share subspace state: per module two orthonormal bases, per task small coefficients.

For a module with frozen weight ``W0`` (``n x d``) the subspace holds ``U_A`` (``d x k_A``) and
``U_B`` (``n x k_B``). Task ``t`` holds ``E_A`` (``k_A x p``) and ``E_B`` (``k_B x p``); its update is
``dW_t = U_B E_B (U_A E_A).T``. Scalings are absorbed into the coefficients (see ``gauge``), so the
update needs no ``lora_alpha``. A task may also carry its own head (e.g. a classifier's weights).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import ItemsView, Iterator, Mapping, MutableMapping, ValuesView
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from . import cyclic_gc
from .config import KPolicy
from .errors import ShareClError
from .folders import MalformedFileError, MissingFileError, describe, read_json, recover_folder, write_folder

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BASES_FILE = "bases.safetensors"
TASKS_DIR = "tasks"
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")  # used with fullmatch: no trailing newline


class UnknownTaskError(ShareClError, KeyError):
    """The subspace (or the folder, or the model) holds no task of that name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def check_task_name(name: str) -> str:
    """Return ``name`` if it is a valid task name (it becomes a file and key name); raise otherwise."""
    if not isinstance(name, str) or _TASK_NAME.fullmatch(name) is None:
        raise ShareClError(
            f"invalid task name {name!r}: use 1-128 letters, digits, '_', '.', '-' starting with a "
            "letter or digit (it becomes a file and key name)"
        )
    return name


@dataclass
class ModuleBasis:
    """Orthonormal bases of one module: ``U_A`` spans the input side, ``U_B`` the output side."""

    U_A: Tensor
    U_B: Tensor
    # share.merge's running Gram of the tasks' coefficients per side (float64, for the next merge); never
    # saved or compared, and checked against the subspace's tasks before use (recomputed when absent).
    gram_cache: Any = field(default=None, compare=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (Ray) without the merge's cache: it is rebuilt where needed, never shipped."""
        return {**self.__dict__, "gram_cache": None}

    @property
    def in_features(self) -> int:
        return self.U_A.shape[0]

    @property
    def out_features(self) -> int:
        return self.U_B.shape[0]

    @property
    def k_A(self) -> int:
        return self.U_A.shape[1]

    @property
    def k_B(self) -> int:
        return self.U_B.shape[1]


class TaskStacks(dict[str, tuple[Tensor, Tensor]]):
    """Per module ``(S_A, S_B)``, ``tasks x k x p`` each: the coefficients of many tasks, one row each.

    Rows are read by indexing until about a quarter of the tasks' worth of rows has been read; from then on
    every row's views are made at once (one ``unbind`` per module and side, the cyclic collector paused) and
    kept, so a pass over every task costs far less than a view per row and read, and a few reads cost
    nothing extra. The views are not pickled.
    """

    def pair(self, module: str, row: int) -> tuple[Tensor, Tensor]:
        """Row ``row`` of ``module``'s stacks: ``(E_A, E_B)``, views."""
        views = self._views_if_many_read()
        if views is not None:
            A, B = views[module]
            return A[row], B[row]
        S_A, S_B = self[module]
        return S_A[row], S_B[row]

    def pairs(self, row: int) -> dict[str, tuple[Tensor, Tensor]]:
        """Row ``row`` of every module's stacks, in module order."""
        views = self._views_if_many_read()
        if views is not None:
            return {m: (A[row], B[row]) for m, (A, B) in views.items()}
        return {m: (S_A[row], S_B[row]) for m, (S_A, S_B) in self.items()}

    def widths(self) -> dict[str, int]:
        """Module -> ``p`` (every row's), worked out once."""
        widths = self.__dict__.get("_widths")
        if widths is None:
            widths = self.__dict__["_widths"] = {m: int(S_A.shape[2]) for m, (S_A, _) in self.items()}
        return dict(widths)

    def views(self) -> dict[str, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]:
        """Module -> every row's views per side, made now if they were not yet."""
        views = self.__dict__.get("_row_views")
        if views is None:
            with cyclic_gc.paused():  # thousands of new tensors, no cycles
                views = {m: (S_A.unbind(0), S_B.unbind(0)) for m, (S_A, S_B) in self.items()}
            self.__dict__["_row_views"] = views
        return views

    def _views_if_many_read(self) -> dict[str, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]] | None:
        state = self.__dict__
        if "_row_views" in state:
            return state["_row_views"]
        reads = state["_reads"] = state.get("_reads", 0) + 1
        first = next(iter(self.values()), None)
        return self.views() if first is not None and 4 * reads > first[0].shape[0] else None

    def __getstate__(self) -> dict[str, Any]:
        return {}


class StackedCoefficients(MutableMapping[str, tuple[Tensor, Tensor]]):
    """One task's coefficients as row ``row`` of per-module stacks shared by many tasks (what ``merge`` gives).

    ``stacks`` maps each module to ``(S_A, S_B)``, ``tasks x k x p`` each; ``self[m]`` is ``(S_A[row], S_B[row])``
    (views: no copy). A merge of thousands of tasks builds one of these per task instead of two tensors per
    task and module, and the next merge reads the stacks whole (``share.merge``). Setting or deleting a module
    makes this an ordinary mapping of its own (the stacks are let go), so a task's coefficients are never tied
    to the stacks after an edit.
    """

    __slots__ = ("_own", "row", "stacks")

    def __init__(self, stacks: TaskStacks, row: int) -> None:
        self.stacks: TaskStacks | None = stacks
        self.row = row
        self._own: dict[str, tuple[Tensor, Tensor]] | None = None

    def __getitem__(self, module: str) -> tuple[Tensor, Tensor]:
        if self.stacks is None:
            assert self._own is not None
            return self._own[module]
        return self.stacks.pair(module, self.row)

    def items(self) -> ItemsView[str, tuple[Tensor, Tensor]]:  # type: ignore[override]
        return self._pairs().items()

    def values(self) -> ValuesView[tuple[Tensor, Tensor]]:  # type: ignore[override]
        return self._pairs().values()

    def _pairs(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Every module's pair at once (what ``items`` and ``values`` iterate; one lookup per module)."""
        if self.stacks is None:
            assert self._own is not None
            return self._own
        return self.stacks.pairs(self.row)

    def __setitem__(self, module: str, pair: tuple[Tensor, Tensor]) -> None:
        self._detach()[module] = pair

    def __delitem__(self, module: str) -> None:
        del self._detach()[module]

    def __iter__(self) -> Iterator[str]:
        return iter(self.stacks if self.stacks is not None else self._own or {})

    def __len__(self) -> int:
        return len(self.stacks if self.stacks is not None else self._own or {})

    def widths(self) -> dict[str, int]:
        """Module -> ``p``, without making the views."""
        return _widths(self._own or {}) if self.stacks is None else self.stacks.widths()

    def _detach(self) -> dict[str, tuple[Tensor, Tensor]]:
        if self.stacks is not None:
            self._own = dict(self._pairs())
            self.stacks = None
        assert self._own is not None
        return self._own

    def __getstate__(self) -> dict[str, Any]:
        return {"stacks": self.stacks, "row": self.row, "_own": self._own}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        return f"StackedCoefficients(modules={list(self)}, row={self.row})"


@dataclass
class TaskCoefficients:
    """One task: coefficient pair per module, its head tensors, and JSON-able metadata."""

    # module -> (E_A: k_A x p, E_B: k_B x p): a dict, or a StackedCoefficients row of stacks a merge left
    E: MutableMapping[str, tuple[Tensor, Tensor]]
    head: dict[str, Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def widths(self) -> dict[str, int]:
        """Module -> ``p`` (the columns of its ``E_A`` and ``E_B``)."""
        return self.E.widths() if isinstance(self.E, StackedCoefficients) else _widths(self.E)


def _widths(E: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, int]:
    """Module -> ``p`` of plain coefficient pairs."""
    return {m: int(E_A.shape[1]) for m, (E_A, _) in E.items()}


@dataclass
class Subspace:
    """Bases per module plus coefficients per task. ``modules`` keeps insertion order."""

    modules: dict[str, ModuleBasis]
    tasks: dict[str, TaskCoefficients] = field(default_factory=dict)
    policy: KPolicy = field(default_factory=KPolicy)
    metadata: dict[str, Any] = field(default_factory=dict)

    # -- derived views -------------------------------------------------------------------------
    def delta_weight(self, task: str, module: str) -> Tensor:
        """``dW`` (``n x d``) of ``task`` at ``module``; materializes a full matrix, for tests/export."""
        basis = self.modules[module]
        E_A, E_B = self.task(task).E[module]
        return (basis.U_B @ E_B) @ (basis.U_A @ E_A).T

    def factors(self, task: str, module: str) -> tuple[Tensor, Tensor]:
        """PEFT-style ``(B, A)`` of ``task`` at ``module`` with scaling 1: ``B`` is ``n x p``, ``A`` ``p x d``."""
        basis = self.modules[module]
        E_A, E_B = self.task(task).E[module]
        return basis.U_B @ E_B, (basis.U_A @ E_A).T

    def task(self, name: str) -> TaskCoefficients:
        try:
            return self.tasks[name]
        except KeyError:
            known = ", ".join(self.tasks) or "none"
            raise UnknownTaskError(f"unknown task {name!r}; this subspace holds: {known}") from None

    def k(self) -> dict[str, tuple[int, int]]:
        return {name: (b.k_A, b.k_B) for name, b in self.modules.items()}

    def num_parameters(self) -> dict[str, int]:
        """Stored parameter counts: shared bases, all coefficients, all heads."""
        bases = sum(b.U_A.numel() + b.U_B.numel() for b in self.modules.values())
        coeffs = sum(a.numel() + b.numel() for t in self.tasks.values() for a, b in t.E.values())
        heads = sum(v.numel() for t in self.tasks.values() for v in t.head.values())
        return {"bases": bases, "coefficients": coeffs, "heads": heads, "total": bases + coeffs + heads}

    def equivalent_lora_parameters(self) -> int:
        """Parameters of the separate LoRA adapters (rank ``p`` each) this subspace replaces, heads included."""
        total = 0
        for t in self.tasks.values():
            for module, (E_A, _) in t.E.items():
                basis = self.modules[module]
                total += E_A.shape[1] * (basis.in_features + basis.out_features)
            total += sum(v.numel() for v in t.head.values())
        return total

    def validate(self) -> None:
        """Check internal consistency; raise ShareClError naming the task/module at fault.

        Shapes are checked per module and task; finiteness in one batched pass over every basis, coefficient
        and head tensor (``_all_finite``), the culprit searched for only when that pass finds NaN or Inf.
        """
        for name, basis in self.modules.items():
            for side, U in (("U_A", basis.U_A), ("U_B", basis.U_B)):
                if U.ndim != 2:
                    raise ShareClError(f"module {name!r}: {side} must be 2-D, got shape {tuple(U.shape)}")
        ks = {name: (basis.k_A, basis.k_B) for name, basis in self.modules.items()}
        for tname, t in self.tasks.items():
            check_task_name(tname)
            if t.E.keys() != self.modules.keys():
                missing = set(self.modules) - set(t.E)
                extra = set(t.E) - set(self.modules)
                raise ShareClError(
                    f"task {tname!r}: modules differ from the subspace's "
                    f"(missing {sorted(missing)}, unknown {sorted(extra)})"
                )
            for mname, (E_A, E_B) in t.E.items():
                k_A, k_B = ks[mname]
                if E_A.shape[0] != k_A or E_B.shape[0] != k_B or E_A.shape[1] != E_B.shape[1]:
                    raise ShareClError(
                        f"task {tname!r}, module {mname!r}: coefficient shapes {tuple(E_A.shape)} and "
                        f"{tuple(E_B.shape)} do not fit k_A={k_A}, k_B={k_B}"
                    )
        tensors = [U for b in self.modules.values() for U in (b.U_A, b.U_B)]
        tensors += [E for t in self.tasks.values() for pair in t.E.values() for E in pair]
        tensors += [value for t in self.tasks.values() for value in t.head.values()]
        if _all_finite(tensors):
            return
        for name, basis in self.modules.items():  # the failure path: name the first culprit
            for side, U in (("U_A", basis.U_A), ("U_B", basis.U_B)):
                if not torch.isfinite(U).all():
                    raise ShareClError(f"module {name!r}: {side} holds NaN or Inf")
        for tname, t in self.tasks.items():
            for mname, (E_A, E_B) in t.E.items():
                if not (torch.isfinite(E_A).all() and torch.isfinite(E_B).all()):
                    raise ShareClError(f"task {tname!r}, module {mname!r}: coefficients hold NaN or Inf")
            for key, value in t.head.items():
                if (value.is_floating_point() or value.is_complex()) and not torch.isfinite(value).all():
                    raise ShareClError(f"task {tname!r}: head tensor {key!r} holds NaN or Inf")

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], overwrite: bool = True) -> Path:
        """Write to a folder atomically: a temporary sibling is written, then swapped with ``path``.

        Layout: ``manifest.json``, ``bases.safetensors`` (``<module>.U_A``/``.U_B``), and
        ``tasks/<task>.safetensors`` (``<module>.E_A``/``.E_B``, ``head.<name>``). Bit-exact.
        A non-empty ``path`` is replaced only with ``overwrite``; an error leaves it as it was. A crash
        leaves the old or the new folder (``share.folders.write_folder``; ``load`` restores the old one
        where the swap is not atomic).
        """
        self.validate()
        return write_folder(Path(path), self._write, overwrite)

    def _write(self, folder: Path) -> None:
        bases = {}
        for name, b in self.modules.items():
            bases[f"{name}.U_A"] = b.U_A.contiguous()
            bases[f"{name}.U_B"] = b.U_B.contiguous()
        save_file(bases, str(folder / BASES_FILE))
        (folder / TASKS_DIR).mkdir()
        checksums = {BASES_FILE: _sha256(folder / BASES_FILE)}
        tasks_manifest = {}
        for tname, t in self.tasks.items():
            tensors = {}
            for mname, (E_A, E_B) in t.E.items():
                tensors[f"{mname}.E_A"] = E_A.contiguous()
                tensors[f"{mname}.E_B"] = E_B.contiguous()
            for key, value in t.head.items():
                tensors[f"head.{key}"] = value.contiguous()
            rel = f"{TASKS_DIR}/{tname}.safetensors"
            save_file(tensors, str(folder / rel))
            checksums[rel] = _sha256(folder / rel)
            tasks_manifest[tname] = {"metadata": t.metadata, "head": list(t.head)}
        manifest = {
            "format": "share-cl-subspace",
            "format_version": FORMAT_VERSION,
            "policy": self.policy.to_dict(),
            "metadata": self.metadata,
            "modules": {
                name: {"in_features": b.in_features, "out_features": b.out_features, "k_A": b.k_A, "k_B": b.k_B}
                for name, b in self.modules.items()
            },
            "tasks": tasks_manifest,
            "checksums": checksums,
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))

    @classmethod
    def load(cls, path: str | os.PathLike[str], tasks: list[str] | None = None) -> Subspace:
        """Read a folder written by ``save``; ``tasks`` limits which tasks' files are read.

        The manifest is checked in full before any payload is opened: every key and type, every task
        name (it becomes ``tasks/<name>.safetensors``), and a checksum for every payload file. Anything
        malformed is one ``ShareClError`` naming the file and the key. A folder that a crashed save
        left only as its hidden backup is put back first (``share.folders.recover_folder``).
        """
        folder = Path(path)
        recover_folder(folder)
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            raise MissingFileError(
                f"{folder} is not a Share subspace folder (no {MANIFEST}); create one with "
                "`sharecl compress ADAPTER_DIR... -o DIR`"
            )
        manifest = _ManifestReader(manifest_path).read()
        wanted = list(manifest.tasks) if tasks is None else list(tasks)
        for tname in wanted:
            check_task_name(tname)
            if tname not in manifest.tasks:
                raise UnknownTaskError(f"unknown task {tname!r}; {folder} holds: {', '.join(manifest.tasks) or 'none'}")
        bases = _load_checked(folder, BASES_FILE, manifest.checksums)
        modules = {}
        for name, entry in manifest.modules.items():
            U_A, U_B = (_tensor(folder / BASES_FILE, bases, f"{name}.{side}") for side in ("U_A", "U_B"))
            for key, expected, got in (
                ("in_features", entry.in_features, U_A.shape[0]),
                ("k_A", entry.k_A, U_A.shape[1]),
                ("out_features", entry.out_features, U_B.shape[0]),
                ("k_B", entry.k_B, U_B.shape[1]),
            ):
                if expected != got:
                    raise MalformedFileError(
                        f"{manifest_path}: ['modules'][{name!r}][{key!r}] is {expected} but {BASES_FILE} has "
                        f"U_A {tuple(U_A.shape)} and U_B {tuple(U_B.shape)}; {_FIX}"
                    )
            modules[name] = ModuleBasis(U_A=U_A, U_B=U_B)
        task_entries = {}
        for tname in wanted:
            rel = _task_file(tname)
            tensors = _load_checked(folder, rel, manifest.checksums)
            E = {
                m: (_tensor(folder / rel, tensors, f"{m}.E_A"), _tensor(folder / rel, tensors, f"{m}.E_B"))
                for m in modules
            }
            head = {}
            for key in manifest.tasks[tname].head:
                if f"head.{key}" not in tensors:
                    raise MalformedFileError(
                        f"{manifest_path}: ['tasks'][{tname!r}]['head'] lists {key!r} but {rel} has no tensor "
                        f"'head.{key}'; {_FIX}"
                    )
                head[key] = tensors[f"head.{key}"]
            task_entries[tname] = TaskCoefficients(E=E, head=head, metadata=manifest.tasks[tname].metadata)
        subspace = cls(modules=modules, tasks=task_entries, policy=manifest.policy, metadata=manifest.metadata)
        subspace.validate()
        return subspace


_FINITE_CHUNK = 1 << 18  # elements per batch of _all_finite: 1 MiB of float32, copied within the cache


def _all_finite(tensors: list[Tensor]) -> bool:
    """True if no tensor holds NaN or Inf; may say False for finite values whose sum overflows.

    Tensors of one dtype, device and shape are stacked a cache-sized batch at a time and summed:
    NaN and Inf make a sum NaN or Inf, and one sum per batch costs far less than one ``isfinite``
    per tensor. Callers search for the culprit when this says False. Non-float tensors hold no NaN.
    """
    groups: dict[tuple[Any, ...], list[Tensor]] = {}
    for t in tensors:
        if t.is_floating_point() or t.is_complex():
            groups.setdefault((t.dtype, t.device, t.shape), []).append(t)
    with torch.no_grad():
        for (dtype, device, shape), group in groups.items():
            wide = dtype in (torch.float32, torch.float64) or group[0].is_complex()  # half types: sum in float32
            step = min(len(group), max(1, _FINITE_CHUNK // max(1, math.prod(shape))))
            buffer = torch.empty((step, *shape), dtype=dtype, device=device) if step > 1 else None
            for i in range(0, len(group), step):
                chunk = group[i : i + step]
                batch = chunk[0] if buffer is None else torch.stack(chunk, out=buffer[: len(chunk)])
                if not torch.isfinite(batch.sum() if wide else batch.sum(dtype=torch.float32)):
                    return False
    return True


# -- reading a folder back ---------------------------------------------------------------------------

_FIX = "the folder is damaged or was not written by Subspace.save; restore it (e.g. `sharecl pull`) or save it again"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _task_file(name: str) -> str:
    return f"{TASKS_DIR}/{check_task_name(name)}.safetensors"


@dataclass(frozen=True)
class _ModuleEntry:
    in_features: int
    out_features: int
    k_A: int
    k_B: int


@dataclass(frozen=True)
class _TaskEntry:
    head: list[str]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class _Manifest:
    """A checked ``manifest.json``: every name valid, every payload file with its checksum."""

    policy: KPolicy
    metadata: dict[str, Any]
    modules: dict[str, _ModuleEntry]
    tasks: dict[str, _TaskEntry]
    checksums: dict[str, str]  # payload file (relative path) -> sha256 hex


class _ManifestReader:
    """Decodes one manifest file strictly (nothing coerced); each error names the file and the key path."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> _Manifest:
        top = self._object(read_json(self.path, _FIX), ())
        fmt, version = top.get("format"), top.get("format_version")
        if fmt != "share-cl-subspace" or type(version) is not int or version != FORMAT_VERSION:
            raise MalformedFileError(
                f"{self.path}: unsupported format {describe(fmt)} version {describe(version)} (keys ['format'] and "
                f"['format_version']); this version of share-cl reads 'share-cl-subspace' version {FORMAT_VERSION}"
            )
        try:
            policy = KPolicy.from_dict(self._field(top, "policy"))
        except MalformedFileError:
            raise
        except ShareClError as err:
            raise MalformedFileError(f"{self.path}: ['policy'] is not valid ({err}); {_FIX}") from None
        metadata = self._object(self._field(top, "metadata"), ("metadata",))
        modules = {}
        for name, raw in self._object(self._field(top, "modules"), ("modules",)).items():
            where = ("modules", name)
            if not name or any(not part for part in name.split(".")):
                self._fail(where, "is not a module name (empty, or an empty part between dots)")
            entry = self._object(raw, where)
            sizes = {key: self._count(entry, (*where, key)) for key in ("in_features", "out_features", "k_A", "k_B")}
            modules[name] = _ModuleEntry(**sizes)
        tasks = {}
        for name, raw in self._object(self._field(top, "tasks"), ("tasks",)).items():
            try:
                check_task_name(name)
            except ShareClError as err:
                raise MalformedFileError(f"{self.path}: ['tasks'][{name!r}]: {err}") from None
            where = ("tasks", name)
            entry = self._object(raw, where)
            head = self._field(entry, "head", where)
            if not isinstance(head, list) or not all(isinstance(key, str) and key for key in head):
                self._fail((*where, "head"), f"must be a list of head tensor names, got {describe(head)}")
            if len(set(head)) != len(head):
                self._fail((*where, "head"), f"names a head tensor twice: {describe(head)}")
            task_metadata = self._object(self._field(entry, "metadata", where), (*where, "metadata"))
            tasks[name] = _TaskEntry(head=head, metadata=task_metadata)
        checksums = self._object(self._field(top, "checksums"), ("checksums",))
        payloads = [BASES_FILE, *(_task_file(name) for name in tasks)]
        for rel, digest in checksums.items():
            if rel not in payloads:
                self._fail(("checksums", rel), "names no payload file of this manifest")
            if not isinstance(digest, str) or _SHA256.fullmatch(digest) is None:
                self._fail(("checksums", rel), f"must be a sha256 hex digest, got {describe(digest)}")
        for rel in payloads:
            if rel not in checksums:
                self._fail(("checksums", rel), "is missing: every payload file must have its checksum")
        return _Manifest(policy=policy, metadata=metadata, modules=modules, tasks=tasks, checksums=checksums)

    def _fail(self, where: tuple[str, ...], problem: str) -> NoReturn:
        key = "".join(f"[{part!r}]" for part in where) if where else "the top level"
        raise MalformedFileError(f"{self.path}: {key} {problem}; {_FIX}")

    def _field(self, mapping: dict[str, Any], key: str, where: tuple[str, ...] = ()) -> Any:
        if key not in mapping:
            self._fail((*where, key), "is missing")
        return mapping[key]

    def _object(self, value: Any, where: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            self._fail(where, f"must be a JSON object, got {describe(value)}")
        return value

    def _count(self, mapping: dict[str, Any], where: tuple[str, ...]) -> int:
        value = self._field(mapping, where[-1], where[:-1])
        if type(value) is not int or value < 0:
            self._fail(where, f"must be an integer >= 0, got {describe(value)}")
        return value


def _tensor(path: Path, tensors: dict[str, Tensor], key: str) -> Tensor:
    if key not in tensors:
        raise MalformedFileError(f"{path}: missing tensor {key!r}; {_FIX}")
    value = tensors[key]
    if value.ndim != 2 or not value.is_floating_point():
        raise MalformedFileError(
            f"{path}: tensor {key!r} must be a floating-point matrix, got {value.dtype} of shape {tuple(value.shape)}; "
            f"{_FIX}"
        )
    return value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_checked(folder: Path, rel: str, checksums: dict[str, str]) -> dict[str, Tensor]:
    """The tensors of payload ``rel``, after its sha256 matched the manifest's (every payload has one)."""
    path = folder / rel
    if not path.is_file():
        raise MissingFileError(f"{path} is missing; the subspace folder {folder} is incomplete")
    if _sha256(path) != checksums[rel]:
        raise ShareClError(f"{path}: checksum mismatch, the file is corrupted; restore it from a store version")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise MalformedFileError(f"{path} cannot be read as safetensors ({err}); {_FIX}") from err
