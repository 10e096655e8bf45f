"""A continual sequence of word-pair relation tasks built offline from WordNet 3.0's pointers.

Every example is a text ``"a ; b"`` (two lemmas, ``_`` replaced by a space) and its label says how
``b`` relates to ``a``: a hypernym, a part, an antonym, the entailed verb, ... or ``unrelated``. Each
task has its own label set (label counts differ) and balanced classes.

How a task is sampled (deterministic given ``seed`` and the task's name):

- A class is the pairs of one pointer type (``man 5 wndb``) between a source synset and a target
  synset, written source first (``reverse`` writes the target first), using the words the pointer
  names for a lexical pointer (antonyms, derivations) and each synset's first word otherwise. Pairs
  whose two words are equal, and texts that would fall into two classes of a task, are left out.
- ``unrelated`` pairs re-pair the first words and second words of the task's other sampled pairs
  (of the same split), keeping only pairs with no pointer of any kind between their synsets, so the
  words of ``unrelated`` are distributed like the related ones' and only the relation tells them apart.
- Train and eval come from disjoint *anchor* synsets (the pointer's source synset), and no eval
  text occurs in train, in either order. The task therefore tests a relation on unseen words.

Usage: ``python -m jobs.datasets.relations --out benchmarks/data/wordnet-relations``
Files: see :mod:`jobs.datasets.taskset`; ``tasks.json`` lists the tasks in order and each task's
labels with their meaning.
"""

from __future__ import annotations

import argparse
import enum
import os
import random
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from jobs.datasets.taskset import TaskPaths, write_manifest, write_task
from jobs.datasets.wordnet import (
    PartOfSpeech,
    Relation,
    Synset,
    SynsetId,
    license_text,
    locate_wordnet,
    read_wordnet,
)
from share.errors import ShareClError

NOUN, VERB, ADJ = PartOfSpeech.NOUN, PartOfSpeech.VERB, PartOfSpeech.ADJ


class PairKind(enum.Enum):
    POINTER = "pointer"  # a pointer of the class's relation from the first word's synset to the second's
    UNRELATED = "unrelated"  # re-paired words of the task's other classes, with no pointer between them


@dataclass(frozen=True)
class PairClass:
    """One label of a relation task: which pairs it holds."""

    label: str
    meaning: str
    kind: PairKind = PairKind.POINTER
    relation: Relation | None = None
    reverse: bool = False  # write the pointer's target first
    source_pos: PartOfSpeech | None = None  # only pointers from synsets of this part of speech
    target_pos: PartOfSpeech | None = None  # only pointers to synsets of this part of speech


@dataclass(frozen=True)
class RelationTask:
    name: str
    classes: tuple[PairClass, ...]

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(c.label for c in self.classes)


def _pointer(
    label: str,
    meaning: str,
    relation: Relation,
    *,
    reverse: bool = False,
    source: PartOfSpeech | None = None,
    target: PartOfSpeech | None = None,
) -> PairClass:
    return PairClass(label, meaning, PairKind.POINTER, relation, reverse, source, target)


def _unrelated(label: str = "unrelated") -> PairClass:
    return PairClass(label, "no WordNet pointer links the two words' synsets", PairKind.UNRELATED)


