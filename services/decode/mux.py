"""GenerateStream: one long-lived stream carries many requests between a router and this decode
worker, so a step's tokens cross Python gRPC as one frame instead of one message per request.

    router ── DecodeCall(start | cancel) ──> reader task ── start ──> one task per request
                                                                      (DecodeServicer.responses:
                                                                       the same logic as Generate)
    router <── DecodeFrame(responses, errors) ── writer (this call's generator) <── ready lists

A running request's token responses skip its task: the engine's delivery callback builds each
and puts it on the ready list (DecodeServicer.responses' `emit`), so a step wakes no task per
request; the task sees the start, a KV pull, the finish and errors. The writer sends whatever
is ready whenever it is free: the engine publishes a step's deltas
in one burst, so a busy stream sends about one frame per step with no timer. A request's
errors travel as (request id, status code name, details), what its own Generate call would
have ended with. The stream ending (the router left or broke) aborts every request it started;
a request's deadline (DecodeStart.timeout_ms) ends it alone with DEADLINE_EXCEEDED; a drain
that runs out of grace ends each with UNAVAILABLE (the router migrates them). With heartbeat_ms,
an empty frame goes out when nothing else did for that long while requests are open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from pdserve.v1 import common_pb2, worker_pb2
from services.decode.server import failure_status
from services.rpc import metrics
from services.rpc.server import in_flight_var, request_id_var

if TYPE_CHECKING:
    from services.decode.server import DecodeServicer

log = logging.getLogger("pdserve.decode")


class DecodeMux:
    """One GenerateStream call: its requests, and what is ready to go out to the caller."""

    def __init__(self, servicer: DecodeServicer, context: grpc.aio.ServicerContext) -> None:
        self.servicer, self.context = servicer, context
        self.tasks: dict[str, asyncio.Task] = {}
        self.responses: list[common_pb2.GenerateResponse] = []
        self.errors: list[worker_pb2.DecodeError] = []
        self.wake = asyncio.Event()
        self.heartbeat_s = 0.0
        self.in_flight = in_flight_var.get()  # the server's drain waits for (and expires) our requests
        # However the call ends (even while grpc holds this generator suspended), its requests end.
        context.add_done_callback(lambda _: self.close())

    async def frames(self, calls: AsyncIterator[worker_pb2.DecodeCall]) -> AsyncIterator[worker_pb2.DecodeFrame]:
        """The call's response stream; ends once the caller closed its side and every request ended."""
        reader = asyncio.create_task(self._read(calls))
        reader.add_done_callback(lambda _: self.wake.set())
        try:
            while True:
                if self.responses or self.errors:
                    frame = worker_pb2.DecodeFrame(responses=self.responses, errors=self.errors)
                    metrics.STREAM_FRAMES.inc()
                    metrics.STREAM_RESPONSES.inc(len(self.responses))
                    self.responses, self.errors = [], []
                    yield frame
                    continue
                bad = reader.done() and not reader.cancelled() and reader.exception() is not None
                if bad:  # the caller's messages were not DecodeCalls
                    await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the stream's messages are not "
                                             "valid DecodeCall messages")
                if reader.done() and not self.tasks:
                    break
                if await self._wait() and not (self.responses or self.errors):
                    yield worker_pb2.DecodeFrame()  # a heartbeat: this worker is alive
        finally:
            reader.cancel()
            self.close()

    def close(self) -> None:
        """The caller is gone: abort every request it started (their blocks go back to the pool)."""
        for task in list(self.tasks.values()):
            task.cancel()

    async def _wait(self) -> bool:
        """Wait for news (a response, an error, a request or the caller's side ending); True when
        a heartbeat came due first."""
        self.wake.clear()
        beat = self.heartbeat_s if self.tasks else 0.0
        if beat <= 0:
            await self.wake.wait()
            return False
        due: list[bool] = []
        timer = asyncio.get_running_loop().call_later(beat, lambda: (due.append(True), self.wake.set()))
        await self.wake.wait()
        timer.cancel()
        return bool(due)

    async def _read(self, calls: AsyncIterator[worker_pb2.DecodeCall]) -> None:
        async for call in calls:
            kind = call.WhichOneof("call")
            if kind == "start":
                self._start(call.start)
            elif kind == "cancel":
                task = self.tasks.get(call.cancel)
                if task is not None:
                    task.cancel()

    def _start(self, start: worker_pb2.DecodeStart) -> None:
        request_id = start.request.request_id
        if not request_id or request_id in self.tasks:
            self._fail(request_id, grpc.StatusCode.INVALID_ARGUMENT,
                       "GenerateStream needs a request id unique among the stream's open requests")
            return
        if self.in_flight is not None and self.in_flight.expired:  # draining, past its grace
            self._fail(request_id, grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry elsewhere")
            return
        if start.request.heartbeat_ms:
            self.heartbeat_s = start.request.heartbeat_ms / 1000
        task = asyncio.create_task(self._run(start, request_id))
        self.tasks[request_id] = task
        self.wake.set()  # the writer's heartbeat timer starts now
        if self.in_flight is not None:
            self.in_flight.tasks.add(task)

    async def _run(self, start: worker_pb2.DecodeStart, request_id: str) -> None:
        """One request, start to end; whatever ends it is told to the caller (but a cancel)."""
        servicer = self.servicer
        request_id_var.set(request_id)  # this task's logs name its request
        timeout = start.timeout_ms / 1000 if start.timeout_ms else None
        finished = False
        task = asyncio.current_task()

        def emit(response: common_pb2.GenerateResponse) -> None:
            """A token response straight from the engine's delivery (DecodeServicer.responses)."""
            if not task.cancelling():  # cancelled, or past its deadline: its end is all that goes out
                self.responses.append(response)
                self.wake.set()

        try:
            async with asyncio.timeout(timeout):
                responses = servicer.responses(start.request, request_id, servicer.engine_id(self.context, request_id),
                                               timeout, 0.0, emit)
                async for response in responses:
                    finished = response.finished
                    self.responses.append(response)
                    self.wake.set()
            if not finished:
                self._fail(request_id, grpc.StatusCode.UNAVAILABLE, "the request ended unfinished")
        except TimeoutError:
            self._fail(request_id, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        except asyncio.CancelledError:
            if self.in_flight is not None and self.in_flight.expired:  # the drain's grace ran out
                self._fail(request_id, grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry elsewhere")
            # else: the caller cancelled it, or left; nobody waits for a word
        except Exception as e:  # noqa: BLE001 - one request's failure must not end the stream
            status = failure_status(e)
            if status is None:
                log.error("internal error", exc_info=e)
                status = grpc.StatusCode.INTERNAL, "internal error; the server logged it"
            self._fail(request_id, *status)
        finally:
            task = self.tasks.pop(request_id, None)
            if self.in_flight is not None and task is not None:
                self.in_flight.tasks.discard(task)
            self.wake.set()  # the writer may be waiting for the last request to end

    def _fail(self, request_id: str, code: grpc.StatusCode, details: str) -> None:
        self.errors.append(worker_pb2.DecodeError(request_id=request_id, code=code.name, details=details))
        self.wake.set()
