"""``benchmarks/RESULTS.md``: each benchmark owns one ``## `` section and replaces only that."""

from __future__ import annotations

import platform
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def replace_section(heading: str, section: str, path: Path = RESULTS) -> None:
    """Put ``section`` (starting with ``heading``) in place of the old one, or append it."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(f"\n{heading}\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading) + 2)
        text = text[: start + 1] + section.rstrip("\n") + "\n" + (text[end:] if end >= 0 else "")
    path.write_text(text)


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that printed a result: ``python -m benchmarks.<module> ARGS``."""
    return " ".join([f"python -m benchmarks.{module}", *(argv if argv is not None else sys.argv[1:])])


def write_section(heading: str, command: str, body: str, machine: str = "") -> None:
    """Replace ``heading``'s section with ``body`` under a line naming the command and the machine."""
    where = ", ".join(part for part in (platform.machine(), machine) if part)
    replace_section(heading, f"{heading}\n\nCommand: `{command}` ({where}).\n\n{body}\n")


def markdown_table(columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table: ``columns`` are (title, ``"l"`` or ``"r"`` alignment), ``rows`` the formatted cells."""
    lines = ["| " + " | ".join(title for title, _ in columns) + " |"]
    lines.append("|" + "".join("---:|" if align == "r" else "---|" for _, align in columns))
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
