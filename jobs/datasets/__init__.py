"""Task folders built offline from real data (WordNet 3.0): gloss categories and word-pair relations.

- :mod:`jobs.datasets.wordnet`: finding Debian's ``wordnet-base`` files and parsing ``data.*`` (pointers included).
- :mod:`jobs.datasets.taskset`: the task folder format (Parquet splits + the ``tasks.json`` manifest).
- :mod:`jobs.datasets.glosses`: ``python -m jobs.datasets.glosses --out DIR`` (gloss -> lexicographer category).
- :mod:`jobs.datasets.relations`: ``python -m jobs.datasets.relations --out DIR`` (``"a ; b"`` -> relation).
"""

from jobs.datasets.glosses import prepare_wordnet_tasks
from jobs.datasets.relations import prepare_relation_tasks
from jobs.datasets.taskset import TaskPaths, write_manifest, write_task
from jobs.datasets.wordnet import WordNetNotFound, locate_wordnet

__all__ = [
    "TaskPaths",
    "WordNetNotFound",
    "locate_wordnet",
    "prepare_relation_tasks",
    "prepare_wordnet_tasks",
    "write_manifest",
    "write_task",
]
