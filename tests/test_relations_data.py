"""The WordNet relation-pair task sequence, on the real WordNet files (fetched once when not installed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from jobs.datasets import relations
from jobs.datasets.relations import DEFAULT_TASKS, KNOWN_TASKS, PairIndex, PairKind, sample_task
from jobs.datasets.wordnet import PartOfSpeech, Relation, Synset, SynsetId, locate_wordnet, read_wordnet
from share.errors import ShareClError
from workers.data import load_split

N_TRAIN, N_EVAL = 24, 10


@pytest.fixture(scope="module")
def wordnet_dir(request, tmp_path_factory) -> Path:
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache_dir = cache.mkdir("wordnet") if cache is not None else tmp_path_factory.mktemp("wordnet")
    try:
        return locate_wordnet(None, cache_dir)
    except FileNotFoundError as err:
        pytest.skip(f"WordNet unobtainable here: {err}")


@pytest.fixture(scope="module")
def synsets(wordnet_dir: Path) -> dict[SynsetId, Synset]:
    return read_wordnet(wordnet_dir)


@pytest.fixture(scope="module")
def index(synsets, wordnet_dir: Path) -> PairIndex:
    return PairIndex(synsets, wordnet_dir)


@pytest.fixture(scope="module")
def built(index: PairIndex, tmp_path_factory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("relations")
    tasks = relations.prepare_relation_tasks(out, train_per_class=N_TRAIN, eval_per_class=N_EVAL, index=index)
    return out, tasks


@pytest.fixture(scope="module")
def sampled(index: PairIndex) -> dict[str, relations.SampledTask]:
    return {t.name: sample_task(t, index, N_TRAIN, N_EVAL, seed=0) for t in DEFAULT_TASKS}


def _find(synsets, word: str, pos: PartOfSpeech, lexname: str | None = None) -> list[Synset]:
    return [s for s in synsets.values() if s.id.pos == pos and word in s.words and lexname in (None, s.lexname)]


def test_the_parser_reads_known_pointers(synsets) -> None:
    (dog,) = _find(synsets, "dog", PartOfSpeech.NOUN, "noun.animal")
    hypernyms = {w for p in dog.pointers if p.relation is Relation.HYPERNYM for w in synsets[p.target].words}
    assert {"canine", "domestic animal"} <= hypernyms
    hot = [s for s in _find(synsets, "hot", PartOfSpeech.ADJ) if s.words[0] == "hot"]
    antonyms = {
        synsets[p.target].word(p.target_word) for s in hot for p in s.pointers if p.relation is Relation.ANTONYM
    }
    assert "cold" in antonyms
    (snore,) = _find(synsets, "snore", PartOfSpeech.VERB)
    assert any(p.relation is Relation.ENTAILMENT and "sleep" in synsets[p.target].words for p in snore.pointers)
    assert len(synsets) == 117_659  # WordNet 3.0: 82,115 noun + 13,767 verb + 18,156 adj + 3,621 adv synsets


def test_known_facts_land_in_the_right_class(index: PairIndex) -> None:
    facts = {
        ("wnr_hypernym_direction", "b_above"): "dog ; canine",
        ("wnr_hypernym_direction", "a_above"): "canine ; dog",
        ("wnr_synonym_antonym", "antonym"): "hot ; cold",
        ("wnr_derivation_direction", "noun_then_verb"): "runner ; run",
        ("wnr_derivation_direction", "verb_then_noun"): "run ; runner",
        ("wnr_morphology", "adjective_to_noun"): "atomic ; atom",
    }
    # Every label's meaning ends with an example pair "(a ; b)": it must be one of that class's pairs.
    for task in KNOWN_TASKS.values():
        for cls in task.classes:
            if cls.kind is not PairKind.UNRELATED:
                facts[task.name, cls.label] = cls.meaning.rpartition("(")[2].rstrip(")")
    for (task, label), text in facts.items():
        classes = KNOWN_TASKS[task].classes
        texts = {c.label: {p.text for p in index.pairs(c)} for c in classes if c.kind is not PairKind.UNRELATED}
        assert text in texts[label], f"{text!r} should be a {label!r} pair of {task}"
        assert all(text not in other for name, other in texts.items() if name != label)


def test_every_sampled_label_is_right(sampled, synsets, index: PairIndex) -> None:
    """Each pair's label agrees with the parsed data, read independently of the builder."""
    checked = Counter()
    for name, task in sampled.items():
        for row in (*task.train, *task.eval):
            cls, p = task.task.classes[row.label], row.pair
            first, second = synsets[p.first_id], synsets[p.second_id]
            assert p.first in first.words and p.second in second.words, p
            assert p.first.lower() != p.second.lower()
            if cls.kind is PairKind.POINTER:
                source, target = (second, first) if cls.reverse else (first, second)
                assert any(q.relation is cls.relation and q.target == target.id for q in source.pointers), (name, p)
                assert cls.source_pos in (None, source.id.pos) and cls.target_pos in (None, target.id.pos)
            elif cls.kind is PairKind.SYNONYM:
                assert first.id == second.id and cls.source_pos in (None, first.id.pos)
            else:
                assert first.id != second.id
                assert not any(q.target == second.id for q in first.pointers)
                assert not any(q.target == first.id for q in second.pointers)
                hypernyms = [{q.target for q in s.pointers if q.relation is Relation.HYPERNYM} for s in (first, second)]
                assert not hypernyms[0] & hypernyms[1]
            checked[cls.kind] += 1
    assert set(checked) == {c.kind for t in DEFAULT_TASKS for c in t.classes}


