"""The decode worker: admits requests decode-first, pulls their prompt KV from the prefill
worker the router named, and runs them in its continuous batch.

For a request naming a prefill instance:
  1. the engine matches this worker's prefix cache and allocates blocks for the whole prompt;
  2. this servicer calls the prefill worker with the prompt and how many leading blocks it
     already has, and writes each received block into the cache (after the checksum, the
     block's index and hash are validated against the allocation);
  3. with all blocks and prefill's first token(s) in, the request decodes here.
Decode computes no prompt token on that path. If the call fails midway (the prefill worker
died, a block is corrupt) or stalls (no block within the progress timeout, or not done within
the pull timeout), the call is cancelled, which frees what prefill holds for it, and the
request prefills what is missing locally and still completes. Without a prefill instance, the
request simply prefills here.

A migrated request (the router moved it off a decode worker that died or stalled) carries the
output its sequences already streamed; it prefills locally, prompt and that output, and goes on
from there (EngineCore.make_request). With `heartbeat_ms`, an empty response goes out whenever
nothing else did for that long, so the router can tell a stalled worker from a slow request.

Two RPCs run the same per-request logic (`DecodeServicer.responses`): Generate, one call per
request (peers, grpcurl, tests), and GenerateStream, one call per router carrying all its
requests, whose tokens go out in one frame per step (services/decode/mux.py; the router uses it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import grpc

from pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.engine.async_engine import AsyncEngine
from services.engine.errors import PdserveError
from services.engine.kv_transfer import BlockData
from services.engine.outputs import CompletionOutput, RequestOutput
from services.engine.sequence import Resumed
from services.kv.transport import KVTransport, PeerError, PeerStalled, PlacedBlock, PrefillDone
from services.kv.wire import KVWireError
from services.rpc import metrics
from services.rpc.convert import delta_to_proto, prompt_logprobs_to_proto, reject_unknown_fields
from services.rpc.worker import WorkerServicerBase, refusal

log = logging.getLogger("pdserve.decode")
T = TypeVar("T")


class DecodeServicer(WorkerServicerBase, worker_pb2_grpc.DecodeWorkerServicer):
    role = "decode"

    def __init__(self, engine: AsyncEngine, instance_id: str, transport: KVTransport,
                 scheduling_policy: str = "fcfs", kv_pull_timeout: float | None = None,
                 stream_interval: int = 1) -> None:
        """`kv_pull_timeout`: seconds a prompt's KV may take to arrive from prefill before this
        worker computes the rest itself (None: the request's own deadline). `stream_interval`:
        send a request's tokens every this many (its first and last at once), as vLLM and
        SGLang coalesce them: fewer messages for a little latency."""
        super().__init__(engine, instance_id, scheduling_policy)
        self.transport = transport
        self.kv_pull_timeout = kv_pull_timeout
        self.stream_interval = max(1, stream_interval)

    async def Generate(self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext):
        request_id = request.request_id or uuid.uuid4().hex
        responses = self.responses(request, request_id, self.engine_id(context, request_id),
                                   context.time_remaining(), request.heartbeat_ms / 1000)
        try:
            async for response in responses:
                yield response
        except Exception as e:  # noqa: BLE001 - mapped below, or re-raised for the interceptor
            status = failure_status(e)
            if status is None:
                raise
            await context.abort(*status)

    async def GenerateStream(self, calls: AsyncIterator[worker_pb2.DecodeCall], context: grpc.aio.ServicerContext):
        """Many requests over one stream (services/decode/mux.py): each runs `responses`, as Generate does."""
        from services.decode.mux import DecodeMux  # the mux imports this module

        mux = DecodeMux(self, context)
        async with contextlib.aclosing(mux.frames(calls)) as frames:
            async for frame in frames:
                yield frame

    async def responses(self, request: worker_pb2.DecodeRequest, request_id: str, engine_id: str,
                        timeout: float | None, heartbeat_s: float,
                        emit: Callable[[common_pb2.GenerateResponse], None] | None = None,
                        ) -> AsyncIterator[common_pb2.GenerateResponse]:
        """One request's responses, the logic behind both Generate and GenerateStream: checks,
        the KV pull from prefill, decoding, and the finish record. Tokens go out every
        `stream_interval` tokens (the first and the last at once); with `heartbeat_s`, an empty
        response whenever nothing else went out for that long. Raises what `failure_status` maps.
        `timeout`: the caller's time left (bounds the KV pull); the caller enforces it. With
        `emit` (GenerateStream), the running request's token responses go to it as the engine
        delivers them, on the event loop with no task woken per token (`_Progress.take`); this
        generator yields the rest, the finish last."""
        resume = [Resumed(r.index, list(r.token_ids), r.text_chars) for r in request.resume] or None
        prefill_id = request.prefill_instance if resume is None else ""  # a resumed request prefills here
        record = common_pb2.DisaggregationRecord(
            decode_instance=self.instance_id, prefill_instance=prefill_id, remote_prefill=bool(prefill_id)
        )
        pull: asyncio.Task | None = None
        progress = _Progress(request_id, self.stream_interval, emit)
        try:
            reject_unknown_fields(request)
            params = self.check_request(request.prompt_token_ids, request.sampling, request.priority)
            log.info("request %s: %d prompt tokens, prefill %s%s", request_id, len(request.prompt_token_ids),
                     prefill_id or "local", f", resuming {len(resume)} sequence(s)" if resume else
                     ", migrated" if request.migrated else "")
            stream = self.engine.generate(
                list(request.prompt_token_ids), params, engine_id, request.priority, remote_prefill=bool(prefill_id),
                resume=resume, migrated=request.migrated, sink=progress.take if emit is not None else None,
            )
            async for out in with_heartbeats(stream, heartbeat_s):
                if out is None:
                    yield common_pb2.GenerateResponse(request_id=request_id)
                    continue
                if out.kv_pull_from_block is not None:
                    pull = asyncio.create_task(
                        self._pull(engine_id, request, out.kv_pull_from_block, timeout, record)
                    )
                if not out.outputs and not out.finished:
                    continue
                if out.finished and pull is not None and pull.done() and pull.exception() is not None:
                    raise pull.exception()  # the peer refused us: an error, not an aborted stream
                response = progress.add(out)
                if out.finished:
                    self._finish(response, out, record)
                    response.finished = True
                    response.usage.completion_tokens = progress.completion_tokens
                    if out.times is not None:
                        metrics.observe_request(out.times, time.monotonic(), len(out.prompt_token_ids),
                                                progress.completion_tokens)
                    progress.timer.finished([c.finish_reason for c in out.outputs])
                if response is not None:
                    yield response
        finally:
            progress.closed = True
            progress.timer.aborted()  # a no-op when the request finished
            if pull is not None and not pull.done():
                pull.cancel()

    async def _pull(
        self,
        request_id: str,
        request: worker_pb2.DecodeRequest,
        skip_blocks: int,
        timeout: float | None,
        record: common_pb2.DisaggregationRecord,
    ) -> None:
        """Fetch the prompt's KV from the prefill peer into the engine; fall back on failure."""
        engine = self.engine
        if self.kv_pull_timeout is not None:
            timeout = self.kv_pull_timeout if timeout is None else min(timeout, self.kv_pull_timeout)
        prefill_request = worker_pb2.PrefillRequest(
            request_id=request_id,
            prompt_token_ids=request.prompt_token_ids,
            sampling=request.sampling,
            skip_blocks=skip_blocks,
            priority=request.priority,
            decode_instance=self.instance_id,
        )
        peer = request.prefill_instance
        try:
            # aclosing: a by-reference transport releases the peer's blocks when the stream closes,
            # after engine.fence() says our copies of them are done.
            async with contextlib.aclosing(self.transport.pull(peer, prefill_request, timeout, engine.fence)) as items:
                async for item in items:
                    record.kv_transport = self.transport.kind_for(peer)
                    if isinstance(item, PrefillDone):
                        engine.finish_kv(request_id, item.first_tokens, item.cached_tokens, item.prompt_logprobs)
                        return
                    self._receive(request_id, item, record)
            engine.fail_kv(request_id, "prefill stream ended without its result")
        except PeerError as e:
            engine.abort(request_id)  # a misconfigured peer is an error, not silently local
            raise e
        except (KVWireError, PeerStalled, grpc.aio.AioRpcError) as e:
            reason = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
            engine.fail_kv(request_id, reason)  # the cancelled call frees what prefill holds for us
        except asyncio.CancelledError:
            engine.fail_kv(request_id, "cancelled")
            raise
        except Exception:  # noqa: BLE001 - whatever broke, the request must not hang
            log.exception("KV pull failed")
            engine.fail_kv(request_id, "internal error (logged)")

    def _receive(self, request_id: str, block: BlockData | PlacedBlock,
                 record: common_pb2.DisaggregationRecord) -> None:
        record.kv_blocks_shipped += 1
        record.kv_bytes_shipped += block.nbytes
        metrics.KV_BLOCKS_SHIPPED.labels("received").inc()
        metrics.KV_BYTES_SHIPPED.labels("received").inc(block.nbytes)
        if not isinstance(block, PlacedBlock):  # a placed one is in the engine's cache already
            self.engine.put_kv(request_id, block)

    def _finish(
        self, response: common_pb2.GenerateResponse, out: RequestOutput, record: common_pb2.DisaggregationRecord
    ) -> None:
        prompt_tokens = len(out.prompt_token_ids)
        imp = out.kv_import
        if imp is not None and imp.state in ("done", "failed"):
            bs = self.engine.layout.block_size
            record.decode_cached_tokens = imp.num_cached_blocks * bs
            record.prefill_cached_tokens = imp.prefill_cached_tokens
            record.decode_computed_prompt_tokens = imp.computed_locally
            if imp.completed_at is not None:
                # From the allocation (just before the call to prefill) to the last block in the cache.
                record.kv_transfer_ms = (imp.completed_at - imp.allocated_at) * 1000
                metrics.KV_TRANSFER.observe(imp.completed_at - imp.allocated_at)
            if imp.state == "failed":
                metrics.KV_FALLBACKS.inc()
        else:
            record.remote_prefill = False
            # A resumed request's cache hits may reach into the output it brought along: count the prompt's only.
            cached = min(out.num_cached_tokens, prompt_tokens)
            record.decode_cached_tokens = cached
            record.decode_computed_prompt_tokens = prompt_tokens - cached
        response.usage.prompt_tokens = prompt_tokens
        response.usage.cached_tokens = record.decode_cached_tokens + record.prefill_cached_tokens
        response.disaggregation.CopyFrom(record)
        metrics.PROMPT_TOKENS.inc(prompt_tokens)
        metrics.PREFIX_HITS.inc(record.decode_cached_tokens)
        metrics.PREFIX_QUERIES.inc(prompt_tokens)


def failure_status(e: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status a request's call ends with for `e`; None for an unexpected error (INTERNAL,
    logged). One mapping for Generate and GenerateStream: the router reads both alike."""
    if isinstance(e, PeerError):
        return e.code, str(e)
    if isinstance(e, PdserveError):
        return refusal(e)
    if isinstance(e, RecursionError):  # a grammar nested too deeply to compile
        return grpc.StatusCode.INVALID_ARGUMENT, "the structured output constraint is nested too deeply"
    return None


class _Progress:
    """What one request's responses keep between the engine's outputs: the tokens counted and
    timed, and those held back (--stream-interval)."""

    def __init__(self, request_id: str, interval: int,
                 emit: Callable[[common_pb2.GenerateResponse], None] | None) -> None:
        self.request_id = request_id
        self.held = _Held(interval)
        self.timer = metrics.StreamTimer()
        self.completion_tokens = 0
        self.emit = emit
        self.closed = False  # the request's generator ended: nothing more goes out

    def add(self, out: RequestOutput) -> common_pb2.GenerateResponse | None:
        """`out`'s tokens into the held response; that response when it is due (the first
        tokens, the finish, or a full interval), else None."""
        outputs = out.outputs
        new_tokens = len(outputs[0].token_ids) if len(outputs) == 1 else sum(len(c.token_ids) for c in outputs)
        self.completion_tokens += new_tokens
        first = self.timer.tokens(new_tokens)
        response = self.held.add(self.request_id, outputs, new_tokens)
        if out.prompt_logprobs is not None:
            response.prompt_logprobs.extend(prompt_logprobs_to_proto(out.prompt_logprobs))
        if not out.finished and not first and self.held.waiting():
            return None
        self.held.reset()
        return response

    def take(self, out: RequestOutput) -> bool:
        """The engine stream's sink (GenerateStream): a running request's tokens go to `emit`
        at once; its finish and a KV pull's start are declined, for the request's generator."""
        if self.closed or out.finished or out.kv_pull_from_block is not None:
            return False
        if out.outputs:
            response = self.add(out)
            if response is not None:
                self.emit(response)
        return True


class _Held:
    """A request's tokens not sent yet (--stream-interval), merged into one response."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.response: common_pb2.GenerateResponse | None = None
        self.tokens = 0

    def add(self, request_id: str, outputs: list[CompletionOutput], count: int) -> common_pb2.GenerateResponse:
        """Hold `outputs` (a step's deltas, `count` tokens); returns everything held."""
        self.tokens += count
        if self.response is None:
            self.response = common_pb2.GenerateResponse(request_id=request_id,
                                                        outputs=[delta_to_proto(c) for c in outputs])
            return self.response
        held = {d.index: d for d in self.response.outputs}
        for c in outputs:
            delta = held.get(c.index)
            if delta is None:
                self.response.outputs.append(delta_to_proto(c))
                continue
            more = delta_to_proto(c)
            delta.token_ids.extend(more.token_ids)
            delta.text += more.text
            delta.logprobs.extend(more.logprobs)
            delta.finish_reason, delta.stop_reason = more.finish_reason, more.stop_reason
        return self.response

    def waiting(self) -> bool:
        """Fewer tokens held than the interval: keep holding."""
        return self.tokens < self.interval

    def reset(self) -> None:
        self.response, self.tokens = None, 0


def with_heartbeats(items: AsyncIterator[T], interval: float) -> AsyncIterator[T | None]:
    """`items`, with a None whenever `interval` seconds pass without an item (0: never; then
    `items` itself, with no generator layer on every token's path)."""
    return items if interval <= 0 else _beating(items, interval)


async def _beating(items: AsyncIterator[T], interval: float) -> AsyncIterator[T | None]:
    """The pending item is awaited in a task that outlives each wait, so a heartbeat never
    cancels `items` (cancelling an engine stream aborts its request); closing this iterator does."""
    source = aiter(items)
    pending = asyncio.ensure_future(anext(source))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            yield item
            pending = asyncio.ensure_future(anext(source))
    finally:
        pending.cancel()
