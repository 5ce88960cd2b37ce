"""`pdserve bench offline`: throughput of the engine on random-token prompts, all submitted at once.
`pdserve bench serve`: the serving benchmark against a running router (loadtest/benchmark.py).

The offline defaults reproduce nano-vllm's bench workload: 256 prompts, input and output
lengths uniform in [100, 1024], ignore_eos. Model loading is excluded from the timing.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from services.cli.model_args import add_model_args, engine_config


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def input_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def random_workload(
    num_prompts: int, min_input: int, max_input: int, min_output: int, max_output: int, seed: int, vocab: int
) -> Workload:
    """Random token ids (below 10,000, as nano-vllm draws them) with uniform lengths."""
    rng = random.Random(seed)
    top = min(vocab, 10_000) - 1
    prompts = [[rng.randint(0, top) for _ in range(rng.randint(min_input, max_input))] for _ in range(num_prompts)]
    outputs = [rng.randint(min_output, max_output) for _ in range(num_prompts)]
    return Workload(prompts, outputs)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    off = bench_sub.add_parser("offline", help="offline throughput on random prompts (nano-vllm's workload)")
    off.add_argument("--num-prompts", type=int, default=256)
    off.add_argument("--min-input", type=int, default=100)
    off.add_argument("--max-input", type=int, default=1024)
    off.add_argument("--min-output", type=int, default=100)
    off.add_argument("--max-output", type=int, default=1024)
    off.add_argument("--seed", type=int, default=0, help="seed of the random workload")
    off.add_argument("--warmup", type=int, default=1, help="short warm-up requests before timing")
    off.add_argument("--temperature", type=float, default=0.0, help="0: greedy (nano-vllm's bench samples at 0.6)")
    off.add_argument("--top-p", type=float, default=1.0)
    off.add_argument("--top-k", type=int, default=-1)
    off.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    add_model_args(off)
    off.set_defaults(run=run_offline)
    _register_serve(bench_sub)


def _register_serve(bench_sub: argparse._SubParsersAction) -> None:
    from loadtest.workloads import WORKLOADS, describe

    srv = bench_sub.add_parser(
        "serve", help="serving benchmark against a router: TTFT/TPOT/ITL/e2e, throughput, goodput",
        description="Poisson arrivals at each rate (open loop), or N requests in flight (--concurrency, closed "
                    "loop), from one or --clients processes; writes results.json and PNG plots into --out.\n\n"
                    "workloads and their parameters (--workload-params KEY=VALUE,...):\n" + describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    srv.add_argument("--url", required=True, help="the router's HOST:PORT (gRPC) or its HTTP port (openai)")
    srv.add_argument("--protocol", choices=("grpc", "openai"), default="grpc",
                     help="grpc: the router's Generate; openai: /v1/completions with stream=true (SSE)")
    srv.add_argument("--model", help="openai: the model name in request bodies (default: the first of /v1/models)")
    srv.add_argument("--workload", choices=list(WORKLOADS), default="sharegpt-like")
    srv.add_argument("--workload-params", default="", help="workload parameters KEY=VALUE,... (see above)")
    srv.add_argument("--sampling-params", default="",
                     help="sampling overrides KEY=VALUE,... (default greedy, ignore_eos: exact output lengths)")
    srv.add_argument("--rates", type=_rates, help="open loop: request rates per second, e.g. 1,2,4 (default 1)")
    srv.add_argument("--concurrency", type=_counts, default=[],
                     help="closed loop: requests in flight, e.g. 64,256 (after any --rates; each its own level)")
    srv.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals (sending) per level")
    srv.add_argument("--clients", type=int, default=1,
                     help="client processes that share the load (default 1: this process); each reports its CPU "
                     "use, and one above 85%% of a core is named: then the numbers measure the client")
    srv.add_argument("--slo-ttft-ms", type=float, help="goodput: time-to-first-token bound")
    srv.add_argument("--slo-tpot-ms", type=float, help="goodput: time-per-output-token bound")
    srv.add_argument("--seed", type=int, default=0, help="seed of prompts and arrival times")
    srv.add_argument("--warmup", type=int, default=1, help="unmeasured requests before the first rate")
    srv.add_argument("--request-timeout", type=float, default=600.0, help="gRPC deadline per request, seconds")
    srv.add_argument("--out", type=Path, help="directory for results.json and the plots")
    srv.add_argument("--no-progress", action="store_true", help="no progress bar")
    srv.set_defaults(run=run_serve)


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be > 0: {text!r}")
    return rates


def _counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"concurrencies must be >= 1: {text!r}")
    return counts


def _target(args: argparse.Namespace) -> tuple[str, str]:
    """The URL to send to and, for openai, the model to name (asked from /v1/models if not given)."""
    if args.protocol == "grpc":
        return args.url, ""
    url = args.url if "://" in args.url else f"http://{args.url}"
    if args.model:
        return url, args.model
    import urllib.request

    from loadtest.benchmark import BenchmarkError

    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as reply:
            return url, json.load(reply)["data"][0]["id"]
    except (OSError, ValueError, LookupError) as e:
        raise BenchmarkError(f"no model from {url}/v1/models ({e}); is a router serving HTTP there?") from None


def client_report(summary: dict) -> list[str]:
    """One line on the clients' CPU use of a level, and a warning per saturated client."""
    usage = summary["clients"]
    level = f"c={summary['concurrency']}" if "concurrency" in summary else f"rate {summary['rate']:g}"
    lines = [f"{level}: client CPU " + ", ".join(f"#{u['index']} {u['cpu_fraction']:.0%}" for u in usage)
             + " of a core"]
    lines += [f"warning: client process #{u['index']} used {u['cpu_fraction']:.0%} of a core: it was saturated, so "
              "these numbers measure the client; run with more --clients" for u in usage if u["saturated"]]
    return lines


