"""Share: one shared low-rank subspace per layer plus tiny per-task coefficients (arXiv 2602.06043).

Pure torch (+ safetensors): no ray, redis or mlflow here.
"""

from .adapter import LoraAdapter
from .config import DEFAULT_MAX_ERROR, KPolicy, KRule, TrainingMode
from .gauge import canonicalize
from .merge import MergeReport, merge
from .model import ShareModel, match_modules
from .peft_io import export_peft, load_peft_adapter
from .quantize import QuantizedBases, quantize_subspace, relative_delta_errors
from .remove import RemoveReport, remove_tasks
from .subspace import ModuleBasis, Subspace, TaskCoefficients
from .update import TaskUpdate

__all__ = [
    "DEFAULT_MAX_ERROR",
    "KPolicy",
    "KRule",
    "TrainingMode",
    "LoraAdapter",
    "MergeReport",
    "ModuleBasis",
    "QuantizedBases",
    "RemoveReport",
    "ShareModel",
    "Subspace",
    "TaskCoefficients",
    "TaskUpdate",
    "canonicalize",
    "export_peft",
    "load_peft_adapter",
    "match_modules",
    "merge",
    "quantize_subspace",
    "relative_delta_errors",
    "remove_tasks",
]
