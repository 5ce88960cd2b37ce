"""Cache-aware routing against round-robin and least-loaded, on a multi-tenant shared-prefix
workload served by 2 decode instances, plus one instance with the fleet's whole KV pool as
the reference for hit rate. Same requests, same arrival times, same machine, one run.

  prefix        `--routing-policy prefix` (the default): decode instance by cached tokens
                minus a load penalty, with the imbalance gate
  round_robin   decode instances in turn
  least_loaded  the shortest queue
  single        one decode instance with twice the KV blocks (the fleet's pool in one
                cache) and all the machine's threads: every tenant's prefix lives in one
                place, the hit rate that routing over two instances tries to keep

Why a KV pool that small: routing only matters when the tenants' prefixes do not all fit in
every instance. Each decode instance gets `--blocks-per-instance` blocks, room for about
`blocks / prefix_blocks` tenants; the workload has more tenants than that but fewer than
two instances hold together. Prefix routing partitions the tenants between the instances and
keeps every prefix cached; round-robin and least-loaded send every tenant everywhere, so each
instance's LRU cache churns through all of them.

Each system is a fresh stack (services/cli/stack.py, what `pdserve serve` runs) started,
warmed with one request per tenant (sequential, unmeasured: the first sight of a prefix is a
miss for every policy), measured, and stopped before the next one starts. Decode prefills
locally unless `--prefill N` adds prefill workers.

    python loadtest/bench_routing.py --write BENCHMARKS.md     # about 10 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc

from loadtest.benchmark import BenchResult, run_benchmark
from loadtest.compare import ratio
from loadtest.report import machine, markdown_table, write_section
from loadtest.request import DEFAULT_SAMPLING, to_request
from loadtest.workloads import Tenants
from pdserve.v1 import router_pb2_grpc
from services.cli.stack import LocalStack
from services.rpc.server import CHANNEL_OPTIONS

KEY = "bench_routing"
POLICIES = ("prefix", "round_robin", "least_loaded")


@dataclass(frozen=True)
class System:
    name: str
    policy: str
    num_decode: int
    blocks: int  # per decode instance
    threads: int  # per worker


def systems(args) -> list[System]:
    fleet = [System(p, p, 2, args.blocks_per_instance, max(1, args.threads // (2 + args.prefill)))
             for p in POLICIES]
    single = System("single", "prefix", 1, 2 * args.blocks_per_instance, max(1, args.threads // (1 + args.prefill)))
    return [s for s in (*fleet, single) if s.name in args.systems]


def run_system(system: System, workload: Tenants, args) -> BenchResult:
    model = [*shlex.split(args.model_args), "--num-kv-blocks", str(system.blocks)]
    env = {**os.environ, "OMP_NUM_THREADS": str(system.threads)}
    log_dir = args.log_dir / system.name if args.log_dir else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    stack = LocalStack(model, num_prefill=args.prefill, num_decode=system.num_decode, env=env, log_dir=log_dir,
                       router_argv=["--routing-policy", system.policy])
    with stack:
        warm_up(stack.router_address, workload, args.seed)
        return run_benchmark(stack.router_address, workload, args.rates, args.duration, seed=args.seed,
                             warmup=0, progress=args.progress)


def warm_up(url: str, workload: Tenants, seed: int) -> None:
    """One request per tenant, one at a time, so that each prefix has been seen once."""
    rng = random.Random(f"warm:{seed}")
    with grpc.insecure_channel(url, options=CHANNEL_OPTIONS) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for tenant in range(workload.num_tenants):
            spec = workload.request(f"tenant-{tenant}", workload.prefix(tenant) + workload.tokens(rng, workload.suffix_len),
                                    workload.output_len)
            for _ in stub.Generate(to_request(spec, DEFAULT_SAMPLING), timeout=300):
                pass  # an error raises; the stream's end means the prefix is cached


def rows_of(results: dict[str, BenchResult]) -> list[dict]:
    rows = []
    for name, result in results.items():
        for r in result.rates:
            s = r.summary
            ok = [x for x in r.records if x.ok]
            per_instance = Counter(x.decode_instance for x in ok)
            homes = {}  # tenant -> the decode instances that served it
            for x in ok:
                homes.setdefault(x.kind, set()).add(x.decode_instance)
            rows.append({
                "system": name, "rate": f"{r.rate:g}", "done": s["completed"], "failed": s["failed"],
                "TTFT p50": _ms(s["ttft_ms"]["p50"]), "TTFT p90": _ms(s["ttft_ms"]["p90"]),
                "TTFT p99": _ms(s["ttft_ms"]["p99"]), "E2E p90": _ms(s["e2e_ms"]["p90"]),
                "hit rate": _pct(s["decode_hit_rate"]),
                "requests per instance": " / ".join(str(n) for _, n in sorted(per_instance.items())),
                "instances per tenant": f"{sum(len(h) for h in homes.values()) / max(1, len(homes)):.2f}",
            })
    return rows


def goal_rows(results: dict[str, BenchResult]) -> list[dict]:
    """Per rate: round-robin's and least-loaded's p90 TTFT over prefix's (the goal: >= 5x), and
    each policy's hit rate as a fraction of the single instance's (the goal: >= 90%)."""
    if not {"prefix", "single"} <= results.keys():
        return []
    rows = []
    for i, rate in enumerate(results["prefix"].config["rates"]):
        prefix, single = results["prefix"].rates[i].summary, results["single"].rates[i].summary
        row = {"rate": f"{rate:g}"}
        for name in ("round_robin", "least_loaded"):
            if name not in results:
                continue
            other = results[name].rates[i].summary
            row[f"{name} / prefix TTFT p90"] = ratio(other["ttft_ms"]["p90"], prefix["ttft_ms"]["p90"])
        for name in (p for p in POLICIES if p in results):
            row[f"{name} hits / single"] = _pct(_frac(results[name].rates[i].summary["decode_hit_rate"],
                                                      single["decode_hit_rate"]))
        rows.append(row)
    return rows


def _ms(x: float | None) -> str | float:
    return "-" if x is None else round(x, 1)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _frac(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def main(argv: list[str] | None = None) -> dict[str, BenchResult]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[1.0])
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of arrivals per rate")
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--prefix-len", type=int, default=384, help="tokens of each tenant's shared prefix")
    parser.add_argument("--suffix-len", type=int, default=32, help="unique tokens per request")
    parser.add_argument("--output", type=int, default=16, help="output tokens per request")
    parser.add_argument("--blocks-per-instance", type=int, default=168,
                        help="KV blocks of each of the 2 decode instances (the single one gets twice as many)")
    parser.add_argument("--systems", type=lambda s: s.split(","), default=[*POLICIES, "single"],
                        help="which of prefix,round_robin,least_loaded,single to run (default: all)")
    parser.add_argument("--prefill", type=int, default=0, help="prefill workers in every stack")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads of the machine")
    parser.add_argument("--model-args", default="--max-model-len 1024",
                        help="model flags for every process (default: the default model, --max-model-len 1024)")
    parser.add_argument("--log-dir", type=Path)
    parser.add_argument("--out", type=Path, help="directory for each system's results.json")
    parser.add_argument("--write", type=Path, help="record the tables in this markdown file (BENCHMARKS.md)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)

    workload = Tenants(num_tenants=args.tenants, prefix_len=args.prefix_len, suffix_len=args.suffix_len,
                       output_len=args.output)
    results = {}
    for system in systems(args):
        print(f"{system.name}: {system.num_decode} decode instance(s) x {system.blocks} KV blocks", flush=True)
        results[system.name] = run_system(system, workload, args)
        if args.out:
            results[system.name].save(args.out / system.name)
    goal = goal_rows(results)
    table, goals = markdown_table(rows_of(results)), markdown_table(goal) if goal else ""

    print(table, "", goals, sep="\n")
    if args.write:
        write_section(args.write, KEY, "Cache-aware routing vs round-robin and least-loaded (2 decode instances)",
                      section(args, table, goals))
    return results


def section(args, table: str, goals: str) -> list[str]:
    prefix_blocks = args.prefix_len // 16
    setup = (
        f"Machine: {machine()}. Model flags `{args.model_args}`; block size 16. Workload `tenants`: {args.tenants} "
        f"tenants drawn uniformly, each with its own {args.prefix_len}-token prefix ({prefix_blocks} whole blocks), "
        f"plus a unique {args.suffix_len}-token suffix per request, {args.output} output tokens (greedy, ignore_eos); "
        f"Poisson arrivals at {', '.join(f'{r:g}' for r in args.rates)} req/s for {args.duration:g} s, the same "
        f"requests and arrival times for every system. Fleet: {args.prefill} prefill and 2 decode instances of "
        f"{args.blocks_per_instance} KV blocks each (room for about {args.blocks_per_instance // prefix_blocks} "
        f"tenants' prefixes), one torch thread per worker; `single`: one decode instance of "
        f"{2 * args.blocks_per_instance} blocks with all {args.threads} threads, the reference for hit rate. Each "
        "system is started fresh, warmed with one request per tenant (unmeasured), measured, and stopped. Hit "
        "rate: prompt tokens decode found in its prefix cache over all prompt tokens (the best possible here is "
        f"{prefix_blocks * 16}/{args.prefix_len + args.suffix_len} = "
        f"{prefix_blocks * 16 / (args.prefix_len + args.suffix_len):.0%}). 'instances per tenant': how many decode "
        "instances served each tenant, averaged (1 = every tenant stayed home). Latencies in ms at the client. "
        f"Command: `python loadtest/bench_routing.py --rates {','.join(f'{r:g}' for r in args.rates)} --duration "
        f"{args.duration:g} --tenants {args.tenants} --prefix-len {args.prefix_len} --suffix-len {args.suffix_len} "
        f"--output {args.output} --blocks-per-instance {args.blocks_per_instance} --prefill {args.prefill} "
        "--write BENCHMARKS.md`."
    )
    note = ("CPU absolute numbers are records of this setup; the claims are the ratios between the systems, "
            "measured in the same run on the same requests. Goals (issue 5): round-robin's p90 TTFT >= 5x "
            "prefix's, and prefix's hit rate >= 90% of the single instance's.")
    return [setup, note, table, *([goals] if goals else [])]


if __name__ == "__main__":
    main()