def test_train_and_eval_are_disjoint(sampled) -> None:
    for name, task in sampled.items():
        train_anchors = {row.pair.anchor for row in task.train}
        eval_anchors = {row.pair.anchor for row in task.eval}
        assert not train_anchors & eval_anchors, f"{name}: a source synset is in both splits"
        train_texts = {t for row in task.train for t in (row.pair.text, row.pair.reversed_text)}
        assert not {row.pair.text for row in task.eval} & train_texts, f"{name}: an eval pair is seen in train"
        assert len({row.pair.text for row in task.train}) == len(task.train), f"{name}: duplicate train texts"


def test_the_sequence_on_disk(built) -> None:
    out, tasks = built
    assert len(tasks) >= 8
    assert [t.name for t in tasks] == [t.name for t in DEFAULT_TASKS]
    label_sets = [t.label_names for t in tasks]
    assert len(set(label_sets)) == len(label_sets), "every task has its own label set"
    manifest = json.loads((out / "tasks.json").read_text())
    assert [m["name"] for m in manifest["tasks"]] == [t.name for t in tasks]
    for entry, t, spec in zip(manifest["tasks"], tasks, DEFAULT_TASKS, strict=True):
        assert tuple(entry["label_names"]) == t.label_names == spec.label_names
        assert set(entry["label_meanings"]) == set(t.label_names)
        train, ev = load_split(out / entry["train"]), load_split(out / entry["eval"])
        assert train.task == ev.task == t.name and tuple(train.label_names) == t.label_names
        k = len(t.label_names)
        assert Counter(train.labels.tolist()) == dict.fromkeys(range(k), N_TRAIN), f"{t.name}: unbalanced train"
        assert Counter(ev.labels.tolist()) == dict.fromkeys(range(k), N_EVAL), f"{t.name}: unbalanced eval"
        assert all(text.count(" ; ") == 1 and "_" not in text for text in train.texts + ev.texts)
        assert not set(ev.texts) & set(train.texts)
    assert {len(t.label_names) for t in tasks} != {2}, "label counts differ between tasks"
    assert manifest["settings"]["train_per_class"][tasks[0].name] == N_TRAIN
    assert "Princeton" in (out / "WORDNET_LICENSE").read_text()


def test_deterministic_by_seed_across_processes(built, wordnet_dir: Path, tmp_path: Path, index: PairIndex) -> None:
    """The CLI in a fresh process (another hash seed) writes exactly the files of the in-process build."""
    out, tasks = built
    names = [tasks[0].name, tasks[-1].name]
    argv = ["--out", str(tmp_path), "--tasks", *names, "--train-per-class", str(N_TRAIN)]
    argv += ["--eval-per-class", str(N_EVAL), "--wordnet-dir", str(wordnet_dir)]
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    command = [sys.executable, "-m", "jobs.datasets.relations", *argv]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in names)
    for name in names:
        for split in ("train", "eval"):
            path = Path(name) / f"{split}.parquet"
            first, second = load_split(out / path), load_split(tmp_path / path)
            assert first.texts == second.texts and first.labels.tolist() == second.labels.tolist()
    task = KNOWN_TASKS[names[0]]
    assert sample_task(task, index, N_TRAIN, N_EVAL, seed=1) != sample_task(task, index, N_TRAIN, N_EVAL, seed=0)


def test_sizes_per_task_and_errors(wordnet_dir: Path, tmp_path: Path, index: PairIndex) -> None:
    first, second = DEFAULT_TASKS[0].name, DEFAULT_TASKS[1].name
    tasks = relations.prepare_relation_tasks(
        tmp_path, tasks=[first, second], train_per_class={first: 5}, eval_per_class=3, index=index
    )
    assert tasks[0].n_train == 5 * len(tasks[0].label_names)
    assert tasks[1].n_train == DEFAULT_TASKS[1].train_per_class * len(tasks[1].label_names)
    assert tasks[1].n_eval == 3 * len(tasks[1].label_names)
    with pytest.raises(ShareClError, match=r"train pairs available, 1000000 asked; lower train_per_class"):
        sample_task(DEFAULT_TASKS[0], index, 1_000_000, 3, seed=0)
    with pytest.raises(ShareClError, match="unknown relation task 'nope'"):
        relations.prepare_relation_tasks(tmp_path, tasks=["nope"], wordnet_dir=wordnet_dir)
    with pytest.raises(ShareClError, match=r"num_tasks must be in \[1, "):
        relations.prepare_relation_tasks(tmp_path, num_tasks=0, wordnet_dir=wordnet_dir)
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        relations.prepare_relation_tasks(tmp_path, wordnet_dir=tmp_path / "missing")


def test_cli_errors(tmp_path: Path, capsys) -> None:
    argv = ["--out", str(tmp_path), "--wordnet-dir", str(tmp_path / "missing")]
    assert relations.main(argv) == 2
    assert "apt-get install wordnet-base" in capsys.readouterr().err
    assert relations.main([*argv, "--tasks", "nope"]) == 2
    assert "unknown relation task 'nope'" in capsys.readouterr().err
