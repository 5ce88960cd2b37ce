"""Colocated vs disaggregated serving on the CPU under open-loop load at several rates:
the `pdserve bench serve` harness (loadtest/benchmark.py) on the long-short mix, the same
requests and arrival times for both stacks, measured in one run.

  colocated      `pdserve serve --prefill 0 --decode 1`: decode prefills every prompt itself;
                 its one worker gets all the machine's threads
  disaggregated  `pdserve serve --prefill 1 --decode 1`: prompts over 64 uncached tokens are
                 prefilled by the prefill worker and their KV shipped; each worker gets half

Both stacks are started by the script (services/cli/stack.py, what `pdserve serve` runs) on
the default model and stay up (an idle stack costs no CPU); each rate is then measured on
both back to back, in alternating order (colocated first at even rate indices), so that load
from other users of the machine drifts into both alike. Prompts are random token ids, unique
per request (each rate has its own seed, shared by both stacks), so nothing is served from a
prefix cache. Pick rates from under-load to overload of the machine:
a short probe at a rate it cannot sustain (`--rates 1 --duration 20`) shows its capacity as
the completed req/s.

    python loadtest/bench_serve_disagg_cpu.py --write BENCHMARKS.md --plots docs   # 15-20 min on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
from pathlib import Path

from loadtest.benchmark import BenchResult, run_benchmark
from loadtest.compare import kind_percentile, model_note, percentile, plot_links, ratio_rows, threads_of, value
from loadtest.report import machine, markdown_table, write_section
from loadtest.request import SLO
from loadtest.stats import table_row
from loadtest.workloads import LongShort
from services.cli.stack import LocalStack

KEY = "bench_serve_disagg_cpu"
MODES = (("colocated", 0), ("disaggregated", 1))
COLUMNS = ("system", "rate", "done", "req/s", "goodput", "out tok/s", "TTFT p50", "TTFT p90", "TTFT p90 short",
           "TTFT p90 long", "TPOT p50", "TPOT p90", "ITL p99", "E2E p50", "remote")
# Disaggregated over colocated, for the numbers disaggregation is meant to move.
RATIOS = {"TTFT p90 short": kind_percentile("short", "ttft_ms", "p90"), "TPOT p90": percentile("tpot_ms", "p90"),
          "ITL p99": percentile("itl_ms", "p99"), "goodput": value("goodput"), "out tok/s": value("output_throughput")}


def run_all(workload: LongShort, slo: SLO, args) -> dict[str, BenchResult]:
    """Both stacks up at once, then per rate one measurement on each (alternating order)."""
    runs: dict[str, list[BenchResult]] = {name: [] for name, _ in MODES}
    with contextlib.ExitStack() as stacks:
        routers = {}
        for name, num_prefill in MODES:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads_of(num_prefill, args.threads))}
            log_dir = args.log_dir / name if args.log_dir else None
            if log_dir:
                log_dir.mkdir(parents=True, exist_ok=True)
            stack = LocalStack(shlex.split(args.model_args), num_prefill=num_prefill, num_decode=1, env=env,
                               log_dir=log_dir)
            routers[name] = stacks.enter_context(stack).router_address
        for i, rate in enumerate(args.rates):
            order = MODES if i % 2 == 0 else MODES[::-1]
            for name, _ in order:
                print(f"{name}, {rate:g} req/s", flush=True)
                runs[name].append(run_benchmark(routers[name], workload, [rate], args.duration, slo,
                                                seed=args.seed + i, warmup=args.warmup if i == 0 else 0))
    return {name: merge(parts) for name, parts in runs.items()}


def merge(parts: list[BenchResult]) -> BenchResult:
    """One result over all rates from one run per rate."""
    config = {**parts[0].config, "rates": [r.rate for p in parts for r in p.rates],
              "seed": [p.config["seed"] for p in parts]}
    return BenchResult(config, [r for p in parts for r in p.rates])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[0.08, 0.16, 0.32])
    parser.add_argument("--duration", type=float, default=80.0, help="seconds of arrivals per rate")
    parser.add_argument("--long", type=int, default=1024, help="long prompt tokens")
    parser.add_argument("--short", type=int, default=64, help="short prompt tokens")
    parser.add_argument("--long-fraction", type=float, default=0.25)
    parser.add_argument("--output", type=int, default=32, help="output tokens per request")
    parser.add_argument("--slo-ttft-ms", type=float, default=5000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=500.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads of the machine")
    parser.add_argument("--model-args", default="--max-model-len 2048",
                        help="model flags for every process (default: the default model, --max-model-len 2048)")
    parser.add_argument("--log-dir", type=Path)
    parser.add_argument("--out", type=Path, help="directory for each mode's results.json")
    parser.add_argument("--plots", type=Path, help="directory for the comparison PNGs (docs/ for the record)")
    parser.add_argument("--write", type=Path, help="record the tables in this markdown file (BENCHMARKS.md)")
    args = parser.parse_args()

    workload = LongShort(long_len=args.long, short_len=args.short, long_fraction=args.long_fraction,
                         long_output_len=args.output, short_output_len=args.output)
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    results = run_all(workload, slo, args)
    for name, result in results.items():
        if args.out:
            result.save(args.out / name)
    rows = [{c: row[c] for c in COLUMNS}
            for name, result in results.items() for r in result.rates
            for row in [table_row(r.summary, name, ("short", "long"))]]
    table, ratios = markdown_table(rows), markdown_table(ratio_rows(results, RATIOS))
    print(table, "", "disaggregated / colocated:", ratios, sep="\n")
    plots = []
    if args.plots:
        from loadtest.plots import plot_results

        plots = plot_results(results, args.plots, prefix=f"{KEY}_")
    if args.write:
        write_section(args.write, KEY, "Colocated vs disaggregated under open-loop load on the CPU",
                      section(args, table, ratios, plots))


def section(args, table: str, ratios: str, plots: list[Path]) -> list[str]:
    setup = (
        f"Machine: {machine()}. Model flags `{args.model_args}`{model_note(args.model_args)}. Two stacks, both "
        f"up for the whole run: colocated (`pdserve serve --prefill 0 --decode 1`, {args.threads} threads) and "
        f"disaggregated (`--prefill 1 --decode 1`, {threads_of(1, args.threads)} thread(s) per worker); each rate "
        "measured on both back to back, in alternating order. Load: `pdserve bench serve`'s open-loop client, "
        f"Poisson arrivals at {', '.join(f'{r:g}' for r in args.rates)} "
        f"req/s, {args.duration:g} s of arrivals per rate (then every request runs to its end); long-short "
        f"workload: {args.long_fraction:.0%} of requests have {args.long}-token prompts, the rest {args.short}, "
        f"{args.output} output tokens each (greedy, ignore_eos), random token ids, seeds {args.seed} + rate index, "
        f"identical requests and arrival times for both stacks. Goodput counts requests with TTFT <= {args.slo_ttft_ms:g} ms "
        f"and TPOT <= {args.slo_tpot_ms:g} ms. Latencies in ms at the client. Command: "
        f"`python loadtest/bench_serve_disagg_cpu.py --rates {','.join(f'{r:g}' for r in args.rates)} "
        f"--duration {args.duration:g} --long {args.long} --short {args.short} --output {args.output} "
        f"--slo-ttft-ms {args.slo_ttft_ms:g} --slo-tpot-ms {args.slo_tpot_ms:g} --write BENCHMARKS.md --plots docs`."
    )
    note = ("Other sessions shared this 2-core machine while it ran, so the absolute numbers are records of the "
            "setup; the ratios between the two stacks, measured back to back on the same requests, are the claim.")
    parts = [setup, note, table, "Disaggregated over colocated (below 1x is better for latencies, above 1x for "
             "goodput and throughput):", ratios]
    if plots:
        parts.append(plot_links(plots, args.write))
    return parts


if __name__ == "__main__":
    main()