def run_serve(args: argparse.Namespace) -> int:
    from loadtest.benchmark import BenchmarkError, run_benchmark
    from loadtest.report import markdown_table
    from loadtest.request import SLO, parse_sampling
    from loadtest.stats import table_row
    from loadtest.workloads import make_workload, parse_params

    try:
        workload = make_workload(args.workload, parse_params(args.workload_params))
        slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
        if args.clients < 1:
            raise ValueError(f"--clients must be >= 1, got {args.clients}")
        rates = args.rates if args.rates is not None else ([] if args.concurrency else [1.0])
        url, model = _target(args)
        result = run_benchmark(url, workload, rates, args.duration, slo,
                               sampling=parse_sampling(args.sampling_params), seed=args.seed, warmup=args.warmup,
                               request_timeout=args.request_timeout, progress=not args.no_progress,
                               clients=args.clients, concurrencies=args.concurrency, protocol=args.protocol,
                               model=model)
    except (ValueError, BenchmarkError) as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2
    print(markdown_table([table_row(r.summary) for r in result.rates]))
    for r in result.rates:
        print("\n".join(client_report(r.summary)))
    if args.out:
        from loadtest.plots import plot_results

        path = result.save(args.out)
        if args.concurrency:  # the plots' x axis is the offered rate, which a closed loop has not
            print(f"wrote {path} (no plots: closed-loop levels)")
            return 0
        plots = plot_results({workload.name: result}, args.out)
        print(f"wrote {path} and {', '.join(p.name for p in plots)}")
    return 0


def run_offline(args: argparse.Namespace) -> int:
    from services.engine import LLM

    llm = LLM(engine_config(args))
    result = measure_offline(
        llm,
        random_workload(
            args.num_prompts, args.min_input, args.max_input, args.min_output, args.max_output,
            args.seed, llm.engine.layout.vocab_size,
        ),
        warmup=args.warmup,
        sampling={"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k},
    )
    layout = llm.engine.layout
    print(f"model {layout.model_identity} on {layout.device} ({str(layout.dtype).removeprefix('torch.')})")
    print(format_table([result]))
    if args.json:
        print(json.dumps({k: result[k] for k in ("output_tokens", "elapsed_s", "output_tokens_per_s", "cpu_s")}))
    return 0


def measure_offline(llm, workload: Workload, warmup: int = 1, name: str = "pdserve",
                    sampling: dict | None = None) -> dict:
    """`sampling`: SamplingParams fields for every request (default greedy); ignore_eos always."""
    from services.engine import SamplingParams

    sampling = {"temperature": 0.0, **(sampling or {})}
    if warmup:
        llm.generate(workload.prompts[:warmup], SamplingParams(max_tokens=4, ignore_eos=True, **sampling))
    params = [SamplingParams(max_tokens=n, ignore_eos=True, **sampling) for n in workload.output_lens]
    start, cpu = time.perf_counter(), time.process_time()
    outputs = llm.generate(workload.prompts, params)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == workload.output_tokens, "ignore_eos run produced a different number of tokens"
    return {
        "name": name,
        "requests": len(workload.prompts),
        "input_tokens": workload.input_tokens,
        "output_tokens": produced,
        "elapsed_s": round(elapsed, 4),
        "cpu_s": round(cpu, 4),  # this process's CPU (all threads) in that time: what the engine costs per token
        "output_tokens_per_s": round(produced / elapsed, 1),
        "total_tokens_per_s": round((produced + workload.input_tokens) / elapsed, 1),
    }


def format_table(rows: list[dict]) -> str:
    cols = ["name", "requests", "input_tokens", "output_tokens", "elapsed_s", "output_tokens_per_s",
            "total_tokens_per_s", "vs_hf"]
    cols = [c for c in cols if any(c in r for r in rows)]
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths, strict=True))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *map(line, cells)])
