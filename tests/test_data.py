"""Task data: real Parquet files, real WordNet files, the real MiniLM tokenizer."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.datasets import glosses
from jobs.datasets.wordnet import locate_wordnet
from workers.data import TaskSplit, iter_batches, load_split, write_split
from workers.models import default_model_path

NAMES = ["negative", "positive", "neutral"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_path()), local_files_only=True)


def _split(n: int = 10) -> TaskSplit:
    texts = [f"example number {i} " + "word " * i for i in range(n)]
    return TaskSplit(texts=texts, labels=torch.arange(n) % 3, label_names=NAMES, task="toy")


def _raw_parquet(path: Path, columns: dict, metadata: dict | None) -> Path:
    table = pa.table(columns)
    if metadata is not None:
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, path)
    return path


def test_round_trip_keeps_texts_labels_names_and_task(tmp_path: Path) -> None:
    texts = ["naïve café ☕", "", "a\nmultiline text", "plain"]
    path = write_split(tmp_path / "sub" / "train.parquet", texts, [2, 0, 1, 2], NAMES, "sentiment")
    split = load_split(path)
    assert split.texts == texts
    assert split.labels.dtype == torch.long and split.labels.tolist() == [2, 0, 1, 2]
    assert split.label_names == NAMES and split.task == "sentiment"
    assert len(split) == 4 and split.num_labels == 3
    # The on-disk schema is the documented one, readable by any Parquet tool.
    schema = pq.read_schema(path)
    assert schema.field("text").type == pa.string() and schema.field("label").type == pa.int64()
    assert json.loads(schema.metadata[b"label_names"]) == NAMES and schema.metadata[b"task"] == b"sentiment"
    assert [p.name for p in path.parent.iterdir()] == ["train.parquet"]  # no temp file left behind


def test_write_split_accepts_a_label_tensor(tmp_path: Path) -> None:
    path = write_split(tmp_path / "t.parquet", ["a", "b"], torch.tensor([1, 0]), NAMES[:2], "t")
    assert load_split(path).labels.tolist() == [1, 0]


def test_missing_file_names_the_path_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.parquet.*jobs\.datasets\.glosses"):
        load_split(tmp_path / "nope.parquet")


def test_not_parquet_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_text("text,label\nhello,0\n")
    with pytest.raises(ValueError, match=r"bad\.parquet is not a readable Parquet file"):
        load_split(path)


def test_missing_column_is_named(tmp_path: Path) -> None:
    meta = {b"label_names": json.dumps(NAMES).encode(), b"task": b"t"}
    path = _raw_parquet(tmp_path / "m.parquet", {"sentence": ["a"], "label": [0]}, meta)
    with pytest.raises(ValueError, match=r"m\.parquet: missing column\(s\) \['text'\]"):
        load_split(path)


def test_float_labels_are_rejected(tmp_path: Path) -> None:
    meta = {b"label_names": json.dumps(NAMES).encode(), b"task": b"t"}
    path = _raw_parquet(tmp_path / "f.parquet", {"text": ["a"], "label": [0.0]}, meta)
    with pytest.raises(ValueError, match="must be an integer class index"):
        load_split(path)


def test_out_of_range_labels_are_rejected_on_read_and_write(tmp_path: Path) -> None:
    meta = {b"label_names": json.dumps(NAMES).encode(), b"task": b"t"}
    path = _raw_parquet(tmp_path / "r.parquet", {"text": ["a", "b"], "label": [0, 3]}, meta)
    with pytest.raises(ValueError, match=r"r\.parquet: labels must be integers in \[0, 3\).*\[3\]"):
        load_split(path)
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 3\)"):
        write_split(tmp_path / "w.parquet", ["a"], [-1], NAMES, "t")
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        write_split(tmp_path / "w.parquet", ["a", "b"], [0], NAMES, "t")
    assert not (tmp_path / "w.parquet").exists()


def test_missing_metadata_points_to_write_split(tmp_path: Path) -> None:
    path = _raw_parquet(tmp_path / "nometa.parquet", {"text": ["a"], "label": [0]}, None)
    with pytest.raises(ValueError, match="must hold 'label_names'.*write_split"):
        load_split(path)


def test_null_texts_are_rejected(tmp_path: Path) -> None:
    meta = {b"label_names": json.dumps(NAMES).encode(), b"task": b"t"}
    path = _raw_parquet(tmp_path / "n.parquet", {"text": pa.array(["a", None]), "label": [0, 1]}, meta)
    with pytest.raises(ValueError, match="may not contain nulls"):
        load_split(path)


def test_iter_batches_covers_every_row_once_with_dynamic_padding(tokenizer) -> None:
    split = _split(10)
    batches = list(iter_batches(split, tokenizer, batch_size=4, shuffle=False, seed=0, max_length=12))
    assert [b["labels"].shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b["labels"] for b in batches]), split.labels)
    for b in batches:
        assert b["input_ids"].shape == b["attention_mask"].shape
        assert b["input_ids"].shape[1] <= 12  # truncated to max_length
        assert b["input_ids"].dtype == torch.long
    # Padding is per batch: the short first texts give 8 tokens, the long last ones are cut at 12.
    assert [b["input_ids"].shape[1] for b in batches] == [8, 12, 12]


def test_iter_batches_shuffle_is_seeded(tokenizer) -> None:
    split = TaskSplit(texts=[str(i) for i in range(32)], labels=torch.arange(32) % 3, label_names=NAMES, task="t")

    def order(seed: int) -> list[int]:
        rows = iter_batches(split, tokenizer, batch_size=8, shuffle=True, seed=seed, max_length=8)
        return [int(tokenizer.decode(ids, skip_special_tokens=True)) for b in rows for ids in b["input_ids"]]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == list(range(32))


# --- WordNet task sequence -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wordnet_dir(request, tmp_path_factory) -> Path:
    """The real WordNet files; fetched once into pytest's cache when not installed."""
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache_dir = cache.mkdir("wordnet") if cache is not None else tmp_path_factory.mktemp("wordnet")
    try:
        return locate_wordnet(None, cache_dir)
    except FileNotFoundError as err:
        pytest.skip(f"WordNet unobtainable here: {err}")


