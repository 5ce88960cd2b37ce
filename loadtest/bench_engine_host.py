"""The engine core's host time per decode step at 256 running sequences (issue #32).

It measures bookkeeping, not a model. A real EngineCore (tiny-llama preset, dummy weights,
CPU, async scheduling on, as on a GPU) prefills `--seqs` prompts with its real model, then
every decode step goes through cuda_graphs.DecodeGraphs, as every decode step does on a GPU
(on the CPU its "replay" calls the forward eagerly). In this script only, that forward is
replaced by one that writes precomputed tokens into the graph's tokens segment and returns
precomputed logits of the right shape, so a timed step is the engine's own Python and torch
host calls:

    scheduler.schedule / advance / update, block manager, persistent block tables,
    the runner's decode inputs and staging (_run_graph), the sampler (in_graph, sample,
    SampledBatch.result), the engine's read-back and stop rules (_on_token)

and nothing of a forward (the stand-in copies 256 int64s). With `--temperature > 0` the
graph "draws" (Sampler.in_graph computes each row's uniform on the host, as on a GPU).

No sequence finishes inside the timed window (max_tokens is past it), so every timed step
decodes exactly `--seqs` tokens.

With `--core-outputs` the engine runs as the engine-core process runs it (core_process.CoreLoop,
its channel a socketpair drained by a thread): requests come in through the loop, and each
timed step is followed by the loop's `_flush`, which encodes the step's outputs for the front
and sends them; its time is reported apart (`flush us`).

    OMP_NUM_THREADS=1 python loadtest/bench_engine_host.py [--seqs 256] [--prompt 512]
        [--steps 300] [--temperature 0] [--profile 30 [--profile-steps 100]] [--label name]
        [--json path]

Prints µs of host time per step and per token (median, mean, p90 of the steps) and, with
`--profile N`, cProfile's top N functions over the timed steps (a separate pass: cProfile
slows Python down, so its times are relative).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import socket
import statistics
import sys
import threading
import time

import numpy as np
import torch

from services.engine.config import EngineConfig
from services.engine.core_channel import Channel
from services.engine.core_process import CoreLoop
from services.engine.cuda_graphs import DecodeGraphs
from services.engine.engine import EngineCore
from services.engine.sampling_params import SamplingParams


def build(seqs: int, max_model_len: int) -> EngineCore:
    blocks_per_seq = -(-max_model_len // 16)
    config = EngineConfig(load_format="dummy", preset="tiny-llama", device="cpu", max_num_seqs=seqs,
                          max_model_len=max_model_len, num_kv_blocks=seqs * blocks_per_seq + 64,
                          async_scheduling=True, max_num_batched_tokens=8192)
    engine = EngineCore(config, assemble_text=False)  # as the engine-core process runs it
    runner = engine.runner
    runner.graphs = DecodeGraphs(runner.model, runner.backend, runner.kv_caches, seqs, runner.tables.device_table,
                                 runner.num_kv_heads, runner.device)
    runner.graphs.capture()  # nothing to capture on the CPU
    return engine


def core_loop(engine: EngineCore) -> CoreLoop:
    """The engine-core process's loop around `engine`, its channel's other end read and dropped."""
    ours, front = socket.socketpair()

    def drain() -> None:
        while front.recv(1 << 20):
            pass

    threading.Thread(target=drain, daemon=True).start()
    return CoreLoop(engine, Channel(ours))


def stand_in_forward(graphs: DecodeGraphs, vocab: int, seed: int = 0):
    """The decode graph's forward without the model: fixed tokens per row, fixed logits."""
    rng = np.random.default_rng(seed)
    tokens = torch.from_numpy(rng.integers(3, vocab, size=graphs.width, dtype=np.int64))
    logits = torch.zeros(graphs.width, vocab)

    def forward(batch: int, draw: bool = False, filtered: bool = False) -> torch.Tensor:
        graphs.tokens[:batch].copy_(tokens[:batch])
        return logits[:batch]

    return forward


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    engine = build(args.seqs, args.max_model_len)
    vocab = engine.layout.vocab_size
    rng = np.random.default_rng(1)
    # Past every timed step and the profiled ones (the first prompts decode while the last
    # prefill, a step of 8,192 tokens each): no sequence finishes while timed.
    max_tokens = args.warmup + args.steps + (args.profile_steps if args.profile else 0) + 64
    assert args.prompt + max_tokens <= args.max_model_len, "raise --max-model-len"
    params = SamplingParams(temperature=args.temperature, max_tokens=max_tokens, ignore_eos=True,
                            seed=7 if args.temperature else None)
    loop = core_loop(engine) if args.core_outputs else None
    for handle in range(args.seqs):
        prompt = rng.integers(3, vocab, size=args.prompt).tolist()
        if loop is None:
            engine.add_request(prompt, params)
        else:
            loop._handle(("add", (engine.make_request(prompt, params), handle)))
    t0 = time.perf_counter()
    while any(s.num_computed_tokens < args.prompt for r in engine.requests.values() for s in r.seqs):
        engine.step()  # the real model prefills (not timed)
    prefill_s = time.perf_counter() - t0
    graphs = engine.runner.graphs
    graphs._forward = stand_in_forward(graphs, vocab)
    for _ in range(args.warmup):
        engine.step()
    assert engine.scheduler.num_running == args.seqs

    wall, cpu, flush = [], [], []
    for _ in range(args.steps):
        w0, c0 = time.perf_counter(), time.process_time()
        changed = engine.step()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        if loop is not None:
            f0 = time.perf_counter()
            for request in changed:
                loop._changed[request.request_id] = request
            loop._flush()
            flush.append(time.perf_counter() - f0)
    assert engine.scheduler.num_running == args.seqs, "a sequence finished inside the timed window"

    result = dict(label=args.label, seqs=args.seqs, prompt=args.prompt, steps=args.steps,
                  temperature=args.temperature, prefill_s=round(prefill_s, 1),
                  us_per_step_median=1e6 * statistics.median(wall), us_per_step_mean=1e6 * statistics.fmean(wall),
                  us_per_step_p90=1e6 * sorted(wall)[int(0.9 * len(wall))],
                  cpu_us_per_step_mean=1e6 * statistics.fmean(cpu),
                  flush_us_per_step_median=1e6 * statistics.median(flush) if flush else None)
    result["us_per_token_median"] = result["us_per_step_median"] / args.seqs
    result["us_per_token_mean"] = result["us_per_step_mean"] / args.seqs

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.profile_steps):
            changed = engine.step()
            if loop is not None:
                for request in changed:
                    loop._changed[request.request_id] = request
                loop._flush()
        profiler.disable()
        assert engine.scheduler.num_running == args.seqs
        print(f"\ncProfile over {args.profile_steps} steps ({args.label}):")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(args.profile)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--profile", type=int, default=0, help="print cProfile's top N functions (0: none)")
    parser.add_argument("--profile-steps", type=int, default=100)
    parser.add_argument("--core-outputs", action="store_true",
                        help="run inside core_process.CoreLoop and time its per-step _flush too")
    parser.add_argument("--label", default="")
    parser.add_argument("--json", help="append the result as a JSON line to this file")
    args = parser.parse_args()
    result = run(args)
    print(f"\n{'label':<10} {'seqs':>5} {'temp':>5} {'us/step med':>12} {'mean':>9} {'p90':>9} "
          f"{'cpu mean':>9} {'us/token':>9}")
    print(f"{result['label']:<10} {result['seqs']:>5} {result['temperature']:>5} "
          f"{result['us_per_step_median']:>12.0f} {result['us_per_step_mean']:>9.0f} "
          f"{result['us_per_step_p90']:>9.0f} {result['cpu_us_per_step_mean']:>9.0f} "
          f"{result['us_per_token_median']:>9.2f}")
    if result["flush_us_per_step_median"] is not None:
        print(f"core loop's _flush: {result['flush_us_per_step_median']:.0f} us/step median "
              f"({result['flush_us_per_step_median'] / args.seqs:.2f} us/token)")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
