"""Speculative decoding on the CPU with the default model (issue #28): tokens/s at batch 1
and batch 8 without speculation and with each method, on prompts that invite copying
(edit or summarise a given passage, code with repeated identifiers) and on open generation,
with the acceptance rate per draft position (accepted / proposed there: k adapts per
sequence, so later positions are proposed less often).

Every method produces the same tokens as the baseline (greedy): the script checks it, so a
speed-up is never bought with different output. Batch 1 runs the prompts one after another,
batch 8 all at once; model loading is excluded. The machine is shared: its load average is
printed beside the table.

    python loadtest/bench_spec.py [--max-tokens 64] [--methods ngram,self_spec,draft_model]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from loadtest.report import machine, markdown_table
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


def run(llm: LLM, prompts: list[str], batch: int, params: SamplingParams) -> tuple[float, list[list[int]]]:
    """Seconds and each prompt's tokens, `batch` prompts at a time."""
    tokens: list[list[int]] = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        tokens += [o.outputs[0].token_ids for o in llm.generate(prompts[i : i + batch], params)]
    return time.perf_counter() - t0, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    args = p.parse_args()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    workloads = {"copy": COPY, "open": OPEN}
    rows, baseline = [], {}
    load_before = os.getloadavg()
    for method in ["none", *args.methods.split(",")]:
        spec = METHODS.get(method)
        llm = LLM(max_model_len=1024, speculative_config=spec)
        llm.generate(OPEN[:2], SamplingParams(temperature=0, max_tokens=4))  # warm-up
        for name, prompts in workloads.items():
            for batch in (1, 8):
                before = llm.engine.speculator.stats if spec else None
                counts0 = (list(before.accepted_per_pos), list(before.drafted_per_pos)) if before else None
                seconds, tokens = run(llm, prompts, batch, params)
                if method == "none":
                    baseline[name, batch] = (seconds, tokens)
                elif tokens != baseline[name, batch][1]:
                    raise SystemExit(f"{method} changed the output on {name} at batch {batch}")
                n = sum(len(t) for t in tokens)
                row = {"method": method, "prompts": name, "batch": batch, "tokens": n,
                       "tok/s": f"{n / seconds:.1f}", "speed-up": f"{baseline[name, batch][0] / seconds:.2f}x"}
                if spec:
                    stats = llm.engine.speculator.stats
                    accepted = [a - b for a, b in zip(stats.accepted_per_pos, counts0[0])]
                    drafted = [a - b for a, b in zip(stats.drafted_per_pos, counts0[1])]
                    row["drafts"] = sum(drafted)
                    row["acceptance per position"] = " ".join(f"{a / d:.2f}" if d else "-"
                                                              for a, d in zip(accepted, drafted))
                else:
                    row["drafts"], row["acceptance per position"] = 0, "-"
                rows.append(row)
                print(json.dumps(row), flush=True)
        del llm
    print(f"\n{machine()}; load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after; "
          f"greedy, max_tokens {args.max_tokens}, every method's tokens equal the baseline's\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
