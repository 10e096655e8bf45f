"""Task folders built offline from real data (WordNet 3.0): gloss categories and word-pair relations.

- :mod:`jobs.datasets.wordnet`: finding Debian's ``wordnet-base`` files and parsing ``data.*`` (pointers included).
- :mod:`jobs.datasets.taskset`: the task folder format (Parquet splits + the ``tasks.json`` manifest).
- :mod:`jobs.datasets.glosses`: ``python -m jobs.datasets.glosses --out DIR`` (gloss -> lexicographer category).
- :mod:`jobs.datasets.relations`: ``python -m jobs.datasets.relations --out DIR`` (``"a ; b"`` -> relation).

Import the submodules themselves (nothing is imported here, so ``python -m`` runs each one cleanly).
"""
