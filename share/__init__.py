"""Share: one shared low-rank subspace per layer plus tiny per-task coefficients (arXiv 2602.06043).

Pure torch (+ safetensors): no ray, redis or mlflow here.
"""

from .adapter import LoraAdapter
from .config import KPolicy
from .gauge import canonicalize
from .merge import MergeReport, merge
from .model import ShareModel, match_modules
from .subspace import ModuleBasis, Subspace, TaskCoefficients

__all__ = [
    "KPolicy",
    "LoraAdapter",
    "MergeReport",
    "ModuleBasis",
    "ShareModel",
    "Subspace",
    "TaskCoefficients",
    "canonicalize",
    "match_modules",
    "merge",
]
