"""Inference benchmark: one batch mixing 32 tasks through all-MiniLM-L6-v2, Share vs PEFT.

    python -m benchmarks.inference [--tasks 32] [--batch 64] [--seq 128 16] [--repeats 10] [--threads 1] [--write]

- PEFT: one ``PeftModel`` holding the 32 LoRA adapters (r=8, lora_alpha=16, query and value, random
  nonzero A and B), called with ``adapter_names=[task of each row]`` (PEFT's mixed-adapter batch).
- Share: the same 32 adapters, saved by PEFT's ``save_pretrained`` and read with
  ``share.load_peft_adapter``, merged into one subspace with ``share.merge(None, adapters, policy)``;
  called as ``ShareModel(..., tasks=[task of each row])``. Two subspaces: ``k`` chosen as Share does by
  default (the paper's 60% explained variance, ``KPolicy()``) and full ``k`` (every direction kept:
  lossless, so its outputs must agree with PEFT's).
- Base: the same model with no adapter, for reference.

Same inputs for all (random token ids, full attention mask, rows assigned to tasks round-robin), the
real weights, ``torch.inference_mode``, warmup calls, then the methods called in turn ``--repeats``
times (interleaved, so interference from other users hits all alike); the median is reported.
Random adapters share no structure, so 60% of their variance needs a larger ``k`` than trained
adapters would; both ``k`` are reported.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.minilm import TARGETS, load_model, relative, timed
from benchmarks.results_md import command_line, markdown_table, write_section

HEADING = "## Inference"
NOTES = """\
"PEFT / this (total)": PEFT's time divided by this method's, whole forward pass; "(above base)": the same for
the time each spends above the base model without adapters, i.e. the cost of the adapters themselves.
"max rel. diff to PEFT": max |out - out_PEFT| / max |out_PEFT| of the last hidden state (or the layer's
output); at full k Share is lossless, at the default k it is the 60% variance truncation of 32 random
adapters. Inputs: random token ids, full attention mask. One torch thread; the machine's two cores are
shared with other users."""


def peft_model_with_adapters(tasks: int, r: int, seed: int):
    """A ``PeftModel`` with ``tasks`` LoRA adapters ``t0 ...``, every factor random and nonzero."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(load_model(), config, adapter_name="t0")
    for i in range(1, tasks):
        model.add_adapter(f"t{i}", config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                # Scaled so that each update is a few percent of the weight it adapts: outputs stay sane.
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    return model.eval()


def share_adapters(peft_model, tasks: int) -> dict:
    """The PEFT adapters as PEFT saves them, read back through Share's PEFT import."""
    from share import load_peft_adapter

    with tempfile.TemporaryDirectory() as tmp:
        names = [f"t{i}" for i in range(tasks)]
        peft_model.save_pretrained(tmp, selected_adapters=names)
        return {name: load_peft_adapter(Path(tmp) / name) for name in names}


def run(args: argparse.Namespace) -> str:
    from share import KPolicy, ShareModel, merge

    torch.set_num_threads(args.threads)
    peft = peft_model_with_adapters(args.tasks, args.r, seed=0)
    adapters = share_adapters(peft, args.tasks)
    subspaces = {
        "default k (60% variance)": merge(None, adapters, KPolicy())[0],
        "full k": merge(None, adapters, KPolicy(k=args.tasks * args.r))[0],
    }
    share_models = {}
    for label, subspace in subspaces.items():
        model = ShareModel(load_model(), TARGETS)
        model.load_subspace(subspace)
        share_models[label] = model
    base = load_model()
    rows = [f"t{i % args.tasks}" for i in range(args.batch)]
    parts = [
        f"{args.tasks} tasks, batch {args.batch} rows (round-robin over the tasks), r={args.r}, median of "
        f"{args.repeats} timed repeats after {args.warmup} warmups ({5 * args.repeats} for the single layer)."
    ]
    for seq in args.seq:
        parts.append(run_length(args, seq, rows, peft, share_models, base, subspaces))
    return "\n\n".join([*parts, NOTES])


def run_length(args, seq: int, rows: list[str], peft, share_models: dict, base, subspaces: dict) -> str:
    """Both tables for one sequence length: the whole model, and one adapted layer alone."""
    g = torch.Generator().manual_seed(seq)
    input_ids = torch.randint(1000, 30000, (args.batch, seq), generator=g)
    input_ids[:, 0] = 101  # [CLS]
    mask = torch.ones_like(input_ids)
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "PEFT, adapter_names=": lambda: peft(input_ids=input_ids, attention_mask=mask, adapter_names=rows)[0],
    }
    for label, model in share_models.items():
        calls[f"Share, {label}"] = lambda m=model: m(input_ids=input_ids, attention_mask=mask, tasks=rows)[0]
    calls["base model, no adapter"] = lambda: base(input_ids=input_ids, attention_mask=mask)[0]
    with torch.inference_mode():
        outputs = {name: call() for name, call in calls.items()}
    seconds = timed(calls, args.warmup, args.repeats)
    model_table = results_table(seconds, outputs, subspaces, "PEFT, adapter_names=", "base model, no adapter")

    # The adapted layer alone (the first query layer), where the two mechanisms differ.
    module = next(iter(share_models["full k"].layers))
    peft_layer = peft.base_model.model.get_submodule(module)
    hidden = torch.randn(args.batch, seq, 384, generator=g)
    layer_calls: dict[str, Callable[[], torch.Tensor]] = {
        "PEFT, adapter_names=": lambda: peft_layer(hidden, adapter_names=rows),
    }
    for label, model in share_models.items():
        model.set_task(rows)
        layer_calls[f"Share, {label}"] = lambda layer=model.layers[module]: layer(hidden)
    layer_calls["base nn.Linear"] = lambda: peft_layer.base_layer(hidden)
    with torch.inference_mode():
        layer_outputs = {name: call() for name, call in layer_calls.items()}
    layer_seconds = timed(layer_calls, args.warmup, 5 * args.repeats)
    layer_table = results_table(layer_seconds, layer_outputs, subspaces, "PEFT, adapter_names=", "base nn.Linear")
    agreement = relative(outputs["Share, full k"], outputs["PEFT, adapter_names="])
    print(f"seq {seq}: full-k agreement with PEFT, max relative difference {agreement:.2e}", file=sys.stderr)
    return (
        f"### {args.batch} rows x {seq} tokens\n\nWhole model (last hidden state):\n\n{model_table}\n\n"
        f"One adapted layer alone (`{module}`, input {args.batch} x {seq} x 384):\n\n{layer_table}"
    )


