"""Speculative decoding on the CPU with the default model (issue #28): tokens/s at batch 1
and batch 8 without speculation and with each method, on prompts that invite copying
(edit or summarise a given passage, code with repeated identifiers) and on open generation,
with the acceptance rate per draft position (accepted / proposed there: k adapts per
sequence, so later positions are proposed less often).

Every method produces the same tokens as the baseline (greedy): the script checks it, so a
speed-up is never bought with different output. Batch 1 runs the prompts one after another,
batch 8 all at once; model loading is excluded. The machine is shared and its load drifts
within minutes, so every engine is loaded at once and the methods alternate on each prompt
(batch 1) or batch (batch 8), `--rounds` times over; the load average is printed beside the
table.

    python loadtest/bench_spec.py [--max-tokens 64] [--methods ngram,self_spec,draft_model] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from loadtest.report import machine, markdown_table, write_section
from services.engine import LLM, SamplingParams

PASSAGE = ("The old lighthouse stood on the northern cliff for two hundred years. Every night the keeper "
           "climbed the spiral stairs, trimmed the wick and polished the great lens, so that ships passing "
           "the rocks below could find their way safely into the harbour.")
CODE = ("class InventoryManager:\n    def __init__(self, inventory_items, inventory_limit):\n"
        "        self.inventory_items = inventory_items\n        self.inventory_limit = inventory_limit\n\n"
        "    def add_inventory_item(self, inventory_item):\n")
COPY = [
    f"Rewrite the passage below, replacing 'lighthouse' with 'tower'.\n\n{PASSAGE}\n\nRewritten passage:\n",
    f"Summarise the passage below in two sentences.\n\n{PASSAGE}\n\nSummary:",
    f"Repeat the passage below word for word.\n\n{PASSAGE}\n\nRepeated:\n",
    f"Fix the spelling in this text: {PASSAGE.replace('the', 'teh')}\n\nFixed text:\n",
    CODE,
    CODE.replace("inventory", "customer").replace("Inventory", "Customer"),
    "def compute_total_price(item_price, item_quantity, discount_rate):\n"
    "    total_price = item_price * item_quantity\n",
    f"Translate into simple English, keeping every sentence:\n\n{PASSAGE}\n\nSimple English:\n",
]
OPEN = [
    "What is AI?", "Once upon a time, in a land far away,", "List three primary colors:",
    "Write a short poem about the sea.", "Why is the sky blue?", "Give me a recipe for pancakes.",
    "What are the benefits of exercise?", "Describe a busy city street in the morning.",
]
METHODS = {
    "ngram": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5},
    "self_spec": {"method": "self_spec", "num_speculative_tokens": 2, "num_layers": 20},
    "draft_model": {"method": "draft_model", "num_speculative_tokens": 4},  # draft = the default model itself
}


def timed(llm: LLM, prompts: list[str], params: SamplingParams) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params)
    return time.perf_counter() - t0, [o.outputs[0].token_ids for o in outputs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="times over every prompt, methods interleaved")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    p.add_argument("--write", type=Path, help="record the table in this markdown file (BENCHMARKS.md)")
    args = p.parse_args()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    methods = ["none", *args.methods.split(",")]
    # Every engine at once, and each (prompts, batch) run by every method back to back: the
    # shared machine's load drifts, so a comparison is only fair within minutes.
    engines = {m: LLM(max_model_len=1024, kv_cache_memory=256 << 20, speculative_config=METHODS.get(m))
               for m in methods}
    for llm in engines.values():
        llm.generate(OPEN[:2], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    rows = []
    load_before = os.getloadavg()
    for name, prompts in {"copy": COPY, "open": OPEN}.items():
        for batch in (1, 8):
            counts0 = {m: _counts(llm) for m, llm in engines.items()}
            seconds, tokens = dict.fromkeys(engines, 0.0), {m: [] for m in engines}
            # Methods alternate on every group of `batch` prompts, `rounds` times over.
            for r in range(args.rounds):
                for i in range(0, len(prompts), batch):
                    for method, llm in engines.items():
                        dt, out = timed(llm, prompts[i : i + batch], params)
                        seconds[method] += dt
                        if r == 0:
                            tokens[method] += out
            for method, llm in engines.items():
                if tokens[method] != tokens["none"]:
                    raise SystemExit(f"{method} changed the output on {name} at batch {batch}")
                n = args.rounds * sum(len(t) for t in tokens[method])
                row = {"method": method, "prompts": name, "batch": batch, "tokens": n,
                       "tok/s": f"{n / seconds[method]:.1f}", "speed-up": f"{seconds['none'] / seconds[method]:.2f}x",
                       "drafts": 0, "acceptance per position": "-"}
                if llm.engine.speculator is not None:
                    (acc0, dr0), (acc1, dr1) = counts0[method], _counts(llm)
                    drafted = [a - b for a, b in zip(dr1, dr0)]
                    row["drafts"] = sum(drafted)
                    row["acceptance per position"] = " ".join(
                        f"{(a1 - a0) / d:.2f}" if d else "-" for a1, a0, d in zip(acc1, acc0, drafted))
                rows.append(row)
                print(json.dumps(row), flush=True)
    setup = (f"{machine()}; load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after (a shared "
             f"2-core machine); the default model, greedy, max_tokens {args.max_tokens}, {args.rounds} round(s), "
             "every method's tokens equal the baseline's. Methods: "
             + "; ".join(f"{m} `{json.dumps(METHODS[m])}`" for m in methods if m in METHODS)
             + f". Command: `python loadtest/bench_spec.py --max-tokens {args.max_tokens} --rounds {args.rounds}`.")
    print(f"\n{setup}\n")
    print(markdown_table(rows))
    if args.write:
        write_section(args.write, "bench_spec", "Speculative decoding on the CPU, default model (issue #28)",
                      [setup, markdown_table(rows)])


def _counts(llm: LLM) -> tuple[list[int], list[int]]:
    spec = llm.engine.speculator
    return (list(spec.stats.accepted_per_pos), list(spec.stats.drafted_per_pos)) if spec else ([], [])


if __name__ == "__main__":
    main()
