"""Offline throughput on the CPU: pdserve vs HF transformers `generate()`, same run, float32.

Workload (issue #2): 16 requests, input lengths uniform in [32, 128] (random token ids),
64 output tokens each. HF runs them as one left-padded batch with
min_new_tokens = max_new_tokens = 64; pdserve gets them all at once with ignore_eos.
Model loading is excluded on both sides. The "matmul floor" is the time of the model's linear
layers alone for this workload (prompt tokens once, then 64 decode steps of 16 rows, logits
for 16 rows per step): no attention, norms, sampling or Python around them.

    python loadtest/bench_offline_vs_hf.py [--repeats 3] [--threads 2] [--busy-neighbour] [--write BENCHMARKS.md]

--busy-neighbour runs another process beside both sides for the whole measurement: a
2-thread torch matmul loop, the busy 2-core machine of issue #26.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from loadtest.report import machine, markdown_table, write_section
from services.cli.bench import Workload, format_table, measure_offline, random_workload
from services.engine.layers.linear import linear

NUM_REQUESTS, MIN_IN, MAX_IN, OUT = 16, 32, 128, 64


def hf_generate_seconds(model, workload: Workload, pad_id: int) -> float:
    lens = [len(p) for p in workload.prompts]
    width = max(lens)
    ids = torch.full((len(lens), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lens), width), dtype=torch.long)
    for i, prompt in enumerate(workload.prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=OUT, min_new_tokens=OUT, pad_token_id=pad_id
        )
        elapsed = time.perf_counter() - start
    assert out.shape == (len(lens), width + OUT)
    return elapsed


def matmul_floor_seconds(llm, workload: Workload, plain: bool = False) -> float:
    """The linear layers of our own model (decoder stack + LM head), fed this workload's token
    counts: all prompt tokens in one step, then 63 decode steps of 16 rows, logits for at most
    16 rows per step. With `plain`, every matmul is torch's F.linear, as HF computes them,
    instead of the CPU orientation our layers pick (services/engine/layers/linear.py)."""
    model = llm.engine.runner.model  # a Llama-family model (the default model)
    layers = [(m.weight, m.bias) for m in model.model.modules() if isinstance(m, torch.nn.Linear)]
    head = model.model.embed_tokens.weight if model.config.tie_word_embeddings else model.lm_head.weight
    matmul = torch.nn.functional.linear if plain else linear
    rows_per_step = [workload.input_tokens] + [NUM_REQUESTS] * (OUT - 1)
    # Inputs made up front (random: uninitialised memory may hold denormals, which are slow).
    inputs = {(r, w.shape[1]): torch.randn(r, w.shape[1]) for r in set(rows_per_step) for w, _ in layers}
    head_input = torch.randn(NUM_REQUESTS, head.shape[1])
    with torch.inference_mode():
        start = time.perf_counter()
        for rows in rows_per_step:
            for weight, bias in layers:
                matmul(inputs[rows, weight.shape[1]], weight, bias)
            matmul(head_input, head)
        return time.perf_counter() - start


NEIGHBOUR = "import torch; torch.set_num_threads(2); a = torch.randn(1024, 1024)\nwhile True: a @ a"


def start_neighbour() -> subprocess.Popen:
    """A process that keeps two threads busy with matmuls until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env={**os.environ, "OMP_NUM_THREADS": "2"})
    time.sleep(2.0)  # past its import
    return proc


def measure(llm, hf, workload: Workload, pad_id: int, repeats: int) -> tuple[list, list, list, list]:
    """Seconds of each run, interleaved: pdserve, HF, the matmul floor, the F.linear floor."""
    ours, theirs, floor, plain_floor = [], [], [], []
    for _ in range(repeats):
        ours.append(measure_offline(llm, workload, warmup=0)["elapsed_s"])
        theirs.append(round(hf_generate_seconds(hf, workload, pad_id), 3))
        floor.append(round(matmul_floor_seconds(llm, workload), 3))
        plain_floor.append(round(matmul_floor_seconds(llm, workload, plain=True), 3))
    return ours, theirs, floor, plain_floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, interleaved; medians reported")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--busy-neighbour", action="store_true", help="a 2-thread matmul loop runs beside")
    parser.add_argument("--write", type=Path, help="replace this benchmark's section in the given markdown file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from services.engine import LLM, loader

    llm = LLM(dtype="float32")
    source = loader.resolve(None)
    hf = AutoModelForCausalLM.from_pretrained(str(source.weights_dir), dtype=torch.float32).eval()
    workload = random_workload(NUM_REQUESTS, MIN_IN, MAX_IN, OUT, OUT, seed=0, vocab=llm.engine.layout.vocab_size)
    pad_id = llm.engine.layout.eos_token_ids[0]

    # One full untimed run of each side first: the first pass pays page faults and allocator growth.
    measure_offline(llm, workload, warmup=0)
    hf_generate_seconds(hf, workload, pad_id)
    matmul_floor_seconds(llm, workload)
    neighbour = start_neighbour() if args.busy_neighbour else None
    try:
        ours, theirs, floor, plain_floor = measure(llm, hf, workload, pad_id, args.repeats)
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()

    tokens = workload.output_tokens
    rows = []
    runs = (("pdserve", ours), ("hf generate", theirs), ("matmul floor", floor),
            ("matmul floor, F.linear", plain_floor))
    for name, times in runs:
        t = statistics.median(times)
        rows.append({"name": name, "elapsed_s": round(t, 2), "output_tokens_per_s": round(tokens / t, 1),
                     "vs_hf": round(statistics.median(theirs) / t, 2)})
    # Runs are interleaved, so each pdserve run has an HF run beside it: their ratio is the
    # least noisy comparison on a shared machine.
    paired = sorted(h / o for h, o in zip(theirs, ours, strict=True))
    speedup = (f"paired speed-up over HF (per interleaved pair of runs): median {statistics.median(paired):.2f}x, "
               f"range {paired[0]:.2f}x-{paired[-1]:.2f}x")
    header = (f"{NUM_REQUESTS} requests, input U[{MIN_IN},{MAX_IN}] ({workload.input_tokens} prompt tokens), "
              f"{OUT} output tokens each, float32, median of {args.repeats}")
    table = markdown_table([{"": r["name"], "elapsed (s)": r["elapsed_s"], "output tok/s": r["output_tokens_per_s"],
                             "vs HF": f"{r['vs_hf']}x"} for r in rows])
    print(header)
    print(format_table(rows))
    print(speedup)
    runs_line = "; ".join(f"{name} {times}" for name, times in runs)
    print(f"every run (s): {runs_line}")
    if args.write:
        flags = (f" --threads {args.threads}" if args.threads else "") + (" --busy-neighbour" if args.busy_neighbour else "")
        key, title = "bench_offline_vs_hf", "Offline throughput vs HF transformers on the CPU"
        if args.busy_neighbour:
            key, title = key + "_busy", title + ", beside a busy 2-thread process"
        write_section(args.write, key, title, [
            f"Machine: {machine()}. Model: the default SmolLM2-135M-Instruct (dequantized GGUF).\n"
            f"Workload: {header}. Command: `python loadtest/bench_offline_vs_hf.py --repeats {len(ours)}{flags}`.",
            table,
            speedup[0].upper() + speedup[1:] + ".",
            f"Every run (s): {runs_line}.",
        ])


if __name__ == "__main__":
    main()
