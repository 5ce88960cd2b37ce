"""Where the GPU time goes (issue #4 working tool; one device call, a table last).

  1. phases of the offline workload (nano-vllm's: 256 prompts, in/out U[100, 1024]): host
     timers around schedule / prepare / forward+sample / update, with a CUDA sync at each
     boundary so device work is charged to the phase that launched it
  2. kernels of one decode step (torch.profiler over CUDA-graph replays) at batch 256 and at
     batch 1: count, GPU time per step, the largest kernels
  3. a sweep of the paged decode kernel's launch settings (splits, tile, warps, stages) on
     ragged batches of the two model shapes and on the bandwidth benchmark's uniform batch
  4. the decode kernel's split count against its minimum split length, from CUDA-graph
     replays (launch gaps included, as in the engine), at batch 256 (ragged), 64 and 1
  5. batch-1 GEMV: kernels/gemv.py's launch settings against cuBLAS (F.linear) on the
     projection shapes of the two models, both timed from CUDA-graph replays
  6. batch-1 fused norm + GEMV (kernels/gemv.py's norm_gemv) against the unfused chain the
     engine runs with PDSERVE_FUSE_NORM_GEMV=0: RMSNorm(+residual) -> linear (-> SiLU-and-mul)
  7. batch-1 decode, host against device: the engine's wall time per token, the part of it
     the host spent waiting for the device, and the captured batch-1 graph replayed back to
     back (the device's own time per step, launch gaps and PDL overlap included)
  8. the decode kernel's splits and tiles, with PDL and without, on the bandwidth benchmark's batch
  9. a batch-1 request's first token (32-token prompt): wall time, host and device profiles
 10. the decode kernel over a token-major and a head-major KV pool, random and contiguous tables
 11. the decode kernel's splits and tiles on the head-major pool, ragged and uniform batches
 12. arrivals: the engine under serve's closed loop (a new 512-token prompt as each request
     ends) at each of --arrival-step-tokens: tok/s, step times by kind, mixed steps' kernels

    python loadtest/profile_gpu.py [--presets llama-3.2-1b,smollm2-135m]
                                   [--only phases,kernels,sweep,splits,gemv,fused,batch1,grid,first,layout,policy,
                                          arrivals]

Writes everything as JSON lines to stdout and $OUT/profile_gpu.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

import triton

from loadtest.bench_gpu import copy_bandwidth, free_gpu, graph_time, kv_pool, workload
from services.cli.bench import random_workload

ROWS: list[dict] = []
MIXED: list[tuple[int, float]] = []  # (tokens, ms) of each step that prefills


def emit(**row) -> None:
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def engine(preset: str, **kw):
    from services.engine import LLM

    kw = {"max_model_len": 4096, "max_num_batched_tokens": 8192, "max_num_seqs": 256, **kw}
    return LLM(load_format="dummy", preset=preset, **kw)


def instrument(llm) -> dict[str, float]:
    """Wrap the four phases of a step with synchronised host timers; returns the totals."""
    eng, totals = llm.engine, defaultdict(float)

    def timed(name, fn):
        def run(*a, **k):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = fn(*a, **k)
            torch.cuda.synchronize()
            totals[name] += time.perf_counter() - t0
            return r
        return run

    runner, sched = eng.runner, eng.scheduler
    prepare = runner._prepare
    runner._prepare = timed("prepare", prepare)
    execute = runner.execute

    def execute_counted(plan):
        decode_only = all(len(s.token_ids) == 1 for s in plan.seqs)
        totals["steps"] += 1
        totals["decode_steps" if decode_only else "mixed_steps"] += 1
        before = totals["execute mixed (incl. prepare)"]
        out = timed("execute (incl. prepare)" if decode_only else "execute mixed (incl. prepare)", execute)(plan)
        if not decode_only:
            MIXED.append((sum(len(s.token_ids) for s in plan.seqs),
                          round((totals["execute mixed (incl. prepare)"] - before) * 1e3, 1)))
        return out

    runner.execute = execute_counted
    runner.sampler.sample = timed("sample (in execute)", runner.sampler.sample)
    sched.schedule = timed("schedule", sched.schedule)
    sched.update = timed("update", sched.update)
    return totals


def phases(preset: str, mode: str = "greedy") -> None:
    from services.cli.bench import measure_offline

    llm = engine(preset)
    sampling = {k: v for k, v in SAMPLING_MODES[mode].items() if k != "seed"}
    measure_offline(llm, random_workload(16, 100, 200, 16, 16, 1, 10_000), warmup=0, sampling=sampling)
    t0 = time.perf_counter()
    plain = measure_offline(llm, workload(llm.engine.layout.vocab_size, seed=1), warmup=0, sampling=sampling)
    emit(part="phases_uninstrumented", preset=preset, mode=mode, wall_s=round(time.perf_counter() - t0, 2),
         tok_per_s=plain["output_tokens_per_s"], cpu_s=plain["cpu_s"])
    totals = instrument(llm)
    t0 = time.perf_counter()
    result = measure_offline(llm, workload(llm.engine.layout.vocab_size), warmup=0, sampling=sampling)
    wall = time.perf_counter() - t0
    steps = max(1, totals["steps"])
    emit(part="mixed_steps", preset=preset, tokens_ms=MIXED[:40])
    MIXED.clear()
    emit(part="phases", preset=preset, mode=mode, wall_s=round(wall, 2), tok_per_s=result["output_tokens_per_s"],
         **{k: round(v, 3) if "steps" not in k else int(v) for k, v in totals.items()},
         per_step_ms={k: round(v / steps * 1e3, 3) for k, v in totals.items() if "steps" not in k})
    del llm
    free_gpu()


SAMPLING_MODES = {  # --kernel-sampling: the decode steps' sampling parameters
    "greedy": {"temperature": 0},
    "t0.6": {"temperature": 0.6},
    "topkp": {"temperature": 0.8, "top_p": 0.9, "top_k": 50},
    "penalty": {"temperature": 0.7, "repetition_penalty": 1.1, "seed": 1},
}


def decode_kernels(preset: str, batch: int, context: int, mode: str = "greedy") -> None:
    """Profile decode steps of `batch` sequences at about `context` tokens each, sampling as
    `mode` says (SAMPLING_MODES): GPU kernels, and the host's busiest ops per step."""
    from torch.profiler import ProfilerActivity, profile

    from services.engine import SamplingParams

    llm = engine(preset, max_num_seqs=max(batch, 1))
    eng = llm.engine
    prompts = [list(range(1000 + i, 1000 + i + context)) for i in range(batch)]
    params = SamplingParams(max_tokens=64, ignore_eos=True, **SAMPLING_MODES[mode])
    for p in prompts:
        eng.add_request(p, params)
    for _ in range(64):  # prefill everything, then a few decode steps to settle
        eng.step()
        if eng.scheduler.num_waiting == 0 and all(s.num_output_tokens > 2 for s in eng.scheduler.running):
            break
    steps = 5
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    kernels = defaultdict(lambda: [0, 0.0])
    host = sorted((e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU),
                  key=lambda e: -e.self_cpu_time_total)[:15]
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[evt.name[:90]]
            k[0] += 1
            k[1] += evt.device_time
    total_us = sum(v[1] for v in kernels.values()) / steps
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:12]
    emit(part="kernels", preset=preset, batch=batch, context=context, mode=mode,
         host_top_us_per_step=[(e.key[:60], e.count // steps, round(e.self_cpu_time_total / steps, 1)) for e in host],
         wall_ms_per_step_profiled=round(wall * 1e3, 3),
         gpu_ms_per_step=round(total_us / 1e3, 3), kernels_per_step=sum(v[0] for v in kernels.values()) / steps,
         top=[(name, n // steps, round(us / steps, 1)) for name, (n, us) in top])
    while eng.has_unfinished():
        eng.step()
    del llm
    free_gpu()


def sweep(only: str = "") -> None:
    """Decode-kernel launch settings on three batches; µs per call and GB/s of live K+V.
    `only`: a substring of the shapes to sweep (all if empty)."""
    from kernels.paged_attention import paged_decode_attention

    g = torch.Generator().manual_seed(0)
    shapes = {  # name: (batch, heads, kv_heads, lens)
        "llama-1b ragged b256": (256, 32, 8, torch.randint(100, 2048, (256,), generator=g)),
        "smollm2 ragged b256": (256, 9, 3, torch.randint(100, 2048, (256,), generator=g)),
        "llama-1b uniform b64 ctx1k": (64, 32, 8, torch.full((64,), 1024)),
        "llama-1b uniform b64 ctx4k": (64, 32, 8, torch.full((64,), 4096)),
        "smollm2 b1 ctx1k": (1, 9, 3, torch.full((1,), 1024)),
    }
    dim, page = 64, 16
    for name, (batch, heads, kvh, lens) in shapes.items():
        if only not in name:
            continue
        width = int(-(-lens.max() // page))
        blocks = batch * width
        k_cache = torch.randn(blocks, page, kvh, dim, dtype=torch.bfloat16, device="cuda")
        v_cache = torch.randn_like(k_cache)
        tables = torch.randperm(blocks, dtype=torch.int32, device="cuda").view(batch, width)
        seq_lens = lens.to(torch.int32).cuda()
        q = torch.randn(batch, heads, dim, dtype=torch.bfloat16, device="cuda")
        live = 2 * int(lens.sum()) * kvh * dim * 2
        ref = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, dim**-0.5, num_splits=1)
        results = []
        for splits in (1, 2, 4, 8, 16):
            for block_n in (32, 64, 128):
                for warps in (2, 4):
                    for stages in (2, 3):
                        try:
                            fn = lambda: paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, dim**-0.5,  # noqa: E731
                                                                num_splits=splits, block_n=block_n, num_warps=warps,
                                                                num_stages=stages)
                            err = float((fn().float() - ref.float()).norm() / ref.float().norm())
                            t = triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") / 1e3
                        except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                            results.append({"cfg": (splits, block_n, warps, stages), "error": str(e)[:120]})
                            continue
                        results.append({"cfg": (splits, block_n, warps, stages), "us": round(t * 1e6, 1),
                                        "GBps": round(live / t / 1e9), "rel_err": round(err, 5)})
        ok = sorted((r for r in results if "us" in r), key=lambda r: r["us"])
        default = next(r for r in results if r["cfg"] == (1, 64, 4, 3))
        emit(part="sweep", shape=name, live_MB=round(live / 1e6, 1), default=default, best=ok[:6],
             worst=ok[-1], errors=sum("error" in r for r in results))
        del k_cache, v_cache
        free_gpu()


def splits_sweep() -> None:
    """µs per decode-kernel call for each (max splits, min split length), 64-token tiles; the
    engine's choice (services/engine/cuda_graphs.py: decode_splits) is marked where it takes
    64-token tiles (`policy` times its 128-token settings)."""
    from kernels.paged_attention import paged_decode_attention
    from services.engine.cuda_graphs import decode_splits

    g = torch.Generator().manual_seed(0)
    shapes = {  # name: (batch, heads, kv_heads, lens)
        "llama-1b ragged b256": (256, 32, 8, torch.randint(100, 2048, (256,), generator=g)),
        "smollm2 ragged b256": (256, 9, 3, torch.randint(100, 2048, (256,), generator=g)),
        "llama-1b ragged b64": (64, 32, 8, torch.randint(100, 2048, (64,), generator=g)),
        "llama-1b uniform b64 ctx1k": (64, 32, 8, torch.full((64,), 1024)),
        "llama-1b uniform b64 ctx2k": (64, 32, 8, torch.full((64,), 2048)),
        "llama-1b b1 ctx600": (1, 32, 8, torch.full((1,), 600)),
        "smollm2 b1 ctx600": (1, 9, 3, torch.full((1,), 600)),
        "smollm2 b1 ctx2k": (1, 9, 3, torch.full((1,), 2000)),
    }
    dim, page = 64, 16
    for name, (batch, heads, kvh, lens) in shapes.items():
        width = int(-(-lens.max() // page))
        blocks = batch * width
        k_cache = torch.randn(blocks, page, kvh, dim, dtype=torch.bfloat16, device="cuda")
        v_cache = torch.randn_like(k_cache)
        tables = torch.randperm(blocks, dtype=torch.int32, device="cuda").view(batch, width)
        seq_lens = lens.to(torch.int32).cuda()
        q = torch.randn(batch, heads, dim, dtype=torch.bfloat16, device="cuda")
        counters = torch.zeros(batch * kvh, dtype=torch.int32, device="cuda")
        live = 2 * int(lens.sum()) * kvh * dim * 2
        ref = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, dim**-0.5, num_splits=1)
        results = []
        for splits in (1, 2, 3, 4, 8, 16):
            for min_len in (64, 128, 256, 512):
                fn = lambda: paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, dim**-0.5,  # noqa: E731
                                                    num_splits=splits, counters=counters, min_split_len=min_len)
                err = float((fn().float() - ref.float()).norm() / ref.float().norm())
                t = graph_time(fn)
                results.append({"cfg": (splits, min_len), "us": round(t * 1e6, 2), "GBps": round(live / t / 1e9),
                                "rel_err": round(err, 5)})
        ok = sorted(results, key=lambda r: r["us"])
        engine_splits = decode_splits(batch, kvh, torch.device("cuda"))
        if name == "llama-1b uniform b64 ctx1k":  # the bandwidth goal's shape: tile settings at 2 splits
            tiles = []
            for block_n in (64, 128):
                for warps in (4, 8):
                    for stages in (2, 3, 4):
                        fn = lambda: paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, dim**-0.5,  # noqa: E731
                                                            num_splits=2, counters=counters, min_split_len=128,
                                                            block_n=block_n, num_warps=warps, num_stages=stages)
                        t = graph_time(fn)
                        tiles.append({"cfg": (block_n, warps, stages), "us": round(t * 1e6, 2),
                                      "GBps": round(live / t / 1e9)})
            emit(part="tiles", shape=name, best=sorted(tiles, key=lambda r: r["us"])[:4],
                 default=next(r for r in tiles if r["cfg"] == (64, 4, 2)))
        emit(part="splits", shape=name, live_MB=round(live / 1e6, 1), engine_splits=engine_splits,
             engine=next((r for r in results if (*r["cfg"], 64) == engine_splits), None), best=ok[:4],
             one_split=next(r for r in results if r["cfg"] == (1, 64)), max_rel_err=max(r["rel_err"] for r in results),
             all=results)
        del k_cache, v_cache
        free_gpu()


def cold_time(fns, replays: int = 10) -> float:
    """Device time per call of a CUDA graph that runs each of `fns` once: given enough
    distinct weights (more bytes than the L2 holds), every call reads its weight from DRAM,
    as each layer's projection does in a forward."""
    for fn in fns[:3]:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (len(fns) * replays) / 1e3


def cold_weights(N: int, K: int) -> list[torch.Tensor]:
    """Copies of an [N, K] bf16 weight, 240 MB of them (over 4x the L2; 4 to 200 copies)."""
    copies = max(4, min(200, -(-(240 << 20) // (N * K * 2))))
    return [torch.randn(N, K, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]


def launch_sweep(kernel, want: torch.Tensor, ws: list[torch.Tensor], block_ns: tuple[int, ...]) -> list[dict]:
    """kernel(w, block_n=, block_k=, num_warps=) -> output, over block_ns x (256, 512) x (4, 8):
    relative error against `want` (the output for ws[0]) and cold-weight µs per call."""
    results = []
    for block_n in block_ns:
        for block_k in (256, 512):
            for warps in (4, 8):
                cfg = dict(block_n=block_n, block_k=block_k, num_warps=warps)
                try:
                    got = kernel(ws[0], **cfg).float()
                    t = cold_time([lambda w=w: kernel(w, **cfg) for w in ws])
                except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                    results.append({"cfg": (block_n, block_k, warps), "error": str(e)[:120]})
                    continue
                results.append({"cfg": (block_n, block_k, warps), "us": round(t * 1e6, 2),
                                "rel_err": round(float((got - want).norm() / want.norm()), 4)})
    return results


def emit_sweep(part: str, name: str, N: int, K: int, copies: int, baseline: str, t_ref: float,
               results: list[dict]) -> None:
    ok = sorted((r for r in results if "us" in r), key=lambda r: r["us"])
    emit(part=part, shape=name, MB=round(N * K * 2 / 1e6, 2), copies=copies, **{baseline: round(t_ref * 1e6, 2)},
         default=next((r for r in results if r["cfg"] == (4, 512, 4)), None), best=ok[:3],
         errors=sum("error" in r for r in results))


def gemv_sweep() -> None:
    """µs per batch-1 projection with cold (DRAM) weights: cuBLAS against kernels/gemv.py."""
    import torch.nn.functional as F

    from kernels.gemv import gemv

    shapes = {  # name: (N, K) of W
        "smollm2 qkv": (960, 576), "smollm2 o": (576, 576), "smollm2 gate_up": (3072, 576),
        "smollm2 down": (576, 1536), "llama-1b qkv": (3072, 2048), "llama-1b o": (2048, 2048),
        "llama-1b gate_up": (16384, 2048), "llama-1b down": (2048, 8192),
    }
    for name, (N, K) in shapes.items():
        ws = cold_weights(N, K)
        x = torch.randn(1, K, dtype=torch.bfloat16, device="cuda")
        t_ref = cold_time([lambda w=w: F.linear(x, w) for w in ws])
        results = launch_sweep(lambda w, **cfg: gemv(x, w, **cfg), F.linear(x, ws[0]).float(), ws, (4, 8, 16))
        emit_sweep("gemv", name, N, K, len(ws), "cublas_us", t_ref, results)
        del ws
        free_gpu()


def fused_sweep() -> None:
    """µs per batch-1 input projection with cold weights: the unfused chain (three or two
    launches, as the engine runs it with PDSERVE_FUSE_NORM_GEMV=0) against one norm_gemv
    launch, with its launch settings swept."""
    from kernels.activation import silu_and_mul
    from kernels.gemv import norm_gemv
    from kernels.rmsnorm import rms_norm
    from services.engine.layers.linear import linear

    shapes = {  # name: (N, K, silu_mul)
        "smollm2 norm+qkv": (960, 576, False), "smollm2 norm+gate_up+silu": (3072, 576, True),
        "llama-1b norm+qkv": (3072, 2048, False), "llama-1b norm+gate_up+silu": (16384, 2048, True),
    }
    for name, (N, K, silu_mul) in shapes.items():
        ws = cold_weights(N, K)
        x, r = (torch.randn(1, K, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        g = 1 + 0.1 * torch.randn(K, dtype=torch.bfloat16, device="cuda")

        def unfused(w):
            h, _ = rms_norm(x, g, 1e-5, r)
            y = linear(h, w)  # the GEMV below 16 MB, cuBLAS above
            return silu_and_mul(y) if silu_mul else y

        t_ref = cold_time([lambda w=w: unfused(w) for w in ws])
        results = launch_sweep(lambda w, **cfg: norm_gemv(x, g, 1e-5, w, r, silu_mul=silu_mul, **cfg)[0],
                               unfused(ws[0]).float(), ws, (2, 4, 8))
        emit_sweep("fused", name, N, K, len(ws), "unfused_us", t_ref, results)
        del ws
        free_gpu()


def gpu_timeline(prof, steps: int) -> dict:
    """From a torch.profiler trace: the device's busy time per step (the union of its kernels
    and copies), the span from its first to its last, and the largest ops by device time."""
    cuda = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end) for e in cuda)
    busy, (lo, hi) = 0.0, spans[0]
    for start, end in spans[1:]:
        if start > hi:
            busy, lo = busy + hi - lo, start
        hi = max(hi, end)
    busy += hi - lo
    ops = defaultdict(lambda: [0, 0.0])
    for e in cuda:
        ops[e.name[:70]][0] += 1
        ops[e.name[:70]][1] += e.time_range.end - e.time_range.start
    top = sorted(ops.items(), key=lambda kv: -kv[1][1])[:14]
    return dict(engine_gpu_busy_ms=round(busy / steps / 1e3, 3),
                engine_gpu_span_ms=round((spans[-1][1] - spans[0][0]) / steps / 1e3, 3),
                engine_gpu_ops_per_step=round(len(cuda) / steps, 1),
                engine_gpu_top_us_per_step=[(name, round(n / steps, 2), round(us / steps, 1))
                                            for name, (n, us) in top])


def batch1_split(preset: str, pdl: bool, prefetch: bool, rope: bool, profile_host: bool = False,
                 steps: int = 256) -> None:
    """Where a batch-1 step's wall time goes: waiting for the device, or host work. `pdl`:
    kernels/pdl.py on; `prefetch`: with it, the GEMV reads whole weight rows before its wait
    (kernels/gemv.py's PREFETCH_ROWS), else one 512-wide tile; `rope`: qkv_proj, rotary and
    the cache write in one kernel (attention.py's FUSE_QKV_ROPE_CACHE)."""
    import kernels.gemv
    import kernels.pdl
    from services.engine import LLM, SamplingParams
    from services.engine import attention

    flags = (kernels.pdl, "ENABLED", pdl), (kernels.gemv, "PREFETCH_ROWS", prefetch), \
        (attention, "FUSE_QKV_ROPE_CACHE", rope)
    defaults = [getattr(module, name) for module, name, _ in flags]
    for module, name, value in flags:  # read when the graphs are captured
        setattr(module, name, value)
    llm = LLM(load_format="dummy", preset=preset, max_model_len=2048, max_num_seqs=1)
    for (module, name, _), value in zip(flags, defaults, strict=True):
        setattr(module, name, value)
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    llm.generate([list(range(100, 132))], params)
    waited = [0.0]
    event_sync = torch.cuda.Event.synchronize

    def timed_sync(event):
        t0 = time.perf_counter()
        event_sync(event)
        waited[0] += time.perf_counter() - t0

    torch.cuda.Event.synchronize = timed_sync
    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.generate([list(range(200, 232))], params)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    finally:
        torch.cuda.Event.synchronize = event_sync
    graph = llm.engine.runner.graphs.graphs[1]  # its inputs: the last step's (context 287)
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    launch = time.perf_counter() - t0  # the host's time to launch them (as fast as the GPU runs them, if longer)
    end.record()
    torch.cuda.synchronize()
    top, timeline = [], {}
    if profile_host:  # the device's busy time per step inside the engine loop (the profiler slows the host)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            llm.generate([list(range(400, 432))], params)
            torch.cuda.synchronize()
        timeline = gpu_timeline(prof, steps)
    if profile_host:  # where the host's time per step goes, by function (own time)
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        llm.generate([list(range(300, 332))], params)
        profiler.disable()
        stats = pstats.Stats(profiler).stats
        top = [(f"{Path(f).name}:{line}:{fn}", calls // steps, round(own / steps * 1e6, 1))
               for (f, line, fn), (_, calls, own, _, _) in sorted(stats.items(), key=lambda kv: -kv[1][2])[:25]]
    emit(part="batch1", preset=preset, pdl=pdl, gemv_prefetch=prefetch, fused_rope=rope,
         ms_per_token=round(wall / steps * 1e3, 3), waiting_ms=round(waited[0] / steps * 1e3, 3),
         host_busy_ms=round((wall - waited[0]) / steps * 1e3, 3),
         graph_replay_ms=round(start.elapsed_time(end) / steps, 3), replay_launch_ms=round(launch / steps * 1e3, 3),
         **timeline, host_top_us_per_step=top)
    del llm
    free_gpu()


@contextmanager
def pdl_enabled(on: bool) -> Iterator[None]:
    """Launch the Triton kernels with programmatic dependent launch or without (kernels/pdl.py),
    then put back what was set."""
    import kernels.pdl

    previous, kernels.pdl.ENABLED = kernels.pdl.ENABLED, on
    try:
        yield
    finally:
        kernels.pdl.ENABLED = previous


def interleaved_times(fns: dict[tuple, Callable[[], object]], reps: int = 3) -> dict[tuple, list[float]]:
    """graph_time of every fn, `reps` rounds with the fns interleaved, so that a drift of the
    card's clocks hits every setting alike."""
    times: dict[tuple, list[float]] = defaultdict(list)
    for _ in range(reps):
        for key, fn in fns.items():
            times[key].append(graph_time(fn))
    return times


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def grid_sweep() -> None:
    """The bandwidth benchmark's uniform batch (64 x 1k/2k/4k, Llama-1B's 8 KV heads): the
    decode kernel's splits and tile settings, each launched with programmatic dependent
    launch and without (kernels/pdl.py: back to back with PDL, a call's programs may start
    and hold SM slots while the call before still runs). Each setting is timed 3 times,
    interleaved with the others (medians)."""
    import kernels.pdl
    from kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

    copy_bw = copy_bandwidth()
    batch, heads, kvh, dim, page = 64, 32, 8, 64, 16
    settings = [(pdl, splits, min_len, block_n, 4, 2) for pdl in (False, True)
                for splits, min_len in ((1, 64), (2, 64), (3, 64), (4, 64), (4, 512)) for block_n in (32, 64)]
    settings += [(False, 2, 128, 128, 8, 2), (False, 3, 64, 64, 4, 3), (False, 3, 64, 64, 8, 2)]
    for ctx in (1024, 2048, 4096):
        blocks = batch * ctx // page
        k_cache = torch.randn(blocks, page, kvh, dim, dtype=torch.bfloat16, device="cuda")
        v_cache = torch.randn_like(k_cache)
        tables = torch.randperm(blocks, dtype=torch.int32, device="cuda").view(batch, ctx // page)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, heads, dim, dtype=torch.bfloat16, device="cuda")
        counters = torch.zeros(batch * kvh, dtype=torch.int32, device="cuda")
        live = 2 * batch * ctx * kvh * dim * 2
        ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, dim**-0.5).float()

        def launch(pdl, splits, min_len, block_n, warps, stages):
            kernels.pdl.ENABLED = pdl  # read at each launch, the graph captures included
            return paged_decode_attention(q, k_cache, v_cache, tables, lens, dim**-0.5, num_splits=splits,
                                          min_split_len=min_len, counters=counters, block_n=block_n,
                                          num_warps=warps, num_stages=stages)

        fns = {cfg: lambda cfg=cfg: launch(*cfg) for cfg in settings}
        with pdl_enabled(kernels.pdl.ENABLED):  # each launch sets its own; the default comes back after
            errs = {cfg: rel_err(fn(), ref) for cfg, fn in fns.items()}
            times = interleaved_times(fns)
        for cfg in settings:
            t = statistics.median(times[cfg])
            emit(part="grid", context=ctx, pdl=cfg[0], splits=cfg[1], min_split_len=cfg[2], block_n=cfg[3],
                 warps=cfg[4], stages=cfg[5], us=round(t * 1e6, 1), us_all=[round(x * 1e6, 1) for x in times[cfg]],
                 pct_of_copy=round(100 * live / t / copy_bw, 1), rel_err=round(errs[cfg], 5))
        del k_cache, v_cache
        free_gpu()


def layout_sweep(ncu: bool = False) -> None:
    """The bandwidth benchmark's uniform batch (64 x 1k/2k/4k, 8 KV heads, head dim 64,
    16-token pages) with the cache stored token-major (the pool before 2026-12-04) or
    head-major, over random and contiguous block tables, for a few split and tile settings;
    PDL off. Each setting is timed 3 times, interleaved (medians). With `ncu`, only random
    tables at 1k and two settings, each launched twice, eagerly, for Nsight Compute to read
    its counters."""
    from kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

    copy_bw = copy_bandwidth()
    batch, heads, kvh, dim, page = 64, 32, 8, 64, 16
    settings = [(1, 64, 64, 4, 2), (2, 64, 64, 4, 2), (3, 64, 64, 4, 2), (4, 512, 64, 4, 2),
                (1, 64, 64, 4, 3), (1, 128, 128, 4, 2), (2, 64, 32, 4, 2), (1, 64, 32, 4, 3)]
    if ncu:
        settings = settings[:2]
    for ctx in (1024,) if ncu else (1024, 2048, 4096):
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, heads, dim, dtype=torch.bfloat16, device="cuda")
        counters = torch.zeros(batch * kvh, dtype=torch.int32, device="cuda")
        live = 2 * batch * ctx * kvh * dim * 2
        blocks = batch * ctx // page
        fns, refs = {}, {}
        for layout in ("nhd", "hnd"):
            k_cache, v_cache = kv_pool(blocks, page, kvh, dim, head_major=layout == "hnd")
            for order in ("random",) if ncu else ("random", "contiguous"):
                ids = torch.randperm(blocks) if order == "random" else torch.arange(blocks)
                tables = ids.to(device="cuda", dtype=torch.int32).view(batch, ctx // page)
                refs[layout, order] = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, dim**-0.5).float()
                for splits, min_len, block_n, warps, stages in settings:
                    fns[layout, order, splits, min_len, block_n, warps, stages] = functools.partial(
                        paged_decode_attention, q, k_cache, v_cache, tables, lens, dim**-0.5, num_splits=splits,
                        min_split_len=min_len, counters=counters, block_n=block_n, num_warps=warps,
                        num_stages=stages)
        with pdl_enabled(False):
            errs = {}
            for key, fn in fns.items():
                errs[key] = rel_err(fn(), refs[key[:2]])
                if ncu:
                    fn()  # each setting twice in a row: Nsight Compute's launches 2i and 2i + 1
            if ncu:
                torch.cuda.synchronize()
                emit(part="layout_ncu_errs", errs={"/".join(map(str, k)): round(v, 5) for k, v in errs.items()})
                continue
            times = interleaved_times(fns)
        for key, ts in times.items():
            t = statistics.median(ts)
            emit(part="layout", context=ctx, layout=key[0], tables=key[1], splits=key[2], min_split_len=key[3],
                 block_n=key[4], warps=key[5], stages=key[6], us=round(t * 1e6, 1),
                 us_all=[round(x * 1e6, 1) for x in ts], pct_of_copy=round(100 * live / t / copy_bw, 1),
                 rel_err=round(errs[key], 5))
        del fns, refs
        free_gpu()


def policy_sweep() -> None:
    """The decode kernel's (most splits, fewest tokens a split, tile) on the engine's
    head-major pool, over the ragged and uniform batches of `splits`; PDL off. The engine's
    choice (decode_splits) is marked, and the earlier token-major pool is timed with it too.
    Each setting is timed 3 times, interleaved (medians)."""
    from kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref
    from services.engine.cuda_graphs import decode_splits

    g = torch.Generator().manual_seed(0)
    shapes = {  # name: (batch, heads, kv_heads, lens)
        "llama-1b ragged b256": (256, 32, 8, torch.randint(100, 2048, (256,), generator=g)),
        "smollm2 ragged b256": (256, 9, 3, torch.randint(100, 2048, (256,), generator=g)),
        "llama-1b ragged b64": (64, 32, 8, torch.randint(100, 2048, (64,), generator=g)),
        "smollm2 ragged b64": (64, 9, 3, torch.randint(100, 2048, (64,), generator=g)),
        "llama-1b uniform b64 ctx1k": (64, 32, 8, torch.full((64,), 1024)),
        "llama-1b uniform b64 ctx4k": (64, 32, 8, torch.full((64,), 4096)),
        "llama-1b ragged b16": (16, 32, 8, torch.randint(100, 2048, (16,), generator=g)),
        "smollm2 b1 ctx2k": (1, 9, 3, torch.full((1,), 2000)),
    }
    settings = [(1, 64, 64), (1, 128, 128), (2, 256, 128), (4, 512, 64), (4, 512, 128), (4, 1024, 128),
                (8, 64, 64), (16, 64, 64)]
    dim, page = 64, 16
    for name, (batch, heads, kvh, lens) in shapes.items():
        width = int(-(-lens.max() // page))
        blocks = batch * width
        q = torch.randn(batch, heads, dim, dtype=torch.bfloat16, device="cuda")
        seq_lens = lens.to(torch.int32).cuda()
        tables = torch.randperm(blocks, dtype=torch.int32, device="cuda").view(batch, width)
        counters = torch.zeros(batch * kvh, dtype=torch.int32, device="cuda")
        live = 2 * int(lens.sum()) * kvh * dim * 2
        engine_cfg = decode_splits(batch, kvh, torch.device("cuda"))
        pools = {layout: kv_pool(blocks, page, kvh, dim, head_major=layout == "hnd") for layout in ("hnd", "nhd")}
        cases = [("hnd", cfg) for cfg in dict.fromkeys(settings + [engine_cfg])] + [("nhd", engine_cfg)]
        refs = {layout: paged_decode_attention_ref(q, *pools[layout], tables, seq_lens, dim**-0.5).float()
                for layout in pools}
        fns = {(layout, cfg): functools.partial(paged_decode_attention, q, *pools[layout], tables, seq_lens,
                                                dim**-0.5, num_splits=cfg[0], min_split_len=cfg[1], block_n=cfg[2],
                                                counters=counters)
               for layout, cfg in cases}
        with pdl_enabled(False):
            errs = {key: rel_err(fn(), refs[key[0]]) for key, fn in fns.items()}
            times = interleaved_times(fns)
        medians = {key: statistics.median(ts) for key, ts in times.items()}
        rows = [{"layout": layout, "cfg": cfg, "us": round(t * 1e6, 2), "GBps": round(live / t / 1e9),
                 "rel_err": round(errs[layout, cfg], 5)} for (layout, cfg), t in medians.items()]
        best = sorted((r for r in rows if r["layout"] == "hnd"), key=lambda r: r["us"])
        emit(part="policy", shape=name, live_MB=round(live / 1e6, 1), engine_cfg=engine_cfg,
             engine_hnd=next(r for r in rows if r["layout"] == "hnd" and r["cfg"] == engine_cfg),
             engine_nhd=next(r for r in rows if r["layout"] == "nhd"), best=best[:4], all=rows,
             max_rel_err=max(errs.values()))
        del pools, fns
        free_gpu()


def first_token(preset: str) -> None:
    """Where a batch-1 request's first token goes: a 32-token prompt, one output token, through
    LLM.generate, timed (median of 5 fresh prompts) and then profiled once on the host
    (cProfile) and on the device (torch.profiler)."""
    import cProfile
    import pstats

    from services.engine import SamplingParams

    llm = engine(preset, max_model_len=2048)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate([list(range(100, 132))], params)

    def call(first: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.generate([list(range(first, first + 32))], params)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    walls = sorted(call(1000 + 100 * i) for i in range(5))
    prof = cProfile.Profile()
    prof.enable()
    call(3000)
    prof.disable()
    stats = pstats.Stats(prof)
    host = sorted(((f"{k[0].rsplit('/', 1)[-1]}:{k[1]}:{k[2]}", v[1], v[3]) for k, v in stats.stats.items()),
                  key=lambda r: -r[2])[:30]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as tprof:
        call(4000)
    emit(part="first_token", preset=preset, wall_ms=[round(w * 1e3, 2) for w in walls], **gpu_timeline(tprof, 1),
         host_cum_top=[[n, calls, round(cum * 1e3, 2)] for n, calls, cum in host])
    del llm


def arrivals(preset: str, mode: str = "greedy", concurrency: int = 256, prompt_len: int = 512,
             output_len: int = 256, warmup_s: float = 4.0, measure_s: float = 8.0, timed_s: float = 3.0,
             step_tokens: int = 2048, profile_host: bool = False) -> None:
    """The engine alone under the load `pdserve serve` sees at saturation (issue #32): a closed
    loop of `concurrency` requests, fixed prompt and output lengths, a new request as each one
    finishes, so that most steps carry a prompt chunk beside the decodes. `step_tokens` a
    step, 256 sequences, max_model_len 1,024; fresh random prompts (no prefix hits). Output
    tok/s over `measure_s` after `warmup_s`; then `timed_s` more with synchronised timers
    around execute, by kind of step (its device time and host time together), and the tokens
    of the steps that carry a prompt; five mixed steps under the torch profiler (device time
    against wall time); with `profile_host`, the host's busiest functions."""
    import numpy as np

    from services.engine import SamplingParams

    llm = engine(preset, max_model_len=1024, max_num_batched_tokens=step_tokens, gpu_memory_utilization=0.5)
    eng = llm.engine
    sampling = {k: v for k, v in SAMPLING_MODES[mode].items() if k != "seed"}
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, **sampling)
    vocab = eng.layout.vocab_size
    rng = np.random.default_rng(7)

    def add() -> None:
        eng.add_request(rng.integers(100, vocab - 100, prompt_len).tolist(), params)

    def run(seconds: float) -> int:
        done, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            for request in eng.step():
                if request.finished:
                    done += 1
                    add()
        return done

    for _ in range(concurrency):
        add()
    run(warmup_s)
    t0 = time.perf_counter()
    done = run(measure_s)
    tok_s = done * output_len / (time.perf_counter() - t0)
    kinds: dict[str, list[float]] = defaultdict(list)
    mixed_tokens: list[int] = []
    execute = eng.runner.execute

    def timed(plan, *a, **k):
        chunks = [len(s.token_ids) for s in plan.seqs if len(s.token_ids) > 1]
        kind = "decode" if not chunks else ("prefill" if len(chunks) == len(plan.seqs) else "mixed")
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = execute(plan, *a, **k)
        torch.cuda.synchronize()
        kinds[kind].append((time.perf_counter() - t) * 1e3)
        if chunks:
            mixed_tokens.append(sum(chunks))
        return out

    eng.runner.execute = timed
    run(timed_s)
    eng.runner.execute = execute
    # the device's kernels in five mixed steps, each profiled alone (synchronised)
    mixed_ops: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    profiled, wall_ms = [], []

    def profile_mixed(plan, *a, **k):
        chunks = [len(s.token_ids) for s in plan.seqs if len(s.token_ids) > 1]
        if not chunks or len(chunks) == len(plan.seqs) or len(profiled) >= 5:
            return execute(plan, *a, **k)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = execute(plan, *a, **k)
            torch.cuda.synchronize()
        wall_ms.append((time.perf_counter() - t) * 1e3)
        profiled.append((len(plan.seqs) - len(chunks), sum(chunks)))
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                mixed_ops[e.name[:70]][0] += 1
                mixed_ops[e.name[:70]][1] += e.time_range.end - e.time_range.start
        return out

    eng.runner.execute = profile_mixed
    end = time.perf_counter() + 30
    while len(profiled) < 5 and time.perf_counter() < end:
        for request in eng.step():
            if request.finished:
                add()
    eng.runner.execute = execute
    n = max(1, len(profiled))
    mixed = dict(mixed_profiled=profiled, mixed_profiled_wall_ms=[round(w, 2) for w in wall_ms],
                 mixed_kernel_ms=round(sum(us for _, us in mixed_ops.values()) / n / 1e3, 2),
                 mixed_top_us=[(name, round(c / n, 1), round(us / n)) for name, (c, us) in
                               sorted(mixed_ops.items(), key=lambda kv: -kv[1][1])[:16]])
    host = []
    if profile_host:  # the host's busiest Python functions (self time) over `timed_s`, unsynchronised
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        run(timed_s)
        prof.disable()
        stats = pstats.Stats(prof).stats
        host = sorted(((f"{k[0].rsplit('/', 1)[-1]}:{k[1]}:{k[2]}", v[1], round(v[2] * 1e3), round(v[3] * 1e3))
                       for k, v in stats.items()), key=lambda r: -r[2])[:25]
    # unsynchronised again: the device's busy time against the wall over 40 steps
    wall = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(40):
            for request in eng.step():
                if request.finished:
                    add()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - wall) * 1e3 / 40
    timeline = gpu_timeline(prof, 40)
    emit(part="arrivals", preset=preset, mode=mode, step_tokens=step_tokens, tok_per_s=round(tok_s),
         finished=done, host_self_ms_top=host, **mixed,
         profiled_wall_ms_per_step=round(wall, 2), **timeline,
         steps={k: len(v) for k, v in kinds.items()},
         step_ms_p50={k: round(statistics.median(v), 2) for k, v in kinds.items()},
         step_ms_mean={k: round(statistics.fmean(v), 2) for k, v in kinds.items()},
         chunk_tokens_p50=statistics.median(mixed_tokens) if mixed_tokens else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="llama-3.2-1b,smollm2-135m")
    parser.add_argument("--only", default="phases,kernels,sweep")
    parser.add_argument("--kernel-batches", default="256,1", help="batch sizes of the kernels part (context 600)")
    parser.add_argument("--kernel-sampling", default="greedy", help=f"kernels and phases: comma list of {', '.join(SAMPLING_MODES)}")
    parser.add_argument("--sweep-shapes", default="", help="sweep: only the shapes whose name contains this")
    parser.add_argument("--batch1-flags", default="each-off", choices=("each-off", "on"),
                        help="batch1: every flag on, then each off once; or only all on")
    parser.add_argument("--arrival-step-tokens", default="2048,8192", help="arrivals: max_num_batched_tokens to compare")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    parts = args.only.split(",")
    emit(part="device", name=torch.cuda.get_device_name(), torch=torch.__version__)
    jobs = []
    for preset in args.presets.split(","):
        if "phases" in parts:
            jobs += [lambda preset=preset, m=m: phases(preset, m) for m in args.kernel_sampling.split(",")]
        if "kernels" in parts:
            jobs += [lambda preset=preset, b=int(b), m=m: decode_kernels(preset, b, 600, m)
                     for b in args.kernel_batches.split(",") for m in args.kernel_sampling.split(",")]
        if "batch1" in parts:
            flags = [(True, True, True)]
            if args.batch1_flags == "each-off":
                flags += [(True, True, False), (True, False, True), (False, False, True)]
            jobs += [lambda preset=preset, v=v: batch1_split(preset, *v, profile_host=v == (True, True, True))
                     for v in flags]
            # each flag off once, against all on; the host profiled with all on
    if "sweep" in parts:
        jobs.append(lambda: sweep(args.sweep_shapes))
    if "splits" in parts:
        jobs.append(splits_sweep)
    if "gemv" in parts:
        jobs.append(gemv_sweep)
    if "fused" in parts:
        jobs.append(fused_sweep)
    if "grid" in parts:
        jobs.append(grid_sweep)
    if "layout" in parts:
        jobs.append(layout_sweep)
    if "layout_ncu" in parts:
        jobs.append(lambda: layout_sweep(ncu=True))
    if "policy" in parts:
        jobs.append(policy_sweep)
    if "arrivals" in parts:
        jobs += [lambda preset=preset, m=m, t=int(t): arrivals(preset, m, step_tokens=t)
                 for preset in args.presets.split(",") for m in args.kernel_sampling.split(",")
                 for t in args.arrival_step_tokens.split(",")]
    if "first" in parts:
        jobs += [lambda preset=preset: first_token(preset) for preset in args.presets.split(",")]
    for job in jobs:
        try:
            job()
        except Exception:  # noqa: BLE001 - one broken part must not lose the others
            emit(part="error", error=traceback.format_exc()[-2000:])
        free_gpu()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_gpu.json").write_text(json.dumps(ROWS, indent=1))
    for row in ROWS:
        if row["part"] == "sweep":
            print(row["shape"], "default", row["default"], "best", row["best"][:2])
        elif row["part"] == "splits":
            print(row["shape"], "one split", row["one_split"], "best", row["best"][:2])
        elif row["part"] == "tiles":
            print(row["shape"], "tiles default", row["default"], "best", row["best"][:2])
        elif row["part"] == "policy":
            print(row["shape"], "engine", row["engine_cfg"], "hnd", row["engine_hnd"]["us"], "nhd",
                  row["engine_nhd"]["us"], "best", [(r["cfg"], r["us"]) for r in row["best"]])
        elif row["part"] in ("grid", "layout"):
            print({k: v for k, v in row.items() if k not in ("part", "us_all")})
        elif row["part"] == "first_token":
            print(row["preset"], "first token ms", row["wall_ms"], "gpu busy ms", row["engine_gpu_busy_ms"],
                  "ops", row["engine_gpu_ops_per_step"])
            print(*row["engine_gpu_top_us_per_step"][:8], sep="\n")
            print(*row["host_cum_top"][:20], sep="\n")
        elif row["part"] == "gemv":
            print(row["shape"], "cublas", row["cublas_us"], "best", row["best"][:1])
        elif row["part"] == "fused":
            print(row["shape"], "unfused", row["unfused_us"], "default", row["default"], "best", row["best"][:1])
        elif row["part"] in ("phases", "phases_uninstrumented", "kernels", "batch1"):
            if row.get("host_top_us_per_step"):
                print(*row["host_top_us_per_step"], sep="\n")
            print(*row.get("top", []), sep="\n")
            print({k: v for k, v in row.items() if k not in ("top", "host_top_us_per_step")})


if __name__ == "__main__":
    main()
