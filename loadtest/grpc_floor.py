"""The floor under the router's CPU per streamed token (issue #32): what Python gRPC (grpc.aio
on uvloop, as the router runs it) costs per server-streamed message when the server does
nothing else.

A server process answers Router.Generate with one GenerateResponse per token (one token id,
a word of text, as the router sends at --stream-interval 1), paced by a step clock: every
--step-ms each open stream gets its next token, as a decode step's frame hands the router a
token for every request at once. --clients processes keep --streams calls open in a closed
loop for --duration seconds. The server's CPU (/proc, all its threads) over the tokens
streamed is grpc's own cost per message plus one asyncio queue hand-off and one generator
layer: the part of the router's µs per token that trimming pdserve's code cannot remove.

    python loadtest/grpc_floor.py [--step-ms 20 80] [--streams 256] [--duration 15]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import time

import grpc
import uvloop

from loadtest.proc_cpu import MachineCpu, ProcessTree
from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.cli.stack import free_port


class _Steps:
    """The step clock: each tick puts one token's turn into every open stream's queue."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue] = set()

    async def run(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            for queue in self.queues:
                queue.put_nowait(None)


class _Servicer(router_pb2_grpc.RouterServicer):
    def __init__(self, steps: _Steps, tokens: int) -> None:
        self.steps, self.tokens = steps, tokens

    async def Generate(self, request, context):
        queue: asyncio.Queue = asyncio.Queue()
        self.steps.queues.add(queue)
        try:
            for i in range(self.tokens):
                await queue.get()
                response = common_pb2.GenerateResponse(request_id=request.request_id)
                delta = response.outputs.add(index=0, token_ids=[1000 + i], text=" word")
                if i == self.tokens - 1:
                    response.finished, delta.finish_reason = True, "length"
                yield response
        finally:
            self.steps.queues.discard(queue)


async def _serve(port: int, step_s: float, tokens: int, ready) -> None:
    server = grpc.aio.server()
    steps = _Steps()
    router_pb2_grpc.add_RouterServicer_to_server(_Servicer(steps, tokens), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    clock = asyncio.create_task(steps.run(step_s))
    ready.set()
    try:
        await server.wait_for_termination()
    finally:
        clock.cancel()


def _server_main(port: int, step_s: float, tokens: int, ready) -> None:
    uvloop.run(_serve(port, step_s, tokens, ready))


async def _load(port: int, streams: int, seconds: float) -> int:
    """Closed loop of `streams` calls for `seconds`; the tokens received."""
    received = 0
    stop = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def one(k: int) -> None:
            nonlocal received
            while time.monotonic() < stop:
                async for response in stub.Generate(router_pb2.GenerateRequest(request_id=f"r{k}")):
                    received += len(response.outputs[0].token_ids)

        await asyncio.gather(*(one(k) for k in range(streams)))
    return received


def _client_main(port: int, streams: int, seconds: float, out) -> None:
    out.put(uvloop.run(_load(port, streams, seconds)))


def _cpu(pid: int) -> float:
    return ProcessTree.snapshot(os.getpid()).procs[pid][2]


def measure(step_ms: float, args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    port, ready, out = free_port(), ctx.Event(), ctx.Queue()
    server = ctx.Process(target=_server_main, args=(port, step_ms / 1000, args.tokens, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the gRPC server did not start")
        per_client = max(1, args.streams // args.clients)
        clients = [ctx.Process(target=_client_main, args=(port, per_client, args.duration, out), daemon=True)
                   for _ in range(args.clients)]
        load1, machine0 = os.getloadavg()[0], MachineCpu.read()
        cpu0, wall0 = _cpu(server.pid), time.monotonic()
        for client in clients:
            client.start()
        tokens = sum(out.get(timeout=args.duration + 120) for _ in clients)
        cpu, wall = _cpu(server.pid) - cpu0, time.monotonic() - wall0
        for client in clients:
            client.join()
        busy = MachineCpu.read().busy_cores(machine0, wall)
    finally:
        server.kill()
        server.join()
    return {"step_ms": step_ms, "tok_s": tokens / wall, "server_core": cpu / wall, "us_per_token": cpu / tokens * 1e6,
            "load1": load1, "busy_cores": busy}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step-ms", type=float, nargs="+", default=[20.0, 80.0], help="the step clock's period(s)")
    p.add_argument("--streams", type=int, default=256, help="open calls (closed loop)")
    p.add_argument("--clients", type=int, default=2, help="client processes")
    p.add_argument("--tokens", type=int, default=128, help="tokens per call")
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    print("| step ms | tok/s | server % of a core | server µs/token | load 1m | busy cores |")
    print("|---|---|---|---|---|---|")
    for _ in range(args.repeats):
        for step_ms in args.step_ms:
            r = measure(step_ms, args)
            print(f"| {r['step_ms']:g} | {r['tok_s']:,.0f} | {r['server_core']:.0%} | {r['us_per_token']:.1f} | "
                  f"{r['load1']:.2f} | {r['busy_cores']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
