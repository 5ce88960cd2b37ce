"""TTFT of a long prompt, disaggregated, with and without layer-wise KV streaming (--kv-layerwise).

Real worker processes: two prefill workers, one with --kv-layerwise on and one off (bytes over
gRPC either way), and one decode worker that has both as peers. Requests alternate between
the two peers (interleaved, so load drifts hit both alike), one at a time; each is a fresh
random prompt (no prefix-cache hit) asking for one token, so the decode worker's TTFT is the
prefill forward plus whatever of the transfer does not overlap it, plus the decode step.

    python loadtest/bench_kv_layerwise.py [--preset smollm2-135m] [--tokens 4096] [--requests 6]
                                          [--chunk 2048] [--device cpu] [--write BENCHMARKS.md]

On a GPU (--device cuda) the three workers share the device (each a fixed pool of blocks), so
layer pieces cross the host between two processes on one GPU:
    python loadtest/bench_kv_layerwise.py --device cuda --preset llama-3.2-1b --tokens 4096 --requests 10
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path


from loadtest.report import machine, markdown_table, write_section
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from services.cli.stack import Child, free_port
from services.engine.sampling_params import SamplingParams
from services.rpc.convert import params_to_proto


def spawn(log_dir: Path, role: str, name: str, flags: list[str]) -> Child:
    port = free_port()
    child = Child(role, name, f"127.0.0.1:{port}", 0,
                  [sys.executable, "-m", "services.cli.main", role, "--port", str(port), "--metrics-port", "0",
                   "--instance-id", name, *flags], log_dir / f"{name}.log")
    child.start(dict(os.environ))
    return child


def ttft(stub, prompt: list[int], peer: str) -> tuple[float, int]:
    """Seconds to the first token, and the prompt tokens decode computed itself (0: all shipped)."""
    params = params_to_proto(SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    request = worker_pb2.DecodeRequest(request_id=f"b{time.monotonic_ns()}", prompt_token_ids=prompt,
                                       sampling=params, prefill_instance=peer)
    start, first, computed = time.monotonic(), None, -1
    for response in stub.Generate(request, timeout=1200):
        if first is None and any(o.token_ids for o in response.outputs):
            first = time.monotonic() - start
        if response.finished:
            computed = response.disaggregation.decode_computed_prompt_tokens
    return first, computed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--requests", type=int, default=6, help="per mode")
    p.add_argument("--chunk", type=int, default=2048, help="prefill --max-num-batched-tokens")
    p.add_argument("--device", default="cpu")
    p.add_argument("--write", type=Path, help="put the table into this markdown file")
    args = p.parse_args()

    model = ["--load-format", "dummy", "--preset", args.preset, "--max-model-len", str(args.tokens + 16),
             "--device", args.device, "--no-prefix-caching",
             "--num-kv-blocks", str(2 * -(-args.tokens // 16) + 64)]  # fixed: three workers may share one GPU
    prefill_flags = [*model, "--kv-transport", "grpc", "--max-num-batched-tokens", str(args.chunk),
                     "--engine-process", "off"]  # the same process layout for both modes
    log_dir = Path(tempfile.mkdtemp(prefix="bench-layerwise-"))
    workers = {mode: spawn(log_dir, "prefill", f"prefill-{mode}", [*prefill_flags, "--kv-layerwise", mode])
               for mode in ("on", "off")}
    peers = ",".join(f"prefill-{mode}={w.address}" for mode, w in workers.items())
    decode = spawn(log_dir, "decode", "decode-0", [*model, "--kv-transport", "grpc", "--prefill-peers", peers,
                                                    "--kv-pull-timeout", "1200", "--kv-progress-timeout", "600"])
    results: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for child in (*workers.values(), decode):
            child.wait_serving(600, poll=0.5)
        stub = worker_pb2_grpc.DecodeWorkerStub(decode.channel())
        rng = random.Random(0)
        prompt = lambda: [rng.randrange(10_000) for _ in range(args.tokens)]  # noqa: E731
        for mode in ("on", "off"):  # warm-up, not counted
            ttft(stub, prompt(), f"prefill-{mode}")
        for i in range(args.requests):
            for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
                seconds, computed = ttft(stub, prompt(), f"prefill-{mode}")
                if computed != 0:
                    raise RuntimeError(f"decode computed {computed} prompt tokens itself: the transfer failed")
                results[mode].append(seconds)
                print(f"{mode}: {seconds * 1000:.0f} ms (load {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        for child in (decode, *workers.values()):
            if child.alive():
                child.proc.terminate()
                child.proc.wait(30)

    load = os.getloadavg()
    table = markdown_table([{"--kv-layerwise": mode, "TTFT median (ms)": f"{statistics.median(xs) * 1000:.0f}",
                             "min": f"{min(xs) * 1000:.0f}", "max": f"{max(xs) * 1000:.0f}", "requests": len(xs)}
                            for mode, xs in results.items()])
    print(table)
    print(f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    if args.write:
        write_section(args.write, "kv-layerwise", f"Layer-wise KV streaming: TTFT of a {args.tokens}-token prompt", [
            f"`python loadtest/bench_kv_layerwise.py --preset {args.preset} --tokens {args.tokens} "
            f"--requests {args.requests} --chunk {args.chunk} --device {args.device}` on {machine()}; "
            f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (a shared machine).",
            table,
        ])


if __name__ == "__main__":
    main()
