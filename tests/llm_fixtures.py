"""A tiny Llama-architecture causal LM and synthetic instruction tasks, made locally (no download).

Loaded through the same code as a real checkpoint (``AutoModelForCausalLM`` / ``AutoTokenizer`` on a
folder), so the tests and the CPU run of ``benchmarks.continual_llm`` exercise the real code path.

- ``make_tiny_llama(folder)``: a character-level tokenizer (a ``tokenizers`` WordLevel model trained on
  the task alphabet, BOS added by its post-processor as Llama's is) and a randomly initialized
  ``LlamaForCausalLM`` (2 layers, hidden 64, 4 heads, 2 key/value heads), both ``save_pretrained``;
  a few seconds of CPU.
- ``make_string_tasks(folder)``: instruction tasks on short letter strings (``copy``, ``reverse``, ...)
  as Parquet splits plus the ``tasks.json`` manifest the continual benchmark reads.

From the command line (the CPU run of the LLM benchmark)::

    python -m tests.llm_fixtures --out /tmp/tiny-llm      # writes /tmp/tiny-llm/model and /tmp/tiny-llm/tasks
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from collections.abc import Callable
from pathlib import Path

from workers.instruction_data import write_instruction_split

LETTERS = "abcdef"
STRING_LENGTH = 3
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
# The prompt is "<task word> <letters separated by spaces> =" and the response the transformed letters,
# space-separated so that ROUGE-L (which splits on spaces) scores letter by letter.
TRANSFORMS: dict[str, Callable[[str], str]] = {
    "copy": lambda s: s,
    "reverse": lambda s: s[::-1],
    "rotate": lambda s: s[1:] + s[:1],
    "shift": lambda s: "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in s),
}


def prompt_of(task: str, letters: str) -> str:
    return f"{task} {' '.join(letters)} ="


def response_of(task: str, letters: str) -> str:
    return " " + " ".join(TRANSFORMS[task](letters))


def alphabet() -> str:
    """Every character a prompt or response of these tasks can hold."""
    return "".join(sorted(set(LETTERS + " =" + "".join(TRANSFORMS))))


def make_tokenizer(folder: Path):
    """A character-level ``PreTrainedTokenizerFast``: one token per character, BOS prepended, saved to ``folder``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1)
    tok.train_from_iterator([alphabet()], trainer=trainer)
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    return fast


def make_tiny_llama(folder: str | Path, *, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """Save a random tiny ``LlamaForCausalLM`` and its tokenizer to ``folder`` (returned)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # Llama's 0.02 leaves a random 64-wide model with activations too weak for adapters to route in a
        # few hundred steps; 0.1 gives a random model that LoRA teaches to copy in ~200 steps.
        initializer_range=0.1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return folder


def string_examples(task: str, strings: list[str]) -> tuple[list[str], list[str]]:
    return [prompt_of(task, s) for s in strings], [response_of(task, s) for s in strings]


def split_strings(seed: int = 0, eval_size: int = 40) -> tuple[list[str], list[str]]:
    """All letter strings of ``STRING_LENGTH``, shuffled and cut into disjoint train and eval sets."""
    strings = ["".join(p) for p in itertools.product(LETTERS, repeat=STRING_LENGTH)]
    random.Random(seed).shuffle(strings)
    return strings[eval_size:], strings[:eval_size]


def make_string_tasks(folder: str | Path, tasks: tuple[str, ...] = ("copy", "reverse"), *, seed: int = 0) -> Path:
    """``<folder>/<task>/{train,eval}.parquet`` per task plus ``<folder>/tasks.json`` (in ``tasks`` order)."""
    folder = Path(folder)
    train_strings, eval_strings = split_strings(seed)
    manifest = []
    for task in tasks:
        for split, strings in (("train", train_strings), ("eval", eval_strings)):
            prompts, responses = string_examples(task, strings)
            write_instruction_split(folder / task / f"{split}.parquet", prompts, responses, task)
        manifest.append({"name": task, "train": f"{task}/train.parquet", "eval": f"{task}/eval.parquet"})
    (folder / "tasks.json").write_text(json.dumps({"tasks": manifest}, indent=2) + "\n", encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.llm_fixtures", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="writes <out>/model and <out>/tasks")
    parser.add_argument("--tasks", nargs="+", default=list(TRANSFORMS), choices=list(TRANSFORMS))
    args = parser.parse_args(argv)
    make_tiny_llama(args.out / "model")
    make_string_tasks(args.out / "tasks", tuple(args.tasks))
    print(f"model: {args.out / 'model'}\ntasks: {args.out / 'tasks'}")


if __name__ == "__main__":
    main()
