"""`pdserve router`: the gRPC front door plus its HTTP port."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
from pathlib import Path

import uvicorn

from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2
from router import metrics as router_metrics
from services.rpc import metrics
from router.gate import Gate
from router.http import build_app
from router.limits import Limits
from router.migration import MigrationPolicy
from router.policy import RoutingConfig, make_policy
from router.registry import RedisRegistry, StaticRegistry
from router.server import Prepared, RouterServicer
from router.tool_calls import ToolConfig
from router.workers import WorkerSlot, reuse_port_socket, watch_parent
from services.engine.block_hash import HASH_SCHEME_VERSION, HASH_SEED
from services.fleet.directory import FleetDirectory
from services.fleet.schema import connect
from services.cli.serve import internal_tls
from services.rpc.security import ApiKeys, TLSFiles
from services.rpc.server import ServerSecurity, parse_peers, serve_until_signalled, start_health_server, start_server

log = logging.getLogger("pdserve.router")

DEFAULT_MODEL_CHAT_TEMPLATE = Path(__file__).parent / "chat_templates" / "smollm2_tools.jinja"


class _HTTPServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # The router owns SIGINT/SIGTERM: health goes NOT_SERVING, gRPC drains, then HTTP stops.
        yield


async def run_router(args: argparse.Namespace, slot: WorkerSlot | None = None) -> None:
    """One router process until SIGINT/SIGTERM: the only one, or worker `slot` of a group
    (router/workers.py), which shares its ports with the others (SO_REUSEPORT)."""
    watch = asyncio.create_task(watch_parent(slot.parent_pid)) if slot is not None else None
    keys = ApiKeys.gather(args.api_key, args.api_key_file)
    client_tls = _client_tls(args)
    limits = Limits(args.max_request_bytes, args.max_seqs_per_request, args.max_prompt_chars, args.max_header_bytes,
                    args.max_header_count, args.max_concurrent_streams, args.request_timeout, args.scheduling_policy)
    directory, registry = _registry(args, internal_tls(args))
    tools = ToolConfig(args.enable_auto_tool_choice, args.tool_call_parser)
    chat_template = _chat_template(args)
    # After the cheap checks: the loader imports torch (seconds), which a bad flag need not wait for.
    from services.engine import loader
    from services.engine.tokenizer import Tokenizer

    source = loader.resolve(args.model, args.load_format, args.preset, args.dummy_seed, args.tokenizer,
                            args.cache_dir, weights=False)
    tokenizer = Tokenizer.load(source.tokenizer_dir) if source.tokenizer_dir else None
    hello = await registry.handshake_any("decode", timeout=args.startup_timeout)
    servicer = _CountingServicer(
        registry,
        make_policy(args.routing_policy, routing_config(args)),
        tokenizer,
        model_name=args.served_model_name or source.name,
        max_model_len=hello.max_model_len,
        vocab_size=hello.identity.vocab_size,
        directory=directory,
        block_size=args.block_size,
        limits=limits,
        offload_threads=args.tokenizer_workers,
        migration=MigrationPolicy(args.migration_limit, args.decode_stall_timeout),
        tools=tools,
        chat_template=chat_template,
    )
    registry.start()
    name = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
    # A worker shares the port with its group; a single router refuses a port someone else listens on.
    reuse_port = [("grpc.so_reuseport", int(slot is not None))]
    server, health, port = await start_server(
        [lambda s: router_pb2_grpc.add_RouterServicer_to_server(servicer, s)], [name], args.host, args.port,
        ServerSecurity(client_tls, api_keys=keys), [*limits.grpc_options(), *reuse_port],
    )
    health_server = await start_health_server(args.host, args.health_port, health) if args.health_port else None
    metrics.set_model_name(servicer.model_name)
    app = build_app(registry, servicer, Gate(keys, limits, metrics_open=args.metrics_without_auth))
    http = _http_server(app, args, limits, client_tls is not None)
    sockets = [reuse_port_socket(args.host, args.http_port)] if slot is not None else None
    http_task = asyncio.create_task(http.serve(sockets=sockets))
    # What start-up made lives as long as the process: keep it out of the cyclic collector's full
    # scans, which walked all of it under load (about a tenth of the router's CPU; issue #32).
    gc.collect()
    gc.freeze()
    print(_banner(args, port, servicer.model_name, len(keys), client_tls is not None, directory is not None, slot),
          flush=True)
    if slot is not None:
        slot.mark_serving()

    async def drain_http() -> None:  # HTTP stops accepting with gRPC; its requests in flight get the grace too
        http.should_exit = True

    try:
        await serve_until_signalled(server, health, args.grace, on_draining=drain_http)
    finally:
        http.should_exit = True
        await http_task
        if health_server is not None:
            await health_server.stop(0)
        servicer.close()
        await registry.close()
        if directory is not None:
            await directory.redis.aclose()
        if watch is not None:
            watch.cancel()


class _CountingServicer(RouterServicer):
    """The router's servicer, counting the requests this process takes (gRPC and HTTP both
    prepare each one here): with --router-workers, how the kernel spread the connections."""

    async def prepare(self, *args, **kwargs) -> Prepared:
        router_metrics.PROCESS_REQUESTS.inc()
        return await super().prepare(*args, **kwargs)


def _banner(args: argparse.Namespace, port: int, model: str, keys: int, tls: bool, fleet: bool,
            slot: WorkerSlot | None) -> str:
    scheme = "https" if tls else "http"
    return (f"router listening on {args.host}:{port} (gRPC{', TLS' if tls else ''}), {scheme}://{args.host}:"
            f"{args.http_port} (/v1, /healthz, /metrics); model {model}; routing {args.routing_policy}; "
            f"API keys {keys or 'none (open)'}" + (", fleet registry in Redis" if fleet else "")
            + (f"; worker {slot.index + 1} of {slot.count}, pid {os.getpid()}" if slot else ""))


def _http_server(app, args: argparse.Namespace, limits: Limits, tls: bool) -> _HTTPServer:
    tls_files = {"ssl_certfile": str(args.tls_cert), "ssl_keyfile": str(args.tls_key)} if tls else {}
    return _HTTPServer(uvicorn.Config(app, host=args.host, port=args.http_port, log_level="warning", lifespan="off",
                                      h11_max_incomplete_event_size=max(64 << 10, 4 * limits.max_header_bytes),
                                      timeout_graceful_shutdown=args.grace, **tls_files))


def _chat_template(args: argparse.Namespace) -> str | None:
    """--chat-template's text; for the default model, pdserve's tool-capable version of its own
    template (SmolLM2's ignores tools and cannot render a tool call)."""
    path = args.chat_template
    if path is None and args.model is None and args.load_format == "auto":
        path = DEFAULT_MODEL_CHAT_TEMPLATE
    try:
        return path.read_text() if path is not None else None
    except OSError as e:
        raise SystemExit(f"pdserve router: cannot read --chat-template {path}: {e}") from None


def routing_config(args: argparse.Namespace) -> RoutingConfig:
    return RoutingConfig(args.remote_prefill_threshold, args.load_penalty, args.imbalance_threshold,
                         args.imbalance_ratio, args.prefill_backlog)


def _client_tls(args: argparse.Namespace) -> TLSFiles | None:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("pdserve router: --tls-cert and --tls-key go together")
    return TLSFiles.load(args.tls_cert, args.tls_key) if args.tls_cert else None


def _registry(args: argparse.Namespace, tls: TLSFiles | None) -> tuple[FleetDirectory | None, StaticRegistry]:
    """Static peers, plus the fleet registry with --redis (the only source it needs)."""
    prefills, decodes = parse_peers(args.prefill_peers), parse_peers(args.decode_peers)
    if not args.redis:
        if not decodes:
            raise SystemExit("pdserve router: give --redis URL (the fleet registry) or --decode-peers")
        return None, StaticRegistry(prefills, decodes, tls=tls)
    # Bursts wait for a pooled connection instead of failing (and routing on load alone).
    directory = FleetDirectory(connect(args.redis, blocking_pool=True))
    # The router hashes prompts itself: instances must hash blocks exactly as it does.
    hashing = worker_pb2.ModelIdentity(block_size=args.block_size, hash_seed=HASH_SEED,
                                       hash_scheme_version=HASH_SCHEME_VERSION)
    return directory, RedisRegistry(prefills, decodes, directory, hashing, tls=tls)
