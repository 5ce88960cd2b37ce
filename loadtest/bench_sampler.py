"""Sampling on the CPU (issue #26): the sampler alone against the one it replaced, and the
engine's sampled / greedy throughput with the default model.

  micro   256 rows x 49,152 tokens (the default model's vocabulary): the vectorized sampler
          against the per-row sampler of commit 5f321ea, read from git (`git show`), on the
          same logits and specs; logits are N(0, sigma^2) or the default model's own (HF
          transformers on random prompts). Best of --repeats calls after one warm-up.
  engine  the default model (float32) on --num-prompts requests all at once, input U[32, 128],
          --output-len tokens each (64), ignore_eos: greedy and each sampling mode interleaved, so
          each sampled run has a greedy run beside it; medians, paired ratios, and the ratio
          of the best runs (the least disturbed, on a shared machine).

    python -m loadtest.bench_sampler [--parts micro,engine] [--threads 2] [--keep-freed-memory]

Torch's threads are pinned (--threads). The engine keeps freed host memory in the heap
(services/engine/host_memory.py); `micro` runs with glibc's default unless
--keep-freed-memory, so both settings can be measured, each in its own process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

OLD_COMMIT = "5f321ea"  # the last commit with the per-row sampler
VOCAB = 49_152
MODES = {
    "temperature 0.6": {"temperature": 0.6},
    "T 0.8, top_p 0.9, top_k 50": {"temperature": 0.8, "top_p": 0.9, "top_k": 50},
    "T 0.7, repetition_penalty 1.1, seed": {"temperature": 0.7, "repetition_penalty": 1.1, "seed": 0},
}
MICRO_MODES = {"top_p 0.9": {"temperature": 1.0, "top_p": 0.9}, **{k: v for k, v in MODES.items() if "seed" not in k}}


def old_sampler_class() -> type:
    """The per-row Sampler as it was at OLD_COMMIT (imports what still exists under its names)."""
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:services/engine/sampler.py"], check=True,
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout
    path = Path(tempfile.mkdtemp()) / "old_sampler.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_sampler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Sampler


def model_logits(rows: int) -> torch.Tensor:
    """The default model's next-token logits after `rows` random 32-token prompts."""
    from transformers import AutoModelForCausalLM

    from services.engine import loader

    model = AutoModelForCausalLM.from_pretrained(str(loader.resolve(None).weights_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, 10_000, (rows, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return torch.cat([model(ids[i : i + 32]).logits[:, -1] for i in range(0, rows, 32)])[:, :VOCAB].contiguous()


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def micro(repeats: int) -> list[dict]:
    from services.engine.sampler import Sampler
    from services.engine.sampling_params import SamplingParams
    from services.engine.scheduler import SampleSpec

    old = old_sampler_class()
    g = torch.Generator().manual_seed(0)
    sources = {"N(0, 1)": torch.randn(256, VOCAB, generator=g), "N(0, 9)": torch.randn(256, VOCAB, generator=g) * 3,
               "default model": model_logits(256)}
    rows = []
    for source, logits in sources.items():
        for mode, kwargs in MICRO_MODES.items():
            specs = [SampleSpec(SamplingParams(**kwargs), (0,), 1, [1]) for _ in range(256)]
            new_s = best_of(lambda: Sampler((2,))(logits, specs), repeats)
            old_s = best_of(lambda: old((2,))(logits, specs), max(1, repeats // 3))
            rows.append(record(part="micro", logits=source, mode=mode, new_ms=round(new_s * 1e3, 1),
                               old_ms=round(old_s * 1e3, 1), speedup=round(old_s / new_s, 1)))
    return rows


def engine(num_prompts: int, output_len: int, repeats: int) -> list[dict]:
    from services.cli.bench import measure_offline, random_workload
    from services.engine import LLM

    llm = LLM(dtype="float32")
    workload = random_workload(num_prompts, 32, 128, output_len, output_len, seed=0, vocab=llm.engine.layout.vocab_size)
    measure_offline(llm, workload, warmup=0)  # one full untimed run: page faults, allocator growth
    for mode in MODES.values():
        measure_offline(llm, workload, warmup=len(workload.prompts), sampling=mode)  # every row's first draws
    times: dict[str, list[float]] = {"greedy": [], **{m: [] for m in MODES}}
    for _ in range(repeats):
        for mode, kwargs in MODES.items():
            for name, sampling in (("greedy", {}), (mode, kwargs)):
                times[name].append(measure_offline(llm, workload, warmup=0, sampling=sampling)["elapsed_s"])
                print(json.dumps({"run": name, "elapsed_s": times[name][-1]}), flush=True)
    tokens = workload.output_tokens
    greedy = statistics.median(times["greedy"])
    rows = [record(part="engine", mode="greedy", requests=num_prompts, output_tok_s=round(tokens / greedy, 1),
                   best_output_tok_s=round(tokens / min(times["greedy"]), 1), runs_s=times["greedy"])]
    for i, mode in enumerate(MODES):
        t = statistics.median(times[mode])
        beside = times["greedy"][i::len(MODES)]
        paired = sorted(g / s for g, s in zip(beside, times[mode], strict=True))
        rows.append(record(part="engine", mode=mode, requests=num_prompts, output_tok_s=round(tokens / t, 1),
                           vs_greedy=round(greedy / t, 3), paired_vs_greedy=[round(p, 3) for p in paired],
                           best_vs_greedy=round(min(times["greedy"]) / min(times[mode]), 3),
                           runs_s=times[mode]))
    return rows


def record(**row) -> dict:
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="micro,engine")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64, help="engine: output tokens per request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep-freed-memory", action="store_true", help="micro: glibc keeps freed blocks, as the engine")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from services.engine.host_memory import keep_freed_memory

        keep_freed_memory()
    rows = [record(part="setup", threads=args.threads, keep_freed_memory=args.keep_freed_memory,
                   torch=torch.__version__, python=sys.version.split()[0])]
    parts = args.parts.split(",")
    if "micro" in parts:
        rows += micro(max(3, args.repeats))
    if "engine" in parts:
        rows += engine(args.num_prompts, args.output_len, args.repeats)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
