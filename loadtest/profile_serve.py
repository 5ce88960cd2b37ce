"""Measure first (issue #32): the service's streaming throughput at saturation beside the
offline engine's, and the CPU every process spends per streamed token.

On the CPU, tiny-llama with dummy weights (default), fixed prompts and output lengths:
  offline  `pdserve bench offline` (LLM.generate, all prompts at once) in its own process
  gRPC     `pdserve serve --prefill 0 --decode 1`, the router's Generate under a closed loop
           of --concurrency streams from --clients client processes (loadtest/clients.py)
  HTTP     the same stack's /v1/completions, stream=true, same load (SSE chunks counted)
Every process's CPU seconds during a measured window (router, decode worker, their children,
Redis, each client) come from /proc (loadtest/proc_cpu.py) and are divided by the tokens
streamed in that window: microseconds of CPU per streamed token (per SSE chunk for HTTP).
Each process runs --threads torch threads (OMP_NUM_THREADS), the offline engine too: two
OpenMP pools spinning on two cores would measure contention. Runs are repeated and
interleaved (offline, gRPC, HTTP, offline, ...); the tables give every run and the medians,
with the machine's load, since other people's work shares the cores.

    python loadtest/profile_serve.py [--repeats 2] [--write BENCHMARKS.md --label before]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from loadtest.benchmark import rate_result
from loadtest.clients import ClientPool, Level, Target, level_seeds
from loadtest.proc_cpu import MachineCpu, ProcessTree
from loadtest.report import machine, markdown_table, write_section
from loadtest.request import SLO, parse_sampling
from loadtest.workloads import Fixed

KEY = "profile_serve"
HOOK = Path(__file__).resolve().parent / "cprofile_hook"
MODEL_ARGS = "--load-format dummy --preset tiny-llama --max-model-len 512"


@dataclass
class Window:
    """One measured load level on the stack: what the clients saw and what each process used."""

    protocol: str
    summary: dict
    tokens: int  # streamed output tokens
    messages: int  # token-carrying messages (gRPC responses or SSE chunks) the clients received
    wall_s: float
    cpu_s: dict[str, float]  # process name -> CPU seconds in the window
    busy_cores: float  # the whole machine's, ours and everyone else's
    load1: float

    def per_token_us(self, name: str) -> float:
        return self.cpu_s.get(name, 0.0) / max(self.tokens, 1) * 1e6

    def per_message_us(self, name: str) -> float:
        return self.cpu_s.get(name, 0.0) / max(self.messages, 1) * 1e6

    @property
    def others_cores(self) -> float:
        """Cores kept busy by processes that are not ours (other people's work on the machine)."""
        return max(0.0, self.busy_cores - sum(self.cpu_s.values()) / self.wall_s)

    def group(self, prefix: str) -> float:
        """CPU seconds of every process whose name starts with `prefix` (a role and its children)."""
        return sum(cpu for name, cpu in self.cpu_s.items() if name.split("/")[0].startswith(prefix))

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("protocol", "tokens", "messages", "wall_s", "cpu_s", "busy_cores",
                                              "load1")} | {"summary": self.summary}


def measure(pool: ClientPool, level: Level, seeds: tuple[str, str], names: dict[int, str], protocol: str) -> Window:
    """One level through `pool`, with every descendant process's CPU time around it."""
    load1 = os.getloadavg()[0]
    tree0, machine0 = ProcessTree.snapshot(os.getpid()), MachineCpu.read()
    outcome = pool.run(level, seeds)
    tree1, machine1 = ProcessTree.snapshot(os.getpid()), MachineCpu.read()
    wall = outcome.elapsed_s
    cpu: dict[str, float] = {}
    for pid, seconds in sorted(tree1.since(tree0).items()):
        name = key = tree1.name(pid, names)
        same = 1
        while key in cpu:  # processes of one name (router workers) get a row each, in pid order
            same += 1
            key = f"{name}-{same}"
        cpu[key] = seconds
    summary = rate_result(level, outcome, SLO()).summary
    records = [r for r in outcome.records if r.ttft_s is not None]
    return Window(protocol, summary, sum(r.output_tokens for r in outcome.records),
                  sum(len(r.itl_s) + 1 for r in records), wall, cpu, machine1.busy_cores(machine0, wall), load1)


