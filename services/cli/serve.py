"""`pdserve prefill`, `pdserve decode`, `pdserve router`: one service each;
`pdserve serve`: router + N prefill + N decode workers as local processes."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from pathlib import Path

from services.cli.model_args import add_model_args, engine_config, parse_bytes
from services.cli.placement import parse_gpus

log = logging.getLogger("pdserve.worker")

DEFAULT_HOST = os.environ.get("POD_IP") or "127.0.0.1"
ROUTING_POLICIES = ("prefix", "round_robin", "least_loaded")  # router/policy.py (not imported: it loads grpc)
TOOL_CALL_PARSERS = ("hermes", "llama3_json")  # router/tool_parsers.py AUTO_PARSERS


def register(sub: argparse._SubParsersAction) -> None:
    for role, port, metrics_port, help_text in (
        ("prefill", 50061, 9161, "run a prefill worker"),
        ("decode", 50071, 9171, "run a decode worker"),
    ):
        p = sub.add_parser(role, help=help_text)
        _add_bind_args(p, port)
        p.add_argument("--metrics-port", type=int, default=metrics_port, help=f"Prometheus /metrics (default {metrics_port}; 0 = off)")
        p.add_argument("--instance-id", help="this worker's id (default ROLE-HOSTNAME-PORT)")
        p.add_argument("--served-model-name", help="the model_name label of this worker's metrics (default: derived "
                       "from --model, as the router's)")
        p.add_argument("--advertise-host", default=os.environ.get("POD_IP"),
                       help="host peers reach us at, as registered (default $POD_IP, else --host)")
        _add_redis_arg(p)
        _add_internal_args(p)
        _add_admission_args(p)
        _add_engine_process_arg(p)
        _add_kv_transport_arg(p)
        if role == "prefill":
            _add_kv_layerwise_arg(p)
        if role == "decode":
            p.add_argument("--prefill-peers", default="",
                           help="static prefill instances: ID=HOST:PORT,... (others resolve through --redis)")
            _add_kv_timeout_args(p)
            _add_stream_interval_arg(p)
        add_model_args(p)
        p.set_defaults(run=lambda args, role=role: _run_async(run_worker(role, args)))

    r = sub.add_parser("router", help="run the router (gRPC front door + HTTP /metrics, /healthz)")
    _add_bind_args(r, 50051)
    _add_router_args(r)
    _add_redis_arg(r)
    _add_internal_args(r)
    add_scheduling_arg(r)
    r.add_argument("--prefill-peers", default="", help="static prefill instances: ID=HOST:PORT,...")
    r.add_argument("--decode-peers", default="", help="static decode instances: ID=HOST:PORT,... (needed without --redis)")
    add_model_args(r)
    r.set_defaults(run=_router_command)

    s = sub.add_parser("serve", help="router + prefill + decode workers as local processes")
    s.add_argument("--host", default="127.0.0.1", help="where the router listens (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=50051, help="router gRPC port (default 50051)")
    _add_router_args(s)
    s.add_argument("--prefill", type=int, default=1, help="prefill workers (0 = colocated: decode prefills)")
    s.add_argument("--decode", type=int, default=1, help="decode workers")
    s.add_argument("--gpus", type=parse_gpus, metavar="IDS",
                   help="GPU ids, one per worker, e.g. 0,1: prefill workers take the first ones, decode workers "
                   "the next; each worker sees only its own (CUDA_VISIBLE_DEVICES). Default: every worker sees "
                   "every device and uses the first")
    _add_redis_arg(s, serve=True)
    _add_admission_args(s)
    _add_engine_process_arg(s)
    _add_kv_transport_arg(s)
    _add_kv_layerwise_arg(s)
    _add_kv_timeout_args(s)
    _add_stream_interval_arg(s)
    add_model_args(s)
    s.set_defaults(run=run_serve)

    c = sub.add_parser("internal-certs", help="make a CA and certificates for --internal-tls (mutual TLS between "
                       "pdserve processes)")
    c.add_argument("dir", type=Path, help="writes DIR/ca.crt, DIR/tls.crt, DIR/tls.key (with --name: DIR/NAME/...)")
    c.add_argument("--name", action="append", default=[],
                   help="one certificate per name, its common name (a worker scopes request ids by it); repeatable")
    c.add_argument("--days", type=int, default=365, help="validity (default 365)")
    c.set_defaults(run=_internal_certs)


def _internal_certs(args: argparse.Namespace) -> int:
    from services.rpc.security import make_internal_certs

    if args.name:
        for name, path in make_internal_certs(args.dir, args.name, args.days).items():
            print(f"{name}: {path}")
        return 0
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        made = make_internal_certs(Path(tmp), ["pdserve"], args.days)["pdserve"]
        args.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for item in made.iterdir():
            shutil.copy2(item, args.dir / item.name)
    print(f"wrote {args.dir}/ca.crt, tls.crt, tls.key (common name pdserve; the CA's key is not kept)")
    return 0


KV_TRANSPORTS = ("auto", "grpc", "nixl")


def _add_kv_transport_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-transport", choices=KV_TRANSPORTS, default="auto",
                   help="how prompt KV moves from prefill to decode: auto = by reference from a prefill worker on "
                   "the same GPU (CUDA IPC, services/kv/cuda_ipc.py), else over NIXL when both engines run in their "
                   "worker's process (a GPU), else bytes over gRPC (default); nixl = read over NIXL/UCX from any "
                   "prefill worker that offers it (services/kv/nixl.py; with the engine core in its own process the "
                   "agent runs there, beside the KV pool: services/kv/nixl_core.py), else bytes; grpc = always bytes")


def _add_kv_layerwise_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-layerwise", choices=("on", "off"), default="off",
                   help="prefill workers: on = ship a prompt chunk's KV bytes layer by layer as the forward writes "
                   "each layer, overlapping the transfer with the rest of the forward (gRPC bytes only; the engine "
                   "then runs in the worker process, and those chunks run without a CUDA graph); off = block by "
                   "block after each step (default: on the CPU it gains nothing measurable, see BENCHMARKS.md)")


def _add_kv_timeout_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("stalled prefill peers (services/kv/transport.py)")
    g.add_argument("--kv-pull-timeout", type=float, default=60.0,
                   help="seconds a prompt's KV may take to arrive from prefill; then decode computes the rest "
                   "itself (default 60)")
    g.add_argument("--kv-progress-timeout", type=float, default=20.0,
                   help="seconds without a message from prefill before decode gives up on it (default 20)")


def _add_engine_process_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine-process", choices=("on", "off"), default="on",
                   help="on: the engine core (step loop) runs in a child process of the worker, apart from its gRPC "
                   "front, which detokenizes (default); off: on a thread of the worker's process "
                   "(services/engine/core_client.py)")


def _add_stream_interval_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream-interval", type=int, default=1,
                   help="decode sends a request's tokens every N tokens (its first and last at once): fewer "
                   "messages for a little latency, as vLLM and SGLang coalesce them (default 1)")


def _add_bind_args(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default=DEFAULT_HOST, help="bind address (default $POD_IP, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=port, help=f"gRPC port (default {port})")
    p.add_argument("--grace", type=float, default=5.0, help="seconds to drain on SIGTERM")


def _add_redis_arg(p: argparse.ArgumentParser, serve: bool = False) -> None:
    default = os.environ.get("PDSERVE_REDIS_URL")
    p.add_argument("--redis", metavar="URL", default=default,
                   help="fleet registry and prefix index, e.g. redis://HOST:6379/0 (default $PDSERVE_REDIS_URL"
                   + (", else a private redis-server started for this stack)" if serve else ")"))


def _add_internal_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("between pdserve processes (services/rpc/security.py)")
    g.add_argument("--internal-tls", metavar="DIR", default=os.environ.get("PDSERVE_INTERNAL_TLS"),
                   help="mutual TLS between router and workers and between workers: DIR holds ca.crt, tls.crt and "
                   "tls.key (a kubernetes.io/tls Secret with its CA). Workers then answer only callers with a "
                   "certificate signed by ca.crt (default $PDSERVE_INTERNAL_TLS; `pdserve serve` makes its own)")
    g.add_argument("--health-port", type=int, default=0,
                   help="also serve grpc.health.v1, and nothing else, in plaintext on this port (Kubernetes' gRPC "
                   "probes present no certificate); 0 = off (default)")


def _add_admission_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("admission (services/engine/admission.py)")
    g.add_argument("--max-queued-requests", type=int,
                   help="requests waiting to start beyond which new ones get RESOURCE_EXHAUSTED (HTTP 429) "
                   "(default: --max-num-seqs)")
    g.add_argument("--max-queued-tokens", type=int,
                   help="prompt tokens waiting to start beyond which new requests are refused "
                   "(default: the KV pool's capacity in tokens)")
    add_scheduling_arg(g)


def add_scheduling_arg(p) -> None:
    p.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default="fcfs",
                   help="fcfs: arrival order, and a request's priority must be 0 (default); priority: lower first")


def _add_router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port: /metrics, /healthz (default 8000)")
    p.add_argument("--served-model-name", help="model name clients see (default: derived from --model)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for a decode worker")
    p.add_argument("--router-workers", type=_positive_int, default=1, metavar="N",
                   help="router processes sharing the gRPC, HTTP and health ports (SO_REUSEPORT; the kernel spreads "
                   "client connections over them), supervised by a parent; /metrics sums them (default 1: one "
                   "process, no parent) (router/workers.py)")
    _add_client_security_args(p)
    _add_limit_args(p)
    _add_chat_args(p)
    g = p.add_argument_group("routing (router/policy.py)")
    g.add_argument("--routing-policy", choices=ROUTING_POLICIES, default="prefix",
                   help="prefix: cached tokens minus a load penalty (default); round_robin; least_loaded")
    g.add_argument("--remote-prefill-threshold", type=int, default=64,
                   help="prefill remotely when more prompt tokens than this are uncached (default 64)")
    g.add_argument("--load-penalty", type=float, default=16.0,
                   help="prefix: cached tokens one queued request is worth (default 16)")
    g.add_argument("--imbalance-threshold", type=int, default=8,
                   help="prefix: route to the least loaded decode instance when the best one has this many more "
                   "requests queued (default 8) ...")
    g.add_argument("--imbalance-ratio", type=float, default=1.5, help="... and this many times as many (default 1.5)")
    g.add_argument("--prefill-backlog", type=int, default=16,
                   help="prefill locally when the chosen prefill instance has this many requests queued (default 16)")


def _add_chat_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("chat and tool calling (router/tool_calls.py)")
    g.add_argument("--chat-template", type=Path,
                   help="a Jinja chat template file for /v1/chat/completions and gRPC chat prompts (default: the "
                   "model's own; for the default model, pdserve's tool-capable version of it)")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='let the model decide when to call tools (tool_choice "auto", the default with tools); '
                   "needs --tool-call-parser")
    g.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS,
                   help="how calls are read from the model's text: hermes (<tool_call>{json}</tool_call>) or "
                   'llama3_json ({"name": ..., "parameters": ...})')


def check_chat_args(args: argparse.Namespace) -> None:
    """Start-up errors for the chat flags (before any process starts)."""
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise SystemExit("pdserve: --enable-auto-tool-choice needs --tool-call-parser")
    if args.chat_template is not None and not args.chat_template.is_file():
        raise SystemExit(f"pdserve: --chat-template {args.chat_template} is not a file")


def _add_client_security_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("clients (router/auth.py)")
    g.add_argument("--api-key", action="append", default=[],
                   help="a key clients must send (HTTP `Authorization: Bearer KEY`, gRPC metadata `authorization`); "
                   "repeat for several; also $PDSERVE_API_KEY. Without one, no key is needed")
    g.add_argument("--api-key-file", type=Path, help="more keys, one per line")
    g.add_argument("--metrics-without-auth", action="store_true", help="serve /metrics without a key")
    g.add_argument("--tls-cert", type=Path, help="certificate (chain) for the router's gRPC and HTTP ports")
    g.add_argument("--tls-key", type=Path, help="private key of --tls-cert")


def _add_limit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("limits per request (router/limits.py)")
    g.add_argument("--max-request-bytes", type=parse_bytes, default=8 << 20,
                   help="largest HTTP body (413) and gRPC request message (default 8MiB)")
    g.add_argument("--max-seqs-per-request", type=int, default=256,
                   help="prompts x n in one request (default 256)")
    g.add_argument("--max-prompt-chars", type=int,
                   help="longest text prompt, checked before tokenizing (default 32 x the context length)")
    g.add_argument("--max-header-bytes", type=parse_bytes, default=16 << 10,
                   help="HTTP headers, and gRPC metadata, of one request (default 16KiB; HTTP 431)")
    g.add_argument("--max-header-count", type=int, default=100, help="HTTP headers of one request (default 100; 431)")
    g.add_argument("--max-concurrent-streams", type=int, default=1024,
                   help="concurrent gRPC calls on one client connection (default 1024)")
    g.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds an HTTP request may take, and the longest deadline a gRPC one gets (default 600)")
    g = p.add_argument_group("failures (router/migration.py)")
    g.add_argument("--migration-limit", type=int, default=3,
                   help="times a request may move to another decode instance after its stream broke or stalled "
                   "(default 3; 0 = never)")
    g.add_argument("--decode-stall-timeout", type=float, default=15.0,
                   help="seconds without a message from a decode instance (which sends heartbeats meanwhile) "
                   "before its request moves elsewhere (default 15)")
    g = p.add_argument_group("limits per request (router/limits.py)")
    g.add_argument("--tokenizer-workers", type=int, default=2,
                   help="threads that tokenize long prompts and parse large bodies off the router's event loop "
                   "(default 2)")


ROUTER_FLAGS = ("routing_policy", "remote_prefill_threshold", "load_penalty", "imbalance_threshold",
                "imbalance_ratio", "prefill_backlog", "served_model_name", "scheduling_policy", "metrics_without_auth",
                "tls_cert", "tls_key", "max_request_bytes", "max_seqs_per_request", "max_prompt_chars",
                "max_header_bytes", "max_header_count", "max_concurrent_streams", "request_timeout", "tokenizer_workers",
                "migration_limit", "decode_stall_timeout", "router_workers", "chat_template", "enable_auto_tool_choice",
                "tool_call_parser")
WORKER_FLAGS = ("max_queued_requests", "max_queued_tokens", "scheduling_policy", "served_model_name", "engine_process",
                "kv_transport")


def router_argv(args: argparse.Namespace) -> list[str]:
    """The router's flags of `args` as command-line words (for `pdserve serve`'s router process;
    API keys travel in a file, not on a command line anyone can read)."""
    return _argv(args, ROUTER_FLAGS)


def worker_argv(args: argparse.Namespace) -> list[str]:
    return _argv(args, WORKER_FLAGS)


def _argv(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    argv: list[str] = []
    for name in names:
        value, flag = getattr(args, name), f"--{name.replace('_', '-')}"
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def _run_async(coro) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro) or 0
    return uvloop.run(coro) or 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _router_command(args: argparse.Namespace) -> int:
    check_chat_args(args)
    if args.router_workers > 1:
        from router.workers import run_router_workers

        return run_router_workers(args)
    return run_router_process(args)


def run_router_process(args: argparse.Namespace, slot=None) -> int:
    """One router process: the only one, or worker `slot` (router/workers.py WorkerSlot) of a group."""
    return _run_async(_router(args, slot))


async def _router(args: argparse.Namespace, slot) -> None:
    from router.main import run_router
    from services.rpc.server import configure_logging

    configure_logging(args.log_level, "router" if slot is None else f"router-{slot.index}")
    await run_router(args, slot)


async def run_worker(role: str, args: argparse.Namespace) -> int:
    from pdserve.v1 import worker_pb2
    from services.fleet.directory import FleetDirectory
    from services.fleet.schema import connect
    from services.fleet.worker import WorkerFleet
    from services.rpc.metrics import serve_metrics, set_model_name
    from services.rpc.worker import export_cache_config
    from services.rpc.server import (ServerSecurity, configure_logging, serve_until_signalled, start_health_server,
                                     start_server)

    instance_id = args.instance_id or f"{role}-{socket.gethostname()}-{args.port}"
    configure_logging(args.log_level, instance_id)
    tls = internal_tls(args)
    if tls is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("no --internal-tls: anyone who reaches %s:%d can call this worker", args.host, args.port)
    engine = _engine(role, args, instance_id)
    # A decode worker resolves prefill ids through the registry; prefill workers only register.
    directory = FleetDirectory(connect(args.redis)) if args.redis and role == "decode" else None
    servicer, add, service = _servicer(role, args, engine, instance_id, directory, tls)
    fleet = WorkerFleet(args.redis, servicer, directory) if args.redis else None  # before serving: sees every block
    name = worker_pb2.DESCRIPTOR.services_by_name[service].full_name
    server, health, port = await start_server([lambda s: add(servicer, s)], [name], args.host, args.port,
                                              ServerSecurity.internal(tls))
    health_server = await start_health_server(args.host, args.health_port, health) if args.health_port else None
    set_model_name(args.served_model_name or engine.model_name)
    export_cache_config(engine)
    serve_metrics(args.host, args.metrics_port)
    gauges = asyncio.create_task(servicer.export_gauges())
    try:
        if fleet is not None:
            await fleet.join(f"{_advertised_host(args)}:{port}")  # a mismatched identity raises: exit 2
        print(f"{role} {instance_id} listening on {args.host}:{port}, metrics :{args.metrics_port}"
              + (", registered in the fleet registry" if fleet else ""), flush=True)
        failure = await serve_until_signalled(server, health, args.grace, on_draining=fleet.leave if fleet else None,
                                              fatal=engine.death())
    finally:
        gauges.cancel()
        await server.stop(0)
        if health_server is not None:
            await health_server.stop(0)
        if fleet is not None:
            await fleet.close()
        engine.shutdown()
    if failure is not None:  # no half-alive worker: exit, and let the supervisor start a fresh one
        print(f"{role} {instance_id}: the engine stopped ({failure!r}); exiting", file=sys.stderr, flush=True)
        os._exit(1)  # now: threads the dead engine left (executors, a stuck copy) must not hold the exit
    return 0


def internal_tls(args: argparse.Namespace):
    """The internal credentials of --internal-tls, or None."""
    from services.rpc.security import TLSFiles

    return TLSFiles.internal(args.internal_tls) if args.internal_tls else None


def _engine(role: str, args: argparse.Namespace, instance_id: str):
    """The worker's engine, its waiting queue bounded (services/engine/admission.py): its core in
    a child process (core_client.py) unless --engine-process off, or unless CUDA IPC may carry
    KV (a prefill worker on a GPU, a decode worker on one with --kv-transport auto): that
    transport maps the core's pool, which must then live in this process. NIXL goes with the
    pool: with the core in its child, --kv-transport nixl starts the agent there."""
    from services.engine.async_engine import AsyncEngine
    from services.engine.core_client import EngineProcess
    from services.engine.engine import EngineCore

    config = engine_config(args)
    layerwise = role == "prefill" and args.kv_layerwise == "on"
    if args.engine_process == "on" and layerwise:
        log.warning("the engine runs in this process, not its own: --kv-layerwise on ships KV from inside its step "
                    "(%s)", role)
    elif args.engine_process == "on" and config.resolve_device().type == "cuda" and \
            (role == "prefill" or args.kv_transport == "auto"):
        log.warning("the engine runs in this process, not its own: CUDA IPC KV transfer (%s) needs the KV pool "
                    "here (--kv-transport grpc on decode workers lifts this)", role)
    elif args.engine_process == "on":
        # --kv-transport nixl: the agent starts in the core, beside the pool (services/kv/nixl_core.py).
        nixl_host = _ucx_host(args) if args.kv_transport == "nixl" and _nixl_installed(args) else None
        return EngineProcess(config, lambda layout: _admission_limits(args, config, layout), args.log_level, role,
                             instance_id, nixl_host)
    core = EngineCore(config)
    return AsyncEngine(core=core, admission=_admission_limits(args, config, core.layout), kv_layerwise=layerwise)


def _nixl(role: str, args: argparse.Namespace, engine, instance_id: str, use):
    """`use(nixl, agent)` with this worker's NIXL agent, its UCX bound to the worker's own
    address; None without NIXL: --kv-transport grpc, no pool in this process (the core in its
    child), or auto where NIXL is missing or fails to start (logged). With --kv-transport nixl
    those are errors."""
    from services.kv import nixl

    if args.kv_transport == "grpc" or engine.kv_cache is None or not _nixl_installed(args):
        return None
    try:
        device = nixl.bind_ucx(_ucx_host(args))
        agent = nixl.new_agent(role, instance_id)
        result = use(nixl, agent)
    except Exception as e:
        if args.kv_transport == "nixl":
            raise
        log.warning("NIXL unavailable (%s): KV moves by CUDA IPC or as bytes over gRPC", e)
        return None
    log.info("NIXL agent %s (UCX on %s)", agent.name, device)
    return result


def _nixl_installed(args: argparse.Namespace) -> bool:
    """Whether NIXL can start; with --kv-transport nixl, its absence is an error."""
    from services.kv import nixl_agent

    if nixl_agent.nixl_api() is not None:
        return True
    if args.kv_transport == "nixl":
        raise SystemExit("--kv-transport nixl: NIXL is not installed (nixl-cu13; `make install`)")
    return False


def _ucx_host(args: argparse.Namespace) -> str:
    """The address UCX's network transports bind to: the worker's own (nixl_agent.bind_ucx)."""
    return _advertised_host(args) if args.host in ("0.0.0.0", "::", "") else args.host


def _admission_limits(args: argparse.Namespace, config, layout):
    from services.engine.admission import AdmissionLimits

    return AdmissionLimits.derive(config.max_num_seqs, layout.kv_capacity_tokens, args.max_queued_requests,
                                  args.max_queued_tokens)


def _servicer(role: str, args: argparse.Namespace, engine, instance_id: str, directory, tls):
    """The worker's servicer, the function that adds it to a server, and its service name."""
    from pdserve.v1 import worker_pb2_grpc

    from services.engine.core_client import EngineProcess

    if role == "prefill":
        from services.prefill.server import PrefillServicer

        if isinstance(engine, EngineProcess) and engine.nixl_pool is not None:  # the agent is in the core
            from services.kv.nixl_agent import RegisteredPool

            nixl_pool = RegisteredPool(None, engine.nixl_pool)
        else:
            nixl_pool = _nixl(role, args, engine, instance_id,
                              lambda nixl, agent: nixl.register_pool(agent, engine.kv_cache))
        return PrefillServicer(engine, instance_id, args.scheduling_policy, nixl_pool=nixl_pool), \
            worker_pb2_grpc.add_PrefillWorkerServicer_to_server, "PrefillWorker"
    from services.decode.server import DecodeServicer
    from services.engine.async_engine import AsyncEngine
    from services.fleet.worker import prefill_resolver
    from services.kv.cuda_ipc import CudaIpcKVTransport
    from services.kv.transport import GrpcKVTransport
    from services.rpc.server import parse_peers
    from services.rpc.worker import identity_of

    cfg, layout = engine.model_config, engine.layout
    common = (
        parse_peers(args.prefill_peers),
        instance_id,
        identity_of(engine),
        (cfg.num_layers, 2, layout.block_size, cfg.num_kv_heads, cfg.head_dim),
        layout.kv_dtype,
    )
    resolve = prefill_resolver(directory) if directory is not None else None
    device = layout.device
    reads = _nixl_reads(role, args, engine, instance_id, common[3])
    if reads is not None:
        from services.kv.nixl import NixlKVTransport

        transport = NixlKVTransport(*common, resolve=resolve, device=device, tls=tls,
                                    progress_timeout=args.kv_progress_timeout, reads=reads,
                                    cuda_ipc=args.kv_transport == "auto")
    elif args.kv_transport == "auto" and device.type == "cuda" and isinstance(engine, AsyncEngine):
        transport = CudaIpcKVTransport(*common, resolve=resolve, device=device, tls=tls,
                                       progress_timeout=args.kv_progress_timeout)
    else:
        transport = GrpcKVTransport(*common, resolve=resolve, tls=tls, progress_timeout=args.kv_progress_timeout)
    return DecodeServicer(engine, instance_id, transport, args.scheduling_policy, args.kv_pull_timeout,
                          args.stream_interval), \
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server, "DecodeWorker"


def _nixl_reads(role: str, args: argparse.Namespace, engine, instance_id: str, block_shape: tuple[int, ...]):
    """Where a decode worker's NIXL reads run: in its engine core when the agent lives there,
    else in this process (None: no NIXL)."""
    from services.engine.core_client import EngineProcess
    from services.kv import nixl

    layout = engine.layout
    if isinstance(engine, EngineProcess) and engine.nixl is not None:
        layers, kv, _, heads, dim = block_shape
        return nixl.EngineCoreReads(engine.nixl, layers * kv * heads * dim * layout.kv_dtype.itemsize)
    reader = _nixl(role, args, engine, instance_id,
                   lambda nixl, agent: nixl.PoolReader(agent, layout.device, block_shape, layout.kv_dtype))
    return nixl.LocalReads(reader) if reader is not None else None


def _advertised_host(args: argparse.Namespace) -> str:
    if args.advertise_host:
        return args.advertise_host
    if args.host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return args.host


def run_serve(args: argparse.Namespace) -> int:
    from services.cli.stack import LocalStack

    check_chat_args(args)
    with LocalStack.from_args(args) as stack:
        stack.print_summary()
        return stack.wait()
