"""`pdserve router`: the gRPC front door plus its HTTP port."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

import uvicorn

from pdserve.v1 import router_pb2, router_pb2_grpc
from router.http import build_app
from router.policy import LeastLoadedPolicy
from router.registry import StaticRegistry
from router.server import RouterServicer
from services.rpc.server import parse_peers, serve_until_signalled, start_server

log = logging.getLogger("pdserve.router")


class _HTTPServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # The router owns SIGINT/SIGTERM: health goes NOT_SERVING, gRPC drains, then HTTP stops.
        yield


async def run_router(args: argparse.Namespace) -> None:
    from services.engine import loader
    from services.engine.tokenizer import Tokenizer

    registry = StaticRegistry(parse_peers(args.prefill_peers), parse_peers(args.decode_peers))
    if not registry.decodes():
        raise SystemExit("pdserve router: --decode-peers names no decode instance")
    source = loader.resolve(args.model, args.load_format, args.preset, args.dummy_seed, args.tokenizer,
                            args.cache_dir, weights=False)
    tokenizer = Tokenizer.load(source.tokenizer_dir) if source.tokenizer_dir else None
    hello = await registry.handshake_any("decode", timeout=args.startup_timeout)
    servicer = RouterServicer(
        registry,
        LeastLoadedPolicy(args.remote_prefill_threshold),
        tokenizer,
        model_name=args.served_model_name or source.name,
        max_model_len=hello.max_model_len,
        vocab_size=hello.identity.vocab_size,
    )
    registry.start()
    name = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
    server, health, port = await start_server(
        [lambda s: router_pb2_grpc.add_RouterServicer_to_server(servicer, s)], [name], args.host, args.port
    )
    http = _HTTPServer(uvicorn.Config(build_app(registry, servicer), host=args.host, port=args.http_port,
                                         log_level="warning", lifespan="off"))
    http_task = asyncio.create_task(http.serve())
    print(f"router listening on {args.host}:{port} (gRPC), http://{args.host}:{args.http_port} "
          f"(/v1, /healthz, /metrics); model {servicer.model_name}", flush=True)
    try:
        await serve_until_signalled(server, health, args.grace)
    finally:
        http.should_exit = True
        await http_task
        await registry.close()
