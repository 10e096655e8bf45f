"""Job schema: example files, defaults, overrides, every section's checks, the policy it hands on, MLflow params."""

import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coordinator.config import CoordinatorConfig, CoordinatorConfigError
from jobs.schema import (
    LR_SCHEDULERS,
    TRAINING_MODES,
    AdapterConfig,
    ClusterConfig,
    JobConfig,
    JobConfigError,
    ModelConfig,
    StoreConfig,
    TaskConfig,
    TrackingConfig,
    TrainingConfig,
    load_job,
    to_dict,
    validate,
)
from share import KPolicy, TrainingMode
from share.errors import ShareClError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "jobs" / "examples"
WORDNET_TASKS = [
    "wn_things",
    "wn_people_places",
    "wn_verbs_action",
    "wn_abstract",
    "wn_physical",
]


def _write_parquet(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": ["a gloss", "another gloss"], "label": [0, 1]}), path)


def _job_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def data_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch current directory holding two real task Parquet files."""
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        _write_parquet(tmp_path / "data" / name / "train.parquet")
        _write_parquet(tmp_path / "data" / name / "eval.parquet")
    return tmp_path


TWO_TASKS = """
tasks:
  - {name: a, train: data/a/train.parquet, eval: data/a/eval.parquet}
  - {name: b, train: data/b/train.parquet}
"""


def _load(tmp_path: Path, text: str = TWO_TASKS, overrides: tuple[str, ...] = ()) -> JobConfig:
    return load_job(_job_file(tmp_path, text), list(overrides))


# ---------------------------------------------------------------- examples


def test_wordnet_example_lists_the_five_tasks() -> None:
    job = load_job(EXAMPLES / "wordnet.yaml", [], check_files=False)
    assert [t.name for t in job.tasks] == WORDNET_TASKS
    for task in job.tasks:
        assert Path(task.train).is_absolute()
        assert task.train.endswith(f"benchmarks/data/wordnet/{task.name}/train.parquet")
        assert task.eval.endswith(f"benchmarks/data/wordnet/{task.name}/eval.parquet")
    assert job.cluster.address is None and job.cluster.num_gpus_per_task == 0
    assert job.experiment_name == "wordnet"
    assert job.adapter.policy == AdapterConfig().policy and job.training == TrainingConfig()


def test_wordnet_example_loads_with_its_data_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in WORDNET_TASKS:
        for split in ("train", "eval"):
            _write_parquet(tmp_path / "benchmarks/data/wordnet" / name / f"{split}.parquet")
    job = load_job(EXAMPLES / "wordnet.yaml", [])
    assert all(Path(t.train).is_file() and Path(t.eval).is_file() for t in job.tasks)
    assert job.tasks[0].train == str(tmp_path / "benchmarks/data/wordnet" / WORDNET_TASKS[0] / "train.parquet")


def test_gpu_cluster_example_asks_for_one_gpu_per_task() -> None:
    job = load_job(EXAMPLES / "gpu_cluster.yaml", [], check_files=False)
    assert job.cluster.address == "auto"
    assert job.cluster.num_gpus_per_task == 1
    assert job.cluster.runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert [t.name for t in job.tasks] == WORDNET_TASKS


# ---------------------------------------------------------------- defaults and overrides


def test_defaults(data_tmp: Path) -> None:
    job = _load(data_tmp)
    assert job.model.name_or_path is None and job.model.builder == "hf-text-classifier"
    a = job.adapter
    assert (a.target_modules, a.r, a.lora_alpha, a.p, a.phi, a.k, a.variance, a.max_error, a.k_max) == (
        ["query", "value"], 8, 16.0, None, 2, None, None, 0.05, 32,
    )  # fmt: skip
    assert a.pseudo_rank == 8
    t = job.training
    assert (t.mode, t.steps, t.batch_size, t.lr, t.lora_lr, t.eval_batch_size) == ("auto", 200, 32, 1e-2, 2e-3, 128)
    assert (t.lr_scheduler, t.warmup_ratio, t.max_grad_norm) == ("cosine", 0.06, 1.0)
    assert job.model.max_length == 128
    assert job.cluster.address is None and job.cluster.num_gpus_per_task == 0 and job.cluster.max_retries == 1
    assert job.store.redis_url is None and job.store.namespace == "default"
    assert job.tracking.mlflow_uri is None and job.experiment_name == "default"
    assert job.tasks[1].eval is None and job.tasks[1].num_labels is None
    assert job.tasks[0].eval == str(data_tmp / "data/a/eval.parquet")


def test_overrides_apply_in_order_with_yaml_types(data_tmp: Path) -> None:
    job = _load(
        data_tmp,
        overrides=(
            "training.steps=50",
            "training.lr=1e-2",
            "tasks.0.name=x",
            "tasks.1.num_labels=4",
            "adapter.p=4",
            "adapter.p=null",
            "adapter.target_modules=[query, key, value]",
            "cluster.runtime_env.env_vars.FOO=bar",
            "store.redis_url=redis://localhost:6380/0",
            "training={mode: lora, seed: 3}",
        ),
    )
    assert job.training.steps == 50 and job.training.lr == 0.01
    assert [t.name for t in job.tasks] == ["x", "b"] and job.tasks[1].num_labels == 4
    assert job.adapter.p is None and job.adapter.target_modules == ["query", "key", "value"]
    assert job.cluster.runtime_env == {"env_vars": {"FOO": "bar"}}
    assert job.store.redis_url == "redis://localhost:6380/0"
    assert (job.training.mode, job.training.seed, job.training.steps) == ("lora", 3, 50)


def test_override_can_replace_the_task_list(data_tmp: Path) -> None:
    job = _load(data_tmp, overrides=("tasks=[{name: only, train: data/b/train.parquet}]",))
    assert [t.name for t in job.tasks] == ["only"]


def test_empty_sections_mean_defaults(data_tmp: Path) -> None:
    job = _load(data_tmp, TWO_TASKS + "store:\ntracking:\n")
    assert job.store.namespace == "default"


def test_training_modes_are_share_s_plus_auto() -> None:
    assert TRAINING_MODES == ("auto", *(m.value for m in TrainingMode))
    assert AdapterConfig(r=8, p=3).pseudo_rank == 3


def test_a_jobs_values_are_what_its_workers_train_with(data_tmp: Path) -> None:
    """Every training setting of the job (none of them a default here) reaches the worker's TaskSpec."""
    from jobs.runner import task_jobs

    job = _load(
        data_tmp,
        overrides=(
            "model.max_length=40",
            "training.steps=7",
            "training.batch_size=5",
            "training.lr=3e-3",
            "training.lora_lr=2e-4",
            "training.lr_scheduler=linear",
            "training.warmup_ratio=0.2",
            "training.max_grad_norm=0.5",
            "training.weight_decay=0.01",
            "training.seed=4",
            "training.log_every=3",
            "training.eval_batch_size=9",
            "adapter.r=6",
            "adapter.lora_alpha=12",
            "adapter.p=2",
            "adapter.phi=1",
        ),
    )
    jobs = task_jobs(job, "job-1", "redis://h:1/0", "sqlite:////tmp/m.db", "0", None)
    assert [j.task for j in jobs] == ["a", "b"]
    lora, coefficients = jobs[0].spec(TrainingMode.LORA), jobs[0].spec(TrainingMode.COEFFICIENTS)
    t = job.training
    assert (lora.steps, lora.batch_size, lora.max_length, lora.seed, lora.log_every, lora.eval_batch_size) == (
        7, 5, 40, 4, 3, 9,
    )  # fmt: skip
    assert (lora.r, lora.lora_alpha, lora.p, lora.phi) == (6, 12.0, 2, 1)
    assert (lora.optim.lr, coefficients.optim.lr) == (t.lora_lr, t.lr)
    assert (lora.optim.lr_scheduler, lora.optim.warmup_ratio, lora.optim.max_grad_norm) == ("linear", 0.2, 0.5)
    assert lora.optim.weight_decay == 0.01


def test_adapter_policy_first_rule_set_wins() -> None:
    assert AdapterConfig().policy == KPolicy(max_error=0.05, k_max=32)
    assert AdapterConfig(max_error=0.1, k_max=None).policy == KPolicy(max_error=0.1)
    # variance set (max_error keeps its default): the paper's rule
    assert AdapterConfig(variance=0.6).policy == KPolicy(variance=0.6, k_max=32)
    assert AdapterConfig(k=4, variance=0.9, max_error=0.2, k_max=8).policy == KPolicy(k=4, k_max=8)


def test_no_rule_at_all_is_a_problem(data_tmp: Path) -> None:
    with pytest.raises(JobConfigError, match=r"^adapter: k, variance and max_error are all null; set one"):
        _load(data_tmp, overrides=("adapter.max_error=null",))


def test_coordinator_config_holds_the_jobs_kpolicy_across_the_ray_boundary() -> None:
    policy = AdapterConfig(max_error=0.1, k_max=16).policy
    config = CoordinatorConfig(namespace="ns", policy=policy)
    plain = config.to_dict()
    assert plain["policy"] == policy.to_dict()  # plain values for Ray
    again = CoordinatorConfig.from_dict(plain)
    assert again.policy == policy and again == config
    assert CoordinatorConfig.from_dict(CoordinatorConfig().to_dict()).policy is None
    with pytest.raises(CoordinatorConfigError, match="policy must be a share.KPolicy"):
        CoordinatorConfig(policy={"k": 4})  # type: ignore[arg-type]
    with pytest.raises(CoordinatorConfigError, match="max_batch must be >= 1"):
        CoordinatorConfig(max_batch=0)
    with pytest.raises(CoordinatorConfigError, match="unknown coordinator setting"):
        CoordinatorConfig.from_dict({"polcy": None})


# ---------------------------------------------------------------- errors


FILE_ERRORS = [
    # (job file text, substrings the message must contain)
    ("trainig: {steps: 3}\n" + TWO_TASKS, ["trainig: unknown key", "Did you mean 'training'", "model, adapter"]),
    ("adapter: {rank: 4}\n" + TWO_TASKS, ["adapter.rank: unknown key", "Valid keys under adapter", "target_modules"]),
    ("tasks:\n  - {name: a, trian: data/a/train.parquet}\n", ["tasks.0.trian: unknown key", "'train'"]),
    ("training: {steps: many}\n" + TWO_TASKS, ["training.steps", "'many'", "an integer"]),
    ("tasks:\n  - {name: a, train: data/a/train.parquet, num_labels: two}\n", ["tasks.0.num_labels", "an integer"]),
    ("model: 3\n" + TWO_TASKS, ["model: expected a mapping", "name_or_path"]),
    ("tasks: data/a/train.parquet\n", ["tasks: expected a list"]),
    ("tasks:\n  - {name: a}\n", ["tasks.0.train: required but not set"]),
    ("adapter: {r: 0}\n" + TWO_TASKS, ["adapter.r", "must be >= 1"]),
    ("adapter: {variance: 0}\n" + TWO_TASKS, ["adapter.variance", "0 < variance <= 1", "null to choose k by"]),
    ("adapter: {variance: 1.5}\n" + TWO_TASKS, ["adapter.variance", "0 < variance <= 1"]),
    ("adapter: {phi: -1}\n" + TWO_TASKS, ["adapter.phi", "must be >= 0"]),
    ("adapter: {p: 0}\n" + TWO_TASKS, ["adapter.p", "null to use r"]),
    ("adapter: {k: 0}\n" + TWO_TASKS, ["adapter.k", "adapter.variance or adapter.max_error"]),
    ("adapter: {target_modules: []}\n" + TWO_TASKS, ["adapter.target_modules", "at least one"]),
    ("training: {mode: full}\n" + TWO_TASKS, ["training.mode", "'full'", ", ".join(TRAINING_MODES)]),
    ("training: {lr: 0}\n" + TWO_TASKS, ["training.lr", "> 0"]),
    ("training: {lora_lr: -1}\n" + TWO_TASKS, ["training.lora_lr", "> 0", "null to train LoRA tasks at training.lr"]),
    ("training: {lr_scheduler: cos}\n" + TWO_TASKS, ["training.lr_scheduler", "'cos'", ", ".join(LR_SCHEDULERS)]),
    ("training: {warmup_ratio: 0.6}\n" + TWO_TASKS, ["training.warmup_ratio", "[0, 0.5]"]),
    ("training: {warmup_ratio: -0.1}\n" + TWO_TASKS, ["training.warmup_ratio", "[0, 0.5]"]),
    ("training: {max_grad_norm: -1}\n" + TWO_TASKS, ["training.max_grad_norm", ">= 0", "disable clipping"]),
    ("training: {max_grad_norm: off}\n" + TWO_TASKS, ["training.max_grad_norm", "a number or null"]),
    ("adapter: {max_error: 0}\n" + TWO_TASKS, ["adapter.max_error", "0 < max_error < 1"]),
    ("adapter: {max_error: 1}\n" + TWO_TASKS, ["adapter.max_error", "0 < max_error < 1"]),
    ("tasks:\n  - {name: a, train: data/a/train.parquet}\n  - {name: a, train: data/b/train.parquet}\n",
     ["tasks.1.name", "repeats tasks.0.name", "unique"]),
    ("tasks:\n  - {name: 'a b', train: data/a/train.parquet}\n", ["tasks.0.name", "not a valid name"]),
    ("tasks:\n  - {name: a, train: data/a/train.parquet, num_labels: 1}\n", ["tasks.0.num_labels", ">= 2"]),
    ("tasks: []\n", ["tasks: empty", "add at least one task"]),
    ("store: {redis_url: 'http://h:1'}\n" + TWO_TASKS, ["store.redis_url", "redis, rediss, unix"]),
    ("store: {namespace: 'a/b'}\n" + TWO_TASKS, ["store.namespace", "not a valid name"]),
    ("cluster: {num_gpus_per_task: -1}\n" + TWO_TASKS, ["cluster.num_gpus_per_task", ">= 0"]),
    ("tasks:\n  - {name: a, train: data/zz/train.parquet}\n",
     ["tasks.0.train", "file not found: data/zz/train.parquet", "python -m jobs.datasets.glosses --out data"]),
    ("tasks:\n  - {name: a, train: data/a/train.parquet, eval: data/a/test.parquet}\n",
     ["tasks.0.eval", "file not found: data/a/test.parquet"]),
    ("- a\n- b\n", ["a job file is a mapping"]),
    ("tasks: [\n", ["not valid YAML"]),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), FILE_ERRORS, ids=[e[1][0] for e in FILE_ERRORS])
