"""gRPC plumbing every service shares: server start with health and reflection (and TLS),
one interceptor for the request id, API keys and error hygiene, error mapping, graceful
shutdown, logging with request ids.

Torch-free: the router uses it too.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import signal
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.engine.errors import PdserveError
from services.rpc.security import ApiKeys, TLSFiles, server_credentials

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


# ---- the one interceptor ---------------------------------------------------------------------

# Reachable without an API key (Kubernetes' probes, load balancers' health checks).
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


class InFlight:
    """The streaming calls a server is running, so a drain can wait for them and end those that
    outlive its grace period with UNAVAILABLE (a router then retries or migrates them), instead
    of the CANCELLED that `grpc.aio.Server.stop` would give them."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()
        self.expired = False

    async def wait_idle(self, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while self.tasks and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    def expire(self) -> int:
        """Cancel every call still running; each ends with UNAVAILABLE (see `_guarded`)."""
        self.expired = True
        for task in self.tasks:
            task.cancel()
        return len(self.tasks)


# server -> its calls in flight (a weak map: the server object is grpc's, not ours to extend)
_IN_FLIGHT: weakref.WeakKeyDictionary[grpc.aio.Server, InFlight] = weakref.WeakKeyDictionary()
# The server's InFlight, for handlers that run many requests in one call (the decode worker's
# GenerateStream): they add each request's task, so a drain waits for and expires requests.
in_flight_var: contextvars.ContextVar[InFlight | None] = contextvars.ContextVar("in_flight", default=None)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Every call, before its handler: the caller's request id (x-request-id) into a contextvar
    for logs; with `api_keys`, `authorization: Bearer KEY` checked (UNAUTHENTICATED otherwise)
    for every method but OPEN_METHODS; the request decoded by us, so that bytes that are not
    the message are INVALID_ARGUMENT; and an unexpected error in a handler is INTERNAL with
    a fixed message (logged here with its traceback), never Python's class name and text."""

    def __init__(self, api_keys: ApiKeys | None = None) -> None:
        self.api_keys = api_keys if api_keys else None
        self.in_flight = InFlight()
        # grpc hands back the same handler object per method: wrap each once, not once per call
        self._guarded: dict[grpc.RpcMethodHandler, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        metadata = handler_call_details.invocation_metadata or ()
        request_id_var.set(next((v for k, v in metadata if k == REQUEST_ID_KEY), "-"))
        in_flight_var.set(self.in_flight)
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in OPEN_METHODS:
            return handler
        if self.api_keys is not None:
            token = next((v for k, v in metadata if k == "authorization"), None)
            if not self.api_keys.check(token if isinstance(token, str) else None):
                return _refuse(handler, grpc.StatusCode.UNAUTHENTICATED, "a valid API key is required "
                               "(metadata authorization: Bearer KEY)")
        guarded = self._guarded.get(handler)
        if guarded is None:
            guarded = _guarded(handler, self.in_flight)
            if len(self._guarded) < 1024:  # a bound, should some server make handlers per call
                self._guarded[handler] = guarded
        return guarded


def _refuse(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def unary(request, context):
        await context.abort(code, message)

    async def stream(request, context):
        await context.abort(code, message)
        yield  # an async generator, for the streaming kinds

    return _same_kind(handler, unary, stream, None)


def _guarded(handler: grpc.RpcMethodHandler, in_flight: InFlight) -> grpc.RpcMethodHandler:
    if handler.request_streaming:  # reflection: grpc decodes, its own handler copes
        return handler
    decode, kind = handler.request_deserializer, "unary_stream" if handler.response_streaming else "unary_unary"
    inner = getattr(handler, kind)

    async def parse(raw: bytes, context):
        try:
            return decode(raw) if decode is not None else raw
        except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends: the caller's bytes
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request is not a valid protobuf message "
                                "of this method's type")

    async def unary(raw, context):
        request = await parse(raw, context)
        try:
            return await inner(request, context)
        except Exception as e:  # noqa: BLE001
            await _internal(context, e)

    async def stream(raw, context):
        request = await parse(raw, context)
        task = asyncio.current_task()
        in_flight.tasks.add(task)
        try:
            async for item in inner(request, context):
                yield item
        except asyncio.CancelledError:
            if in_flight.expired and not context.done():  # the drain's grace ran out (the handler cleaned up)
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry elsewhere")
            raise
        except Exception as e:  # noqa: BLE001
            await _internal(context, e)
        finally:
            in_flight.tasks.discard(task)

    return _same_kind(handler, unary, stream, lambda raw: raw)


async def _internal(context, e: Exception) -> None:
    if isinstance(e, (grpc.aio.AbortError, grpc.aio.UsageError)):  # the handler ended the call on purpose
        raise e
    if context.done() or context.cancelled():  # the caller left: nobody to tell, nothing went wrong here
        raise asyncio.CancelledError() from e
    log.error("internal error", exc_info=e)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; the server logged it")


def _same_kind(handler: grpc.RpcMethodHandler, unary, stream, deserializer) -> grpc.RpcMethodHandler:
    make = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
    if handler.request_streaming:
        make = grpc.stream_stream_rpc_method_handler if handler.response_streaming else grpc.stream_unary_rpc_method_handler
    return make(stream if handler.response_streaming else unary,
                request_deserializer=deserializer or handler.request_deserializer,
                response_serializer=handler.response_serializer)


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


@dataclass(frozen=True)
class ServerSecurity:
    """How a server port admits callers: TLS files (mutual with `require_client_cert`), API keys."""

    tls: TLSFiles | None = None
    require_client_cert: bool = False
    api_keys: ApiKeys | None = None

    @classmethod
    def internal(cls, files: TLSFiles | None) -> ServerSecurity:
        """A worker's port: only callers with a certificate from the internal CA (when configured)."""
        return cls(files, require_client_cert=files is not None)


async def start_server(
    adders: Sequence[Callable[[grpc.aio.Server], None]],
    service_names: Sequence[str],
    host: str,
    port: int,
    security: ServerSecurity = ServerSecurity(),
    options: Sequence[tuple[str, object]] = (),
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """A started grpc.aio server with the given servicers, health and reflection.

    Returns (server, health servicer, bound port); port 0 picks a free port. `options` add to
    (and override) CHANNEL_OPTIONS, e.g. a router's smaller message and metadata limits.
    """
    interceptor = ServiceInterceptor(security.api_keys)
    server = grpc.aio.server(interceptors=[interceptor],
                             options=list({**dict(CHANNEL_OPTIONS), **dict(options)}.items()))
    _IN_FLIGHT[server] = interceptor.in_flight
    for add in adders:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    address = f"{host}:{port}"
    if security.tls is not None:
        bound = server.add_secure_port(address, server_credentials(security.tls, security.require_client_cert))
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer, bound


async def start_health_server(host: str, port: int, health_servicer: health.aio.HealthServicer) -> grpc.aio.Server:
    """grpc.health.v1 alone, in plaintext, sharing `health_servicer` (so readiness follows the
    main port's, draining included): for probes that present no certificate."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot bind the health port {host}:{port}")
    await server.start()
    return server


async def serve_until_signalled(
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    grace_s: float = 5.0,
    on_stop: Callable[[], None] | None = None,
    on_draining: Callable[[], Awaitable[None]] | None = None,
    fatal: asyncio.Future | None = None,
) -> BaseException | None:
    """Run until SIGINT/SIGTERM, then drain: readiness NOT_SERVING (and `on_draining`, e.g. leave
    the fleet registry so routers stop sending work), refuse new calls, let the streams in flight
    finish for up to `grace_s`, end the rest with UNAVAILABLE, stop.

    `fatal` (e.g. the engine's death): when it resolves first, the same without the grace (its
    streams have already failed), and its result is returned so the process can exit non-zero
    for its supervisor to restart it; None after a signal."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waits = [asyncio.ensure_future(server.wait_for_termination()), asyncio.ensure_future(stop.wait())]
    if fatal is not None:
        waits.append(fatal)
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    failure = fatal.result() if fatal is not None and fatal.done() and not stop.is_set() else None
    if failure is not None:  # its streams are failing already: a moment for them to say so, no more
        log.error("stopping at once: %r", failure)
        grace_s = min(grace_s, 1.0)
    else:
        log.info("shutting down: draining for up to %.0fs", grace_s)
    await health_servicer.enter_graceful_shutdown()
    if on_draining is not None:
        await on_draining()
    stopping = asyncio.ensure_future(server.stop(grace_s + 5.0))  # refuses new calls from now on
    in_flight = _IN_FLIGHT.get(server)
    if in_flight is not None:
        await in_flight.wait_idle(grace_s)
        left = in_flight.expire()
        if left:
            log.warning("drain: %d streams outlived the grace period; ended with UNAVAILABLE", left)
    await stopping
    if on_stop is not None:
        on_stop()
    return failure


def parse_peers(text: str | None) -> dict[str, str]:
    """'ID=HOST:PORT,ID=HOST:PORT' -> {id: address}."""
    peers: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, address = item.partition("=")
        if not sep or not name or ":" not in address:
            raise ValueError(f"peer {item!r} is not ID=HOST:PORT")
        peers[name] = address
    return peers
