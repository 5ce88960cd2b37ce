"""Offline throughput on the CPU: pdserve vs HF transformers `generate()`, same run, float32.

Workload (issue #2): 16 requests, input lengths uniform in [32, 128] (random token ids),
64 output tokens each. HF runs them as one left-padded batch with
min_new_tokens = max_new_tokens = 64; pdserve gets them all at once with ignore_eos.
Model loading is excluded on both sides. The "matmul floor" is the time of the model's linear
layers alone for this workload (prompt tokens once, then 64 decode steps of 16 rows, logits
for 16 rows per step): no attention, norms, sampling or Python around them.

    python loadtest/bench_offline_vs_hf.py [--repeats 3] [--threads 2] [--busy-neighbour] [--write BENCHMARKS.md]

HF runs in its own process, as its users run it (libgomp's default OpenMP settings); pdserve
with the setting its engine makes (services/engine/openmp.py). --busy-neighbour runs every
round twice, alone and beside another process (a 2-thread torch matmul loop: the busy 2-core
machine of issue #26), and reports how much each side slows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

USER_ENV = dict(os.environ)  # HF's process and the neighbour run with what the user set, not with our setting

from services.engine.openmp import prefer_short_spins  # noqa: E402

if "--hf-child" not in sys.argv:  # HF's own process (HFProcess) keeps libgomp's defaults
    prefer_short_spins()  # as the `pdserve` command does, before torch loads

import torch  # noqa: E402

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
    """A process that keeps two threads busy with matmuls until it is killed: an ordinary
    torch process, with libgomp's default spin-waiting (not ours)."""
    proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env={**USER_ENV, "OMP_NUM_THREADS": "2"})
    time.sleep(2.0)  # past its import
    return proc


class HFProcess:
    """HF `generate()` as its users run it: its own process, libgomp's defaults. Loads the
    model once; each `run()` times one generate over the workload and returns the seconds."""

    def __init__(self, threads: int, vocab: int, pad_id: int) -> None:
        argv = [sys.executable, "-m", "loadtest.bench_offline_vs_hf", "--hf-child",
                "--threads", str(threads), "--vocab", str(vocab), "--pad-id", str(pad_id)]
        self.proc = subprocess.Popen(argv, env=USER_ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=Path(__file__).resolve().parent.parent)

    def run(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the HF process died")
        return round(float(line), 3)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def hf_child(threads: int, vocab: int, pad_id: int) -> None:
    """The HF side's process: one untimed generate, then one timed generate per `run` line."""
    from transformers import AutoModelForCausalLM

    from services.engine import loader

    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(loader.resolve(None).weights_dir), dtype=torch.float32).eval()
    workload = random_workload(NUM_REQUESTS, MIN_IN, MAX_IN, OUT, OUT, seed=0, vocab=vocab)
    hf_generate_seconds(model, workload, pad_id)  # the first pass pays page faults and allocator growth
    for line in sys.stdin:
        if line.strip() == "run":
            print(hf_generate_seconds(model, workload, pad_id), flush=True)


SIDES = ("pdserve", "hf generate", "matmul floor", "matmul floor, F.linear")


def measure_round(llm, hf: HFProcess, workload: Workload, times: dict[str, list[float]]) -> None:
    """One interleaved run of each side, appended to `times`."""
    times["pdserve"].append(measure_offline(llm, workload, warmup=0)["elapsed_s"])
    times["hf generate"].append(hf.run())
    times["matmul floor"].append(round(matmul_floor_seconds(llm, workload), 3))
    times["matmul floor, F.linear"].append(round(matmul_floor_seconds(llm, workload, plain=True), 3))


def measure(llm, hf: HFProcess, workload: Workload, repeats: int,
            busy: bool) -> tuple[dict[str, list[float]], dict[str, list[float]] | None]:
    """Seconds of each side, interleaved; with `busy`, every round also runs beside the neighbour."""
    alone = {side: [] for side in SIDES}
    beside = {side: [] for side in SIDES} if busy else None
    for _ in range(repeats):
        measure_round(llm, hf, workload, alone)
        if beside is not None:
            neighbour = start_neighbour()
            try:
                measure_round(llm, hf, workload, beside)
            finally:
                neighbour.kill()
                neighbour.wait()
    return alone, beside


