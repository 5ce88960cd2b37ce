"""The fp8 KV cache (issue #31) against the model dtype's cache, default model, same run.

Accuracy: perplexity of the passage tests/data/kv_fp8_passage.txt with the engine's fp8 cache
(per-tensor scales), and, to choose that scheme, with K and V rounded through e4m3 at the
cache write under other scales: per layer (amax / 448 over the passage itself, an optimistic
calibration) and per block and KV head (amax / 448 of the tokens written, the best a block
scale can do). Those variants quantize and dequantize inside a model-dtype cache, so they
measure rounding, not speed.

Speed and capacity: offline throughput (`pdserve bench offline`'s workload, smaller) and
tokens per pool of the same memory, the two caches alternating `--rounds` times over on a
shared machine (load average printed beside the table).

    python loadtest/bench_kv_fp8.py [--device cpu|cuda] [--num-prompts 16] [--rounds 2] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import torch

import kernels.cache
import services.engine.attention as attention
from loadtest.report import machine, markdown_table, write_section
from services.cli.bench import random_workload
from services.engine import LLM, SamplingParams

NOTE = ("Scales: per tensor (one K and one V scale per layer), all 1. The finer or calibrated "
        "schemes were no more accurate here: e4m3 is a float format, so a scale only moves the window "
        "between saturation (+-448) and subnormals (below 2^-6), and the default model's K and V (|x| < 21) "
        "fit it unscaled; a per-tensor scale also keeps the kernels' work to one multiply, a block's scale "
        "fixed while decode appends to it, and the wire's scales a constant 8 bytes a layer. On the CPU there is "
        "no fp8 arithmetic: every step widens the context's K and V back to the model dtype, so the fp8 "
        "cache buys capacity (tokens per pool) and transfer bytes there, not speed.")
PASSAGE = Path(__file__).resolve().parents[1] / "tests" / "data" / "kv_fp8_passage.txt"
FP8 = kernels.cache.FP8


def perplexity(llm: LLM, text: str) -> float:
    out = llm.generate(text, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))[0]
    lps = [lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:], strict=True)]
    return math.exp(-sum(lps) / len(lps))


def rounded(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """x stored as e4m3 under `scale` and read back."""
    return (x / scale).clamp(-kernels.cache.FP8_MAX, kernels.cache.FP8_MAX).to(FP8).to(x.dtype) * scale


def simulated_perplexities(llm: LLM, text: str) -> dict[str, float]:
    """Perplexity with K and V rounded through e4m3 under each scale scheme (see the docstring)."""
    write = attention.reshape_and_cache_ref
    layers = llm.engine.model_config.num_layers
    amax: dict[int, tuple[float, float]] = {}
    calls = iter(range(1 << 30))
    scheme = "record"

    def per_block_head(x, slots, block_size):
        out, blocks = x.clone(), slots // block_size
        for b in blocks.unique():
            m = blocks == b
            out[m] = rounded(x[m], x[m].abs().amax(dim=(0, 2), keepdim=True).clamp(min=1e-6) / 448)
        return out

    def patched(k, v, k_cache, v_cache, slots, k_scale=1.0, v_scale=1.0):
        layer = next(calls) % layers
        if scheme == "record":
            old = amax.get(layer, (0.0, 0.0))
            amax[layer] = (max(old[0], k.abs().max().item()), max(old[1], v.abs().max().item()))
        elif scheme == "per layer, amax / 448":
            k, v = rounded(k, amax[layer][0] / 448), rounded(v, amax[layer][1] / 448)
        elif scheme == "per block and KV head, amax / 448":
            k, v = per_block_head(k, slots, k_cache.shape[1]), per_block_head(v, slots, k_cache.shape[1])
        return write(k, v, k_cache, v_cache, slots, k_scale, v_scale)

    attention.reshape_and_cache_ref = patched
    results = {}
    try:
        for scheme in ("record", "per layer, amax / 448", "per block and KV head, amax / 448"):
            calls = iter(range(1 << 30))
            llm.engine.block_manager.reset_prefix_cache()
            results[scheme] = perplexity(llm, text)
    finally:
        attention.reshape_and_cache_ref = write
    results.pop("record")
    return results


def throughput(llm: LLM, workload) -> float:
    """Output tokens per second of the whole workload submitted at once."""
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    llm.engine.block_manager.reset_prefix_cache()
    t0 = time.perf_counter()
    llm.generate(workload.prompts, params)
    elapsed = time.perf_counter() - t0
    return workload.output_tokens / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--kv-cache-memory", type=int, default=256 << 20, help="bytes of KV pool for both caches")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--write", type=Path, help="put the tables into this markdown file (BENCHMARKS.md)")
    args = p.parse_args()
    load_before = os.getloadavg()
    text = PASSAGE.read_text()
    common = dict(device=args.device, max_model_len=2048, kv_cache_memory=args.kv_cache_memory)
    if args.device != "cpu":
        common = dict(device=args.device, max_model_len=2048, gpu_memory_utilization=0.5)
    engines = {"auto": LLM(**common), "fp8": LLM(kv_cache_dtype="fp8", **common)}
    dtype = str(engines["auto"].engine.layout.dtype).removeprefix("torch.")
    ppl = {name: perplexity(llm, text) for name, llm in engines.items()}
    simulated = simulated_perplexities(engines["auto"], text) if args.device == "cpu" else {}
    workload = random_workload(args.num_prompts, 100, 400, 32, 128, 0, engines["auto"].engine.model_config.vocab_size)
    runs: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, llm in engines.items():
            runs[name].append(throughput(llm, workload))
    rows = []
    for name, llm in engines.items():
        layout = llm.engine.layout
        out_tps = statistics.median(runs[name])
        rows.append({
            "KV cache": f"{str(layout.kv_dtype).removeprefix('torch.')} (`--kv-cache-dtype {name}`)",
            "tokens per pool": f"{layout.kv_capacity_tokens:,}",
            "output tok/s (median of rounds)": f"{out_tps:.1f}",
            "all rounds": ", ".join(f"{r:.1f}" for r in runs[name]),
            "passage perplexity": f"{ppl[name]:.3f} ({ppl[name] / ppl['auto'] - 1:+.2%})",
        })
    scheme_rows = [{"scales": "per tensor (layer), 1 — what the engine does", "perplexity":
                    f"{ppl['fp8']:.3f} ({ppl['fp8'] / ppl['auto'] - 1:+.2%})"}]
    scheme_rows += [{"scales": k, "perplexity": f"{v:.3f} ({v / ppl['auto'] - 1:+.2%})"} for k, v in simulated.items()]
    pool = (f"{args.kv_cache_memory / (1 << 20):.0f} MiB of KV pool each" if args.device == "cpu"
            else "gpu_memory_utilization 0.5 each")
    setup = (f"{machine()}, default model in {dtype}, {pool}; {args.num_prompts} random prompts of 100-400 tokens, "
             f"32-128 output tokens, greedy, ignore_eos; load average {load_before[0]:.1f} before, "
             f"{os.getloadavg()[0]:.1f} after (a shared machine). Perplexity: tests/data/kv_fp8_passage.txt "
             f"({len(engines['auto'].tokenizer.encode(text))} tokens), one prefill.")
    print(setup)
    print(markdown_table(rows))
    print(markdown_table(scheme_rows))
    if args.write:
        write_section(args.write, f"bench_kv_fp8_{args.device}", f"fp8 KV cache vs {dtype} KV cache on "
                      f"{args.device} (issue #31)", [setup, markdown_table(rows), markdown_table(scheme_rows), NOTE])


if __name__ == "__main__":
    main()
