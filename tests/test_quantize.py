"""int8 bases (share.quantize): exact byte counts, small error measured independently, round trip, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from share import KPolicy, LoraAdapter, QuantizedBases, ShareModel, Subspace, merge, quantize_subspace
from share.errors import ShareClError
from share.quantize import QMAX, quantize_columns, relative_delta_errors

MODULES = {"enc.q": (48, 40), "enc.v": (32, 40)}  # name -> (out n, in d), two shapes on purpose


def _subspace(tasks: int = 5, r: int = 4, seed: int = 0) -> Subspace:
    g = torch.Generator().manual_seed(seed)
    adapters = {
        f"t{i}": LoraAdapter(
            factors={
                m: (torch.randn(n, r, generator=g), torch.randn(r, d, generator=g)) for m, (n, d) in MODULES.items()
            },
            scaling={m: 2.0 for m in MODULES},
        )
        for i in range(tasks)
    }
    return merge(None, adapters, KPolicy(k=12))[0]


def _dense_errors(reference: Subspace, other: Subspace) -> dict[str, float]:
    """The same relative errors the slow way: every dW materialized in float64."""

    def dense(subspace: Subspace, task: str, module: str) -> torch.Tensor:
        basis = subspace.modules[module]
        E_A, E_B = (e.double() for e in subspace.tasks[task].E[module])
        return (basis.U_B.double() @ E_B) @ (basis.U_A.double() @ E_A).T

    out = {}
    for task in reference.tasks:
        diff = norm = 0.0
        for module in reference.modules:
            dw, dw_other = dense(reference, task, module), dense(other, task, module)
            diff += float(torch.linalg.matrix_norm(dw_other - dw) ** 2)
            norm += float(torch.linalg.matrix_norm(dw) ** 2)
        out[task] = math.sqrt(diff / norm)
    return out


def test_bytes_are_exact_int8_entries_plus_float32_scales():
    subspace = _subspace()
    q = quantize_subspace(subspace)
    assert isinstance(q, QuantizedBases)
    expected = 0
    for basis in subspace.modules.values():
        for U in (basis.U_A, basis.U_B):
            rows, cols = U.shape
            expected += rows * cols * 1 + cols * 4
    assert q.nbytes == expected
    coeffs = sum(4 * (a.numel() + b.numel()) for t in subspace.tasks.values() for a, b in t.E.values())
    assert q.coefficient_nbytes == coeffs
    assert q.total_nbytes == expected + coeffs
    for basis in q.modules.values():
        for side in (basis.U_A, basis.U_B):
            assert side.values.dtype == torch.int8 and side.scales.dtype == torch.float32
            assert bool((side.values.abs().amax(dim=0) == QMAX).all())  # each column's largest entry maps to +-127
    # The float32 bases took four bytes per entry: int8 is close to 4x smaller.
    float_bytes = sum(4 * (b.U_A.numel() + b.U_B.numel()) for b in subspace.modules.values())
    assert 3.5 < float_bytes / q.nbytes < 4.0


def test_round_trip_keeps_shapes_tasks_and_loads_into_a_model():
    subspace = _subspace()
    back = quantize_subspace(subspace).dequantize()
    assert list(back.modules) == list(subspace.modules)
    assert list(back.tasks) == list(subspace.tasks)
    for name, basis in subspace.modules.items():
        assert back.modules[name].U_A.shape == basis.U_A.shape and back.modules[name].U_A.dtype == torch.float32
        assert back.modules[name].U_B.shape == basis.U_B.shape
        # Each entry is within half a quantization step of the original.
        for U, V in ((basis.U_A, back.modules[name].U_A), (basis.U_B, back.modules[name].U_B)):
            step = U.abs().amax(dim=0) / QMAX
            assert bool(((U - V).abs() <= step / 2 + 1e-7).all())
    for task in subspace.tasks:
        assert back.tasks[task].E is subspace.tasks[task].E  # coefficients untouched
    back.validate()
    base = torch.nn.Sequential()
    base.add_module("enc", torch.nn.Module())
    base.enc.q = torch.nn.Linear(40, 48)
    base.enc.v = torch.nn.Linear(40, 32)
    model = ShareModel(base, ["q", "v"])
    model.load_subspace(back)
    model.set_task("t0")
    assert model.layers["enc.q"].U_A.shape == subspace.modules["enc.q"].U_A.shape


def test_error_is_small_and_equals_the_dense_computation():
    subspace = _subspace()
    back = quantize_subspace(subspace).dequantize()
    fast = relative_delta_errors(subspace, back)
    slow = _dense_errors(subspace, back)
    assert fast.keys() == slow.keys()
    for task in slow:
        assert fast[task] == pytest.approx(slow[task], rel=1e-6, abs=1e-12)
        assert 1e-5 < slow[task] < 0.03  # int8: visible but around a percent
    assert relative_delta_errors(subspace, subspace) == {t: 0.0 for t in subspace.tasks}


def test_an_all_zero_column_stays_zero_and_a_wrong_dtype_is_refused():
    m = torch.randn(10, 3)
    m[:, 1] = 0.0
    q = quantize_columns(m)
    assert bool((q.dequantize()[:, 1] == 0).all()) and float(q.scales[1]) == 1.0
    with pytest.raises(ShareClError, match="floating-point matrix"):
        quantize_columns(torch.ones(3, 3, dtype=torch.int64))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_bases_are_refused_naming_the_module(bad):
    subspace = _subspace()
    subspace.modules["enc.v"].U_B[3, 2] = bad
    with pytest.raises(ShareClError, match=r"module 'enc.v': U_B holds NaN or Inf"):
        quantize_subspace(subspace)


def test_errors_refuse_subspaces_that_do_not_match():
    subspace = _subspace()
    other = _subspace(tasks=4)
    with pytest.raises(ShareClError, match="different modules or tasks"):
        relative_delta_errors(subspace, other)
