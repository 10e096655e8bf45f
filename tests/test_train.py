"""The shared training loop and evaluation on the real all-MiniLM-L6-v2 (tiny: few steps, short inputs)."""

from __future__ import annotations

import pytest
import torch

from workers.data import TaskSplit, iter_batches
from workers.models import (
    DEFAULT_BUILDER,
    TextClassifier,
    build_text_classifier,
    get_builder,
    register_builder,
)
from workers.train import evaluate, train

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
        lr=1e-2,
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
    assert {"loss", "examples_per_s", "elapsed_s", "epoch"} <= set(reports[0][1])

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
        return train(model, batches, steps=5, lr=1e-2, log_every=2, seed=7).loss_curve

    assert run() == run()
    err = capsys.readouterr().err
    assert "[train] step 2/5 loss" in err and "[train] step 5/5 loss" in err


def test_train_refuses_bad_input(built) -> None:
    model, tok = built
    split = _easy_split(ANIMALS[:1], MONEY[:1])

    def batches(epoch: int):
        return iter_batches(split, tok, 4, shuffle=False, seed=0, max_length=16)

    with pytest.raises(ValueError, match="steps must be >= 1"):
        train(model, batches, steps=0, lr=1e-3, log_every=1, seed=0)
    _freeze_all_but(model, ())
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        train(model, batches, steps=1, lr=1e-3, log_every=1, seed=0)
    empty = TaskSplit(texts=[], labels=torch.zeros(0, dtype=torch.long), label_names=["a", "b"], task="empty")
    model.head.requires_grad_(True)
    with pytest.raises(ValueError, match="no batches"):
        train(model, lambda e: iter_batches(empty, tok, 4, False, 0, 16), steps=1, lr=1e-3, log_every=1, seed=0)
    with pytest.raises(ValueError, match="eval split of task 'empty' is empty"):
        evaluate(model, empty, tok, batch_size=4)
    three = TaskSplit(texts=["x"], labels=torch.tensor([0]), label_names=["a", "b", "c"], task="three")
    with pytest.raises(ValueError, match="num_labels=3"):
        evaluate(model, three, tok, batch_size=4)


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