def offline(args: argparse.Namespace, env: dict[str, str]) -> dict:
    """`pdserve bench offline` on the same workload, model flags and threads; its JSON line."""
    n, p, o = args.num_prompts, args.prompt_len, args.output_len
    s = parse_sampling(args.sampling_params)
    argv = [sys.executable, "-m", "services.cli.main", "bench", "offline", *shlex.split(args.model_args),
            "--num-prompts", str(n), "--min-input", str(p), "--max-input", str(p), "--min-output", str(o),
            "--max-output", str(o), "--temperature", str(s.temperature), "--top-p", str(s.top_p),
            "--top-k", str(s.top_k), *shlex.split(args.offline_args), "--json"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"bench offline failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "load1": os.getloadavg()[0]}


def served_model(http_url: str) -> str:
    with urllib.request.urlopen(f"{http_url}/v1/models", timeout=30) as reply:
        return json.load(reply)["data"][0]["id"]


def run_all(args: argparse.Namespace) -> dict[str, list]:
    """The stack and both client pools up for the whole run; per repeat offline, gRPC, HTTP."""
    from services.cli.stack import LocalStack

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    workload = Fixed(input_len=args.prompt_len, output_len=args.output_len)
    runs: dict[str, list] = {"offline": [], "grpc": [], "openai": []}
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    stack_env = env
    if args.profile:  # the stack's processes load loadtest/cprofile_hook/sitecustomize.py
        args.profile.mkdir(parents=True, exist_ok=True)
        path = os.pathsep.join(filter(None, [str(HOOK), env.get("PYTHONPATH")]))
        stack_env = {**env, "PYTHONPATH": path, "PDSERVE_CPROFILE_DIR": str(args.profile.resolve())}
    stack = LocalStack(shlex.split(args.model_args), num_prefill=0, num_decode=1, env=stack_env, log_dir=args.log_dir,
                       router_argv=shlex.split(args.router_args), decode_argv=shlex.split(args.decode_args))
    with stack:
        names = {c.proc.pid: c.instance_id for c in stack.children}
        http_url = f"http://{stack.host}:{stack.http_port}"
        sampling = parse_sampling(args.sampling_params)
        grpc_target = Target(stack.router_address, "grpc", sampling)
        pools = {"grpc": ClientPool(grpc_target, workload, args.clients, warmup=2)}
        if not args.no_http:
            http_target = Target(http_url, "openai", sampling, model=served_model(http_url))
            pools["openai"] = ClientPool(http_target, workload, args.clients, warmup=2)
        try:
            for protocol, pool in pools.items():
                pool.start()
                names |= {pid: f"{protocol}-client-{i}" for i, pid in enumerate(pool.pids)}
            if args.profile:  # warm: the stack's profilers start now (cprofile_hook)
                for child in stack.children:
                    child.proc.send_signal(signal.SIGUSR1)
            for r in range(args.repeats):
                runs["offline"].append(offline(args, env))
                print(f"run {r}: offline {runs['offline'][-1]['output_tokens_per_s']:,.0f} tok/s", flush=True)
                for i, (protocol, pool) in enumerate(pools.items()):
                    level = Level(args.duration, concurrency=args.concurrency)
                    window = measure(pool, level, level_seeds(args.seed, r * 2 + i), names, protocol)
                    runs[protocol].append(window)
                    print(f"run {r}: {protocol} {window.summary['steady_output_throughput']:,.0f} tok/s, router "
                          f"{window.group('router') / max(window.tokens, 1) * 1e6:.0f} us/token", flush=True)
        finally:
            for pool in pools.values():
                pool.close()
    return runs


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _f(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def grpc_rows(runs: dict[str, list]) -> list[dict]:
    rows = []
    for i, (off, w) in enumerate(zip(runs["offline"], runs["grpc"], strict=True)):
        cpu_us = off.get("cpu_s", float("nan")) / off["output_tokens"] * 1e6
        rows.append(_grpc_row(str(i), off["output_tokens_per_s"], cpu_us, w))
    if len(rows) > 1:
        rows.append(_median_row(rows))
    return rows


def _grpc_row(label: str, offline_tps: float, offline_cpu_us: float, w: Window) -> dict:
    tps = w.summary["steady_output_throughput"]
    clients = max((u["cpu_fraction"] for u in w.summary["clients"]), default=0.0)
    return {"run": label, "load 1m": _f(w.load1, 2), "busy cores": _f(w.busy_cores, 2),
            "others' cores": _f(w.others_cores, 2),
            "offline tok/s": _f(offline_tps), "serve tok/s": _f(tps), "serve/offline": _f(tps / offline_tps, 2),
            "offline µs/tok": _f(offline_cpu_us), "serve µs/tok": _f(sum(w.cpu_s.values()) / max(w.tokens, 1) * 1e6),
            "TPOT p50 ms": _f(w.summary["tpot_ms"]["p50"] or 0, 1), "tok/msg": _f(w.tokens / max(w.messages, 1), 2),
            "router µs/tok": _f(w.group("router") / max(w.tokens, 1) * 1e6),
            "decode µs/tok": _f(w.group("decode") / max(w.tokens, 1) * 1e6),
            "clients µs/tok": _f(w.group("grpc-client") / max(w.tokens, 1) * 1e6),
            "busiest client": f"{clients:.0%}", "failed": w.summary["failed"]}


def http_rows(runs: dict[str, list]) -> list[dict]:
    rows = []
    for i, (off, w) in enumerate(zip(runs["offline"], runs["openai"], strict=False)):
        tps = w.summary["steady_output_throughput"]
        clients = max((u["cpu_fraction"] for u in w.summary["clients"]), default=0.0)
        rows.append({"run": str(i), "load 1m": _f(w.load1, 2), "busy cores": _f(w.busy_cores, 2),
                     "others' cores": _f(w.others_cores, 2),
                     "HTTP tok/s": _f(tps), "HTTP/offline": _f(tps / off["output_tokens_per_s"], 2),
                     "TPOT p50 ms": _f(w.summary["tpot_ms"]["p50"] or 0, 1),
                     "tok/chunk": _f(w.tokens / max(w.messages, 1), 2),
                     "router µs/chunk": _f(w.group("router") / max(w.messages, 1) * 1e6),
                     "decode µs/tok": _f(w.group("decode") / max(w.tokens, 1) * 1e6),
                     "clients µs/chunk": _f(w.group("openai-client") / max(w.messages, 1) * 1e6),
                     "busiest client": f"{clients:.0%}", "failed": w.summary["failed"]})
    if len(rows) > 1:
        rows.append(_median_row(rows))
    return rows


def _median_row(rows: list[dict]) -> dict:
    """Column-wise medians of numeric cells (percentages included)."""
    out = {}
    for col in rows[0]:
        cells = [r[col] for r in rows]
        try:
            pct = cells[0].endswith("%") if isinstance(cells[0], str) else False
            values = [float(str(c).rstrip("%").replace(",", "")) for c in cells]
            values = [v for v in values if v == v]  # a run that lacks a number (nan) has no say
        except ValueError:
            out[col] = "median"
            continue
        m = _median(values)
        digits = max((len(str(c).split(".")[1]) if "." in str(c) else 0) for c in cells)
        out[col] = f"{m:.0f}%" if pct else _f(m, digits)
    out["run"] = "median"
    return out


def process_rows(runs: dict[str, list]) -> list[dict]:
    """Per process: median % of a core and CPU per streamed token (gRPC) or per chunk (HTTP)."""
    names = sorted({n for p in ("grpc", "openai") for w in runs[p] for n in w.cpu_s})
    rows = []
    for name in names:
        row = {"process": name}
        for protocol, unit in (("grpc", "µs/tok"), ("openai", "µs/chunk")):
            windows = runs[protocol]
            if not windows:
                continue
            tag = "gRPC" if protocol == "grpc" else "HTTP"
            row[f"{tag} % of a core"] = f"{_median([w.cpu_s.get(name, 0.0) / w.wall_s for w in windows]):.0%}"
            per = [w.per_token_us(name) if protocol == "grpc" else w.per_message_us(name) for w in windows]
            row[f"{tag} {unit}"] = _f(_median(per))
        if any(v not in ("0%", "0") for k, v in row.items() if k != "process"):
            rows.append(row)
    return rows


def section(args: argparse.Namespace, tables: dict[str, str]) -> list[str]:
    setup = (
        f"Machine: {machine()}; {os.cpu_count()} cores shared with other sessions (load average and the whole "
        f"machine's busy cores per run below). Model flags `{args.model_args}`, {args.threads} torch thread(s) per "
        f"process (OMP_NUM_THREADS), {args.prompt_len}-token prompts (random ids), {args.output_len} output tokens, "
        f"{args.sampling_params or 'greedy'}, ignore_eos. Offline: `pdserve bench offline` with {args.num_prompts} "
        "prompts at once. Serve: "
        f"`pdserve serve --prefill 0 --decode 1{' ' + args.router_args if args.router_args else ''}`"
        f"{f' (decode worker: `{args.decode_args}`)' if args.decode_args else ''}, closed loop of "
        f"{args.concurrency} streams for {args.duration:g} s from {args.clients} client process(es); serve tok/s "
        "counts tokens that arrived while the loop was sending, over that time. CPU: each process's utime+stime "
        "(/proc) during the window over the tokens streamed in it; `serve µs/tok` sums every process (router, "
        "decode, Redis, clients), `offline µs/tok` is the offline engine's process over its run. CPU per token "
        "is what a noisy machine disturbs least; tok/s depends on what the other sessions left us. "
        "Runs interleaved: offline, gRPC, HTTP, repeat. "
        f"Command: `python loadtest/profile_serve.py --repeats {args.repeats} --concurrency {args.concurrency} "
        f"--duration {args.duration:g} --clients {args.clients}"
        + (f" --router-args '{args.router_args}'" if args.router_args else "")
        + (f" --decode-args '{args.decode_args}'" if args.decode_args else "")
        + (f" --sampling-params {args.sampling_params}" if args.sampling_params else "") + "`" + (f" ({args.label})." if args.label else ".")
    )
    parts = [setup, "gRPC (`Generate`):", tables["grpc"]]
    if "openai" in tables:
        parts += ["OpenAI HTTP (`/v1/completions`, stream=true; one SSE chunk per token-carrying message):",
                  tables["openai"]]
    parts += ["Per process, medians over the runs:", tables["process"]]
    return parts


MEASURED = ("repeats", "concurrency", "duration", "clients", "num_prompts", "prompt_len", "output_len", "threads",
            "model_args", "router_args", "decode_args", "seed", "no_http", "sampling_params", "offline_args")


def load(paths: list[Path], parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, list]:
    """Earlier runs' windows from their --out JSON, in order (runs of one tree interleaved with
    another's come together here); `args` takes the first run's measured settings (and its
    label, unless one is given) and the repeats of all of them."""
    runs: dict[str, list] = {"offline": [], "grpc": [], "openai": []}
    for path in reversed(paths):
        data = json.loads(path.read_text())
        runs = {k: [*part, *runs[k]] for k, part in _windows(data).items()}
    _restore(parser, args, json.loads(paths[0].read_text())["args"])
    args.repeats = len(runs["offline"])
    return runs


def _windows(data: dict) -> dict[str, list]:
    return {"offline": data["offline"], **{p: [Window(**w) for w in data[p]] for p in ("grpc", "openai")}}


def _restore(parser: argparse.ArgumentParser, args: argparse.Namespace, saved_args: dict) -> None:
    data = {"args": saved_args}
    for action in parser._actions:
        saved = data["args"].get(action.dest)
        if saved is not None and (action.dest in MEASURED or (action.dest == "label" and not args.label)):
            value = saved in (True, "True") if action.dest == "no_http" else saved
            setattr(args, action.dest, action.type(value) if action.type and isinstance(value, str) else value)


def profile_report(profile_dir: Path, top: int = 15) -> str:
    """Each profiled process's `top` functions by own time (cProfile's tottime)."""
    import io
    import pstats

    parts = []
    for path in sorted(profile_dir.glob("*.prof")):
        out = io.StringIO()
        stats = pstats.Stats(str(path), stream=out)
        stats.strip_dirs().sort_stats("tottime").print_stats(top)
        body = out.getvalue()
        parts.append(f"{path.stem}:\n{body[body.index('   ncalls'):].rstrip()}" if "   ncalls" in body else path.stem)
    return "\n\n".join(parts)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=256, help="closed-loop streams (gRPC and HTTP)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of sending per measured window")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--num-prompts", type=int, default=256, help="offline: prompts submitted at once")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--model-args", default=MODEL_ARGS)
    parser.add_argument("--router-args", default="", help="extra router flags, e.g. '--router-workers 2'")
    parser.add_argument("--decode-args", default="", help="extra decode worker flags, e.g. '--stream-interval 4'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--offline-args", default="",
                        help="extra flags for the offline run only, e.g. '--gpu-memory-utilization 0.85' on a GPU "
                             "the stack shares")
    parser.add_argument("--sampling-params", default="",
                        help="KEY=VALUE,... for offline and serve alike, e.g. temperature=0.6 (default greedy); "
                             "only temperature, top_p and top_k reach the offline run")
    parser.add_argument("--no-http", action="store_true", help="skip the OpenAI HTTP path")
    parser.add_argument("--log-dir", type=Path)
    parser.add_argument("--out", type=Path, help="write every run's numbers as JSON here")
    parser.add_argument("--label", default="", help="names the measured tree (e.g. before, after); with --write "
                        "the section key becomes profile_serve_LABEL")
    parser.add_argument("--write", type=Path, help="record the tables in this markdown file (BENCHMARKS.md)")
    parser.add_argument("--profile", type=Path, help="cProfile the router's and the decode worker's main threads "
                        "into this directory and print their top functions (slows them: not for the tables)")
    parser.add_argument("--from", dest="saved", type=Path, action="append",
                        help="measure nothing: print (and --write) the tables of earlier runs' --out JSON "
                        "(repeatable: their runs together)")
    return parser


