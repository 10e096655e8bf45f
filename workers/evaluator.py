"""The coordinator's evaluator for tasks trained by the workers (named by import path: ``EVALUATOR``).

The coordinator never imports ``workers/``: each task's ``EvalSpec`` names this function, and the
coordinator imports it where it runs. The job driver runs the same evaluation as a Ray task when
the coordinator's last row is missing.
"""

from __future__ import annotations

from typing import Any

from subspace_store import EvalSpec

EVALUATOR = "workers.evaluator:evaluate_subspace"


def evaluate_subspace(subspace: Any, specs: dict[str, EvalSpec]) -> dict[str, float]:
    """The score of each task in ``specs`` served from ``subspace`` (accuracy for a classification task,
    ROUGE-L for an instruction task); tasks sharing a base model (and max length) are evaluated on one model."""
    from workers.eval_models import eval_model
    from workers.instruction_data import load_task_split
    from workers.task import evaluate_tasks

    groups: dict[tuple[Any, ...], dict[str, EvalSpec]] = {}
    for task, spec in specs.items():
        key = (
            spec.builder,
            spec.model_name_or_path,
            tuple(spec.target_modules),
            spec.max_length,
            spec.dtype,
            spec.gradient_checkpointing,
        )
        groups.setdefault(key, {})[task] = spec
    accuracy: dict[str, float] = {}
    for group in groups.values():
        splits = {task: load_task_split(spec.eval_path) for task, spec in group.items()}
        first = next(iter(group.values()))
        model, tokenizer = eval_model(first, max(s.num_labels for s in splits.values()))
        model.load_subspace(subspace)
        accuracy.update(
            evaluate_tasks(model, splits, tokenizer, batch_size=first.batch_size, max_length=first.max_length)
        )
    return accuracy


def evaluate_version(redis_url: str, namespace: str, version: str, specs: dict[str, EvalSpec]) -> dict[str, float]:
    """Accuracy of each task in ``specs`` (that ``version`` holds) served from ``version``."""
    from subspace_store import SubspaceStore, connect

    client = connect(redis_url)
    try:
        store = SubspaceStore(client, namespace)
        tasks = [t for t in specs if t in store.manifest(version)["tasks"]]
        if not tasks:
            return {}
        subspace = store.get(version, tasks=tasks)
    finally:
        client.close()
    return evaluate_subspace(subspace, {t: specs[t] for t in tasks})


def launch_evaluation(
    redis_url: str,
    namespace: str,
    version: str,
    specs: dict[str, EvalSpec],
    *,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
) -> Any:
    """``evaluate_version(...)`` as a Ray task (on a GPU node, in a process of its own, where the job's tasks
    use GPUs: ``workers.ray_task.remote_function``); returns its ObjectRef."""
    from workers.ray_task import remote_function  # imports this module

    remote = remote_function(evaluate_version, gpus=num_gpus > 0)
    return remote.options(num_cpus=num_cpus, num_gpus=num_gpus, name="sharecl:evaluate").remote(
        redis_url, namespace, version, specs
    )