# The task sequence, in order.
DEFAULT_TASKS: tuple[RelationTask, ...] = (
    RelationTask(
        "wnr_noun_links",
        (
            _pointer("hypernym", "b is a hypernym of a (dog ; canine)", Relation.HYPERNYM, source=NOUN, target=NOUN),
            _pointer("hyponym", "b is a hyponym of a (canine ; dog)", Relation.HYPERNYM, reverse=True, source=NOUN),
            _pointer("has_part", "b is a part of a (car ; wheel)", Relation.PART_MERONYM),
            _unrelated(),
        ),
    ),
    RelationTask(
        "wnr_meronymy",
        (
            _pointer("member", "b is a member of a (team ; player)", Relation.MEMBER_MERONYM),
            _pointer("substance", "b is a substance of a (water ; oxygen)", Relation.SUBSTANCE_MERONYM),
            _pointer("part", "b is a part of a (car ; wheel)", Relation.PART_MERONYM),
        ),
    ),
    RelationTask(
        "wnr_adjectives",
        (
            _pointer("antonym", "b is an antonym of a (hot ; cold)", Relation.ANTONYM, source=ADJ),
            _pointer("similar", "b is similar to a (hot ; scorching)", Relation.SIMILAR_TO),
            _unrelated(),
        ),
    ),
    RelationTask(
        "wnr_derivation",
        (
            _pointer(
                "derived_verb",
                "b is a verb derived with a (runner ; run)",
                Relation.DERIVATION,
                source=NOUN,
                target=VERB,
            ),  # fmt: skip
            _unrelated("not_derived"),
        ),
    ),
    RelationTask(
        "wnr_verb_links",
        (
            _pointer("entails", "doing a entails doing b (snore ; sleep)", Relation.ENTAILMENT),
            _pointer("causes", "a causes b (kill ; die)", Relation.CAUSE),
            _unrelated(),
        ),
    ),
    RelationTask(
        "wnr_hypernym_direction",
        (
            _pointer("b_above", "b is a hypernym of a (oak ; tree)", Relation.HYPERNYM, source=NOUN, target=NOUN),
            _pointer("a_above", "a is a hypernym of b (tree ; oak)", Relation.HYPERNYM, reverse=True, source=NOUN),
        ),
    ),
    RelationTask(
        "wnr_attribute",
        (
            _pointer(
                "attribute_value", "b is a value of the attribute a (weight ; heavy)", Relation.ATTRIBUTE, source=NOUN
            ),  # fmt: skip
            _unrelated("no_attribute"),
        ),
    ),
    RelationTask(
        "wnr_verb_group",
        (
            _pointer("same_group", "a and b are grouped senses (bake ; broil)", Relation.VERB_GROUP),
            _pointer("verb_hypernym", "b is a verb hypernym of a (stroll ; walk)", Relation.HYPERNYM, source=VERB),
            _unrelated(),
        ),
    ),
    RelationTask(
        "wnr_part_direction",
        (
            _pointer("b_part_of_a", "b is a part of a (car ; wheel)", Relation.PART_MERONYM),
            _pointer("a_part_of_b", "a is a part of b (wheel ; car)", Relation.PART_MERONYM, reverse=True),
        ),
    ),
    RelationTask(
        "wnr_pertainym",
        (
            _pointer(
                "pertains",
                "the adjective a pertains to the noun b (atomic ; atom)",
                Relation.PERTAINYM,
                source=ADJ,
                target=NOUN,
            ),  # fmt: skip
            _unrelated("not_pertaining"),
        ),
    ),
)
TASKS_BY_NAME: dict[str, RelationTask] = {t.name: t for t in DEFAULT_TASKS}


@dataclass(frozen=True)
class Pair:
    first: str
    second: str
    first_id: SynsetId
    second_id: SynsetId
    anchor: SynsetId  # the pointer's source synset; train and eval never share an anchor

    @property
    def text(self) -> str:
        return f"{self.first} ; {self.second}"

    @property
    def reversed_text(self) -> str:
        return f"{self.second} ; {self.first}"


class _PointerIndex:
    """Pointers of the parsed WordNet by relation, and a check whether two synsets are linked at all."""

    def __init__(self, synsets: Mapping[SynsetId, Synset]) -> None:
        self.synsets = synsets
        self.by_relation: dict[Relation, list[tuple[Synset, int]]] = defaultdict(list)
        for synset in synsets.values():
            for i, pointer in enumerate(synset.pointers):
                self.by_relation[pointer.relation].append((synset, i))

    def linked(self, a: SynsetId, b: SynsetId) -> bool:
        if a == b:
            return True
        return any(p.target == b for p in self.synsets[a].pointers) or any(
            p.target == a for p in self.synsets[b].pointers
        )

    def pairs(self, cls: PairClass) -> list[Pair]:
        """Every pair of a pointer class, in file order, one per unordered synset pair (or word pair)."""
        assert cls.relation is not None
        seen: set[tuple[str, str]] = set()
        out = []
        for source, i in self.by_relation[cls.relation]:
            pointer = source.pointers[i]
            if cls.source_pos is not None and source.id.pos != cls.source_pos:
                continue
            if cls.target_pos is not None and pointer.target.pos != cls.target_pos:
                continue
            target = self.synsets[pointer.target]
            a = source.word(pointer.source_word)
            if pointer.lexical:
                b = target.word(pointer.target_word)
            else:  # the target's first word that differs from a ("wake ; awaken", not "wake ; wake")
                b = next((w for w in target.words if w.lower() != a.lower()), a)
            key = (min(a, b), max(a, b))
            if a.lower() == b.lower() or key in seen:
                continue
            seen.add(key)
            if cls.reverse:
                out.append(Pair(b, a, target.id, source.id, anchor=source.id))
            else:
                out.append(Pair(a, b, source.id, target.id, anchor=source.id))
        return out


