"""The shared training loop and evaluation on the real all-MiniLM-L6-v2 (tiny: few steps, short inputs)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from share.config import TrainingMode
from share.errors import ShareClError
from workers.data import TaskSplit, iter_batches
from workers.models import (
    DEFAULT_BUILDER,
    TextClassifier,
    build_text_classifier,
    get_builder,
    register_builder,
)
from workers.task import TaskSpec
from workers.train import LrScheduler, OptimConfig, clip_gradients, evaluate, train

ANIMALS = ["cat", "dog", "horse", "rabbit", "parrot", "cow", "goat", "duck"]
MONEY = ["stock", "bond", "loan", "salary", "invoice", "tax", "budget", "mortgage"]
ANIMAL_T = ["the {} sleeps in the barn", "a {} is eating grass", "my {} runs in the field", "the young {} is hungry"]
MONEY_T = ["the {} was paid by the bank", "our {} rose this quarter", "the {} is due next month", "a {} costs money"]


def _easy_split(words_a: list[str], words_b: list[str], task: str = "animal_vs_money") -> TaskSplit:
    texts, labels = [], []
    for label, (words, templates) in enumerate(((words_a, ANIMAL_T), (words_b, MONEY_T))):
        for w in words:
            for t in templates:
                texts.append(t.format(w))
                labels.append(label)
    return TaskSplit(texts=texts, labels=torch.tensor(labels), label_names=["animal", "money"], task=task)


@pytest.fixture(scope="module")
def built():
    return build_text_classifier(None, 2, seed=0)


def _freeze_all_but(model: torch.nn.Module, prefixes: tuple[str, ...]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))


def test_model_shape_and_target_module_names(built) -> None:
    model, _ = built
    assert isinstance(model, TextClassifier) and isinstance(model.head, torch.nn.Linear)
    assert (model.head.in_features, model.head.out_features) == (384, 2)
    names = {n for n, _ in model.named_modules()}
    for layer in range(6):
        assert f"encoder.encoder.layer.{layer}.attention.self.query" in names
        assert f"encoder.encoder.layer.{layer}.attention.self.value" in names
    assert not any("pooler" in n for n, _ in model.named_parameters())


def test_mean_pooling_ignores_padding(built) -> None:
    model, tok = built
    model.eval()
    short, long = "a dog", "a much longer sentence about the quarterly budget of the bank"
    alone = tok([short], return_tensors="pt")
    padded = tok([short, long], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"])
        b = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"])
    assert padded["attention_mask"][0].sum() < padded["attention_mask"].shape[1]
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-4)


def test_head_is_seeded_and_leaves_global_rng_alone(built) -> None:
    model, _ = built
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again, _ = build_text_classifier(None, 2, seed=0)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(again.head.weight, model.head.weight)
    other, _ = build_text_classifier(None, 2, seed=1)
    assert not torch.equal(other.head.weight, model.head.weight)


def test_tiny_training_learns_and_changes_only_trainable_params() -> None:
    model, tok = build_text_classifier(None, 2, seed=0)
    # Head plus the last layer's query projection: backward stops at layer 5, so this stays cheap.
    trainable = ("head.", "encoder.encoder.layer.5.attention.self.query.")
    _freeze_all_but(model, trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_split = _easy_split(ANIMALS[:6], MONEY[:6])
    eval_split = _easy_split(ANIMALS[6:], MONEY[6:])  # words never seen in training
    reports: list[tuple[int, dict[str, float]]] = []

    result = train(
        model,
        lambda epoch: iter_batches(train_split, tok, 16, shuffle=True, seed=epoch, max_length=32),
        steps=12,
        optim=OptimConfig.constant(1e-2),
        log_every=4,
        on_metrics=lambda step, m: reports.append((step, m)),
        seed=0,
    )

    expected = 384 * 2 + 2 + 384 * 384 + 384
    assert result.trainable_params == expected
    assert [s for s, _ in result.loss_curve] == list(range(1, 13))
    assert result.examples_seen == 12 * 16
    first, last = result.loss_curve[0][1], result.final_loss
    assert last < first, f"loss did not decrease: {result.loss_curve}"
    assert [s for s, _ in reports] == [4, 8, 12]
    assert {"loss", "lr", "grad_norm", "examples_per_s", "elapsed_s", "epoch"} <= set(reports[0][1])

    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == name.startswith(trainable), f"{name}: changed={changed}, requires_grad={p.requires_grad}"

    model.train()
    metrics = evaluate(model, eval_split, tok, batch_size=16, max_length=32)
    assert model.training, "evaluate must restore the caller's mode"
    assert metrics["examples"] == len(eval_split)
    assert metrics["accuracy"] > 0.75, metrics  # chance is 0.5
    assert metrics["loss"] > 0


def test_training_is_reproducible_and_logs_to_stderr(built, capsys) -> None:
    _, tok = built
    split = _easy_split(ANIMALS[:2], MONEY[:2])

    def run() -> list[tuple[int, float]]:
        model, _ = build_text_classifier(None, 2, seed=3)
        _freeze_all_but(model, ("head.",))
        batches = lambda epoch: iter_batches(split, tok, 8, shuffle=True, seed=epoch, max_length=16)  # noqa: E731
        # 16 examples, batch 8: 5 steps run past the end of a pass, so the loop must start a new epoch.
        return train(model, batches, steps=5, optim=OptimConfig.constant(1e-2), log_every=2, seed=7).loss_curve

    assert run() == run()
    err = capsys.readouterr().err
    assert "[train] step 2/5 loss" in err and "[train] step 5/5 loss" in err and " lr 0.01 grad norm " in err


def test_train_refuses_bad_input(built) -> None:
    model, tok = built
    split = _easy_split(ANIMALS[:1], MONEY[:1])

    def batches(epoch: int):
        return iter_batches(split, tok, 4, shuffle=False, seed=0, max_length=16)

    with pytest.raises(ValueError, match="steps must be >= 1"):
        train(model, batches, steps=0, optim=OptimConfig.constant(1e-3), log_every=1, seed=0)
    _freeze_all_but(model, ())
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        train(model, batches, steps=1, optim=OptimConfig.constant(1e-3), log_every=1, seed=0)
    empty = TaskSplit(texts=[], labels=torch.zeros(0, dtype=torch.long), label_names=["a", "b"], task="empty")
    model.head.requires_grad_(True)
    with pytest.raises(ValueError, match="no batches"):
        train(
            model,
            lambda e: iter_batches(empty, tok, 4, False, 0, 16),
            steps=1,
            optim=OptimConfig.constant(1e-3),
            log_every=1,
            seed=0,
        )
    with pytest.raises(ValueError, match="eval split of task 'empty' is empty"):
        evaluate(model, empty, tok, batch_size=4, max_length=16)
    three = TaskSplit(texts=["x"], labels=torch.tensor([0]), label_names=["a", "b", "c"], task="three")
    with pytest.raises(ValueError, match="num_labels=3"):
        evaluate(model, three, tok, batch_size=4, max_length=16)


def test_builder_registry() -> None:
    assert get_builder(DEFAULT_BUILDER) is build_text_classifier
    assert get_builder("workers.models:build_text_classifier") is build_text_classifier
    with pytest.raises(ValueError, match="unknown model builder 'nope'.*hf-text-classifier"):
        get_builder("nope")
    with pytest.raises(ValueError, match="could not be imported"):
        get_builder("no_such_module_xyz:build")

    def custom(model_name_or_path, num_labels, seed):
        return build_text_classifier(model_name_or_path, num_labels, seed)

    register_builder("test-custom", custom)
    assert get_builder("test-custom") is custom
    with pytest.raises(ValueError, match="already registered"):
        register_builder("test-custom", lambda *a: None)
    with pytest.raises(ValueError, match="module:function"):
        register_builder("a:b", custom)


def test_missing_model_folder_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="could not be loaded offline"):
        build_text_classifier(str(tmp_path / "no-model"), 2, seed=0)


# -- the schedule, clipping and the defaults ----------------------------------------------------------


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """One torch thread for the tiny-model tests (and OMP_NUM_THREADS so ``train`` keeps it): deterministic, fast."""
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_schedule_multiplier_warmup_then_cosine_linear_or_constant() -> None:
    cosine = OptimConfig(1e-3, LrScheduler.COSINE, warmup_ratio=0.06, max_grad_norm=1.0)
    assert cosine.warmup_steps(100) == 6 and cosine.warmup_steps(10) == 1  # ceil(0.6): one step
    m = [cosine.multiplier(step, 100) for step in range(101)]
    assert m[0] == 0.0 and m[3] == pytest.approx(0.5) and m[6] == 1.0  # linear warmup from 0 to 1
    assert m[6 + 47] == pytest.approx(0.5)  # cosine midpoint of the 94 decay steps
    assert m[100] == 0.0 and 0 < m[99] < 1e-3
    assert all(a >= b for a, b in zip(m[6:], m[7:], strict=False)), "decay must not rise"

    linear = OptimConfig(1e-3, "linear", warmup_ratio=0.1, max_grad_norm=None)  # type: ignore[arg-type]
    assert linear.lr_scheduler is LrScheduler.LINEAR
    assert [linear.multiplier(s, 20) for s in (0, 1, 2, 11, 20)] == [0.0, 0.5, 1.0, pytest.approx(0.5), 0.0]

    constant = OptimConfig(1e-3, LrScheduler.CONSTANT, warmup_ratio=0.25, max_grad_norm=1.0)
    assert [constant.multiplier(s, 8) for s in (0, 1, 2, 5, 8)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    no_warmup = OptimConfig(1e-3, LrScheduler.COSINE, warmup_ratio=0.0, max_grad_norm=1.0)
    assert no_warmup.multiplier(0, 10) == 1.0 and no_warmup.multiplier(10, 10) == 0.0


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_train_follows_hugging_face_schedules_step_by_step(kind: str, one_thread) -> None:
    """The lr each step trained at equals what transformers' own scheduler gives an optimizer stepped alike."""
    import transformers

    steps, ratio, lr = 37, 0.1, 3e-3
    reference_fn = {
        "cosine": transformers.get_cosine_schedule_with_warmup,
        "linear": transformers.get_linear_schedule_with_warmup,
        "constant": lambda opt, warmup, total: transformers.get_constant_schedule_with_warmup(opt, warmup),
    }[kind]
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    reference = reference_fn(opt, math.ceil(ratio * steps), steps)
    expected = []
    for _ in range(steps):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        reference.step()

    model = _mlp(seed=0)
    optim = OptimConfig(lr, LrScheduler(kind), warmup_ratio=ratio, max_grad_norm=1.0)
    result = train(model, _sum_mod_batches, steps=steps, optim=optim, log_every=0, on_metrics=_ignore, seed=0)
    assert [s for s, _ in result.lr_curve] == list(range(1, steps + 1))
    assert [v for _, v in result.lr_curve] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert result.lr_curve[0][1] == 0.0  # with warmup the first step trains at lr 0, as in the Trainer


