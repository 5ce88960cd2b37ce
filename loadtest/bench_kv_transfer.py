"""KV shipping throughput between two processes on one host: bytes over gRPC and over NIXL
(UCX), and on a GPU also by reference (the same-GPU CUDA IPC transport), same run.

The prefill side is the production sender: the real PrefillServicer (handshake with its NIXL
pool, Prefill's block encoding or references, ReleaseKV) in its own process, over an engine
that computes nothing and hands out the blocks of a KV pool of a real model's block shape
(random values): as copies read out of the pool (device-to-host, what the engine's export
does) or as references to its slots. The receiving side is the real decode-side transport
(checksums, dtype, shape and slot checks; NIXL reads) plus the copy into a paged cache on the
same device, and for references ReleaseKV (after the fence for CUDA IPC). No model runs, so
this is the cost of shipping alone; the prefill compute it overlaps with in serving is not
included.

    python loadtest/bench_kv_transfer.py [--device cuda] [--tokens 1024,4096] [--transport nixl,grpc]
                                         [--requests 10] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import torch

from loadtest.compare import ratio
from loadtest.report import machine, markdown_table, write_section
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from services.engine.kv_transfer import BlockData, BlockRef
from services.engine.outputs import CompletionOutput, RequestOutput
from services.engine.presets import preset_config
from services.kv import cuda_ipc, nixl
from services.kv.transport import GrpcKVTransport, PrefillDone
from services.prefill.server import PrefillServicer
from services.rpc.server import CHANNEL_OPTIONS
from services.rpc.worker import identity_of

BLOCK = 16
CHUNK_BLOCKS = 16  # blocks handed out per engine step (a 256-token prefill chunk)
SHAPES = {  # name -> (layers, kv_heads, head_dim), from the presets
    name: (cfg.num_hidden_layers, cfg.num_key_value_heads, getattr(cfg, "head_dim", None)
           or cfg.hidden_size // cfg.num_attention_heads)
    for name, cfg in ((n, preset_config(n)) for n in ("smollm2-135m", "llama-3.2-1b", "llama-3.1-8b"))
}
TRANSPORTS = ("grpc", "nixl", "cuda_ipc")


def _shape_of(shape: tuple[int, ...], dtype: torch.dtype, max_model_len: int) -> SimpleNamespace:
    """What identity_of and the servicer read of an engine: its model's KV shape and layout."""
    layers, _, block, heads, dim = shape
    return SimpleNamespace(
        model_config=SimpleNamespace(num_layers=layers, num_kv_heads=heads, head_dim=dim, vocab_size=32000),
        layout=SimpleNamespace(model_identity="bench", dtype=dtype, kv_dtype=dtype, block_size=block,
                                max_model_len=max_model_len))


