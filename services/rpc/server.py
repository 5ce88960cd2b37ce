"""gRPC plumbing every service shares: server start with health and reflection, one
interceptor for the request id, error mapping, graceful shutdown, logging with request ids.

Torch-free: the router uses it too.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.engine.errors import PdserveError

# Large enough for one KV block of a big model (llama-3.1-8b: 32 layers x 2 x 16 x 8 x 128 x 2 B = 2 MiB;
# 128-token blocks and fp32 stay far below this).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

REQUEST_ID_KEY = "x-request-id"
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

log = logging.getLogger("pdserve.rpc")


# ---- errors ------------------------------------------------------------------------------------


def status_of(err: PdserveError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.grpc_status)


async def abort_with(context: grpc.aio.ServicerContext, err: PdserveError) -> None:
    """End the RPC with the status that `err`'s type maps to (raises)."""
    await context.abort(status_of(err), str(err))


# ---- request ids and logs ----------------------------------------------------------------------


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Put the caller's request id (metadata x-request-id) into a contextvar for logs."""

    async def intercept_service(self, continuation, handler_call_details):
        for key, value in handler_call_details.invocation_metadata or ():
            if key == REQUEST_ID_KEY:
                request_id_var.set(value)
                break
        else:
            request_id_var.set("-")
        return await continuation(handler_call_details)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def configure_logging(level: str, service: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s {service} [%(request_id)s] %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def request_metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    return ((REQUEST_ID_KEY, request_id),)


# ---- servers -----------------------------------------------------------------------------------


async def start_server(
    adders: Sequence[Callable[[grpc.aio.Server], None]],
    service_names: Sequence[str],
    host: str,
    port: int,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """A started grpc.aio server with the given servicers, health and reflection.

    Returns (server, health servicer, bound port); port 0 picks a free port.
    """
    server = grpc.aio.server(interceptors=[RequestIdInterceptor()], options=CHANNEL_OPTIONS)
    for add in adders:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer, bound


async def serve_until_signalled(
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    grace_s: float = 5.0,
    on_stop: Callable[[], None] | None = None,
    on_draining: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run until SIGINT/SIGTERM, then: readiness NOT_SERVING (and `on_draining`, e.g. leave the
    fleet registry so routers stop sending work), drain for `grace_s`, stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server_done = asyncio.ensure_future(server.wait_for_termination())
    await asyncio.wait([server_done, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down: draining for up to %.0fs", grace_s)
    await health_servicer.enter_graceful_shutdown()
    if on_draining is not None:
        await on_draining()
    await server.stop(grace_s)
    if on_stop is not None:
        on_stop()


def parse_peers(text: str | None) -> dict[str, str]:
    """'ID=HOST:PORT,ID=HOST:PORT' -> {id: address}."""
    peers: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, address = item.partition("=")
        if not sep or not name or ":" not in address:
            raise ValueError(f"peer {item!r} is not ID=HOST:PORT")
        peers[name] = address
    return peers