def test_clip_gradients_bounds_the_norm_and_returns_it_before_clipping() -> None:
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 4.0]), torch.full((2, 2), 6.0)  # global norm sqrt(25 + 144) = 13
    assert clip_gradients([a, b], 1.0) == pytest.approx(13.0)
    after = torch.cat([a.grad.flatten(), b.grad.flatten()]).norm()
    assert after <= 1.0 + 1e-6 and after == pytest.approx(1.0)
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 0.0, 4.0]) / 13)  # direction kept
    # Off (None): the norm is measured, the gradients stay as they are.
    a.grad = torch.tensor([30.0, 0.0, 40.0])
    assert clip_gradients([a], None) == pytest.approx(50.0)
    torch.testing.assert_close(a.grad, torch.tensor([30.0, 0.0, 40.0]))


def test_every_optimizer_step_sees_clipped_gradients(one_thread) -> None:
    """Inside the loop: the gradients AdamW steps with never exceed max_grad_norm, though the raw norm does."""
    seen: list[float] = []

    def before_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        grads = [p.grad.flatten() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.cat(grads).norm()))

    optim = OptimConfig(0.1, LrScheduler.COSINE, warmup_ratio=0.06, max_grad_norm=0.5)
    handle = register_optimizer_step_pre_hook(before_step)
    try:
        result = train(_mlp(seed=0), _sum_mod_batches, steps=60, optim=optim, log_every=0, on_metrics=_ignore, seed=0)
    finally:
        handle.remove()
    raw = [n for _, n in result.grad_norm_curve]
    assert len(seen) == len(raw) == 60
    assert max(raw) > 0.5, "the test needs steps whose raw gradient norm is above the threshold"
    assert max(seen) <= 0.5 * (1 + 1e-5)
    for before, after in zip(raw, seen, strict=True):
        assert after == pytest.approx(min(before, 0.5), rel=1e-4)