def test_file_errors_name_the_key_and_fix(data_tmp: Path, text: str, expected: list[str]) -> None:
    with pytest.raises(JobConfigError) as info:
        _load(data_tmp, text)
    for part in expected:
        assert part in str(info.value)


OVERRIDE_ERRORS = [
    ("training.steps", ["expected KEY=VALUE"]),
    ("training.stepz=1", ["training.stepz: unknown key", "Did you mean 'steps'", "log_every"]),
    ("tasks.0.nm=x", ["tasks.0.nm: unknown key", "Valid keys under tasks.0: name, train, eval, num_labels"]),
    ("tasks.5.name=x", ["tasks has 2 entries", "tasks.5 does not exist"]),
    ("tasks.first.name=x", ["tasks is a list", "tasks.0"]),
    ("training.steps.x=1", ["training.steps is a single value"]),
    ("training.steps=abc", ["training.steps", "an integer"]),
    ("tasks=[{name: a, trian: b}]", ["tasks.0.trian: unknown key"]),
    ("tasks=[{name: a, train: data/a/train.parquet, num_labels: x}]", ["tasks.0.num_labels", "an integer or null"]),
    ("training.mode=fast", ["training.mode", ", ".join(TRAINING_MODES)]),
    ("training.warmup=0.1", ["training.warmup: unknown key", "Did you mean 'warmup_ratio'"]),
    ("adapter.max_eror=0.1", ["adapter.max_eror: unknown key", "Did you mean 'max_error'"]),
]