def _sizes(value: int | Mapping[str, int], task: str, what: str) -> int:
    n = value.get(task) if isinstance(value, Mapping) else value
    if n is None:
        raise ShareClError(f"{what} has no entry for task {task!r}; give an int or a mapping naming every task")
    if n < 1:
        raise ShareClError(f"{what} must be >= 1 for task {task!r}, got {n}")
    return n


def _build_task(
    task: RelationTask, index: _PointerIndex, n_train: int, n_eval: int, seed: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    rng = random.Random(f"{seed}:{task.name}")
    pools = {label: index.pairs(c) for label, c in enumerate(task.classes) if c.kind is PairKind.POINTER}
    if not pools:
        raise ShareClError(f"task {task.name!r} needs at least one pointer class besides 'unrelated'")
    # A text that two classes would hold is ambiguous: leave it out of both.
    owners: dict[str, set[int]] = defaultdict(set)
    for label, pairs in pools.items():
        for pair in pairs:
            owners[pair.text].add(label)
    related_texts = set(owners)
    pools = {label: [p for p in pairs if len(owners[p.text]) == 1] for label, pairs in pools.items()}

    anchors = sorted({p.anchor for pairs in pools.values() for p in pairs})
    rng.shuffle(anchors)
    eval_anchors = set(anchors[: round(len(anchors) * n_eval / (n_train + n_eval))])

    def pick(label: int, candidates: list[Pair], n: int, split: str) -> list[Pair]:
        if len(candidates) < n:
            cls = task.classes[label]
            raise ShareClError(
                f"task {task.name!r}, class {cls.label!r}: {len(candidates)} {split} pairs available, {n} asked; "
                f"lower the {split} size per class (train_per_class / eval_per_class)"
            )
        return rng.sample(candidates, n)

    train = {lab: pick(lab, [p for p in pairs if p.anchor not in eval_anchors], n_train, "train")
             for lab, pairs in pools.items()}  # fmt: skip
    train_texts = {text for pairs in train.values() for p in pairs for text in (p.text, p.reversed_text)}
    evals = {
        lab: pick(lab, [p for p in pairs if p.anchor in eval_anchors and p.text not in train_texts], n_eval, "eval")
        for lab, pairs in pools.items()
    }

    def rows(chosen: dict[int, list[Pair]], n: int, split: str, exclude: set[str]) -> list[tuple[str, int]]:
        out = [(p.text, lab) for lab, pairs in chosen.items() for p in pairs]
        related = [p for pairs in chosen.values() for p in pairs]
        used = set(exclude) | related_texts
        for label, cls in enumerate(task.classes):
            if cls.kind is not PairKind.UNRELATED:
                continue
            made = 0
            for _ in range(200 * n):
                if made == n:
                    break
                x, y = rng.choice(related), rng.choice(related)
                text = f"{x.first} ; {y.second}"
                if x.first.lower() == y.second.lower() or text in used or index.linked(x.first_id, y.second_id):
                    continue
                used.add(text)
                out.append((text, label))
                made += 1
            if made < n:
                raise ShareClError(f"task {task.name!r}: found only {made} of {n} unrelated {split} pairs")
        rng.shuffle(out)
        return out

    train_rows = rows(train, n_train, "train", set())
    eval_rows = rows(
        evals,
        n_eval,
        "eval",
        {t for t, _ in train_rows} | {" ; ".join(reversed(t.split(" ; "))) for t, _ in train_rows},
    )
    return train_rows, eval_rows


def prepare_relation_tasks(
    out_dir: str | os.PathLike[str],
    *,
    tasks: Sequence[RelationTask | str] | None = None,
    num_tasks: int | None = None,
    train_per_class: int | Mapping[str, int] = 200,
    eval_per_class: int | Mapping[str, int] = 100,
    seed: int = 0,
    wordnet_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[TaskPaths]:
    """Write the relation task sequence under ``out_dir`` and return it in order.

    ``tasks`` are :class:`RelationTask` or names from :data:`DEFAULT_TASKS` (default: all of them, in
    order); ``num_tasks`` keeps the first n. ``train_per_class`` / ``eval_per_class`` are per class
    (every class of a task gets that many), one int for all tasks or a mapping by task name.
    ``cache_dir`` (default ``<out_dir>/.cache``) is where WordNet is unpacked when it is not installed.
    """
    out = Path(out_dir)
    chosen: list[RelationTask] = []
    for t in tasks if tasks is not None else DEFAULT_TASKS:
        if isinstance(t, str):
            if t not in TASKS_BY_NAME:
                raise ShareClError(f"unknown relation task {t!r}; known: {sorted(TASKS_BY_NAME)}")
            t = TASKS_BY_NAME[t]
        chosen.append(t)
    if num_tasks is not None:
        if not 1 <= num_tasks <= len(chosen):
            raise ShareClError(f"num_tasks must be in [1, {len(chosen)}], got {num_tasks}")
        chosen = chosen[:num_tasks]
    names = [t.name for t in chosen]
    if len(set(names)) != len(names):
        raise ShareClError(f"task names must be distinct, got {names}")
    for t in chosen:
        if len(t.classes) < 2 or len(set(t.label_names)) != len(t.label_names):
            raise ShareClError(f"task {t.name!r} needs at least 2 classes with distinct labels, has {t.label_names}")
    sizes = {
        t.name: (_sizes(train_per_class, t.name, "train_per_class"), _sizes(eval_per_class, t.name, "eval_per_class"))
        for t in chosen
    }

    source = locate_wordnet(wordnet_dir, out / ".cache" if cache_dir is None else cache_dir)
    index = _PointerIndex(read_wordnet(source))
    result = []
    for t in chosen:
        train_rows, eval_rows = _build_task(t, index, *sizes[t.name], seed)
        result.append(write_task(out, t.name, t.label_names, train_rows, eval_rows))

    (out / "WORDNET_LICENSE").write_text(license_text(source), encoding="utf-8")
    settings = {"seed": seed, "train_per_class": dict(sizes) if False else {n: s[0] for n, s in sizes.items()},
                "eval_per_class": {n: s[1] for n, s in sizes.items()}}  # fmt: skip
    meanings = {t.name: {"label_meanings": {c.label: c.meaning for c in t.classes}} for t in chosen}
    write_manifest(out, "WordNet 3.0 (Debian wordnet-base), word pairs by pointer relation", settings, result, meanings)
    return result


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.datasets.relations", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder, e.g. benchmarks/data/wordnet-relations")
    parser.add_argument("--tasks", nargs="+", default=None, help=f"task names in order (default: {len(DEFAULT_TASKS)})")
    parser.add_argument("--num-tasks", type=int, default=None, help="keep the first n tasks")
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--eval-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wordnet-dir", default=None, help="folder with data.noun, data.verb, ... (WordNet 3.0)")
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        tasks = prepare_relation_tasks(
            args.out,
            tasks=args.tasks,
            num_tasks=args.num_tasks,
            train_per_class=args.train_per_class,
            eval_per_class=args.eval_per_class,
            seed=args.seed,
            wordnet_dir=args.wordnet_dir,
        )
    except ShareClError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    for t in tasks:
        print(f"{t.name}: {', '.join(t.label_names)}  train {t.n_train}  eval {t.n_eval}  -> {t.train.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