def test_a_run_that_diverges_at_constant_lr_converges_with_the_default_schedule(one_thread) -> None:
    """Issue 9's failure in miniature: at a high lr, constant lr without clipping reaches a low loss and
    then climbs far above it; the defaults (6% warmup, cosine decay, clipping at 1.0) end near zero."""
    defaults = TaskSpec(name="t", mode="lora", steps=300, lr=0.1)  # type: ignore[arg-type]
    assert (defaults.lr_scheduler, defaults.warmup_ratio, defaults.max_grad_norm) == (LrScheduler.COSINE, 0.06, 1.0)
    for seed in (0, 1, 2):
        runs = {}
        for name, optim in (("constant", OptimConfig.constant(0.1)), ("defaults", defaults.optim)):
            result = train(
                _mlp(seed), _sum_mod_batches, steps=300, optim=optim, log_every=0, on_metrics=_ignore, seed=0
            )
            runs[name] = [loss for _, loss in result.loss_curve]
        constant, scheduled = runs["constant"], runs["defaults"]
        # ln(4) = 1.39 is chance on these 4 classes.
        assert sum(constant[-10:]) / 10 > min(constant) + 0.5, f"seed {seed}: constant lr did not blow up"
        assert sum(scheduled[-10:]) / 10 < 0.05, f"seed {seed}: the default schedule did not converge"
        assert all(math.isfinite(v) for v in scheduled)


