"""A short headless locust run against pdserve, checked: `make loadtest` runs this.

Without --host it starts a local stack first (router + prefill + decode, `pdserve serve`'s
LocalStack, on --model-args) and stops it afterwards. It then runs loadtest/locustfile.py
headless under a hard timeout, writes locust's CSVs into --csv-dir, and exits non-zero unless
the run had no failures and its stats hold TTFT, TPOT and e2e entries.

    python -m loadtest.run_locust                                  # default model, 4 users, 30 s
    python -m loadtest.run_locust --host 127.0.0.1:50051 --workload long-short
    python -m loadtest.run_locust --model-args "--load-format dummy --preset tiny-llama" -t 5s
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
ENTRIES = ("TTFT", "TPOT", "e2e")


def locust_command(host: str, users: int, spawn_rate: float, run_time: str, csv_prefix: Path,
                   locust_args: list[str] = ()) -> list[str]:
    """The headless locust command line; in-flight requests get 60 s to finish at the end."""
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
            "-u", str(users), "-r", str(spawn_rate), "-t", run_time, "--stop-timeout", "60",
            "--csv", str(csv_prefix), "--only-summary", *locust_args]


def check_stats(stats_csv: Path) -> list[str]:
    """What is wrong with a locust stats CSV: failures, or a missing TTFT/TPOT/e2e entry."""
    with open(stats_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] != "Aggregated"]
    problems = [f"{r['Name']}: {r['Failure Count']} failures" for r in rows if int(r["Failure Count"])]
    for entry in ENTRIES:
        if not any(entry in r["Name"] and int(r["Request Count"]) > 0 for r in rows):
            problems.append(f"no {entry} entry with requests")
    return problems


def run(host: str, args: argparse.Namespace) -> int:
    args.csv_dir.mkdir(parents=True, exist_ok=True)
    prefix = args.csv_dir / "locust"
    command = locust_command(host, args.users, args.spawn_rate, args.run_time, prefix, args.locust_args)
    print("+", shlex.join(command), flush=True)
    try:
        proc = subprocess.run(command, timeout=args.timeout, env={**os.environ, **_workload_env(args)})
    except subprocess.TimeoutExpired:
        print(f"locust did not finish within {args.timeout:.0f} s (killed)", file=sys.stderr)
        return 1
    problems = check_stats(Path(f"{prefix}_stats.csv"))
    if proc.returncode or problems:
        print(f"load test failed (locust exit {proc.returncode}): {'; '.join(problems)}", file=sys.stderr)
        return 1
    print(f"load test passed: no failures; TTFT, TPOT and e2e in {prefix}_stats.csv")
    return 0


def _workload_env(args: argparse.Namespace) -> dict[str, str]:
    return {"PDSERVE_WORKLOAD": args.workload, "PDSERVE_WORKLOAD_PARAMS": args.workload_params}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help="a running router's HOST:PORT (default: start a local stack)")
    parser.add_argument("--model-args", default="--max-model-len 2048",
                        help="model flags of the local stack (default: the default model)")
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers of the local stack")
    parser.add_argument("-u", "--users", type=int, default=4)
    parser.add_argument("-r", "--spawn-rate", type=float, default=4)
    parser.add_argument("-t", "--run-time", default="30s")
    parser.add_argument("--workload", default="fixed")
    parser.add_argument("--workload-params", default="")
    parser.add_argument("--csv-dir", type=Path, help="where locust's CSVs go (default: a new temporary directory)")
    parser.add_argument("--timeout", type=float, default=300, help="kill locust after this many seconds")
    parser.add_argument("locust_args", nargs="*", help="more locust options, after --")
    args = parser.parse_args(argv)
    args.csv_dir = args.csv_dir or Path(tempfile.mkdtemp(prefix="pdserve-locust-"))
    if args.host:
        return run(args.host, args)
    from services.cli.stack import LocalStack

    with LocalStack(shlex.split(args.model_args), num_prefill=args.prefill, num_decode=1) as stack:
        print(f"stack up at {stack.router_address}", flush=True)
        return run(stack.router_address, args)


if __name__ == "__main__":
    sys.exit(main())