def test_wordnet_tasks_default_caps(tmp_path: Path, wordnet_dir: Path) -> None:
    tasks = glosses.prepare_wordnet_tasks(tmp_path, wordnet_dir=wordnet_dir)
    assert len(tasks) >= 5
    all_labels = [name for t in tasks for name in t.label_names]
    assert len(all_labels) == len(set(all_labels)), "category groups must be disjoint across tasks"
    for t in tasks:
        train, ev = load_split(t.train), load_split(t.eval)
        assert t.train == tmp_path / t.name / "train.parquet" and t.eval == tmp_path / t.name / "eval.parquet"
        assert train.task == ev.task == t.name
        assert train.label_names == ev.label_names == list(t.label_names) and len(t.label_names) == 4
        assert Counter(train.labels.tolist()) == {0: 100, 1: 100, 2: 100, 3: 100}
        assert Counter(ev.labels.tolist()) == {0: 50, 1: 50, 2: 50, 3: 50}
        assert not set(train.texts) & set(ev.texts)
        assert all(": " in text and len(text) > 10 for text in train.texts)
    manifest = json.loads((tmp_path / "tasks.json").read_text())
    assert [m["name"] for m in manifest["tasks"]] == [t.name for t in tasks]
    assert "Princeton" in (tmp_path / "WORDNET_LICENSE").read_text()


def test_wordnet_tasks_are_deterministic_by_seed(tmp_path: Path, wordnet_dir: Path) -> None:
    def texts(out: str, seed: int) -> list[str]:
        tasks = glosses.prepare_wordnet_tasks(
            tmp_path / out, num_tasks=2, train_per_task=20, eval_per_task=8, seed=seed, wordnet_dir=wordnet_dir
        )
        return [x for t in tasks for x in load_split(t.train).texts + load_split(t.eval).texts]

    first = texts("a", 0)
    assert len(first) == 2 * (20 + 8)
    assert texts("b", 0) == first
    assert texts("c", 1) != first


def test_wordnet_gloss_only_option(tmp_path: Path, wordnet_dir: Path) -> None:
    tasks = glosses.prepare_wordnet_tasks(
        tmp_path,
        tasks={"animals_vs_plants": ("noun.animal", "noun.plant")},
        train_per_task=10,
        eval_per_task=4,
        with_words=False,
        with_examples=True,
        wordnet_dir=wordnet_dir,
    )
    split = load_split(tasks[0].train)
    assert split.label_names == ["noun.animal", "noun.plant"] and len(split) == 10
    assert not any("_" in t for t in split.texts)


def test_wordnet_errors_name_the_fix(tmp_path: Path, wordnet_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        glosses.prepare_wordnet_tasks(tmp_path, wordnet_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="task groups must be disjoint"):
        glosses.prepare_wordnet_tasks(
            tmp_path, tasks={"a": ("noun.animal", "noun.plant"), "b": ("noun.plant", "noun.food")}
        )
    with pytest.raises(ValueError, match="unknown lexicographer categories"):
        glosses.prepare_wordnet_tasks(tmp_path, tasks={"a": ("noun.animal", "noun.dragon")}, wordnet_dir=wordnet_dir)
    with pytest.raises(ValueError, match="verb.consumption has 243 synsets.*lower train_per_task"):
        glosses.prepare_wordnet_tasks(
            tmp_path, tasks={"a": ("verb.motion", "verb.consumption")}, train_per_task=600, wordnet_dir=wordnet_dir
        )


def test_wordnet_cli(tmp_path: Path, wordnet_dir: Path, capsys) -> None:
    argv = ["--out", str(tmp_path), "--num-tasks", "1", "--train-per-task", "8", "--eval-per-task", "4"]
    assert glosses.main([*argv, "--wordnet-dir", str(wordnet_dir)]) == 0
    assert "wn_things" in capsys.readouterr().out
    assert load_split(tmp_path / "wn_things" / "train.parquet").labels.numel() == 8
    assert glosses.main([*argv, "--wordnet-dir", str(tmp_path / "missing")]) == 2
    assert "apt-get install wordnet-base" in capsys.readouterr().err
