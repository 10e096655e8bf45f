"""WordNet 3.0 as shipped by Debian's ``wordnet-base``: finding the files and parsing ``data.*``.

Each line of ``data.noun`` / ``data.verb`` / ``data.adj`` / ``data.adv`` that does not start with a
space is one synset (``man 5 wndb``)::

    offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt [ptr ...] [frames] | gloss

where each pointer is ``symbol target_offset target_pos source/target`` (``source/target`` is four
hex digits: ``0000`` links whole synsets, otherwise the 1-based word numbers in source and target).

WordNet is found at ``wordnet_dir`` if given, else ``$WNSEARCHDIR``, else ``/usr/share/wordnet``,
else it is unpacked into a cache folder with ``apt-get download`` + ``dpkg -x`` (no root needed).
"""

from __future__ import annotations

import enum
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from share.errors import ShareClError

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


class PartOfSpeech(enum.Enum):
    """A data file; adjective satellites (``ss_type`` ``s``) live in ``data.adj`` with the adjectives."""

    NOUN = "n"
    VERB = "v"
    ADJ = "a"
    ADV = "r"

    @property
    def data_file(self) -> str:
        return {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}[self.value]

    @classmethod
    def of(cls, code: str) -> PartOfSpeech:
        """From a pointer's or synset's part-of-speech letter (``s`` is an adjective satellite)."""
        return cls.ADJ if code == "s" else cls(code)


class Relation(enum.Enum):
    """A pointer symbol (``man 5 wnsearch`` / ``wndb``), read from the source synset's line."""

    ANTONYM = "!"
    HYPERNYM = "@"  # the target is a hypernym of the source
    INSTANCE_HYPERNYM = "@i"
    HYPONYM = "~"
    INSTANCE_HYPONYM = "~i"
    MEMBER_HOLONYM = "#m"  # the source is a member of the target
    SUBSTANCE_HOLONYM = "#s"
    PART_HOLONYM = "#p"
    MEMBER_MERONYM = "%m"  # the target is a member of the source
    SUBSTANCE_MERONYM = "%s"
    PART_MERONYM = "%p"
    ATTRIBUTE = "="
    DERIVATION = "+"  # derivationally related form
    TOPIC_DOMAIN = ";c"
    TOPIC_MEMBER = "-c"
    REGION_DOMAIN = ";r"
    REGION_MEMBER = "-r"
    USAGE_DOMAIN = ";u"
    USAGE_MEMBER = "-u"
    ENTAILMENT = "*"
    CAUSE = ">"
    ALSO_SEE = "^"
    VERB_GROUP = "$"
    SIMILAR_TO = "&"
    PARTICIPLE = "<"
    PERTAINYM = "\\"  # pertains to (adjectives) / derived from (adverbs)


_RELATIONS = {r.value: r for r in Relation}
_POINTER_POS = {"n": PartOfSpeech.NOUN, "v": PartOfSpeech.VERB, "a": PartOfSpeech.ADJ, "s": PartOfSpeech.ADJ,
                "r": PartOfSpeech.ADV}  # fmt: skip


class SynsetId(NamedTuple):
    pos: PartOfSpeech
    offset: int


@dataclass(frozen=True, slots=True)
class Pointer:
    relation: Relation
    target: SynsetId
    source_word: int  # 0: the whole synset; else the 1-based number of the source synset's word
    target_word: int  # 0: the whole synset; else the 1-based number of the target synset's word

    @property
    def lexical(self) -> bool:
        """A pointer between two particular words (antonyms, derivations), not between synsets."""
        return self.source_word != 0


@dataclass(frozen=True, slots=True)
class Synset:
    id: SynsetId
    lexname: str
    words: tuple[str, ...]  # display form: "_" -> " ", adjective markers such as "(a)" removed
    gloss: str
    pointers: tuple[Pointer, ...] = ()

    def word(self, number: int) -> str:
        """The synset's word by 1-based ``number``; 0 (a whole-synset pointer) gives the first word."""
        return self.words[max(number, 1) - 1]


class WordNetNotFound(ShareClError, FileNotFoundError):
    """The WordNet files are missing; the message says how to install them."""


INSTALL_HINT = (
    "install WordNet with `sudo apt-get install wordnet-base` (files in /usr/share/wordnet), or without root: "
    "`apt-get download wordnet-base && dpkg -x wordnet-base_*.deb DIR` and pass --wordnet-dir DIR/usr/share/wordnet"
)
_REQUIRED = (PartOfSpeech.NOUN, PartOfSpeech.VERB)


