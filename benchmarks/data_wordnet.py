"""A continual sequence of real text-classification tasks from WordNet 3.0 glosses.

Each task classifies a synset's gloss (optionally prefixed with the synset's words) into one of four
lexicographer categories (``man 5 lexnames``); the tasks use disjoint category groups, so every task
has its own head and its own label space. Classes are balanced and capped, and the sample depends
only on ``seed`` and the task name.

Usage: ``python -m benchmarks.data_wordnet --out benchmarks/data/wordnet``
Files: ``<out>/<task>/train.parquet``, ``<out>/<task>/eval.parquet`` (see workers/data.py),
``<out>/tasks.json`` (the task order and build settings), ``<out>/WORDNET_LICENSE``.

WordNet comes from the Debian package ``wordnet-base``: ``--wordnet-dir``, else ``$WNSEARCHDIR``, else
``/usr/share/wordnet``, else a cache under ``<out>/.cache`` filled by ``apt-get download`` + ``dpkg -x``
(no root needed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from workers.data import write_split

# lex_filenum -> lexicographer file name, from WordNet's lexnames(5).
LEXNAMES: dict[int, str] = {
    0: "adj.all", 1: "adj.pert", 2: "adv.all", 3: "noun.Tops", 4: "noun.act", 5: "noun.animal",
    6: "noun.artifact", 7: "noun.attribute", 8: "noun.body", 9: "noun.cognition", 10: "noun.communication",
    11: "noun.event", 12: "noun.feeling", 13: "noun.food", 14: "noun.group", 15: "noun.location",
    16: "noun.motive", 17: "noun.object", 18: "noun.person", 19: "noun.phenomenon", 20: "noun.plant",
    21: "noun.possession", 22: "noun.process", 23: "noun.quantity", 24: "noun.relation", 25: "noun.shape",
    26: "noun.state", 27: "noun.substance", 28: "noun.time", 29: "verb.body", 30: "verb.change",
    31: "verb.cognition", 32: "verb.communication", 33: "verb.competition", 34: "verb.consumption",
    35: "verb.contact", 36: "verb.creation", 37: "verb.emotion", 38: "verb.motion", 39: "verb.perception",
    40: "verb.possession", 41: "verb.social", 42: "verb.stative", 43: "verb.weather", 44: "adj.ppl",
}  # fmt: skip
_DATA_FILE = {"noun": "data.noun", "verb": "data.verb", "adj": "data.adj", "adv": "data.adv"}

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

_INSTALL_HINT = (
    "install WordNet with `sudo apt-get install wordnet-base` (files in /usr/share/wordnet), or without root: "
    "`apt-get download wordnet-base && dpkg -x wordnet-base_*.deb DIR` and pass --wordnet-dir DIR/usr/share/wordnet"
)


@dataclass(frozen=True)
class TaskPaths:
    name: str
    train: Path
    eval: Path
    label_names: tuple[str, ...]
    n_train: int
    n_eval: int


@dataclass(frozen=True)
class Synset:
    lexname: str
    words: tuple[str, ...]
    gloss: str


def _has_wordnet(folder: Path) -> bool:
    return all((folder / _DATA_FILE[pos]).is_file() for pos in ("noun", "verb"))


def _fetch_wordnet(cache_dir: Path) -> Path:
    """Unpack the Debian package into ``cache_dir`` without root; returns the data folder."""
    target = cache_dir / "wordnet-base"
    data_dir = target / "usr" / "share" / "wordnet"
    if _has_wordnet(data_dir):
        return data_dir
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise FileNotFoundError(f"WordNet files not found and apt-get/dpkg are not available here; {_INSTALL_HINT}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        try:
            subprocess.run(["apt-get", "download", "wordnet-base"], cwd=tmp, check=True, capture_output=True, text=True)
            debs = sorted(Path(tmp).glob("wordnet-base_*.deb"))
            if not debs:
                raise FileNotFoundError("apt-get download wordnet-base produced no .deb")
            unpack = Path(tmp) / "unpacked"
            subprocess.run(["dpkg", "-x", str(debs[0]), str(unpack)], check=True, capture_output=True, text=True)
        except (subprocess.CalledProcessError, FileNotFoundError) as err:
            detail = getattr(err, "stderr", None) or str(err)
            raise FileNotFoundError(
                f"could not fetch WordNet into {cache_dir} ({detail.strip()[-300:]}); {_INSTALL_HINT}"
            ) from err
        if not _has_wordnet(unpack / "usr" / "share" / "wordnet"):
            raise FileNotFoundError(f"the wordnet-base package did not contain data.noun/data.verb; {_INSTALL_HINT}")
        if target.exists():
            shutil.rmtree(target)
        # Rename inside one filesystem, so a concurrent reader sees either nothing or the whole tree.
        os.replace(unpack, target)
    return data_dir


def locate_wordnet(
    wordnet_dir: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """The folder holding ``data.noun`` etc.: explicit, ``$WNSEARCHDIR``, system, or fetched into ``cache_dir``."""
    if wordnet_dir is not None:
        folder = Path(wordnet_dir)
        if not _has_wordnet(folder):
            raise FileNotFoundError(f"--wordnet-dir {folder} does not contain data.noun and data.verb; {_INSTALL_HINT}")
        return folder
    for candidate in (os.environ.get("WNSEARCHDIR"), "/usr/share/wordnet"):
        if candidate and _has_wordnet(Path(candidate)):
            return Path(candidate)
    if cache_dir is None:
        raise FileNotFoundError(f"WordNet files not found in $WNSEARCHDIR or /usr/share/wordnet; {_INSTALL_HINT}")
    return _fetch_wordnet(Path(cache_dir))


def _clean_word(word: str) -> str:
    # Adjectives may carry a syntactic marker such as "(a)", "(p)" or "(ip)"; "_" joins a collocation.
    if word.endswith(")") and "(" in word:
        word = word[: word.rindex("(")]
    return word.replace("_", " ")


def read_synsets(wordnet_dir: Path, lexnames: Sequence[str]) -> dict[str, list[Synset]]:
    """All synsets of the given categories, in file order (by byte offset), grouped by category."""
    wanted = set(lexnames)
    unknown = wanted - set(LEXNAMES.values())
    if unknown:
        raise ValueError(
            f"unknown lexicographer categories {sorted(unknown)}; valid names: {sorted(LEXNAMES.values())}"
        )
    out: dict[str, list[Synset]] = {name: [] for name in lexnames}
    for pos in sorted({name.split(".")[0] for name in wanted}):
        path = wordnet_dir / _DATA_FILE[pos]
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(" "):  # the license header lines start with two spaces
                    continue
                head, sep, gloss = line.partition(" | ")
                fields = head.split(" ")
                if not sep or len(fields) < 6:
                    raise ValueError(f"{path}: malformed synset line {line[:60]!r}; is this a WordNet 3.0 data file?")
                lexname = LEXNAMES.get(int(fields[1]))
                if lexname not in wanted:
                    continue
                w_cnt = int(fields[3], 16)
                words = tuple(_clean_word(w) for w in fields[4 : 4 + 2 * w_cnt : 2])
                out[lexname].append(Synset(lexname=lexname, words=words, gloss=gloss.strip()))
    return out


def synset_text(synset: Synset, *, with_words: bool, with_examples: bool) -> str:
    gloss = synset.gloss
    if not with_examples:
        # Examples follow the definition as '; "..."'; the definition alone is shorter and harder.
        gloss = gloss.split('; "')[0].strip()
    return f"{', '.join(synset.words)}: {gloss}" if with_words else gloss


def _license_text(wordnet_dir: Path) -> str:
    with open(wordnet_dir / _DATA_FILE["noun"], encoding="utf-8") as fh:
        lines = []
        for line in fh:
            if not line.startswith(" "):
                break
            # Header lines are "  <n> <text>"; drop the line number.
            lines.append(line.strip().partition(" ")[2].rstrip())
    return "\n".join(lines) + "\n"


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
    """Write the task sequence under ``out_dir`` and return it in order.

    ``tasks`` maps task name to its categories (default :data:`DEFAULT_TASKS`); ``num_tasks`` keeps
    the first n. Caps are per task and split evenly over its classes. ``cache_dir`` (default
    ``<out_dir>/.cache``) is where WordNet is unpacked when it is not installed.
    """
    out = Path(out_dir)
    groups = {name: tuple(cats) for name, cats in (tasks or DEFAULT_TASKS).items()}
    if num_tasks is not None:
        if not 1 <= num_tasks <= len(groups):
            raise ValueError(f"num_tasks must be in [1, {len(groups)}], got {num_tasks}")
        groups = dict(list(groups.items())[:num_tasks])
    seen: dict[str, str] = {}
    for name, cats in groups.items():
        if len(cats) < 2:
            raise ValueError(f"task {name!r} needs at least 2 categories, has {list(cats)}")
        for cat in cats:
            if cat in seen:
                raise ValueError(
                    f"category {cat!r} is in both {seen[cat]!r} and {name!r}; task groups must be disjoint"
                )
            seen[cat] = name
        if train_per_task < len(cats) or eval_per_task < len(cats):
            raise ValueError(f"caps must give every class at least one example; task {name!r} has {len(cats)} classes")

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
                raise ValueError(
                    f"category {cat} has {len(pool)} synsets, fewer than {n_tr + n_ev} needed for task {name!r}; "
                    f"lower train_per_task/eval_per_task"
                )
            picked = rng.sample(pool, n_tr + n_ev)  # distinct synsets, so train and eval never share one
            texts = [synset_text(s, with_words=with_words, with_examples=with_examples) for s in picked]
            train_rows += [(t, label) for t in texts[:n_tr]]
            eval_rows += [(t, label) for t in texts[n_tr:]]
        rng.shuffle(train_rows)
        rng.shuffle(eval_rows)
        paths = {}
        for split, rows in (("train", train_rows), ("eval", eval_rows)):
            paths[split] = write_split(
                out / name / f"{split}.parquet", [t for t, _ in rows], [y for _, y in rows], list(cats), name
            )
        result.append(TaskPaths(name, paths["train"], paths["eval"], cats, len(train_rows), len(eval_rows)))

    (out / "WORDNET_LICENSE").write_text(_license_text(source), encoding="utf-8")
    manifest = {
        "source": "WordNet 3.0 (Debian wordnet-base), glosses by lexicographer category",
        "settings": {
            "seed": seed,
            "train_per_task": train_per_task,
            "eval_per_task": eval_per_task,
            "with_words": with_words,
            "with_examples": with_examples,
        },
        "tasks": [
            {"name": t.name, "label_names": list(t.label_names), "n_train": t.n_train, "n_eval": t.n_eval,
             "train": str(t.train.relative_to(out)), "eval": str(t.eval.relative_to(out))}
            for t in result
        ],
    }  # fmt: skip
    (out / "tasks.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder, e.g. benchmarks/data/wordnet")
    parser.add_argument("--num-tasks", type=int, default=None, help=f"first n of {len(DEFAULT_TASKS)} tasks")
    parser.add_argument("--train-per-task", type=int, default=400)
    parser.add_argument("--eval-per-task", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-words", action="store_true", help="gloss only, without the synset's words")
    parser.add_argument("--with-examples", action="store_true", help="keep the gloss's quoted usage examples")
    parser.add_argument("--wordnet-dir", default=None, help="folder with data.noun, data.verb (WordNet 3.0)")
    args = parser.parse_args(argv)
    try:
        tasks = prepare_wordnet_tasks(
            args.out,
            num_tasks=args.num_tasks,
            train_per_task=args.train_per_task,
            eval_per_task=args.eval_per_task,
            seed=args.seed,
            with_words=not args.no_words,
            with_examples=args.with_examples,
            wordnet_dir=args.wordnet_dir,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"data_wordnet: error: {err}", file=sys.stderr)
        return 2
    for t in tasks:
        print(f"{t.name}: {', '.join(t.label_names)}  train {t.n_train}  eval {t.n_eval}  -> {t.train.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