@pytest.mark.parametrize(("override", "expected"), OVERRIDE_ERRORS, ids=[e[0] for e in OVERRIDE_ERRORS])
def test_override_errors_name_the_key(data_tmp: Path, override: str, expected: list[str]) -> None:
    with pytest.raises(JobConfigError) as info:
        _load(data_tmp, overrides=(override,))
    for part in expected:
        assert part in str(info.value)


def test_all_problems_are_reported_together(data_tmp: Path) -> None:
    with pytest.raises(JobConfigError) as info:
        _load(
            data_tmp,
            overrides=(
                "adapter.r=0",
                "adapter.phi=-2",
                "adapter.max_error=2",
                "training.batch_size=0",
                "training.warmup_ratio=0.9",
                "model.max_length=0",
                "tasks.1.name=a",
                "store.namespace=a/b",
            ),
        )
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid job:"
    keys = [line.removeprefix("  - ").split(":")[0] for line in lines[1:]]
    assert keys == [
        "model.max_length",
        "adapter.r",
        "adapter.phi",
        "adapter.max_error",
        "training.batch_size",
        "training.warmup_ratio",
        "tasks.1.name",
        "store.namespace",
    ]


SECTIONS = [
    # (a section with one bad field, the key its own check names)
    (ModelConfig(builder=" "), "model.builder"),
    (AdapterConfig(max_error=0.0), "adapter.max_error"),
    (TrainingConfig(lr_scheduler="step"), "training.lr_scheduler"),
    (TaskConfig(name="a b", train="s3://b/a.parquet"), "tasks.3.name"),
    (ClusterConfig(max_retries=-2), "cluster.max_retries"),
    (StoreConfig(redis_url="http://h:1"), "store.redis_url"),
    (TrackingConfig(experiment=" "), "tracking.experiment"),
]


