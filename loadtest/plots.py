"""PNG plots of one or more benchmark results (matplotlib, Agg: no display needed).

Each function takes `{label: BenchResult}`, one label per system compared (one label for a
single run), and writes one figure:
    latency_cdf.png        CDFs of TTFT, TPOT, ITL and e2e; a row per label, a line per rate
    throughput_vs_rate.png request throughput and goodput vs offered rate; output tokens/s
    latency_vs_rate.png    TTFT and TPOT p50/p90/p99 vs rate (and TTFT p90 per kind when
                           the workload has several kinds)
"""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from loadtest.benchmark import BenchResult  # noqa: E402
from loadtest.stats import latencies  # noqa: E402

METRICS = ("ttft", "tpot", "itl", "e2e")
STYLES = ("-", "--", ":", "-.")
FILES = ("latency_cdf.png", "throughput_vs_rate.png", "latency_vs_rate.png")


def plot_results(results: dict[str, BenchResult], out_dir: Path, prefix: str = "") -> list[Path]:
    """All three figures into `out_dir` (names prefixed by `prefix`); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{prefix}{name}" for name in FILES]
    for draw, path in zip((latency_cdfs, throughput_vs_rate, latency_vs_rate), paths, strict=True):
        fig = draw(results)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
    return paths


def latency_cdfs(results: dict[str, BenchResult]) -> plt.Figure:
    fig, axes = plt.subplots(len(results), len(METRICS), figsize=(4 * len(METRICS), 3.2 * len(results)),
                             squeeze=False, sharex="col")
    for row, (label, result) in enumerate(results.items()):
        for col, metric in enumerate(METRICS):
            ax = axes[row][col]
            for rate in result.rates:
                ms = np.sort(np.asarray(latencies(rate.records)[metric]) * 1e3)
                if len(ms):
                    ax.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post", label=f"{rate.rate:g} req/s")
            _log_axis(ax, "x")
            ax.set_title(f"{label}: {metric.upper()}", fontsize=10)
            ax.set_xlabel("ms")
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel("fraction of requests")
        axes[row][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def throughput_vs_rate(results: dict[str, BenchResult]) -> plt.Figure:
    fig, (req_ax, tok_ax) = plt.subplots(1, 2, figsize=(11, 4))
    first = next(iter(results.values()))
    # What actually arrived (a Poisson draw) rather than the nominal rate: a short run's
    # throughput can sit above the nominal line, never above this one for long.
    req_ax.plot([r.rate for r in first.rates], [len(r.records) / first.config["duration_s"] for r in first.rates],
                color="grey", linestyle=":", marker=".", label="arrived")
    for color, (label, result) in _colors(results):
        rates = [r.rate for r in result.rates]
        req_ax.plot(rates, [r.summary["request_throughput"] for r in result.rates], marker="o", color=color,
                    label=f"{label} throughput")
        if all(r.summary["goodput"] is not None for r in result.rates):
            req_ax.plot(rates, [r.summary["goodput"] for r in result.rates], marker="s", linestyle="--",
                        color=color, label=f"{label} goodput")
        tok_ax.plot(rates, [r.summary["output_throughput"] for r in result.rates], marker="o", color=color,
                    label=label)
    req_ax.set(xlabel="offered rate (req/s)", ylabel="req/s", title="Throughput and goodput" + _slo_note(first))
    tok_ax.set(xlabel="offered rate (req/s)", ylabel="output tokens/s", title="Output token throughput")
    for ax in (req_ax, tok_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def latency_vs_rate(results: dict[str, BenchResult]) -> plt.Figure:
    kinds = sorted({k for res in results.values() for r in res.rates for k in r.summary["by_kind"]})
    panels = [("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")]
    fig, axes = plt.subplots(1, len(panels) + (len(kinds) > 1), figsize=(5.5 * (len(panels) + (len(kinds) > 1)), 4))
    for ax, (key, title) in zip(axes, panels):
        for color, (label, result) in _colors(results):
            for p, style in zip(("p50", "p90", "p99"), STYLES):
                values = [_nan(r.summary[key][p]) for r in result.rates]
                ax.plot([r.rate for r in result.rates], values, marker="o", linestyle=style, color=color,
                        label=f"{label} {p}")
        ax.set(xlabel="offered rate (req/s)", ylabel="ms", title=f"{title} vs rate")
        _log_axis(ax, "y")
    if len(kinds) > 1:
        ax = axes[-1]
        for color, (label, result) in _colors(results):
            for kind, style in zip(kinds, itertools.cycle(STYLES)):
                values = [_nan(r.summary["by_kind"].get(kind, {}).get("ttft_ms", {}).get("p90")) for r in result.rates]
                ax.plot([r.rate for r in result.rates], values, marker="o", linestyle=style, color=color,
                        label=f"{label} {kind}")
        ax.set(xlabel="offered rate (req/s)", ylabel="ms", title="TTFT p90 per kind")
        _log_axis(ax, "y")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _colors(results: dict[str, BenchResult]):
    """(color, (label, result)): one colour per system, the same in every figure."""
    return ((f"C{i}", item) for i, item in enumerate(results.items()))


def _slo_note(result: BenchResult) -> str:
    slo = result.config.get("slo", {})
    bounds = [f"{k.removesuffix('_ms').upper()} <= {v:g} ms" for k, v in slo.items() if v is not None]
    return f"\n(goodput: {', '.join(bounds)})" if bounds else ""


def _log_axis(ax: plt.Axes, which: str) -> None:
    """Log scale with plain numbers at 1, 2, 5 x 10^k (not 2x10^1), no minor labels."""
    if which == "x":
        ax.set_xscale("log")
        axis = ax.xaxis
    else:
        ax.set_yscale("log")
        axis = ax.yaxis
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value
