"""``Subspace.save`` / ``load``: bit-exact round trip, corruption detected, atomic replacement, crash recovery."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from share import KPolicy, LoraAdapter, Subspace, folders, merge
from share.errors import ShareClError
from share.folders import MissingFileError
from share.subspace import BASES_FILE, MANIFEST, TASKS_DIR, UnknownTaskError, check_task_name

SHAPES = {"enc.0.query": (12, 10), "enc.0.value": (10, 12)}  # name -> (n, d)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_adapter(seed: int, r: int = 3, with_head: bool = True) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(n, r, generator=g), torch.randn(r, d, generator=g)) for m, (n, d) in SHAPES.items()}
    head = {"head.weight": torch.randn(4, 10, generator=g), "head.bias": torch.randn(4, generator=g)}
    return LoraAdapter(
        factors=factors,
        scaling={m: 1.5 for m in SHAPES},
        head=head if with_head else {},
        metadata={"task": f"t{seed}", "accuracy": 0.5 + seed / 100, "notes": ["ü", None]},
    )


@pytest.fixture
def subspace() -> Subspace:
    first, _ = merge(None, {"t0": random_adapter(0), "t1": random_adapter(1, with_head=False)}, KPolicy(k=4))
    second, _ = merge(first, {"t2": random_adapter(2)}, KPolicy(variance=0.8, k_max=5))
    second.metadata = {"version": 3, "parent": 2}
    return second


def tensors_of(s: Subspace) -> dict[str, torch.Tensor]:
    out = {}
    for m, b in s.modules.items():
        out[f"{m}.U_A"], out[f"{m}.U_B"] = b.U_A, b.U_B
    for t, c in s.tasks.items():
        for m, (E_A, E_B) in c.E.items():
            out[f"{t}/{m}.E_A"], out[f"{t}/{m}.E_B"] = E_A, E_B
        for key, value in c.head.items():
            out[f"{t}/head.{key}"] = value
    return out


def assert_identical(left: Subspace, right: Subspace) -> None:
    a, b = tensors_of(left), tensors_of(right)
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert list(left.modules) == list(right.modules)
    assert list(left.tasks) == list(right.tasks)
    assert left.policy == right.policy
    assert left.metadata == right.metadata
    for t in left.tasks:
        assert left.tasks[t].metadata == right.tasks[t].metadata


def test_round_trip_is_bit_exact(subspace: Subspace, tmp_path: Path) -> None:
    folder = subspace.save(tmp_path / "sub")
    loaded = Subspace.load(folder)
    assert_identical(subspace, loaded)
    # And once more: a loaded subspace saves to byte-identical tensor files.
    again = Subspace.load(loaded.save(tmp_path / "again"))
    assert_identical(subspace, again)
    for rel in [BASES_FILE, *(f"{TASKS_DIR}/{t}.safetensors" for t in subspace.tasks)]:
        assert (tmp_path / "sub" / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel


def test_partial_load_reads_only_the_named_tasks(subspace: Subspace, tmp_path: Path) -> None:
    folder = subspace.save(tmp_path / "sub")
    (folder / TASKS_DIR / "t0.safetensors").unlink()  # never read when only t2 is asked for
    part = Subspace.load(folder, tasks=["t2"])
    assert list(part.tasks) == ["t2"]
    for m in SHAPES:
        assert torch.equal(part.delta_weight("t2", m), subspace.delta_weight("t2", m))
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        Subspace.load(folder, tasks=["nope"])


@pytest.mark.parametrize("target", [BASES_FILE, f"{TASKS_DIR}/t1.safetensors"])
def test_corrupted_file_is_detected_by_checksum(subspace: Subspace, tmp_path: Path, target: str) -> None:
    folder = subspace.save(tmp_path / "sub")
    path = folder / target
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one flipped bit inside the last tensor's payload: safetensors alone would not notice
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        Subspace.load(folder)


def test_missing_files_name_the_folder_and_the_fix(subspace: Subspace, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="sharecl compress"):
        Subspace.load(tmp_path / "nothing-here")
    folder = subspace.save(tmp_path / "sub")
    (folder / TASKS_DIR / "t2.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="t2.safetensors is missing"):
        Subspace.load(folder)


def test_unknown_format_version_is_refused(subspace: Subspace, tmp_path: Path) -> None:
    folder = subspace.save(tmp_path / "sub")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["format_version"] = 999
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="unsupported format"):
        Subspace.load(folder)


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failing_save_leaves_the_old_folder_intact(subspace: Subspace, tmp_path: Path) -> None:
    """The write fails half-way (bases already written): the previous folder stays byte for byte."""
    folder = subspace.save(tmp_path / "sub")
    before = folder_snapshot(folder)
    broken, _ = merge(subspace, {"t3": random_adapter(3)}, KPolicy(k=4))
    shared = torch.randn(4)
    # Two head entries sharing memory pass validate() but make safetensors refuse the task file.
    broken.tasks["t3"].head = {"head.bias": shared, "head.bias_copy": shared}
    with pytest.raises(RuntimeError, match="share memory"):
        broken.save(folder)
    assert folder_snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # no temporary folder left behind
    assert_identical(subspace, Subspace.load(folder))


def test_invalid_subspace_is_refused_before_anything_is_written(subspace: Subspace, tmp_path: Path) -> None:
    folder = subspace.save(tmp_path / "sub")
    before = folder_snapshot(folder)
    subspace.tasks["t1"].E["enc.0.query"][0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="task 't1', module 'enc.0.query': coefficients hold NaN"):
        subspace.save(folder)
    assert folder_snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_save_without_overwrite_refuses_an_existing_folder(subspace: Subspace, tmp_path: Path) -> None:
    folder = subspace.save(tmp_path / "sub")
    before = folder_snapshot(folder)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        subspace.save(folder, overwrite=False)
    assert folder_snapshot(folder) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_identical(subspace, Subspace.load(subspace.save(empty, overwrite=False)))  # nothing to replace


def test_save_replaces_an_existing_folder_completely(subspace: Subspace, tmp_path: Path) -> None:
    """Overwriting with fewer tasks leaves no stale task file from the previous version."""
    folder = subspace.save(tmp_path / "sub")
    smaller, _ = merge(None, {"only": random_adapter(9)}, KPolicy(k=2))
    smaller.save(folder)
    assert sorted(p.name for p in (folder / TASKS_DIR).iterdir()) == ["only.safetensors"]
    assert_identical(smaller, Subspace.load(folder))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


@pytest.mark.parametrize("name", ["t0\n", "", "\n", "a/b", "../t0", ".hidden", "t" * 129, "t0\r"])
def test_task_names_must_match_in_full(subspace: Subspace, tmp_path: Path, name: str) -> None:
    """A trailing newline used to pass ``re.match`` with ``$``; it would become a file and key name."""
    with pytest.raises(ShareClError, match="invalid task name"):
        check_task_name(name)
    subspace.tasks[name] = subspace.tasks.pop("t0")
    with pytest.raises(ShareClError, match="invalid task name"):
        subspace.save(tmp_path / "sub")
    assert not (tmp_path / "sub").exists()


def test_valid_task_names_pass() -> None:
    for name in ("t0", "wn_animals", "A.b-c_1", "x" * 128):
        assert check_task_name(name) == name


def test_unknown_tasks_and_missing_folders_raise_project_errors(subspace: Subspace, tmp_path: Path) -> None:
    """One base class for the CLI to catch; the lookup and OS error types stay for existing callers."""
    with pytest.raises(UnknownTaskError) as unknown:
        subspace.task("nope")
    assert isinstance(unknown.value, ShareClError) and isinstance(unknown.value, KeyError)
    assert str(unknown.value) == "unknown task 'nope'; this subspace holds: t0, t1, t2"  # not quoted as KeyError
    with pytest.raises(MissingFileError) as missing:
        Subspace.load(tmp_path / "nothing-here")
    assert isinstance(missing.value, ShareClError) and isinstance(missing.value, FileNotFoundError)


# -- a crash inside the folder swap (issue 10, defect 11) -----------------------------------------

_CRASHING_SAVE = """
import os, shutil, sys
from share import Subspace
from share import folders