def main() -> None:
    p = parser()
    args = p.parse_args()
    started = time.time()
    runs = load(args.saved, p, args) if args.saved else run_all(args)
    tables = {"grpc": markdown_table(grpc_rows(runs)), "process": markdown_table(process_rows(runs))}
    if runs["openai"]:
        tables["openai"] = markdown_table(http_rows(runs))
    for name, table in tables.items():
        print(f"\n{name}:\n{table}")
    print(f"\n{time.time() - started:.0f} s in all")
    if args.profile:
        write_profile(args)
        return
    record(args, runs, tables)


def write_profile(args: argparse.Namespace) -> None:
    """Print the profiles (and with --write, record them in their own section)."""
    report = profile_report(args.profile)
    print(f"\ncProfile, top functions by own time:\n{report}")
    if args.write:
        key = f"{KEY}_cprofile" + (f"_{args.label}" if args.label else "")
        note = ("A run under cProfile (`--profile`; main threads only: the router's event loop and the decode "
                "worker's gRPC front, not its engine thread; the thread's CPU clock, from warm-up to the end, both "
                "protocols), top functions by own CPU time. cProfile slows what it watches; read the shares, not "
                "the times.")
        write_section(args.write, key, "Where the router's and decode front's CPU goes (cProfile, issue #32)"
                      + (f", {args.label}" if args.label else ""), [note, f"```\n{report}\n```"])


def record(args: argparse.Namespace, runs: dict[str, list], tables: dict[str, str]) -> None:
    """--out: every run's numbers as JSON; --write: the section."""
    if args.out:
        args.out.write_text(json.dumps({"args": {k: v if isinstance(v, (int, float, str)) else str(v)
                                                 for k, v in vars(args).items()},
                                        "offline": runs["offline"],
                                        **{p: [w.to_json() for w in runs[p]] for p in ("grpc", "openai")}}, indent=1))
    if args.write:
        key = f"{KEY}_{args.label}" if args.label else KEY
        title = "Where the CPU goes at saturation: serve vs the offline engine on the CPU (issue #32)"
        write_section(args.write, key, title + (f", {args.label}" if args.label else ""), section(args, tables))


if __name__ == "__main__":
    main()
