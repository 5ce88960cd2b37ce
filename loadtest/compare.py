"""What the colocated-vs-disaggregated serving benchmarks share (bench_serve_disagg_cpu.py on
the CPU, bench_disagg_gpu.py on GPUs): the CPU thread split, the per-rate ratio table of the
two systems, and pieces of their BENCHMARKS.md sections."""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from pathlib import Path

from loadtest.benchmark import BenchResult

# A number read from one rate's summary (loadtest/stats.py), None where there is none.
Metric = Callable[[dict], float | None]


def percentile(key: str, p: str) -> Metric:
    """summary[key][p], e.g. percentile("ttft_ms", "p90")."""
    return lambda s: s[key][p]


def kind_percentile(kind: str, key: str, p: str) -> Metric:
    """The same for one request kind; None when that rate had none of the kind."""
    return lambda s: s["by_kind"].get(kind, {}).get(key, {}).get(p)


def value(key: str) -> Metric:
    return lambda s: s[key]


def threads_of(num_prefill: int, threads: int) -> int:
    """On the CPU the machine's cores are split between the workers, never oversubscribed: a
    colocated worker gets them all, each of a disaggregated pair half."""
    return threads if num_prefill == 0 else max(1, threads // 2)


def ratio(num: float | None, den: float | None) -> str:
    return "-" if not num or not den else f"{num / den:.2f}x"


def ratio_rows(results: dict[str, BenchResult], metrics: dict[str, Metric],
               base: str = "colocated", other: str = "disaggregated") -> list[dict]:
    """Per rate, `other` over `base` for each metric (both measured at the same rates)."""
    rows = []
    for b, o in zip(results[base].rates, results[other].rates, strict=True):
        rows.append({"rate": f"{b.rate:g}", **{name: ratio(m(o.summary), m(b.summary)) for name, m in metrics.items()}})
    return rows


def plot_links(plots: list[Path], markdown: Path) -> str:
    """Markdown images of `plots`, relative to the file that embeds them."""
    base = markdown.resolve().parent
    return " ".join(f"![{p.stem}]({os.path.relpath(p.resolve(), base)})" for p in plots)


def model_note(model_args: str, default: str = "the default model, SmolLM2-135M-Instruct, float32") -> str:
    """Names the model when the flags leave it to the default."""
    own = any(flag in shlex.split(model_args) for flag in ("--model", "--load-format", "--preset"))
    return "" if own else f" ({default})"
