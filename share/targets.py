"""PEFT's ``target_modules`` rule, the one place it is written (attaching a model, importing an adapter).

A string is a regular expression that must match the whole module name; a list selects a name equal
to an entry or ending with ``"." + entry`` (``peft.tuners.tuners_utils.check_target_module_exists``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def is_target(target_modules: str | Sequence[str], name: str) -> bool:
    """Whether ``target_modules`` selects the module called ``name``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == entry or name.endswith(f".{entry}") for entry in target_modules)