@pytest.mark.parametrize(("section", "key"), SECTIONS, ids=[s[1] for s in SECTIONS])
def test_each_section_checks_its_own_fields(section, key: str) -> None:
    problems = section.problems(key.rsplit(".", 1)[0]) if isinstance(section, TaskConfig) else section.problems()
    assert [p.split(":")[0] for p in problems] == [key]


def test_section_defaults_pass_their_own_checks() -> None:
    for section in (ModelConfig, AdapterConfig, TrainingConfig, ClusterConfig, StoreConfig, TrackingConfig):
        assert section().problems() == [], section
    assert TaskConfig(name="a", train="s3://b/a.parquet").problems("tasks.0") == []


def test_check_files_false_skips_only_the_file_check(tmp_path: Path) -> None:
    job = _load_unchecked(tmp_path, "tasks:\n  - {name: a, train: nowhere/train.parquet}\n")
    assert job.tasks[0].train == str(Path.cwd() / "nowhere/train.parquet")
    with pytest.raises(JobConfigError, match="adapter.r"):
        _load_unchecked(tmp_path, "adapter: {r: 0}\ntasks:\n  - {name: a, train: nowhere.parquet}\n")


def _load_unchecked(tmp_path: Path, text: str) -> JobConfig:
    return load_job(_job_file(tmp_path, text), [], check_files=False)


