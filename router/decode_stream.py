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
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque

import grpc

from pdserve.v1 import common_pb2, worker_pb2
from router.migration import Broken, StallWatch

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

    def __init__(self, mux: _Mux, request_id: str) -> None:
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

    def __init__(self, stub, stall_s: float) -> None:
        self.requests: dict[str, RequestStream] = {}
        self.outgoing: asyncio.Queue[worker_pb2.DecodeCall] = asyncio.Queue()
        self.call = stub.GenerateStream(self._calls())
        self.watch = StallWatch(self.call, stall_s, idle=lambda: not self.requests)
        self.alive = True
        # A fresh context: the reader serves every request, not the one whose start opened it.
        self.reader = asyncio.create_task(self._read(), context=contextvars.Context())

    def start(self, request: worker_pb2.DecodeRequest, timeout: float | None) -> RequestStream:
        stream = RequestStream(self, request.request_id)
        self.requests[request.request_id] = stream
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
        error: Exception
        try:
            while True:
                frame = await self.watch.read()
                if frame is grpc.aio.EOF:
                    error = StreamError(grpc.StatusCode.UNAVAILABLE, "ended the stream with requests unfinished")
                    break
                self._dispatch(frame)
        except Broken as e:  # stalled
            error = e
        except grpc.aio.AioRpcError as e:
            error = StreamError(e.code(), e.details() or "the stream broke")
        except asyncio.CancelledError:
            error = StreamError(grpc.StatusCode.UNAVAILABLE, "the router closed the stream")
        finally:
            self.alive = False
            self.watch.close()
            self.call.cancel()
        if self.requests:
            log.warning("decode stream broke with %d requests open: %s", len(self.requests), error)
        for stream in list(self.requests.values()):
            stream.put(error)

    def _dispatch(self, frame: worker_pb2.DecodeFrame) -> None:
        requests = self.requests
        for response in frame.responses:
            stream = requests.get(response.request_id)
            if stream is not None:  # else cancelled by us meanwhile
                stream.put(response)
        for error in frame.errors:
            stream = requests.get(error.request_id)
            if stream is not None:
                stream.put(StreamError(_status(error.code), error.details))


class DecodeStream:
    """The shared stream to one decode instance: opened on first use, reopened after it breaks."""

    def __init__(self, stub, stall_s: float) -> None:
        """`stub`: the instance's DecodeWorkerStub; `stall_s`: silence that breaks the stream
        while requests are open (the worker heartbeats at the start messages' heartbeat_ms)."""
        self.stub, self.stall_s = stub, stall_s
        self._mux: _Mux | None = None

    def start(self, request: worker_pb2.DecodeRequest, timeout: float | None) -> RequestStream:
        """Send `request` (its request_id unique among this router's open requests); `timeout`:
        seconds the worker has for it (DEADLINE_EXCEEDED after)."""
        if self._mux is None or not self._mux.alive:
            self._mux = _Mux(self.stub, self.stall_s)
        return self._mux.start(request, timeout)

    @property
    def open_requests(self) -> int:
        return len(self._mux.requests) if self._mux is not None else 0
