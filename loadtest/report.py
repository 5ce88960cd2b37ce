"""What every benchmark script shares: the machine line, markdown tables, and replacing the
script's own section of BENCHMARKS.md (between begin/end markers) with a fresh result."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path


def machine() -> str:
    import torch  # here, so that printing a table needs no torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"


def markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_section(path: Path, key: str, title: str, paragraphs: list[str]) -> None:
    """Put `### title (date)` and `paragraphs` into `path`, replacing the previous run of `key`."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    body = "\n\n".join([f"### {title} ({datetime.date.today().isoformat()})", *paragraphs])
    section = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
