"""`pdserve` command line: one subcommand per file, imported only when used."""

from __future__ import annotations

import argparse
import logging
import sys

from services.engine.openmp import prefer_short_spins

prefer_short_spins()  # before a subcommand loads torch (services/engine/openmp.py says why)

from services.cli import bench, generate, serve  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The whole `pdserve` command line (tests parse the k8s manifests' args with it)."""
    parser = argparse.ArgumentParser(prog="pdserve", description="LLM serving with paged KV and continuous batching")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default), ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.register(sub)
    bench.register(sub)
    serve.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from services.engine.errors import PdserveError

    try:
        return args.run(args) or 0
    except PdserveError as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
