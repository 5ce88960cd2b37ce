"""KV shipping throughput between two processes on one host: bytes over gRPC, and on a GPU
also by reference (the same-GPU CUDA IPC transport, services/kv/cuda_ipc.py), same run.

A stand-in prefill worker (its own process) holds a KV pool of a real model's block shape
(random values) and answers Prefill with every block of the prompt: as bytes, read out of the
pool and encoded exactly as the real worker does (device-to-host copy, raw bytes + xxh64), or
as references to its slots. The receiving side is the real decode-side transport (checksums,
dtype, shape and slot checks) plus the copy into a paged cache on the same device, and for
references the fence and ReleaseKV. No model runs, so this is the cost of shipping alone; the
prefill compute it overlaps with in serving is not included.

    python loadtest/bench_kv_transfer.py [--device cuda] [--tokens 1024] [--requests 10] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import grpc
import torch

from loadtest.compare import ratio
from loadtest.report import machine, markdown_table, write_section
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from services.engine.kv_transfer import BlockData, BlockRef
from services.engine.presets import preset_config
from services.kv import cuda_ipc, wire
from services.kv.transport import GrpcKVTransport, PrefillDone
from services.rpc.server import CHANNEL_OPTIONS

BLOCK = 16
SHAPES = {  # name -> (layers, kv_heads, head_dim), from the presets
    name: (cfg.num_hidden_layers, cfg.num_key_value_heads, getattr(cfg, "head_dim", None)
           or cfg.hidden_size // cfg.num_attention_heads)
    for name, cfg in ((n, preset_config(n)) for n in ("smollm2-135m", "llama-3.2-1b", "llama-3.1-8b"))
}


class _FakePrefill(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: str, num_blocks: int) -> None:
        layers, _, block, heads, dim = shape
        self.dtype = dtype
        self.pool = torch.randn(layers, 2, num_blocks, block, heads, dim, device=device).to(dtype)

    async def Handshake(self, request, context):
        response = worker_pb2.HandshakeResponse(instance_id="fake", role="prefill", identity=request.identity)
        pool = cuda_ipc.export_pool(self.pool) if request.want_kv_pool else None
        if pool is not None:
            response.kv_pool.CopyFrom(pool)
        return response

    async def Prefill(self, request, context):
        n = len(request.prompt_token_ids)
        layers, _, _, _, heads, dim = self.pool.shape
        for i in range(-(-n // BLOCK)):
            tokens = min(BLOCK, n - i * BLOCK)
            block_hash = i if tokens == BLOCK else None
            if request.kv_by_reference:
                msg = wire.encode_ref(BlockRef(i, block_hash, tokens, i), layers, heads, dim, self.dtype)
            else:  # what the engine's read_block and the worker's encode do
                msg = wire.encode(BlockData(i, block_hash, self.pool[:, :, i, :tokens].to("cpu", copy=True)))
            yield worker_pb2.PrefillResponse(block=msg)
        yield worker_pb2.PrefillResponse(result=worker_pb2.PrefillResult(first_tokens=[worker_pb2.FirstToken()]))

    async def ReleaseKV(self, request, context):
        return worker_pb2.ReleaseKVResponse(released=True)


def _serve(port: int, shape, dtype_name: str, device: str, num_blocks: int, ready) -> None:
    async def main():
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        servicer = _FakePrefill(shape, getattr(torch, dtype_name), device, num_blocks)
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(servicer, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


async def _measure(port: int, shape, dtype, tokens: int, requests: int, device: str, transport_name: str
                   ) -> tuple[list[float], str]:
    layers, _, _, heads, dim = shape
    args = ({"p": f"127.0.0.1:{port}"}, "bench", worker_pb2.ModelIdentity(), shape, dtype)
    if transport_name == "cuda_ipc":
        transport = cuda_ipc.CudaIpcKVTransport(*args, device=torch.device(device))
    else:
        transport = GrpcKVTransport(*args)
    cache = torch.zeros(layers, 2, -(-tokens // BLOCK), BLOCK, heads, dim, dtype=dtype, device=device)

    async def fence():
        if cache.is_cuda:
            torch.cuda.synchronize(cache.device)

    times = []
    for r in range(requests + 1):  # the first request warms the channel (and the IPC mapping) up
        start = time.perf_counter()
        request = worker_pb2.PrefillRequest(request_id=f"r{r}", prompt_token_ids=range(tokens))
        async with contextlib.aclosing(transport.pull("p", request, 120, fence)) as items:
            async for item in items:
                if isinstance(item, PrefillDone):
                    break
                cache[:, :, item.block_index, : item.num_tokens] = item.tensor.to(device)  # the runner's write_block
        await fence()
        if r:
            times.append(time.perf_counter() - start)
    kind = transport.kind_for("p")
    await transport.close()
    return times, kind


def run(name: str, dtype: torch.dtype, tokens: int, requests: int, device: str, transport: str) -> dict:
    layers, heads, dim = SHAPES[name]
    shape = (layers, 2, BLOCK, heads, dim)
    port = _free_port()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    args = (port, shape, str(dtype).removeprefix("torch."), device, -(-tokens // BLOCK), ready)
    server = ctx.Process(target=_serve, args=args, daemon=True)
    server.start()
    ready.wait(120)
    try:
        times, kind = asyncio.run(_measure(port, shape, dtype, tokens, requests, device, transport))
    finally:
        server.terminate()
    if kind != transport:
        raise SystemExit(f"bench_kv_transfer: asked for {transport}, the transport used {kind}")
    nbytes = tokens * layers * 2 * heads * dim * torch.empty((), dtype=dtype).element_size()
    t = statistics.median(times)
    return {"shape": name, "dtype": str(dtype).removeprefix("torch."), "transport": transport, "tokens": tokens,
            "MB/request": round(nbytes / 1e6, 1), "ms/request": round(t * 1e3, 2), "GB/s": round(nbytes / t / 1e9, 2)}


def _free_port() -> int:
    from services.cli.stack import free_port

    return free_port()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where both pools live (default: cuda when there is a GPU)")
    parser.add_argument("--tokens", type=int, default=1024, help="prompt tokens per request")
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--write", type=Path, help="record the table in this markdown file")
    args = parser.parse_args()
    transports = ("grpc", "cuda_ipc") if args.device == "cuda" else ("grpc",)
    rows = []
    for name, dtype in (("smollm2-135m", torch.float32), ("llama-3.2-1b", torch.bfloat16),
                        ("llama-3.1-8b", torch.bfloat16)):
        base = None
        for transport in transports:
            row = run(name, dtype, args.tokens, args.requests, args.device, transport)
            base = base or row
            if len(transports) > 1:
                row["vs grpc"] = ratio(base["ms/request"], row["ms/request"])
            rows.append(row)
    table = markdown_table(rows)
    print(table)
    if args.write:
        gpu = args.device == "cuda"
        where = f"one {torch.cuda.get_device_name()}, both processes on it" if gpu else "loopback"
        write_section(args.write, "bench_kv_transfer" + ("_gpu" if gpu else ""), f"KV shipping between two "
                      f"processes: {where}", [
            f"Machine: {machine()}. Two processes on one host: a stand-in prefill worker holding a pool of "
            f"{BLOCK}-token blocks of each shape on the {'GPU' if gpu else 'CPU'} and streaming every block of the "
            "prompt, as bytes (device-to-host copy, encode, xxh64)"
            + (" or by reference (slots of its pool, mapped by decode through CUDA IPC)" if gpu else "")
            + "; the real decode-side transport (checksum, dtype/shape/slot checks) and the copy into a paged "
            f"cache on the same device{', then the fence and ReleaseKV' if gpu else ''}; median of "
            f"{args.requests} requests of {args.tokens} prompt tokens. vs grpc: gRPC's ms over this row's. "
            f"Command: `python loadtest/bench_kv_transfer.py --device {args.device} --tokens {args.tokens}`.",
            table,
        ])


if __name__ == "__main__":
    main()