def results_table(
    seconds: dict[str, float], outputs: dict[str, torch.Tensor], subspaces: dict, peft_name: str, base_name: str
) -> str:
    peft_seconds, base_seconds = seconds[peft_name], seconds[base_name]
    columns = [("method", "l"), ("k per module", "l"), ("median seconds", "r"), ("time above base", "r")]
    columns += [("PEFT / this (total)", "r"), ("PEFT / this (above base)", "r"), ("max rel. diff to PEFT", "r")]
    lines = []
    for name, value in seconds.items():
        label = name.removeprefix("Share, ")
        k_text = ""
        if label in subspaces:
            ks = sorted({k for pair in subspaces[label].k().values() for k in pair})
            k_text = f"{ks[0]}" if len(ks) == 1 else f"{ks[0]}-{ks[-1]}"
        above = value - base_seconds
        is_share = name.startswith("Share")
        diff = f"{relative(outputs[name], outputs[peft_name]):.1e}" if is_share else ""
        ratio_above = f"{(peft_seconds - base_seconds) / above:.2f}x" if is_share and above > 0 else ""
        lines.append([name, k_text, f"{value:.5f}", f"{above:+.5f}", f"{peft_seconds / value:.2f}x", ratio_above, diff])
    return markdown_table(columns, lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 16], help="sequence lengths")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    parser.add_argument("--write", action="store_true", help="replace the ## Inference section of RESULTS.md")
    args = parser.parse_args(argv)
    body = run(args)
    print(body)
    if args.write:
        machine = f"{os.cpu_count()} CPUs shared with other users, {args.threads} torch thread(s)"
        write_section(HEADING, command_line("inference", argv), body, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