def summary(times: dict[str, list[float]], tokens: int) -> tuple[list[dict], str]:
    theirs = statistics.median(times["hf generate"])
    rows = [{"name": side, "elapsed_s": round(statistics.median(t), 2),
             "output_tokens_per_s": round(tokens / statistics.median(t), 1),
             "vs_hf": round(theirs / statistics.median(t), 2)} for side, t in times.items()]
    # Runs are interleaved, so each pdserve run has an HF run beside it: their ratio is the
    # least noisy comparison on a shared machine.
    paired = sorted(h / o for h, o in zip(times["hf generate"], times["pdserve"], strict=True))
    return rows, (f"paired speed-up over HF (per interleaved pair of runs): median {statistics.median(paired):.2f}x, "
                  f"range {paired[0]:.2f}x-{paired[-1]:.2f}x")


def markdown(rows: list[dict]) -> str:
    return markdown_table([{"": r["name"], "elapsed (s)": r["elapsed_s"], "output tok/s": r["output_tokens_per_s"],
                            "vs HF": f"{r['vs_hf']}x"} for r in rows])


def slowdown_table(alone: dict[str, list[float]], beside: dict[str, list[float]]) -> str:
    """How much each side slows beside the neighbour (medians)."""
    rows = []
    for side in ("pdserve", "hf generate"):
        a, b = statistics.median(alone[side]), statistics.median(beside[side])
        rows.append({"": side, "alone (s)": round(a, 2), "beside the neighbour (s)": round(b, 2),
                     "slowdown": f"{b / a:.2f}x"})
    return markdown_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, interleaved; medians reported")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--busy-neighbour", action="store_true",
                        help="every round runs twice: alone, then beside a 2-thread matmul loop")
    parser.add_argument("--write", type=Path, help="replace this benchmark's section in the given markdown file")
    parser.add_argument("--hf-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--pad-id", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_child:
        return hf_child(args.threads, args.vocab, args.pad_id)
    if args.threads:
        torch.set_num_threads(args.threads)

    from services.engine import LLM

    llm = LLM(dtype="float32")
    vocab, pad_id = llm.engine.layout.vocab_size, llm.engine.layout.eos_token_ids[0]
    workload = random_workload(NUM_REQUESTS, MIN_IN, MAX_IN, OUT, OUT, seed=0, vocab=vocab)
    hf = HFProcess(args.threads, vocab, pad_id)
    try:
        # One full untimed run first: the first pass pays page faults and allocator growth.
        measure_offline(llm, workload, warmup=0)
        matmul_floor_seconds(llm, workload)
        alone, beside = measure(llm, hf, workload, args.repeats, args.busy_neighbour)
    finally:
        hf.close()

    rows, speedup = summary(alone, workload.output_tokens)
    header = (f"{NUM_REQUESTS} requests, input U[{MIN_IN},{MAX_IN}] ({workload.input_tokens} prompt tokens), "
              f"{OUT} output tokens each, float32, median of {args.repeats}; pdserve with its OpenMP setting "
              f"(GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')}), HF in its own process with "
              f"libgomp's defaults{' (as set by the user)' if 'GOMP_SPINCOUNT' in USER_ENV else ''}")
    print(header)
    print(format_table(rows))
    print(speedup)
    runs_line = "; ".join(f"{side} {times}" for side, times in alone.items())
    print(f"every run (s): {runs_line}")
    paragraphs = [markdown(rows), speedup[0].upper() + speedup[1:] + ".", f"Every run (s): {runs_line}."]
    if beside is not None:
        busy_rows, busy_speedup = summary(beside, workload.output_tokens)
        busy_line = "; ".join(f"{side} {times}" for side, times in beside.items())
        print("beside a 2-thread matmul loop:")
        print(format_table(busy_rows))
        print(busy_speedup)
        print(f"every run beside it (s): {busy_line}")
        slowdown = slowdown_table(alone, beside)
        print(slowdown)
        paragraphs += ["Beside a 2-thread torch matmul loop (an ordinary process, libgomp's defaults), same rounds:",
                       markdown(busy_rows), busy_speedup[0].upper() + busy_speedup[1:] + ".",
                       f"Every run beside it (s): {busy_line}.", "How much each side slows:", slowdown]
    if args.write:
        flags = (f" --threads {args.threads}" if args.threads else "") + (" --busy-neighbour" if args.busy_neighbour else "")
        write_section(args.write, "bench_offline_vs_hf", "Offline throughput vs HF transformers on the CPU", [
            f"Machine: {machine()}. Model: the default SmolLM2-135M-Instruct (dequantized GGUF).\n"
            f"Workload: {header}. Command: `python loadtest/bench_offline_vs_hf.py --repeats {args.repeats}{flags}`.",
            *paragraphs,
        ])


if __name__ == "__main__":
    main()