def _has_wordnet(folder: Path, parts: Iterable[PartOfSpeech] = _REQUIRED) -> bool:
    return all((folder / pos.data_file).is_file() for pos in parts)


def _fetch_wordnet(cache_dir: Path) -> Path:
    """Unpack the Debian package into ``cache_dir`` without root; returns the data folder."""
    target = cache_dir / "wordnet-base"
    data_dir = target / "usr" / "share" / "wordnet"
    if _has_wordnet(data_dir):
        return data_dir
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise WordNetNotFound(f"WordNet files not found and apt-get/dpkg are not available here; {INSTALL_HINT}")
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
            raise WordNetNotFound(
                f"could not fetch WordNet into {cache_dir} ({detail.strip()[-300:]}); {INSTALL_HINT}"
            ) from err
        if not _has_wordnet(unpack / "usr" / "share" / "wordnet"):
            raise WordNetNotFound(f"the wordnet-base package did not contain data.noun/data.verb; {INSTALL_HINT}")
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
            raise WordNetNotFound(f"--wordnet-dir {folder} does not contain data.noun and data.verb; {INSTALL_HINT}")
        return folder
    for candidate in (os.environ.get("WNSEARCHDIR"), "/usr/share/wordnet"):
        if candidate and _has_wordnet(Path(candidate)):
            return Path(candidate)
    if cache_dir is None:
        raise WordNetNotFound(f"WordNet files not found in $WNSEARCHDIR or /usr/share/wordnet; {INSTALL_HINT}")
    return _fetch_wordnet(Path(cache_dir))


def clean_word(word: str) -> str:
    """Display form of a lemma: adjective markers ``(a)``, ``(p)``, ``(ip)`` dropped, ``_`` -> space."""
    if word.endswith(")") and "(" in word:
        word = word[: word.rindex("(")]
    return word.replace("_", " ")


def _parse_line(line: str, pos: PartOfSpeech, path: Path) -> Synset:
    head, sep, gloss = line.partition(" | ")
    fields = head.split()
    try:
        w_cnt = int(fields[3], 16)
        words = tuple(clean_word(w) for w in fields[4 : 4 + 2 * w_cnt : 2])
        at = 4 + 2 * w_cnt
        p_cnt = int(fields[at])
        pointers = []
        for i in range(at + 1, at + 1 + 4 * p_cnt, 4):
            symbol, offset, target_pos, source_target = fields[i : i + 4]
            pointers.append(
                Pointer(
                    relation=_RELATIONS[symbol],
                    target=SynsetId(_POINTER_POS[target_pos], int(offset)),
                    source_word=int(source_target[:2], 16),
                    target_word=int(source_target[2:], 16),
                )
            )
        if not sep or len(words) != w_cnt or len(pointers) != p_cnt:
            raise ValueError("field counts do not match")
        lexname = LEXNAMES[int(fields[1])]
        return Synset(SynsetId(pos, int(fields[0])), lexname, words, gloss.strip(), tuple(pointers))
    except (ValueError, IndexError, KeyError) as err:
        raise ShareClError(
            f"{path}: malformed synset line {line[:60]!r} ({err}); is this a WordNet 3.0 data file?"
        ) from err


def iter_synsets(wordnet_dir: str | os.PathLike[str], pos: PartOfSpeech) -> Iterator[Synset]:
    """Every synset of one data file, in file order (by byte offset)."""
    path = Path(wordnet_dir) / pos.data_file
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.startswith(" "):  # the license header lines start with two spaces
                yield _parse_line(line, pos, path)


def read_wordnet(
    wordnet_dir: str | os.PathLike[str], parts: Iterable[PartOfSpeech] = tuple(PartOfSpeech)
) -> dict[SynsetId, Synset]:
    """The synsets of the given data files (default: all four), by id, in file order."""
    return {s.id: s for pos in parts for s in iter_synsets(wordnet_dir, pos)}


def license_text(wordnet_dir: str | os.PathLike[str]) -> str:
    """The WordNet license, from the header of ``data.noun`` (to be shipped with derived data)."""
    with open(Path(wordnet_dir) / PartOfSpeech.NOUN.data_file, encoding="utf-8") as fh:
        lines = []
        for line in fh:
            if not line.startswith(" "):
                break
            # Header lines are "  <n> <text>"; drop the line number.
            lines.append(line.strip().partition(" ")[2].rstrip())
    return "\n".join(lines) + "\n"
