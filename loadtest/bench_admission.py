"""Admission control under overload (issue #24): capacity first, then goodput and TTFT of the
admitted requests at 1x, 2x and 4x that load, with and without admission control, same run.

Stacks on the same model, all up for the whole run (an idle stack costs no CPU):

  admission on, queue Q  each decode worker queues at most Q requests (--max-queued, one stack
                         per value; and --max-queued-tokens prompt tokens) beyond its
                         --max-num-seqs running ones, and refuses the rest with
                         RESOURCE_EXHAUSTED; the router tries the other decode worker, then
                         refuses. Q = --max-num-seqs queues a whole batch (a queued request
                         waits about one request's length); a smaller Q bounds TTFT tighter
  admission off          both bounds so high that nothing is ever refused: everything queues

Each stack is a router and two decode workers (prompts are short, so decode prefills them
itself) on the tiny dummy Llama (`--model-args`), one torch thread per process. Load is closed
loop: C clients, each sending its next request when the last one ended. A refused client
counts the refusal and resends after `--backoff` ms (shorter than the router's Retry-After,
so that the offered load stays C).

  1. capacity: a concurrency sweep on the admission-off stack; capacity is the smallest
     concurrency whose throughput is within 5% of the best.
  2. at 1x, 2x and 4x capacity, every stack back to back (alternating order): completed
     requests, refusals, goodput (requests meeting TTFT <= 2x the median TTFT at capacity),
     TTFT of admitted requests, and TTFT as the client saw it (including its refused tries).
  3. the router's /healthz latency while a maximal text prompt (32 chars x context) goes
     through /v1/completions, against idle, on a third stack with the default model (the
     dummy has no tokenizer).

A level counts what ends inside its window, after `--warmup` seconds until the end: the
requests that complete and the refusals that come back (in steady state, what crosses one edge
of the window is balanced by what crosses the other); the calls still open are then cancelled.

    python -m loadtest.bench_admission [--quick] [--write BENCHMARKS.md]   # ~11 min on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import shlex
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from loadtest.report import machine, markdown_table, write_section
from loadtest.request import DEFAULT_SAMPLING, SLO, RequestRecord, StreamTimer, to_request
from loadtest.workloads import Fixed, RequestSpec, specs
from pdserve.v1 import router_pb2_grpc
from services.cli.stack import LocalStack
from services.rpc.server import CHANNEL_OPTIONS

KEY = "bench_admission"
OFF = "admission off"
MULTIPLES = (1, 2, 4)
NEVER = 1 << 30  # a queue bound no run reaches
MAX_PROMPT_CHARS_PER_TOKEN = 32  # router/limits.py: the default prompt cap per token of context
TOO_LONG = ": it has more tokens than the context, which the router finds by tokenizing"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Done:
    """A request that ended inside the window: its record (sent at `record.arrival_s`) and when
    its client first tried it (earlier if refused tries came before)."""

    record: RequestRecord
    first_try_s: float

    @property
    def client_ttft_s(self) -> float | None:
        """TTFT as the client saw it, its refused tries and their backoffs included."""
        ttft = self.record.ttft_s
        return None if ttft is None else self.record.arrival_s - self.first_try_s + ttft


@dataclass
class Level:
    """One closed-loop run, counted in its window [warmup, duration): the requests that ended
    and the refusals that came back inside it (in steady state, the requests running across
    the window's start balance those cut off at its end)."""

    concurrency: int
    window_s: float
    done: list[Done] = field(default_factory=list)
    refusals_s: list[float] = field(default_factory=list)  # how long each took to come back

    def completed(self) -> list[RequestRecord]:
        return [d.record for d in self.done if d.record.ok]

    def throughput(self) -> float:
        return len(self.completed()) / self.window_s


# ---- what the numbers mean (pure; tests/test_loadtest.py) --------------------------------------


def capacity(curve: dict[int, float], tolerance: float = 0.05) -> int:
    """The smallest concurrency whose throughput is within `tolerance` of the best one."""
    if not curve:
        raise ValueError("no throughput measured")
    best = max(curve.values())
    return min(c for c, thr in curve.items() if thr >= (1 - tolerance) * best)


def goodput(records: list[RequestRecord], window_s: float, slo: SLO) -> tuple[float, float]:
    """(requests/s, output tokens/s) of the completed requests that meet `slo`."""
    good = [r for r in records if r.meets(slo)]
    return len(good) / window_s, sum(r.output_tokens for r in good) / window_s


def _ms(values_s: list[float], p: float) -> float | str:
    return round(float(np.percentile(np.asarray(values_s) * 1e3, p)), 1) if values_s else "-"


def table_row(mode: str, multiple: int, level: Level, slo: SLO) -> dict:
    """One printable row: counts, throughput and goodput per second of window, latencies in ms."""
    done = level.completed()
    good_req, good_tok = goodput(done, level.window_s, slo)
    ttft = [r.ttft_s for r in done]
    return {
        "system": mode, "load": f"{multiple}x", "clients": level.concurrency, "completed": len(done),
        "failed": len(level.done) - len(done), "refused": len(level.refusals_s),
        "req/s": round(level.throughput(), 2), "goodput req/s": round(good_req, 2),
        "goodput tok/s": round(good_tok, 1), "TTFT p50": _ms(ttft, 50), "TTFT p99": _ms(ttft, 99),
        "E2E p99": _ms([r.e2e_s for r in done], 99),
        "client TTFT p99": _ms([d.client_ttft_s for d in level.done if d.record.ok], 99),
        "refusal p50": _ms(level.refusals_s, 50),
    }


# ---- the closed-loop clients -------------------------------------------------------------------


async def run_level(url: str, concurrency: int, args, seed: str) -> Level:
    """`concurrency` clients for `args.duration` seconds, then every call still open is cancelled."""
    level = Level(concurrency, args.duration - args.warmup)
    workload = Fixed(input_len=args.input_len, output_len=args.output_len)
    async with grpc.aio.insecure_channel(url, options=CHANNEL_OPTIONS) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        start = asyncio.get_running_loop().time()
        clients = [asyncio.create_task(_client(stub, specs(workload, f"{seed}:{i}"), start, args, level))
                   for i in range(concurrency)]
        await asyncio.sleep(args.duration)
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    return level


async def _client(stub, requests: Iterator[RequestSpec], start: float, args, level: Level) -> None:
    """Forever (until cancelled): send a request, and resend it after each refusal."""
    loop = asyncio.get_running_loop()
    window = start + args.warmup
    while True:
        spec, first_try, record = next(requests), loop.time() - start, None
        while record is None:
            timer = StreamTimer(spec, loop.time() - start)
            try:
                async for response in stub.Generate(to_request(spec, DEFAULT_SAMPLING), timeout=600):
                    timer.on_response(response)
                record = timer.finish()
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    if loop.time() >= window:
                        level.refusals_s.append(timer.clock() - timer.start)
                    await asyncio.sleep(args.backoff / 1e3)
                else:
                    record = timer.fail(e.code().name)
        if loop.time() >= window:
            level.done.append(Done(record, first_try))


def measure(url: str, concurrency: int, args, seed: str) -> Level:
    level = asyncio.run(run_level(url, concurrency, args, seed))
    failed = [d.record.error for d in level.done if not d.record.ok]
    print(f"  {concurrency:>3} clients: {level.throughput():.2f} req/s, {len(level.refusals_s)} refused"
          + (f", failed {failed[:3]}" if failed else ""), flush=True)
    time.sleep(args.settle)
    return level


# ---- /healthz while a maximal prompt tokenizes -------------------------------------------------


def _poll_healthz(port: int, stop: threading.Event, interval: float, out: list[tuple[float, float]]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        sent = time.perf_counter()
        conn.request("GET", "/healthz")
        conn.getresponse().read()
        out.append((sent, time.perf_counter() - sent))
        time.sleep(max(0.0, interval - (time.perf_counter() - sent)))
    conn.close()


def _completion(port: int, body: dict) -> tuple[int, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    status = conn.getresponse().status
    conn.close()
    return status, time.perf_counter() - start


def healthz_under_big_prompt(port: int, repeats: int) -> dict:
    """/healthz latencies (s) idle and while each of `repeats` maximal prompts is in flight."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/v1/models")
    card = json.loads(conn.getresponse().read())["data"][0]
    conn.close()
    chars = MAX_PROMPT_CHARS_PER_TOKEN * card["max_model_len"]  # the router's default --max-prompt-chars
    prompt = " ".join(f"word{i % 997}" for i in range(chars // 4))[:chars]
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    poller = threading.Thread(target=_poll_healthz, args=(port, stop, 0.02, samples), daemon=True)
    poller.start()
    time.sleep(3.0)
    idle_until, busy, replies = time.perf_counter(), [], []
    for _ in range(repeats):
        start = time.perf_counter()
        replies.append(_completion(port, {"model": card["id"], "prompt": prompt, "max_tokens": 1}))
        busy.append((start, time.perf_counter()))
        time.sleep(0.5)
    stop.set()
    poller.join()
    during = [lat for sent, lat in samples if any(a <= sent <= b for a, b in busy)]
    return {"chars": len(prompt), "context": card["max_model_len"], "replies": replies,
            "idle": [lat for sent, lat in samples if sent < idle_until], "during": during}


def healthz_table(h: dict) -> str:
    rows = [{"router": name, "samples": len(h[name]), "/healthz p50 ms": _ms(h[name], 50),
             "p99 ms": _ms(h[name], 99), "max ms": _ms(h[name], 100)} for name in ("idle", "during")]
    rows[1]["router"] = f"a {h['chars']:,}-char prompt in flight"
    return markdown_table(rows)


# ---- the run -----------------------------------------------------------------------------------


def modes(args) -> dict[str, tuple[int, int]]:
    """System name -> (queued requests, queued prompt tokens) per decode worker."""
    return {OFF: (NEVER, NEVER), **{f"admission on, queue {q}": (q, args.max_queued_tokens) for q in args.max_queued}}


def stack_for(name: str, queued: tuple[int, int], args) -> LocalStack:
    worker = ["--max-queued-requests", str(queued[0]), "--max-queued-tokens", str(queued[1])]
    model = [*shlex.split(args.model_args), "--max-num-seqs", str(args.max_num_seqs)]
    return LocalStack(model, num_prefill=0, num_decode=2, env=ONE_THREAD, log_dir=_log_dir(args, name),
                      worker_argv=worker)


def _log_dir(args, name: str) -> Path | None:
    if not args.log_dir:
        return None
    path = args.log_dir / name.replace(" ", "-")
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_load(args) -> tuple[dict[int, float], int, SLO, list[dict]]:
    """The capacity sweep, then every multiple on every stack (each multiple in the reverse
    order of the one before, so that drifting load from other users falls on all alike)."""
    systems = modes(args)
    with contextlib.ExitStack() as stacks:
        url = {name: stacks.enter_context(stack_for(name, queued, args)).router_address
               for name, queued in systems.items()}
        print("capacity sweep (admission off)", flush=True)
        sweep = {c: measure(url[OFF], c, args, f"sweep:{c}") for c in args.sweep}
        curve = {c: level.throughput() for c, level in sweep.items()}
        cap = capacity(curve)
        slo = SLO(ttft_ms=round(2 * float(np.median([r.ttft_s for r in sweep[cap].completed()])) * 1e3, 1))
        print(f"capacity {cap} clients; SLO TTFT <= {slo.ttft_ms} ms", flush=True)
        rows = []
        for i, multiple in enumerate(MULTIPLES):
            for mode in list(systems) if i % 2 == 0 else list(systems)[::-1]:
                print(f"{mode}, {multiple}x", flush=True)
                rows.append(table_row(mode, multiple, measure(url[mode], multiple * cap, args, f"x{multiple}"), slo))
    rows.sort(key=lambda r: (list(systems).index(r["system"]), int(r["load"][:-1])))
    return curve, cap, slo, rows


def run_healthz(args) -> dict:
    """On the default model (the dummy has no tokenizer): a router and one decode worker."""
    with LocalStack([], num_prefill=0, num_decode=1, env=ONE_THREAD, log_dir=_log_dir(args, "healthz")) as stack:
        print("/healthz under a maximal prompt (default model)", flush=True)
        return healthz_under_big_prompt(stack.http_port, args.healthz_repeats)


def section(args, curve: dict[int, float], cap: int, slo: SLO, table: str, health: dict | None) -> list[str]:
    setup = (
        f"Machine: {machine()}; shared with other sessions while it ran. Model flags `{args.model_args}`, "
        f"`--max-num-seqs {args.max_num_seqs}`. Each stack: a router and two decode workers (`--prefill 0 --decode 2`), "
        f"OMP_NUM_THREADS=1 per process, all stacks up for the whole run. `admission on, queue Q`: "
        f"`--max-queued-requests Q --max-queued-tokens {args.max_queued_tokens}` per worker (the token bound never "
        f"binds here), Q in {', '.join(map(str, args.max_queued))}; off: both {NEVER}. Closed loop: "
        f"each client sends its next request when the last ends; a refused one resends it after {args.backoff:g} ms. "
        f"Requests: {args.input_len} random prompt tokens, {args.output_len} output tokens (greedy, ignore_eos), the "
        f"same for every stack. Each level runs {args.duration:g} s and counts what ends in its last "
        f"{args.duration - args.warmup:g} s (requests completed, refusals returned); then open calls are cancelled."
    )
    sweep = ", ".join(f"{c}: {thr:.2f}" for c, thr in curve.items())
    notes = (f"Capacity (admission off, completed req/s by concurrency): {sweep}; capacity = {cap} clients (the "
             f"smallest within 5% of the best). Goodput counts completed requests with TTFT <= {slo.ttft_ms:g} ms (2x "
             "the median TTFT at capacity). TTFT and E2E are of admitted requests; `client TTFT` adds the refused tries "
             "and backoffs before admission; `refusal p50` is how fast RESOURCE_EXHAUSTED came back. Times in ms at "
             "the client.")
    parts = [setup, notes, table]
    if health:
        replies = ", ".join(f"HTTP {status} in {secs:.2f} s" for status, secs in health["replies"])
        statuses = {status for status, _ in health["replies"]}
        parts += [f"Router liveness (default model, a router and one decode worker): `/healthz` polled every 20 ms "
                  f"over HTTP keep-alive, idle and while a {health['chars']:,}-character text prompt (the default cap: "
                  f"32 x the {health['context']}-token context) went through `/v1/completions` with max_tokens 1, "
                  f"{len(health['replies'])} times in turn ({replies}{TOO_LONG if statuses == {400} else ''}).",
                  healthz_table(health)]
    parts.append(f"Command: `python -m loadtest.bench_admission{' --quick' if args.quick else ''} --write BENCHMARKS.md`.")
    return parts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke test: short levels, a short sweep (~2 min)")
    p.add_argument("--model-args", default="--load-format dummy --preset tiny-llama --max-model-len 512",
                   help="model flags of the load stacks (default: the tiny dummy Llama)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="running sequences per decode worker")
    p.add_argument("--max-queued", type=lambda s: [int(x) for x in s.split(",")], default=[8, 2],
                   help="admission on: queued requests per decode worker, one stack per value (default 8,2)")
    p.add_argument("--max-queued-tokens", type=int, default=4096, help="admission on: queued prompt tokens per worker")
    p.add_argument("--sweep", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16, 24, 32, 48])
    p.add_argument("--duration", type=float, default=30.0, help="seconds per level")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds at the start of a level not counted")
    p.add_argument("--settle", type=float, default=1.0, help="seconds of rest between levels")
    p.add_argument("--backoff", type=float, default=100.0, help="ms a refused client waits before retrying")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--healthz-repeats", type=int, default=5, help="maximal prompts sent (0: skip)")
    p.add_argument("--log-dir", type=Path)
    p.add_argument("--write", type=Path, help="record the section in this markdown file (BENCHMARKS.md)")
    if p.parse_known_args(argv)[0].quick:  # shorter defaults; flags given still win
        p.set_defaults(sweep=[1, 4, 16], duration=8.0, warmup=2.0, healthz_repeats=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    curve, cap, slo, rows = run_load(args)
    health = run_healthz(args) if args.healthz_repeats else None
    table = markdown_table(rows)
    print(table)
    if health:
        print(healthz_table(health), f"maximal prompt replies (status, s): {health['replies']}", sep="\n")
    if args.write:
        write_section(args.write, KEY, "Admission control under overload: goodput and TTFT at 1x, 2x, 4x capacity",
                      section(args, curve, cap, slo, table, health))


if __name__ == "__main__":
    main()
