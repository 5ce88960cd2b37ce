"""Is a batch-1 decode step host- or device-bound inside the engine? (issue #4 working tool, GPU only)

    python loadtest/batch1_replay.py [smollm2-135m|llama-3.2-1b]

1. The captured batch-1 graph replayed back to back, then with what an engine step adds
   around it, one piece at a time: the copy of its tokens to pinned memory, an event, the
   staging copy, the engine's pattern (launch step i, then wait for step i-1), and host work
   between steps (a 250 us busy loop, or a 200 us sleep). Host time of the loop, wall time and
   device time per step.
2. One `LLM.generate` of 256 tokens with CUDA events around every replay: the graph's device
   time, the gap between one graph's end and the next one's start, and how many launches
   found the previous graph already done (the device starved by the host).

JSON lines to stdout and $OUT/replay_exp_<preset>.json.
"""
import json
import os
import sys
import time

import torch

from services.engine import LLM, SamplingParams

preset = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
llm = LLM(load_format="dummy", preset=preset, max_model_len=2048, max_num_seqs=1)
params = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
llm.generate([list(range(100, 132))], params)
g = llm.engine.runner.graphs
graph = g.graphs[1]
staged_host = torch.zeros(g._staged.shape[0] - g.width, dtype=torch.long, pin_memory=True)
staged_host.copy_(g._staged[g.width:].cpu())
tok_host = torch.zeros(256, dtype=torch.long, pin_memory=True)
rows = []

def bench(name, body, steps=256):
    for i in range(20): body(i)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record(); t0 = time.perf_counter()
    for i in range(steps): body(i)
    host = time.perf_counter() - t0
    e1.record(); torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    r = dict(variant=name, host_loop_us=round(host / steps * 1e6, 1), wall_us=round(wall / steps * 1e6, 1),
             gpu_us=round(e0.elapsed_time(e1) / steps * 1e3, 1))
    rows.append(r); print(json.dumps(r), flush=True)

events = {}
def replay(i): graph.replay()
def replay_d2h(i):
    graph.replay(); tok_host[:1].copy_(g.tokens[:1], non_blocking=True)
def replay_d2h_ev(i):
    replay_d2h(i); e = torch.cuda.Event(); e.record(); events[i] = e
def full(i):
    g._staged[g.width:].copy_(staged_host, non_blocking=True); replay_d2h_ev(i)
def full_wait(i):  # the engine's pattern: launch i, then wait for i-1
    full(i); e = events.pop(i - 1, None)
    if e is not None: e.synchronize()
def busy(us):
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end: pass
def full_wait_host(i):  # plus ~250 us of host work after the wait
    full_wait(i); busy(250)
def full_wait_host_before(i):  # host work, then launch, then wait (work before launch)
    busy(250); full_wait(i)
def full_wait_sleep(i):
    full_wait(i); time.sleep(0.0002)

for name, body in [("replay", replay), ("replay+d2h", replay_d2h), ("replay+d2h+event", replay_d2h_ev),
                   ("h2d+replay+d2h+event", full), ("... then wait for i-1", full_wait),
                   ("... + 250us host after", full_wait_host), ("250us host, then launch, wait", full_wait_host_before),
                   ("... + sleep 200us after", full_wait_sleep), ("replay", replay)]:
    bench(name, body)
    events.clear()

# the engine itself, with timing events around each replay
pre, post, starved = [], [], [0]
run = g.run
def timed_run(n):
    if post and post[-1].query(): starved[0] += 1
    a = torch.cuda.Event(enable_timing=True); a.record(); out = run(n)
    b = torch.cuda.Event(enable_timing=True); b.record(); pre.append(a); post.append(b)
    return out
g.run = timed_run
torch.cuda.synchronize(); t0 = time.perf_counter()
llm.generate([list(range(200, 232))], params)
torch.cuda.synchronize(); wall = time.perf_counter() - t0
g.run = run
graph_ms = [a.elapsed_time(b) for a, b in zip(pre, post)]
gap_ms = [post[i].elapsed_time(pre[i + 1]) for i in range(len(pre) - 1)]
import statistics as st
r = dict(variant="engine", wall_ms_per_token=round(wall / 256 * 1e3, 3), graph_ms_median=round(st.median(graph_ms), 3),
         graph_ms_mean=round(st.mean(graph_ms), 3), gap_ms_median=round(st.median(gap_ms), 3),
         gap_ms_mean=round(st.mean(gap_ms), 3), gap_ms_max=round(max(gap_ms), 3), starved_launches=starved[0],
         steps=len(pre))
rows.append(r); print(json.dumps(r), flush=True)
os.makedirs(os.environ.get("OUT", "."), exist_ok=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), f"replay_exp_{preset}.json"), "w"), indent=1)
