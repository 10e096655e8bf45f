"""A continual sequence of real text-classification tasks from WordNet 3.0 glosses.

Each task classifies a synset's gloss (optionally prefixed with the synset's words) into one of four
lexicographer categories (``man 5 lexnames``); the tasks use disjoint category groups, so every task
has its own head and its own label space. Classes are balanced and capped, and the sample depends
only on ``seed`` and the task name.

Usage: ``python -m jobs.datasets.glosses --out benchmarks/data/wordnet``
Files: see :mod:`jobs.datasets.taskset`. WordNet is found as :func:`jobs.datasets.wordnet.locate_wordnet`
says (unpacked into ``<out>/.cache`` when it is not installed).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from jobs.datasets.cli import run_builder
from jobs.datasets.taskset import TaskPaths, write_manifest, write_task
from jobs.datasets.wordnet import LEXNAMES, PartOfSpeech, Synset, iter_synsets, license_text, locate_wordnet
from share.errors import ShareClError

# The task sequence, in order. Category groups are disjoint; each category has >= 243 synsets,
# enough for the default caps (150 per class).
DEFAULT_TASKS: dict[str, tuple[str, ...]] = {
    "wn_things": ("noun.animal", "noun.plant", "noun.food", "noun.artifact"),
    "wn_people_places": ("noun.person", "noun.location", "noun.time", "noun.quantity"),
    "wn_verbs_action": ("verb.motion", "verb.communication", "verb.emotion", "verb.consumption"),
    "wn_abstract": ("noun.act", "noun.state", "noun.attribute", "noun.communication"),
    "wn_physical": ("noun.body", "noun.substance", "noun.object", "noun.phenomenon"),
    "wn_verbs_doing": ("verb.body", "verb.cognition", "verb.contact", "verb.possession"),
}
_POS_OF_LEXFILE = {
    "noun": PartOfSpeech.NOUN,
    "verb": PartOfSpeech.VERB,
    "adj": PartOfSpeech.ADJ,
    "adv": PartOfSpeech.ADV,
}


def read_synsets(wordnet_dir: Path, lexnames: Sequence[str]) -> dict[str, list[Synset]]:
    """All synsets of the given categories, in file order (by byte offset), grouped by category."""
    wanted = set(lexnames)
    unknown = wanted - set(LEXNAMES.values())
    if unknown:
        raise ShareClError(
            f"unknown lexicographer categories {sorted(unknown)}; valid names: {sorted(LEXNAMES.values())}"
        )
    out: dict[str, list[Synset]] = {name: [] for name in lexnames}
    for lexfile in sorted({name.split(".")[0] for name in wanted}):
        for synset in iter_synsets(wordnet_dir, _POS_OF_LEXFILE[lexfile]):
            if synset.lexname in wanted:
                out[synset.lexname].append(synset)
    return out


def synset_text(synset: Synset, *, with_words: bool, with_examples: bool) -> str:
    gloss = synset.gloss
    if not with_examples:
        # Examples follow the definition as '; "..."'; the definition alone is shorter and harder.
        gloss = gloss.split('; "')[0].strip()
    return f"{', '.join(synset.words)}: {gloss}" if with_words else gloss


def prepare_wordnet_tasks(
    out_dir: str | os.PathLike[str],
    *,
    tasks: dict[str, Sequence[str]] | None = None,
    num_tasks: int | None = None,
    train_per_task: int = 400,
    eval_per_task: int = 200,
    seed: int = 0,
    with_words: bool = True,
    with_examples: bool = False,
    wordnet_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[TaskPaths]:
    """Write the gloss task sequence under ``out_dir`` and return it in order.

    ``tasks`` maps task name to its categories (default :data:`DEFAULT_TASKS`); ``num_tasks`` keeps
    the first n. Caps are per task and split evenly over its classes. ``cache_dir`` (default
    ``<out_dir>/.cache``) is where WordNet is unpacked when it is not installed.
    """
    out = Path(out_dir)
    groups = {name: tuple(cats) for name, cats in (tasks or DEFAULT_TASKS).items()}
    if num_tasks is not None:
        if not 1 <= num_tasks <= len(groups):
            raise ShareClError(f"num_tasks must be in [1, {len(groups)}], got {num_tasks}")
        groups = dict(list(groups.items())[:num_tasks])
    seen: dict[str, str] = {}
    for name, cats in groups.items():
        if len(cats) < 2:
            raise ShareClError(f"task {name!r} needs at least 2 categories, has {list(cats)}")
        for cat in cats:
            if cat in seen:
                raise ShareClError(
                    f"category {cat!r} is in both {seen[cat]!r} and {name!r}; task groups must be disjoint"
                )
            seen[cat] = name
        if train_per_task < len(cats) or eval_per_task < len(cats):
            raise ShareClError(
                f"caps must give every class at least one example; task {name!r} has {len(cats)} classes"
            )

    source = locate_wordnet(wordnet_dir, out / ".cache" if cache_dir is None else cache_dir)
    synsets = read_synsets(source, list(seen))

    result: list[TaskPaths] = []
    for name, cats in groups.items():
        # A string seed is hashed deterministically by random.Random (not subject to PYTHONHASHSEED).
        rng = random.Random(f"{seed}:{name}")
        n_tr, n_ev = train_per_task // len(cats), eval_per_task // len(cats)
        train_rows: list[tuple[str, int]] = []
        eval_rows: list[tuple[str, int]] = []
        for label, cat in enumerate(cats):
            pool = synsets[cat]
            if len(pool) < n_tr + n_ev:
                raise ShareClError(
                    f"category {cat} has {len(pool)} synsets, fewer than {n_tr + n_ev} needed for task {name!r}; "
                    f"lower train_per_task/eval_per_task"
                )
            picked = rng.sample(pool, n_tr + n_ev)  # distinct synsets, so train and eval never share one
            texts = [synset_text(s, with_words=with_words, with_examples=with_examples) for s in picked]
            train_rows += [(t, label) for t in texts[:n_tr]]
            eval_rows += [(t, label) for t in texts[n_tr:]]
        rng.shuffle(train_rows)
        rng.shuffle(eval_rows)
        result.append(write_task(out, name, cats, train_rows, eval_rows))

    (out / "WORDNET_LICENSE").write_text(license_text(source), encoding="utf-8")
    settings = {
        "seed": seed,
        "train_per_task": train_per_task,
        "eval_per_task": eval_per_task,
        "with_words": with_words,
        "with_examples": with_examples,
    }
    write_manifest(out, "WordNet 3.0 (Debian wordnet-base), glosses by lexicographer category", settings, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.datasets.glosses", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder, e.g. benchmarks/data/wordnet")
    parser.add_argument("--num-tasks", type=int, default=None, help=f"first n of {len(DEFAULT_TASKS)} tasks")
    parser.add_argument("--train-per-task", type=int, default=400)
    parser.add_argument("--eval-per-task", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-words", action="store_true", help="gloss only, without the synset's words")
    parser.add_argument("--with-examples", action="store_true", help="keep the gloss's quoted usage examples")
    parser.add_argument("--wordnet-dir", default=None, help="folder with data.noun, data.verb (WordNet 3.0)")
    return run_builder(
        parser,
        argv,
        lambda args: prepare_wordnet_tasks(
            args.out,
            num_tasks=args.num_tasks,
            train_per_task=args.train_per_task,
            eval_per_task=args.eval_per_task,
            seed=args.seed,
            with_words=not args.no_words,
            with_examples=args.with_examples,
            wordnet_dir=args.wordnet_dir,
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