def test_optim_config_checks_name_the_field_and_the_fix() -> None:
    cases = [
        (dict(lr=0.0), "OptimConfig.lr must be a finite number > 0"),
        (dict(lr=math.nan), "OptimConfig.lr must be a finite number > 0"),
        (dict(lr_scheduler="step"), "OptimConfig.lr_scheduler 'step' is not one of cosine, linear, constant"),
        (dict(warmup_ratio=1.0), r"OptimConfig.warmup_ratio must be in \[0, 1\).*0 disables warmup"),
        (dict(warmup_ratio=-0.1), r"OptimConfig.warmup_ratio must be in \[0, 1\)"),
        (dict(max_grad_norm=-1.0), "OptimConfig.max_grad_norm .* None or 0 disables clipping"),
        (dict(weight_decay=-1e-2), "OptimConfig.weight_decay must be a finite number >= 0"),
    ]
    base = dict(lr=1e-3, lr_scheduler="cosine", warmup_ratio=0.06, max_grad_norm=1.0)
    for change, message in cases:
        with pytest.raises(ShareClError, match=message):
            OptimConfig(**{**base, **change})  # type: ignore[arg-type]
    assert OptimConfig(**{**base, "max_grad_norm": 0.0}).clip_norm is None  # type: ignore[arg-type]
    with pytest.raises(ShareClError, match="step 11 is outside 0..10"):
        OptimConfig(**base).multiplier(11, 10)  # type: ignore[arg-type]


