"""KV shipping throughput over the gRPC transport, between two processes on one host.

A stand-in prefill worker (its own process) answers Prefill by streaming random blocks of a
real model's block shape, encoded exactly as the real worker does (raw bytes + xxh64 checksum);
the receiving side is the real decode-side transport (GrpcKVTransport: checksum, dtype and
shape checks) plus the copy into a paged cache tensor. No model runs, so this is the cost of
shipping alone; the prefill compute it overlaps with in serving is not included.

    python loadtest/bench_kv_transfer.py [--tokens 1024] [--requests 10] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import grpc
import torch

from loadtest.report import machine, markdown_table, write_section
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from services.engine.kv_transfer import BlockData
from services.engine.presets import preset_config
from services.kv import wire
from services.kv.transport import GrpcKVTransport, PrefillDone
from services.rpc.server import CHANNEL_OPTIONS

BLOCK = 16
SHAPES = {  # name -> (layers, kv_heads, head_dim), from the presets
    name: (cfg.num_hidden_layers, cfg.num_key_value_heads, getattr(cfg, "head_dim", None)
           or cfg.hidden_size // cfg.num_attention_heads)
    for name, cfg in ((n, preset_config(n)) for n in ("smollm2-135m", "llama-3.2-1b", "llama-3.1-8b"))
}


class _FakePrefill(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.shape, self.dtype = shape, dtype
        self.block = torch.randn(shape).to(dtype)  # every block ships these bytes (encoded afresh)

    async def Handshake(self, request, context):
        return worker_pb2.HandshakeResponse(instance_id="fake", role="prefill", identity=request.identity)

    async def Prefill(self, request, context):
        n = len(request.prompt_token_ids)
        for i in range(-(-n // BLOCK)):
            tokens = min(BLOCK, n - i * BLOCK)
            data = BlockData(i, i if tokens == BLOCK else None, self.block[:, :, :tokens])
            yield worker_pb2.PrefillResponse(block=wire.encode(data))
        yield worker_pb2.PrefillResponse(result=worker_pb2.PrefillResult(first_tokens=[worker_pb2.FirstToken()]))


def _serve(port: int, shape, dtype_name: str, ready) -> None:
    async def main():
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(_FakePrefill(shape, getattr(torch, dtype_name)), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


async def _measure(port: int, shape, dtype, tokens: int, requests: int) -> list[float]:
    layers, _, _, heads, dim = shape
    transport = GrpcKVTransport({"p": f"127.0.0.1:{port}"}, "bench", worker_pb2.ModelIdentity(), shape, dtype)
    cache = torch.zeros(layers, 2, -(-tokens // BLOCK), BLOCK, heads, dim, dtype=dtype)  # the receiving pool
    times = []
    for r in range(requests + 1):  # the first request warms the channel up
        start = time.perf_counter()
        request = worker_pb2.PrefillRequest(request_id=f"r{r}", prompt_token_ids=range(tokens))
        async for item in transport.pull("p", request, timeout=120):
            if isinstance(item, PrefillDone):
                break
            cache[:, :, item.block_index, : item.num_tokens] = item.tensor
        if r:
            times.append(time.perf_counter() - start)
    await transport.close()
    return times


def run(name: str, dtype: torch.dtype, tokens: int, requests: int) -> dict:
    layers, heads, dim = SHAPES[name]
    shape = (layers, 2, BLOCK, heads, dim)
    port = _free_port()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    server = ctx.Process(target=_serve, args=(port, shape, str(dtype).removeprefix("torch."), ready), daemon=True)
    server.start()
    ready.wait(60)
    try:
        times = asyncio.run(_measure(port, shape, dtype, tokens, requests))
    finally:
        server.terminate()
    nbytes = tokens * layers * 2 * heads * dim * torch.empty((), dtype=dtype).element_size()
    t = statistics.median(times)
    return {"shape": name, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens,
            "MB/request": round(nbytes / 1e6, 1), "ms/request": round(t * 1e3, 1), "GB/s": round(nbytes / t / 1e9, 2)}


def _free_port() -> int:
    from services.cli.stack import free_port

    return free_port()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024, help="prompt tokens per request")
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--write", type=Path, help="record the table in this markdown file")
    args = parser.parse_args()
    rows = [
        run("smollm2-135m", torch.float32, args.tokens, args.requests),
        run("llama-3.2-1b", torch.bfloat16, args.tokens, args.requests),
        run("llama-3.1-8b", torch.bfloat16, args.tokens, args.requests),
    ]
    table = markdown_table(rows)
    print(table)
    if args.write:
        write_section(args.write, "bench_kv_transfer", "KV shipping over gRPC on loopback", [
            f"Machine: {machine()}. Two processes on one host: a stand-in prefill worker streaming "
            f"{BLOCK}-token blocks of each shape (encode + xxh64), the real decode-side transport "
            "(checksum, dtype/shape checks) and the copy into a paged cache; median of "
            f"{args.requests} requests of {args.tokens} prompt tokens. "
            "Command: `python loadtest/bench_kv_transfer.py`.",
            table,
        ])

if __name__ == "__main__":
    main()