def test_remote_task_uris_are_kept_and_not_checked(tmp_path: Path) -> None:
    job = load_job(_job_file(tmp_path, "tasks:\n  - {name: a, train: 's3://bucket/a/train.parquet'}\n"), [])
    assert job.tasks[0].train == "s3://bucket/a/train.parquet"


def test_missing_job_file() -> None:
    with pytest.raises(FileNotFoundError, match="job file not found: .*nope.yaml"):
        load_job("nope.yaml", [])


def test_validate_checks_types_of_hand_built_configs() -> None:
    job = JobConfig(training=TrainingConfig(steps="5"), tasks=[TaskConfig(name="a", train="s3://b/a.parquet")])  # type: ignore[arg-type]
    with pytest.raises(JobConfigError, match=r"training.steps: got '5'; set it to an integer"):
        validate(job)
    job = JobConfig(adapter=AdapterConfig(r=True), tasks=[TaskConfig(name="a", train="s3://b/a.parquet")])
    with pytest.raises(JobConfigError, match="adapter.r"):
        validate(job)
    validate(JobConfig(adapter=AdapterConfig(lora_alpha=16), tasks=[TaskConfig(name="a", train="s3://b/a")]))


def test_job_config_error_is_a_share_cl_error() -> None:
    assert issubclass(JobConfigError, ShareClError) and issubclass(JobConfigError, ValueError)


# ---------------------------------------------------------------- MLflow params


def test_to_dict_is_flat_and_redacts_secrets(data_tmp: Path) -> None:
    job = _load(
        data_tmp,
        overrides=(
            "store.redis_url=redis://:s3cret@redis.internal:6379/0",
            "tracking.mlflow_uri=http://me:pw@mlflow:5000",
            "cluster.runtime_env={env_vars: {HF_TOKEN: abc, MODE: fast}}",
        ),
    )
    params = to_dict(job)
    assert params["training.steps"] == 200
    assert params["adapter.target_modules"] == "query,value"
    assert params["tasks.1.name"] == "b"
    assert params["store.redis_url"] == "redis://:***@redis.internal:6379/0"
    assert params["tracking.mlflow_uri"] == "http://me:***@mlflow:5000"
    assert params["cluster.runtime_env.env_vars.HF_TOKEN"] == "***"
    assert params["cluster.runtime_env.env_vars.MODE"] == "fast"
    assert all(not isinstance(v, list | dict) for v in params.values())
    assert "s3cret" not in str(params) and "abc" not in str(params.values())
    # The job itself is untouched.
    assert dataclasses.asdict(job)["store"]["redis_url"].endswith("s3cret@redis.internal:6379/0")


def test_to_dict_is_accepted_by_mlflow(data_tmp: Path) -> None:
    import mlflow

    job = _load(data_tmp)
    mlflow.set_tracking_uri(f"sqlite:///{data_tmp / 'mlflow.db'}")
    try:
        mlflow.set_experiment(job.experiment_name)
        with mlflow.start_run() as run:
            mlflow.log_params(to_dict(job))
        logged = mlflow.get_run(run.info.run_id).data.params
    finally:
        mlflow.set_tracking_uri(None)
    assert logged["training.mode"] == "auto" and logged["tasks.0.name"] == "a"
