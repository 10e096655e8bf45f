"""share.subspace.StackedCoefficients: a task's coefficients as one row of stacks shared by many tasks (merge's)."""

from __future__ import annotations

import pickle

import torch

from share.subspace import StackedCoefficients, TaskCoefficients, TaskStacks


def stacks(tasks: int = 5) -> TaskStacks:
    g = torch.Generator().manual_seed(0)
    return TaskStacks(
        {
            "q": (torch.randn(tasks, 6, 3, generator=g), torch.randn(tasks, 4, 3, generator=g)),
            "v": (torch.randn(tasks, 6, 2, generator=g), torch.randn(tasks, 4, 2, generator=g)),
        }
    )


def test_a_row_reads_its_own_slices_as_views_and_every_way_of_reading_agrees() -> None:
    shared = stacks(tasks=40)
    row = StackedCoefficients(shared, 3)
    assert list(row) == ["q", "v"] and len(row) == 2
    for m, (E_A, E_B) in row.items():
        S_A, S_B = shared[m]
        assert torch.equal(E_A, S_A[3]) and torch.equal(E_B, S_B[3])
        assert E_A.data_ptr() == S_A[3].data_ptr()  # a view, no copy
        assert all(torch.equal(x, y) for x, y in zip(row[m], (E_A, E_B), strict=True))
    assert [pair[0].shape for pair in row.values()] == [(6, 3), (6, 2)]
    assert TaskCoefficients(E=row).widths() == {"q": 3, "v": 2}
    assert "_row_views" not in shared.__dict__  # a few reads index the stacks; no view of every row is made


def test_a_pass_over_every_row_makes_all_views_once_and_reads_them_from_then_on() -> None:
    shared = stacks(tasks=40)
    rows = [StackedCoefficients(shared, i) for i in range(40)]
    for r in rows:
        for m, (E_A, E_B) in r.items():
            assert torch.equal(E_A, shared[m][0][r.row]) and torch.equal(E_B, shared[m][1][r.row])
    views = shared.__dict__["_row_views"]  # made during the pass, for every row of every module
    assert all(len(A) == len(B) == 40 for A, B in views.values())
    assert rows[7]["q"][0] is views["q"][0][7] and rows[7]["q"][0] is rows[7]["q"][0]


def test_an_edit_detaches_the_row_and_leaves_the_stacks_and_other_rows_alone() -> None:
    shared = stacks()
    before = shared["q"][0].clone()
    row, other = StackedCoefficients(shared, 2), StackedCoefficients(shared, 4)
    E_A, E_B = row["q"]
    row["q"] = (E_A * 2, E_B)
    assert row.stacks is None and torch.equal(row["q"][0], E_A * 2) and torch.equal(row["v"][0], shared["v"][0][2])
    assert torch.equal(shared["q"][0], before) and other.stacks is shared
    del row["v"]
    assert list(row) == ["q"] and row.widths() == {"q": 3}


def test_pickling_ships_the_stacks_once_and_not_the_views() -> None:
    shared = stacks()
    rows = [StackedCoefficients(shared, i) for i in range(5)]
    shared.views()
    back = pickle.loads(pickle.dumps(rows))
    assert all(r.stacks is back[0].stacks for r in back) and "_row_views" not in back[0].stacks.__dict__
    for r, b in zip(rows, back, strict=True):
        assert all(torch.equal(x, y) for m in r for x, y in zip(r[m], b[m], strict=True))