def test_task_spec_defaults_are_the_job_schemas() -> None:
    """The job schema owns the defaults; TaskSpec repeats them (workers cannot import jobs), and must agree."""
    from jobs.schema import AdapterConfig, ModelConfig, TrainingConfig

    training, adapter = TrainingConfig(), AdapterConfig()
    schema = {
        "max_length": ModelConfig().max_length,
        "r": adapter.r,
        "lora_alpha": adapter.lora_alpha,
        "p": adapter.pseudo_rank,
        "phi": adapter.phi,
    }
    for spec_field in dataclasses.fields(TaskSpec):
        if spec_field.default is dataclasses.MISSING:
            continue
        expected = schema[spec_field.name] if spec_field.name in schema else getattr(training, spec_field.name)
        assert spec_field.default == expected, f"TaskSpec.{spec_field.name}: {spec_field.default!r} != {expected!r}"


def test_task_spec_types_its_fields_and_resolves_the_lora_lr() -> None:
    lora = TaskSpec(name="t", mode="lora", steps=10, lr=1e-3, lora_lr=5e-4, lr_scheduler="linear")  # type: ignore[arg-type]
    assert lora.mode is TrainingMode.LORA and lora.lr_scheduler is LrScheduler.LINEAR
    assert lora.optim == OptimConfig(5e-4, LrScheduler.LINEAR, warmup_ratio=0.06, max_grad_norm=1.0)
    coefficients = dataclasses.replace(lora, mode=TrainingMode.COEFFICIENTS)
    assert coefficients.optim.lr == 1e-3  # lora_lr applies to LoRA-mode tasks only
    assert dataclasses.replace(lora, lora_lr=None).optim.lr == 1e-3
    with pytest.raises(ShareClError, match="TaskSpec.mode 'auto' is not one of lora, coefficients"):
        TaskSpec(name="t", mode="auto", steps=10, lr=1e-3)  # type: ignore[arg-type]
    with pytest.raises(ShareClError, match="OptimConfig.warmup_ratio"):
        TaskSpec(name="t", mode="lora", steps=10, lr=1e-3, warmup_ratio=2.0)  # type: ignore[arg-type]
    with pytest.raises(ShareClError, match="TaskSpec.lora_lr must be > 0"):
        TaskSpec(name="t", mode="lora", steps=10, lr=1e-3, lora_lr=0.0)  # type: ignore[arg-type]


# A tiny MLP on a synthetic task: label = (a + b) mod 4 for token pairs (a, b), all 144 pairs, batch 32.
VOCAB_MOD, CLASSES_MOD = 12, 4
_A, _B = torch.meshgrid(torch.arange(VOCAB_MOD), torch.arange(VOCAB_MOD), indexing="ij")
_PAIRS = torch.stack([_A.flatten(), _B.flatten()], dim=1)
_SUMS = (_A.flatten() + _B.flatten()) % CLASSES_MOD


class _PairMlp(torch.nn.Module):
    def __init__(self, seed: int, dim: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB_MOD, dim)
        self.l1, self.l2 = torch.nn.Linear(2 * dim, hidden), torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, CLASSES_MOD)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.01))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids).flatten(1)
        return self.head(torch.relu(self.l2(torch.relu(self.l1(x)))))


def _mlp(seed: int) -> _PairMlp:
    return _PairMlp(seed)


def _sum_mod_batches(epoch: int):
    order = torch.randperm(len(_PAIRS), generator=torch.Generator().manual_seed(epoch))
    for i in range(0, len(order), 32):
        rows = order[i : i + 32]
        ids = _PAIRS[rows]
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": _SUMS[rows]}


def _ignore(step: int, metrics: dict[str, float]) -> None:
    pass