point, source, target = sys.argv[1:]
if point == "between-renames":  # the two-rename swap (no atomic exchange), killed after the first rename
    setattr(folders, "_renameat2", None)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            os._exit(17)
        real_rename(src, dst)

    folders.os.rename = rename
elif point == "before-exchange":
    folders._exchange = lambda a, b: os._exit(17)
elif point == "after-exchange":  # killed before the previous folder is deleted
    folders.shutil.rmtree = lambda *args, **kwargs: os._exit(17)
Subspace.load(source).save(target)
"""


def crash_while_saving(point: str, source: Path, target: Path) -> None:
    """Save ``source`` over ``target`` in a child process that dies (``os._exit``) at ``point``."""
    result = subprocess.run(
        [sys.executable, "-c", _CRASHING_SAVE, point, str(source), str(target)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 17, result.stderr


def test_crash_between_the_two_renames_leaves_a_loadable_folder(subspace: Subspace, tmp_path: Path) -> None:
    """Where no atomic exchange exists the swap takes two renames; a process killed between them leaves the
    previous folder only as a hidden backup. ``load`` puts it back: the previous version, bit for bit."""
    folder = subspace.save(tmp_path / "sub")
    newer, _ = merge(subspace, {"t3": random_adapter(3)}, KPolicy(k=4))
    newer.save(tmp_path / "newer")
    crash_while_saving("between-renames", tmp_path / "newer", folder)
    assert not folder.exists()  # the crash point was really hit
    assert_identical(subspace, Subspace.load(folder))
    assert folder.is_dir() and not [p for p in tmp_path.iterdir() if ".old-" in p.name]
    newer.save(folder)  # and the folder takes new versions again
    assert_identical(newer, Subspace.load(folder))


@pytest.mark.skipif(not hasattr(folders, "_renameat2") or folders._renameat2 is None, reason="no renameat2")
@pytest.mark.parametrize(("point", "expect_new"), [("before-exchange", False), ("after-exchange", True)])
def test_crash_around_the_atomic_exchange_leaves_one_complete_version(
    subspace: Subspace, tmp_path: Path, point: str, expect_new: bool
) -> None:
    """With renameat2's exchange the target always names a complete folder, whatever instant the crash hits."""
    folder = subspace.save(tmp_path / "sub")
    newer, _ = merge(subspace, {"t3": random_adapter(3)}, KPolicy(k=4))
    newer.save(tmp_path / "newer")
    crash_while_saving(point, tmp_path / "newer", folder)
    assert_identical(newer if expect_new else subspace, Subspace.load(folder))


def test_a_backup_of_a_live_save_is_left_alone(subspace: Subspace, tmp_path: Path) -> None:
    """A backup whose process still runs belongs to a save in flight: ``load`` does not take it."""
    folder = subspace.save(tmp_path / "sub")
    backup = tmp_path / f".sub.old-{os.getpid()}-x"
    backup.mkdir()
    os.rename(folder, backup / "old")
    with pytest.raises(MissingFileError):
        Subspace.load(folder)
    assert (backup / "old" / MANIFEST).is_file()


def test_saving_over_a_link_replaces_the_link_and_keeps_the_linked_folder(subspace: Subspace, tmp_path: Path) -> None:
    real = subspace.save(tmp_path / "real")
    before = folder_snapshot(real)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    smaller, _ = merge(None, {"only": random_adapter(9)}, KPolicy(k=2))
    smaller.save(tmp_path / "link")
    assert not (tmp_path / "link").is_symlink()
    assert_identical(smaller, Subspace.load(tmp_path / "link"))
    assert folder_snapshot(real) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
