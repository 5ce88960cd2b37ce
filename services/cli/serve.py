"""`pdserve prefill`, `pdserve decode`, `pdserve router`: one service each;
`pdserve serve`: router + N prefill + N decode workers as local processes."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket

from services.cli.model_args import add_model_args, engine_config

DEFAULT_HOST = os.environ.get("POD_IP") or "127.0.0.1"


def register(sub: argparse._SubParsersAction) -> None:
    for role, port, metrics_port, help_text in (
        ("prefill", 50061, 9161, "run a prefill worker"),
        ("decode", 50071, 9171, "run a decode worker"),
    ):
        p = sub.add_parser(role, help=help_text)
        _add_bind_args(p, port)
        p.add_argument("--metrics-port", type=int, default=metrics_port, help=f"Prometheus /metrics (default {metrics_port}; 0 = off)")
        p.add_argument("--instance-id", help="this worker's id (default ROLE-HOSTNAME-PORT)")
        p.add_argument("--advertise-host", default=os.environ.get("POD_IP"), help="address peers reach us at (default $POD_IP)")
        if role == "decode":
            p.add_argument("--prefill-peers", default="", help="prefill instances: ID=HOST:PORT,...")
        add_model_args(p)
        p.set_defaults(run=lambda args, role=role: _run_async(run_worker(role, args)))

    r = sub.add_parser("router", help="run the router (gRPC front door + HTTP /metrics, /healthz)")
    _add_bind_args(r, 50051)
    _add_router_args(r)
    r.add_argument("--prefill-peers", default="", help="prefill instances: ID=HOST:PORT,...")
    r.add_argument("--decode-peers", required=True, help="decode instances: ID=HOST:PORT,...")
    add_model_args(r)
    r.set_defaults(run=lambda args: _run_async(_router(args)))

    s = sub.add_parser("serve", help="router + prefill + decode workers as local processes")
    s.add_argument("--host", default="127.0.0.1", help="where the router listens (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=50051, help="router gRPC port (default 50051)")
    _add_router_args(s)
    s.add_argument("--prefill", type=int, default=1, help="prefill workers (0 = colocated: decode prefills)")
    s.add_argument("--decode", type=int, default=1, help="decode workers")
    add_model_args(s)
    s.set_defaults(run=run_serve)


def _add_bind_args(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default=DEFAULT_HOST, help="bind address (default $POD_IP, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=port, help=f"gRPC port (default {port})")
    p.add_argument("--grace", type=float, default=5.0, help="seconds to drain on SIGTERM")


def _add_router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port: /metrics, /healthz (default 8000)")
    p.add_argument("--remote-prefill-threshold", type=int, default=64,
                   help="prefill remotely when more prompt tokens than this are uncached (default 64)")
    p.add_argument("--served-model-name", help="model name clients see (default: derived from --model)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for a decode worker")


def _run_async(coro) -> int:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)
    return 0


async def _router(args: argparse.Namespace) -> None:
    from router.main import run_router
    from services.rpc.server import configure_logging

    configure_logging(args.log_level, "router")
    await run_router(args)


async def run_worker(role: str, args: argparse.Namespace) -> None:
    from pdserve.v1 import worker_pb2, worker_pb2_grpc
    from services.engine.async_engine import AsyncEngine
    from services.rpc.metrics import serve_metrics
    from services.rpc.server import configure_logging, parse_peers, serve_until_signalled, start_server

    instance_id = args.instance_id or f"{role}-{socket.gethostname()}-{args.port}"
    configure_logging(args.log_level, instance_id)
    engine = AsyncEngine(engine_config(args))
    if role == "prefill":
        from services.prefill.server import PrefillServicer

        servicer = PrefillServicer(engine, instance_id)
        add = worker_pb2_grpc.add_PrefillWorkerServicer_to_server
        service = "PrefillWorker"
    else:
        from services.decode.server import DecodeServicer
        from services.kv.transport import GrpcKVTransport
        from services.rpc.worker import identity_of

        core = engine.core
        cfg = core.model_config
        transport = GrpcKVTransport(
            parse_peers(args.prefill_peers),
            instance_id,
            identity_of(engine),
            (cfg.num_layers, 2, core.layout.block_size, cfg.num_kv_heads, cfg.head_dim),
            core.layout.dtype,
        )
        servicer = DecodeServicer(engine, instance_id, transport)
        add = worker_pb2_grpc.add_DecodeWorkerServicer_to_server
        service = "DecodeWorker"
    name = worker_pb2.DESCRIPTOR.services_by_name[service].full_name
    server, health, port = await start_server([lambda s: add(servicer, s)], [name], args.host, args.port)
    serve_metrics(args.host, args.metrics_port)
    gauges = asyncio.create_task(servicer.export_gauges())
    print(f"{role} {instance_id} listening on {args.host}:{port}, metrics :{args.metrics_port}", flush=True)
    try:
        await serve_until_signalled(server, health, args.grace)
    finally:
        gauges.cancel()
        engine.shutdown()


def run_serve(args: argparse.Namespace) -> int:
    from services.cli.stack import LocalStack

    with LocalStack.from_args(args) as stack:
        stack.print_summary()
        return stack.wait()
