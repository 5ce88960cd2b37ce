"""Quantized weights on the CPU (issue #31): decode tokens/s of the default model with its GGUF
blocks kept as stored (native) against the converted fp32 weights, and with
`--quantization int8` / `fp8` (weight-only here) against fp32, all in the same run.

Every engine is loaded at once and the modes alternate on each round, because the shared
machine's load drifts within minutes; batch 1 decodes one prompt, batch 8 eight at once,
`--max-tokens` each, greedy; model loading is excluded. Also prints each mode's weight bytes.

    python loadtest/bench_quant.py [--max-tokens 32] [--rounds 3] [--modes converted,native,int8,fp8] [--write BENCHMARKS.md]

On a GPU the same script compares the default model's native GGUF blocks (Triton
dequantization) with its converted bf16 weights; `--preset llama-3.2-1b` (or llama-3.1-8b)
compares dummy weights of that shape in bf16 against fp8 (w8a8 `torch._scaled_mm` on Hopper)
and int8: `--preset llama-3.2-1b --modes dense,fp8,int8`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from loadtest.report import machine, markdown_table, write_section
from services.engine import LLM, SamplingParams
from services.engine.quant import QuantizedWeight

PROMPTS = ["What is AI?", "Write a short poem about the sea.", "Explain how a bicycle works.",
           "List three uses of copper.", "Why is the sky blue?", "Describe a busy market.",
           "How do vaccines work?", "Give me a recipe for pancakes."]
MODES = {"converted": {"gguf_weights": "converted"}, "native": {"gguf_weights": "native"}, "dense": {},
         "int8": {"gguf_weights": "converted", "quantization": "int8"},
         "fp8": {"gguf_weights": "converted", "quantization": "fp8"}}


def weight_bytes(llm: LLM) -> int:
    model = llm.engine.runner.model
    quantized = [m.weight for m in model.modules() if isinstance(getattr(m, "weight", None), QuantizedWeight)]
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(w.nbytes for w in quantized)


def tokens_per_s(llm: LLM, prompts: list[str], max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", default="converted,native,int8,fp8")
    p.add_argument("--preset", help="dummy weights of this shape instead of the default model (modes dense, int8, fp8)")
    p.add_argument("--write", type=Path)
    args = p.parse_args()
    modes = args.modes.split(",")
    model = {"load_format": "dummy", "preset": args.preset} if args.preset else {}
    llms = {m: LLM(num_kv_blocks=256, max_model_len=1024, **model, **MODES[m]) for m in modes}
    for llm in llms.values():  # warm-up
        tokens_per_s(llm, PROMPTS[:1], 4)
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.rounds):
        for batch in (1, 8):
            for m, llm in llms.items():
                rate = tokens_per_s(llm, PROMPTS[:batch], args.max_tokens)
                best[m, batch] = max(best.get((m, batch), 0.0), rate)
                print(f"{m} batch {batch}: {rate:.1f} tok/s", flush=True)
    reference = "dense" if args.preset else "converted"
    base = {"native": "converted", "int8": reference, "fp8": reference}
    rows = [{"weights": m, "weight MB": f"{weight_bytes(llms[m]) / 1e6:.0f}",
             **{f"batch {b} tok/s": f"{best[m, b]:.1f}" for b in (1, 8)},
             **{f"batch {b} vs fp32": (f"{best[m, b] / best[base[m], b]:.2f}x" if base.get(m) in llms else "1.00x")
                for b in (1, 8)}}
            for m in modes]
    table = markdown_table(rows)
    load = os.getloadavg()
    print(table)
    print(f"{machine()}; torch threads {torch.get_num_threads()}; load average {load[0]:.1f}")
    if args.write:
        write_section(args.write, "bench-quant", "Quantized weights on the CPU: native GGUF, int8, fp8 vs fp32 "
                      "(issue #31)", [
                          f"`python loadtest/bench_quant.py --max-tokens {args.max_tokens} --rounds {args.rounds}`, "
                          f"default model (SmolLM2-135M-Instruct Q4_1), greedy, best of {args.rounds} rounds, "
                          f"{machine()}, load average {load[0]:.1f} (shared machine). converted = the GGUF "
                          "dequantized to fp32 once (the fp32 reference of every row); native = Q4_1/Q8_0 blocks "
                          "as stored, dequantized a slab per matmul; int8 / fp8 = the fp32 weights quantized "
                          "on load (fp8: the weight-only fallback, as on every CPU).", table])


if __name__ == "__main__":
    main()
