"""Disaggregated vs colocated serving on one machine, same load: TTFT and inter-token latency.

Each mode starts a real stack (`services/cli/stack.py`) on the default model:
  colocated      router + 1 decode worker that prefills everything itself
  disaggregated  router + 1 prefill worker + 1 decode worker (prompts over 64 tokens ship KV)
then runs the same closed-loop load: C clients, each sending one request after another for
D seconds; a request is long (L prompt tokens) with probability P, else short (S tokens), and
asks for O output tokens (ignore_eos). Prompts are random token ids, unique per request, so
nothing is served from a prefix cache. The machine's cores are split, not oversubscribed:
colocated uses all threads in its one worker, disaggregated gives each worker half.

    python loadtest/bench_disagg_cpu.py [--duration 60] [--clients 4] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import time
from pathlib import Path

import grpc

from loadtest.report import machine, markdown_table, write_section
from pdserve.v1 import router_pb2, router_pb2_grpc
from services.cli.stack import LocalStack
from services.engine.sampling_params import SamplingParams
from services.rpc.convert import params_to_proto



def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


async def client(stub, rng: random.Random, args, deadline: float, out: dict) -> None:
    params = params_to_proto(SamplingParams(temperature=0, max_tokens=args.output, ignore_eos=True))
    while time.monotonic() < deadline:
        long = rng.random() < args.long_fraction
        n = args.long if long else args.short
        request = router_pb2.GenerateRequest(sampling=params)
        request.token_ids.ids.extend(rng.randrange(10_000) for _ in range(n))
        start = last = time.monotonic()
        first = None
        async for response in stub.Generate(request, timeout=600):
            if not any(c.token_ids for c in response.outputs):
                continue
            now = time.monotonic()
            if first is None:
                first = now
                out["ttft_long" if long else "ttft_short"].append(now - start)
            else:
                out["itl"].append(now - last)
            last = now
        out["e2e"].append(time.monotonic() - start)
        out["tokens"] += args.output


async def load(address: str, args) -> dict:
    out = {"ttft_long": [], "ttft_short": [], "itl": [], "e2e": [], "tokens": 0}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        # Warm-up: one request of each kind, not measured.
        warm = {"ttft_long": [], "ttft_short": [], "itl": [], "e2e": [], "tokens": 0}
        await client(stub, random.Random(-1), argparse.Namespace(**{**vars(args), "long_fraction": 0.5}),
                     time.monotonic() + 1, warm)
        start = time.monotonic()
        deadline = start + args.duration
        await asyncio.gather(*(client(stub, random.Random(i), args, deadline, out) for i in range(args.clients)))
        out["elapsed"] = time.monotonic() - start
    return out


def run_mode(name: str, num_prefill: int, threads: int, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with LocalStack(shlex.split(args.model_args), num_prefill=num_prefill, num_decode=1, env=env, log_dir=args.log_dir) as stack:
        result = asyncio.run(load(stack.router_address, args))
    ms = lambda xs, p: round(percentile(xs, p) * 1e3, 1)  # noqa: E731
    return {
        "mode": name, "threads/worker": threads, "requests": len(result["e2e"]),
        "TTFT long p50": ms(result["ttft_long"], 50), "TTFT long p90": ms(result["ttft_long"], 90),
        "TTFT short p50": ms(result["ttft_short"], 50), "TTFT short p90": ms(result["ttft_short"], 90),
        "ITL p50": ms(result["itl"], 50), "ITL p90": ms(result["itl"], 90), "ITL p99": ms(result["itl"], 99),
        "ITL max": ms(result["itl"], 100),
        "out tok/s": round(result["tokens"] / result["elapsed"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--long", type=int, default=1024, help="long prompt tokens")
    parser.add_argument("--short", type=int, default=64, help="short prompt tokens")
    parser.add_argument("--long-fraction", type=float, default=0.25)
    parser.add_argument("--output", type=int, default=32, help="output tokens per request")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads of the machine")
    parser.add_argument("--model-args", default="--max-model-len 2048",
                        help="model flags for the workers (default: the default model, --max-model-len 2048)")
    parser.add_argument("--log-dir", type=Path)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    rows = [
        run_mode("colocated", 0, args.threads, args),
        run_mode("disaggregated", 1, max(1, args.threads // 2), args),
    ]
    table = markdown_table(rows)
    print(table)
    if args.write:
        write_section(args.write, "bench_disagg_cpu", "Disaggregated vs colocated serving on the CPU", [
            f"Machine: {machine()}. Model flags `{args.model_args}` (the default model, float32). Load: {args.clients} "
            f"closed-loop clients for {args.duration:.0f} s per mode; {args.long_fraction:.0%} of requests have "
            f"{args.long}-token prompts, the rest {args.short}; {args.output} output tokens each; latencies in ms, "
            "measured at the client. Command: `python loadtest/bench_disagg_cpu.py`.",
            table,
        ])

if __name__ == "__main__":
    main()
