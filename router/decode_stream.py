"""This router's one GenerateStream per decode instance, shared by every request sent there.

    _attempt ── DecodeStream.start(request, timeout) ──> RequestStream ── read() ──> responses
                      │  starts, cancels (in order)                 ^
                      v                                             │ per-request queue
                 _Mux: one bidi call ── reader task: frames ────────┘ (never blocks: a client
                                                                      that stops reading grows
                                                                      only its own queue)

A decode step's tokens for all this router's requests arrive as one frame (issue #32), not one
message per request. Per request, what `read` raises is what a Generate call of its own would
have: `StreamError` with the worker's status for that request (its refusal, its deadline, its
error), or with the shared call's status when the call breaks (the worker died: UNAVAILABLE,
so every request on it migrates); `Broken("stalled")` when the call sent nothing, not even a
heartbeat frame, for the stall timeout while requests were open (router/migration.py's
StallWatch: the worker heartbeats per stream, not per request, so silence means the whole
worker is frozen or gone). A broken call is forgotten; the next start opens a new one.

A decode worker without GenerateStream (an older version during a rolling upgrade) answers the
call UNIMPLEMENTED before any frame: that instance's requests, those already started on the
call included, go on one DecodeWorker.Generate call each (_Single), as before issue #32.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from pdserve.v1 import common_pb2, worker_pb2
from router.migration import Broken, StallWatch
from services.rpc.server import request_metadata

log = logging.getLogger("pdserve.router")


class StreamError(Exception):
    """A request ended with a status other than OK (as a Generate call's AioRpcError would)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name} {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _status(name: str) -> grpc.StatusCode:
    return grpc.StatusCode.__members__.get(name, grpc.StatusCode.UNKNOWN)


class RequestStream:
    """One request's responses on a shared stream, in order; an error or Broken ends it."""

    def __init__(self, mux: _Mux | _Single, request_id: str) -> None:
        self.mux, self.request_id = mux, request_id
        self.items: deque[common_pb2.GenerateResponse | Exception] = deque()
        self.waiter: asyncio.Future | None = None
        self.ended = False  # finished, failed, or given up: no cancel to send
        self.deadline: asyncio.TimerHandle | None = None

    async def read(self) -> common_pb2.GenerateResponse:
        """The next response; raises StreamError or Broken when the request ends without finishing."""
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        item = self.items.popleft()
        if isinstance(item, Exception):
            raise item
        return item

    def put(self, item: common_pb2.GenerateResponse | Exception) -> None:
        """From the mux's reader: never blocks, never waits for this request's reader."""
        self.items.append(item)
        if isinstance(item, Exception) or item.finished:
            self._end()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def close(self) -> None:
        """The consumer is done with it; an unfinished request is cancelled on the worker."""
        if not self.ended:
            self._end()
            self.mux.cancel(self.request_id)

    def expire(self) -> None:
        """The caller's deadline passed (the worker enforces it too; whichever comes first)."""
        if not self.ended:
            self.put(StreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"))
            self.mux.cancel(self.request_id)

    def _end(self) -> None:
        self.ended = True
        self.mux.requests.pop(self.request_id, None)
        if self.deadline is not None:
            self.deadline.cancel()


class _Mux:
    """One GenerateStream call and the requests started on it."""

    def __init__(self, stub, stall_s: float, unimplemented: Callable[[list[_Replay]], None]) -> None:
        """`unimplemented`: takes the open requests when the worker has no GenerateStream."""
        self.requests: dict[str, RequestStream] = {}
        self.sent: dict[str, worker_pb2.DecodeRequest] | None = {}  # until the first frame: for a replay
        self.unimplemented = unimplemented
        self.stub = stub
        self.outgoing: asyncio.Queue[worker_pb2.DecodeCall] = asyncio.Queue()
        self.call = stub.GenerateStream(self._calls())
        self.watch = StallWatch(self.call, stall_s, idle=lambda: not self.requests)
        self.alive = True
        # A fresh context: the reader serves every request, not the one whose start opened it.
        self.reader = asyncio.create_task(self._read(), context=contextvars.Context())

    def start(self, request: worker_pb2.DecodeRequest, timeout: float | None) -> RequestStream:
        stream = RequestStream(self, request.request_id)
        self.requests[request.request_id] = stream
        if self.sent is not None:
            self.sent[request.request_id] = request
        timeout_ms = 0 if timeout is None else max(1, int(timeout * 1000))
        self.outgoing.put_nowait(worker_pb2.DecodeCall(start=worker_pb2.DecodeStart(request=request,
                                                                                       timeout_ms=timeout_ms)))
        if timeout is not None:
            stream.deadline = asyncio.get_running_loop().call_later(timeout, stream.expire)
        return stream

    def cancel(self, request_id: str) -> None:
        if self.alive:
            self.outgoing.put_nowait(worker_pb2.DecodeCall(cancel=request_id))

    async def _calls(self):
        while True:
            yield await self.outgoing.get()

    async def _read(self) -> None:
        try:
            error = await _pump(self.watch, self._dispatch, "stream", "ended the stream with requests unfinished")
        finally:
            self.alive = False
            self.watch.close()
            self.call.cancel()
        if self.sent is not None and isinstance(error, StreamError) and await _unimplemented(self.stub, error):
            self.unimplemented([_Replay(s, self.sent[s.request_id]) for s in self.requests.values()])
            self.requests.clear()  # theirs now
            return
        if self.requests:
            log.warning("decode stream broke with %d requests open: %s", len(self.requests), error)
        for stream in list(self.requests.values()):
            stream.put(error)

    def _dispatch(self, frame: worker_pb2.DecodeFrame) -> None:
        self.sent = None  # the worker speaks GenerateStream
        requests = self.requests
        for response in frame.responses:
            stream = requests.get(response.request_id)
            if stream is not None:  # else cancelled by us meanwhile
                stream.put(response)
        for error in frame.errors:
            stream = requests.get(error.request_id)
            if stream is not None:
                stream.put(StreamError(_status(error.code), error.details))


async def _pump(watch: StallWatch, deliver: Callable[[object], None], noun: str, eof: str,
                until: Callable[[], bool] = lambda: False) -> Exception | None:
    """Hand `watch`'s messages to `deliver` until `until()` or the call ends; returns what ended
    it, as its requests' error (None: `until`). Both readers, the shared stream's and a single
    request's Generate call, end their requests the same way."""
    try:
        while not until():
            message = await watch.read()
            if message is grpc.aio.EOF:
                return StreamError(grpc.StatusCode.UNAVAILABLE, eof)
            deliver(message)
        return None
    except Broken as e:  # stalled
        return e
    except grpc.aio.AioRpcError as e:
        return StreamError(e.code(), e.details() or f"the {noun} broke")
    except asyncio.CancelledError:
        return StreamError(grpc.StatusCode.UNAVAILABLE, f"the router closed the {noun}")


async def _unimplemented(stub, error: StreamError) -> bool:
    """Whether a GenerateStream call that broke before its first frame did so because the worker
    has no such method. A start message written as the refusal arrives turns it into INTERNAL
    ("Failed execute_batch") on the router's side, so that one is asked again with a call that
    writes nothing."""
    if error.code() == grpc.StatusCode.UNIMPLEMENTED:
        return True
    if error.code() != grpc.StatusCode.INTERNAL:
        return False
    call = stub.GenerateStream(timeout=2.0)
    try:
        await call.done_writing()
        return await call.code() == grpc.StatusCode.UNIMPLEMENTED
    except (grpc.aio.AioRpcError, grpc.aio.UsageError):
        return False
    finally:
        call.cancel()


@dataclass
class _Replay:
    """A request the worker never saw (it has no GenerateStream), to send again on Generate."""

    stream: RequestStream
    request: worker_pb2.DecodeRequest


class _Single:
    """One request on its own DecodeWorker.Generate call (a worker without GenerateStream), in
    the shape a _Mux gives its requests: responses, errors and Broken("stalled") into the
    RequestStream; a stall is silence on this call (the worker heartbeats per request here)."""

    def __init__(self, stub, stall_s: float, request: worker_pb2.DecodeRequest, timeout: float | None,
                 stream: RequestStream | None = None) -> None:
        self.requests: dict[str, RequestStream] = {}
        self.stream = stream or RequestStream(self, request.request_id)
        self.stream.mux = self
        self.requests[request.request_id] = self.stream
        self.call = stub.Generate(request, timeout=timeout, metadata=request_metadata(request.request_id))
        self.watch = StallWatch(self.call, stall_s)
        self.reader = asyncio.create_task(self._read(), context=contextvars.Context())

    def cancel(self, request_id: str) -> None:
        self.call.cancel()

    async def _read(self) -> None:
        try:
            error = await _pump(self.watch, self.stream.put, "call", "ended the call before the request finished",
                                until=lambda: self.stream.ended)
        finally:
            self.watch.close()
        if error is not None and not self.stream.ended:
            self.stream.put(error)


class DecodeStream:
    """The shared stream to one decode instance: opened on first use, reopened after it breaks;
    a Generate call per request instead once the instance turned out not to have GenerateStream."""

    def __init__(self, stub, stall_s: float) -> None:
        """`stub`: the instance's DecodeWorkerStub; `stall_s`: silence that breaks the stream
        while requests are open (the worker heartbeats at the start messages' heartbeat_ms)."""
        self.stub, self.stall_s = stub, stall_s
        self._mux: _Mux | None = None
        self.per_request = False  # the worker has no GenerateStream

    def start(self, request: worker_pb2.DecodeRequest, timeout: float | None) -> RequestStream:
        """Send `request` (its request_id unique among this router's open requests); `timeout`:
        seconds the worker has for it (DEADLINE_EXCEEDED after)."""
        if self.per_request:
            stream = _Single(self.stub, self.stall_s, request, timeout).stream
            if timeout is not None:
                stream.deadline = asyncio.get_running_loop().call_later(timeout, stream.expire)
            return stream
        if self._mux is None or not self._mux.alive:
            self._mux = _Mux(self.stub, self.stall_s, self._unimplemented)
        return self._mux.start(request, timeout)

    def _unimplemented(self, replays: list[_Replay]) -> None:
        """The worker has no GenerateStream: per-request calls from now on, these requests first
        (their deadline timers keep running; the call gets the time left)."""
        if not self.per_request:
            log.warning("decode worker has no GenerateStream (an older version?): one Generate call per request")
        self.per_request = True
        loop = asyncio.get_running_loop()
        for replay in replays:
            timer = replay.stream.deadline
            timeout = None if timer is None else max(0.001, timer.when() - loop.time())
            _Single(self.stub, self.stall_s, replay.request, timeout, replay.stream)

    @property
    def open_requests(self) -> int:
        return len(self._mux.requests) if self._mux is not None else 0