class _PoolEngine:
    """The engine under the real PrefillServicer, minus the model: a prompt's blocks are the
    first slots of a random pool, handed out per step as the engine's export does."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: str, num_blocks: int) -> None:
        layers, _, block, heads, dim = shape
        described = _shape_of(shape, dtype, num_blocks * block + 1)
        self.model_config, self.layout = described.model_config, described.layout
        self.kv_cache = torch.randn(layers, 2, num_blocks, block, heads, dim, device=device).to(dtype)

    async def generate(self, prompt, params, request_id=None, priority=0, kv_export_from=0, kv_by_reference=False):
        n = len(prompt)
        blocks = []
        for i in range(kv_export_from, -(-n // BLOCK)):
            tokens = min(BLOCK, n - i * BLOCK)
            block_hash = i if tokens == BLOCK else None
            if kv_by_reference:
                blocks.append(BlockRef(i, block_hash, tokens, i))
            else:  # the engine's read_block: a device-to-host copy
                blocks.append(BlockData(i, block_hash, self.kv_cache[:, :, i, :tokens].to("cpu", copy=True)))
            if len(blocks) == CHUNK_BLOCKS:
                yield RequestOutput(request_id, prompt, [], False, kv_blocks=blocks)
                blocks = []
        yield RequestOutput(request_id, prompt, [CompletionOutput(0, [0], "", None, "length")], True,
                            kv_blocks=blocks)

    def release_kv(self, request_id: str) -> None:
        return None

    def is_held(self, request_id: str) -> bool:
        return False


def _serve(port: int, shape, dtype_name: str, device: str, num_blocks: int, ready) -> None:
    async def main():
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        engine = _PoolEngine(shape, getattr(torch, dtype_name), device, num_blocks)
        registered = None
        if nixl.nixl_api() is not None:
            nixl.bind_ucx("127.0.0.1")
            registered = nixl.register_pool(nixl.new_agent("prefill", "bench"), engine.kv_cache)
        servicer = PrefillServicer(engine, "bench-prefill", nixl_pool=registered)
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(servicer, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


async def _measure(port: int, shape, dtype, tokens: int, requests: int, device: str, transport_name: str
                   ) -> tuple[list[float], str]:
    layers, _, _, heads, dim = shape
    identity = identity_of(_shape_of(shape, dtype, -(-tokens // BLOCK) * BLOCK + 1))
    args = ({"p": f"127.0.0.1:{port}"}, "bench", identity, shape, dtype)
    if transport_name == "nixl":
        nixl.bind_ucx("127.0.0.1")
        reader = nixl.PoolReader(nixl.new_agent("decode", "bench"), torch.device(device), shape, dtype)
        transport = nixl.NixlKVTransport(*args, device=torch.device(device), reader=reader)
    elif transport_name == "cuda_ipc":
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
        server.join(30)
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
    parser.add_argument("--tokens", default="1024", help="prompt tokens per request, comma-separated (1024,4096)")
    parser.add_argument("--transport", help="comma-separated, from grpc, nixl, cuda_ipc (default: grpc, and "
                        "cuda_ipc with --device cuda); the first is the baseline of `vs`")
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--write", type=Path, help="record the table in this markdown file")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    transports = tuple(args.transport.split(",")) if args.transport else ("grpc", "cuda_ipc") if gpu else ("grpc",)
    if unknown := set(transports) - set(TRANSPORTS):
        parser.error(f"unknown transport(s): {', '.join(sorted(unknown))}")
    token_counts = [int(t) for t in args.tokens.split(",")]
    rows = []
    for tokens in token_counts:
        for name, dtype in (("smollm2-135m", torch.float32), ("llama-3.2-1b", torch.bfloat16),
                            ("llama-3.1-8b", torch.bfloat16)):
            base = None
            for transport in transports:
                row = run(name, dtype, tokens, args.requests, args.device, transport)
                base = base or row
                if len(transports) > 1:
                    row[f"vs {transports[0]}"] = ratio(base["ms/request"], row["ms/request"])
                rows.append(row)
    table = markdown_table(rows)
    print(table)
    if args.write:
        where = f"one {torch.cuda.get_device_name()}, both processes on it" if gpu else "loopback"
        section = "bench_kv_transfer" + ("_gpu" if gpu else "") + ("_nixl" if "nixl" in transports else "")
        write_section(args.write, section, f"KV shipping between two processes: {where}", [
            f"Machine: {machine()}. Two processes on one host: the production prefill sender (PrefillServicer over "
            f"an engine that computes nothing and hands out {CHUNK_BLOCKS} blocks per step from a pool of "
            f"{BLOCK}-token blocks of each shape on the {'GPU' if gpu else 'CPU'}) streaming every block of the "
            "prompt, as bytes (device-to-host copy, encode, xxh64) or as slot ids that decode reads itself "
            "(NIXL: READs over UCX into a registered buffer; CUDA IPC: a mapped pool); the real decode-side "
            "transport (checks, reads) and the copy into a paged cache on the same device, then ReleaseKV for "
            f"slot ids; median of {args.requests} requests per row. vs {transports[0]}: its ms over this row's. "
            f"Command: `python loadtest/bench_kv_transfer.py --device {args.device} --tokens {args.tokens}"
            f" --transport {','.join(transports)}`.",
            table,
        ])


if __name__ == "__main__":
    main()
