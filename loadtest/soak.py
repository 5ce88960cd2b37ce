"""Soak (issue #25): a supervised local stack at saturation, a fault every M seconds.

    python -m loadtest.soak [--minutes 10] [--fault-every 30] [--streams 16] [--write BENCHMARKS.md]

Router + 1 prefill + 2 decode workers (tiny dummy model on the CPU, a private Redis), supervised
as `pdserve serve` supervises them (LocalStack.supervise). `--streams` client threads send
greedy streaming requests back to back; every M seconds one fault, in turn: SIGKILL a decode
worker, SIGKILL the prefill worker, SIGKILL Redis (each restarted by the supervisor). A request
is lost when it errors or its tokens differ from a fault-free run of its prompt. Reported:
requests, lost, p99 TTFT, each process's RSS at start and end, and KV blocks held once idle.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from loadtest.report import markdown_table, write_section
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.cli.stack import Child, LocalStack, RestartPolicy

MODEL = ["--load-format", "dummy", "--preset", "tiny-llama", "--max-model-len", "512", "--grace", "3"]
# Short prompts prefill on decode, long ones (> 64 uncached tokens) on the prefill worker.
PROMPTS = [list(range(100 + 7 * i, 120 + 7 * i)) for i in range(4)] + \
          [list(range(3000 + 11 * i, 3150 + 11 * i)) for i in range(4)]
MAX_TOKENS = 32


def _request(prompt: list[int]) -> router_pb2.GenerateRequest:
    msg = router_pb2.GenerateRequest()
    msg.token_ids.ids.extend(prompt)
    msg.sampling.max_tokens, msg.sampling.temperature, msg.sampling.ignore_eos = MAX_TOKENS, 0, True
    return msg


def _run(stub, prompt: list[int]) -> tuple[list[int], float]:
    """(tokens, seconds to the first token)."""
    start, ttft, tokens = time.monotonic(), None, []
    for response in stub.Generate(_request(prompt), timeout=120):
        for c in response.outputs:
            if c.token_ids and ttft is None:
                ttft = time.monotonic() - start
            tokens += c.token_ids
    return tokens, ttft or 0.0


def rss_mib(child: Child) -> float:
    for line in Path(f"/proc/{child.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def blocks_held(stack: LocalStack) -> dict[str, int]:
    held = {}
    for c in [*stack.prefills, *stack.decodes]:
        stub = worker_pb2_grpc.DecodeWorkerStub if c.role == "decode" else worker_pb2_grpc.PrefillWorkerStub
        with c.channel() as channel:
            load = stub(channel).GetLoad(worker_pb2.LoadRequest(), timeout=5)
        held[c.instance_id] = load.total_kv_blocks - load.free_kv_blocks
    return held


class Soak:
    def __init__(self, stack: LocalStack, streams: int) -> None:
        self.stack, self.streams = stack, streams
        self.stop = threading.Event()
        self.results: list[tuple[str, float]] = []  # (outcome, ttft)
        self.reference: dict[int, list[int]] = {}
        self.faults: list[str] = []

    def warm_up(self) -> None:
        stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(self.stack.router_address))
        self.reference = {i: _run(stub, p)[0] for i, p in enumerate(PROMPTS)}

    def client(self, index: int) -> None:
        stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(self.stack.router_address))
        for n in itertools.count(index):
            if self.stop.is_set():
                return
            i = n % len(PROMPTS)
            try:
                tokens, ttft = _run(stub, PROMPTS[i])
                self.results.append(("ok" if tokens == self.reference[i] else "wrong", ttft))
            except grpc.RpcError as e:
                self.results.append((e.code().name, 0.0))

    def inject(self, n: int) -> None:
        stack = self.stack
        kind = n % 3
        if kind == 0:
            victim = stack.decodes[(n // 3) % len(stack.decodes)]
            victim.proc.send_signal(signal.SIGKILL)
            self.faults.append(f"SIGKILL {victim.instance_id}")
        elif kind == 1:
            stack.prefills[0].proc.send_signal(signal.SIGKILL)
            self.faults.append("SIGKILL prefill-0")
        else:
            stack.redis.kill()
            self.faults.append("SIGKILL redis")
        print(f"[soak] t={time.monotonic() - self.t0:.0f}s fault: {self.faults[-1]}", flush=True)

    def run(self, minutes: float, fault_every: float) -> None:
        clients = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(self.streams)]
        self.t0 = time.monotonic()
        for t in clients:
            t.start()
        end = self.t0 + minutes * 60
        for n in itertools.count():
            next_fault = self.t0 + (n + 1) * fault_every
            if next_fault >= end - fault_every / 2:  # leave the last stretch to recover
                break
            time.sleep(max(0.0, next_fault - time.monotonic()))
            self.inject(n)
        time.sleep(max(0.0, end - time.monotonic()))
        self.stop.set()
        for t in clients:
            t.join()


def wait_idle(stack: LocalStack, timeout: float = 60.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            held = blocks_held(stack)
            if not any(held.values()) or time.monotonic() > deadline:
                return held
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--fault-every", type=float, default=30.0, help="seconds between faults")
    p.add_argument("--streams", type=int, default=16, help="concurrent streaming clients")
    p.add_argument("--note", default="", help="a sentence for the written section (e.g. why the run was short)")
    p.add_argument("--write", type=Path, help="write the result to this BENCHMARKS.md (section soak)")
    args = p.parse_args(argv)

    log_dir = Path(tempfile.mkdtemp(prefix="pdserve-soak-"))
    stack = LocalStack(MODEL, num_prefill=1, num_decode=2, log_dir=log_dir)
    stack.start(timeout=600)
    stop = threading.Event()
    supervisor = threading.Thread(target=stack.supervise, args=(stop, RestartPolicy(crash_loop_restarts=20)),
                                  daemon=True)
    supervisor.start()
    try:
        soak = Soak(stack, args.streams)
        soak.warm_up()
        rss_start = {c.instance_id: rss_mib(c) for c in stack.children}
        soak.run(args.minutes, args.fault_every)
        held = wait_idle(stack)
        rss_end = {c.instance_id: rss_mib(c) for c in stack.children}
        restarts = {c.instance_id: len(c.restarts) for c in stack.children}
    finally:
        stop.set()
        supervisor.join()
        stack.stop()

    ok = [ttft for outcome, ttft in soak.results if outcome == "ok"]
    lost = [outcome for outcome, _ in soak.results if outcome != "ok"]
    p99 = statistics.quantiles(ok, n=100)[98] * 1000 if len(ok) >= 100 else float("nan")
    summary = [{"minutes": args.minutes, "fault every (s)": args.fault_every, "streams": args.streams,
                "faults": len(soak.faults), "requests": len(soak.results), "lost": len(lost),
                "lost by status": ", ".join(f"{s} {lost.count(s)}" for s in sorted(set(lost))) or "-",
                "p99 TTFT (ms)": f"{p99:.0f}", "blocks held at idle": sum(held.values())}]
    processes = [{"process": name, "restarts": restarts[name], "RSS start (MiB)": f"{rss_start[name]:.0f}",
                  "RSS end (MiB)": f"{rss_end[name]:.0f}",
                  "change": f"{100 * (rss_end[name] / rss_start[name] - 1):+.1f}%"} for name in rss_start]
    print(markdown_table(summary))
    print(markdown_table(processes))
    print(f"faults: {', '.join(soak.faults)}; logs in {log_dir}")
    if args.write:
        how = (f"`python -m loadtest.soak --minutes {args.minutes:g} --fault-every {args.fault_every:g} "
               f"--streams {args.streams}`: router + 1 prefill + 2 decode workers (tiny-llama dummy, CPU), supervised; "
               "faults in turn: SIGKILL a decode worker, SIGKILL the prefill worker, SIGKILL Redis. Lost = an error "
               "or tokens other than a fault-free run's. RSS of a restarted process is its new process's (its "
               "restarts are counted).")
        write_section(args.write, "soak", "Soak: faults at saturation (issue #25)",
                      [how, *([args.note] if args.note else []), markdown_table(summary), markdown_table(processes)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
