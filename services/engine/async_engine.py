"""The asyncio entry point the gRPC workers wrap: `add_request` -> async stream of outputs.

Model steps run on a dedicated engine thread, off the event loop, so serving, health checks
and cancellation stay responsive during a long prefill. The event loop and the engine thread
talk through two channels only: an inbox of commands (add, abort) that the engine thread
drains between steps, and per-request queues (OutputQueue) it fills with streaming deltas.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from services.engine.admission import Admission, AdmissionLimits
from services.engine.block_manager import CacheListener
from services.engine.config import EngineConfig, EngineLayout
from services.engine.engine import EngineCore, Prompt
from services.engine.errors import EngineDeadError, EngineFailedError, InvalidRequestError
from services.engine.kv_transfer import BlockData
from services.engine.models import ModelConfig
from services.engine.outputs import RequestOutput, SampledToken, build_output
from services.engine.parallel.driver import RankDiedError
from services.engine.sampling_params import SamplingParams
from services.engine.sequence import Request, Resumed, SequenceStatus

log = logging.getLogger("pdserve.engine")


# Takes a request's output on its event loop instead of its stream (True: taken).
Sink = Callable[[RequestOutput], bool]


class OutputQueue:
    """A request's outputs between the loop's callbacks (one producer) and its stream (one
    reader): a deque and at most one waiting future. asyncio.Queue's bounds, putters and join
    bookkeeping cost more on every token of every request, and none of it is used here."""

    __slots__ = ("_items", "_waiter", "_sink")

    def __init__(self, sink: Sink | None = None) -> None:
        """`sink` (generate's): offered each output while nothing waits in the queue, so the
        reader gets only what the sink declined and in order; an error it raises is queued."""
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None
        self._sink = sink

    def put_nowait(self, item: object) -> None:
        if self._sink is not None and not self._items and not isinstance(item, BaseException):
            try:
                if self._sink(item):
                    return
            except Exception as e:  # noqa: BLE001 - the stream's reader raises it, as its own
                item = e
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> object:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: OutputQueue


class EngineStreams:
    """What AsyncEngine and EngineProcess (core_client.py) share: the open streams (request id
    -> a stream with its event loop and queue) and the one notice of the engine's death."""

    def __init__(self) -> None:
        self._streams: dict = {}
        self._lock = threading.Lock()
        self._dead: BaseException | None = None
        self._death_watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    @property
    def dead(self) -> BaseException | None:
        """What stopped the engine loop, or None while it runs."""
        return self._dead

    def death(self) -> asyncio.Future:
        """A future of the running loop that resolves with what stopped the engine loop (a worker
        watches it to go NOT_SERVING and exit; it never resolves while the engine runs)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self._dead is None:
                self._death_watchers.append((loop, future))
                return future
        future.set_result(self._dead)
        return future

    def _declare_dead(self, cause: BaseException, stream_error: BaseException) -> None:
        """The engine stopped with `cause`: every open stream gets `stream_error`, every watcher
        `cause`; a stream opened from now on is refused (generate checks `_dead` under the lock)."""
        with self._lock:
            self._dead = cause
            streams, watchers = list(self._streams.values()), self._death_watchers
            self._death_watchers = []
        for stream in streams:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, stream_error)
        for loop, future in watchers:
            loop.call_soon_threadsafe(lambda f=future, e=cause: f.done() or f.set_result(e))


class AsyncEngine(EngineStreams):
    def __init__(self, config: EngineConfig | None = None, core: EngineCore | None = None,
                 admission: AdmissionLimits | None = None, kv_layerwise: bool = False) -> None:
        """`admission`: bounds of the waiting queue (admission.py); None admits everything.
        `kv_layerwise`: a prefill request's KV bytes go out layer by layer, mid-step (kv_transfer.py)."""
        super().__init__()
        self.core = core or EngineCore(config or EngineConfig())
        if kv_layerwise and self.core.runner.driver is not None:
            log.warning("--kv-layerwise: not with several tensor/pipeline-parallel ranks; KV goes out after each step")
        elif kv_layerwise:
            self.core.kv_layer_sink = self._publish
        self.admission = Admission(admission) if admission is not None else None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
        self._thread.start()
        # Another parallel rank's exit ends the engine at once, idle or not (as in the core process).
        self.core.watch_ranks(lambda why: self._inbox.put(("rank_died", why)))

    @property
    def tokenizer(self):
        return self.core.tokenizer

    # What servicers read of the engine, the same on EngineProcess (core_client.py).

    @property
    def layout(self) -> EngineLayout:
        return self.core.layout

    @property
    def model_config(self) -> ModelConfig:
        return self.core.model_config

    @property
    def kv_cache(self) -> torch.Tensor | None:
        """The paged KV pool (a prefill worker exports it over CUDA IPC); None with tensor
        parallelism, where it holds only rank 0's heads."""
        return self.core.runner.kv_cache if self.core.runner.driver is None else None

    @property
    def num_preemptions(self) -> int:
        return self.core.scheduler.num_preemptions

    @property
    def config(self) -> EngineConfig:
        return self.core.config

    @property
    def model_name(self) -> str:
        return self.core.model_name

    def spec_stats(self):
        """Speculative decoding's totals (SpecStats; None: no speculation)."""
        return self.core.speculator.stats if self.core.speculator is not None else None

    def drain_step_tokens(self) -> list[int]:
        """Tokens computed by each step since the last call (pdserve:iteration_tokens_total)."""
        steps = self.core.scheduler.step_tokens
        return [steps.popleft() for _ in range(len(steps))]

    def has_request(self, request_id: str) -> bool:
        """Whether the engine holds `request_id` now (read from any thread: a snapshot)."""
        return request_id in self.core.requests

    def is_held(self, request_id: str) -> bool:
        return self.core.is_held(request_id)

    def set_cache_listener(self, listener: CacheListener) -> None:
        """Tell `listener` every prefix-cache change, starting with every hash cached now."""
        self.core.block_manager.set_listener(listener)

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        kv_export_from: int | None = None,
        remote_prefill: bool = False,
        kv_by_reference: bool = False,
        resume: list[Resumed] | None = None,
        migrated: bool = False,
        sink: Sink | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream deltas of one request; leaving the loop early (or cancelling) aborts it.

        KV transfer (kv_transfer.py): with `kv_export_from`, outputs carry the prompt's KV
        blocks (references with `kv_by_reference`, held until `release_kv`); with
        `remote_prefill`, one output announces `kv_pull_from_block`, after which the caller feeds
        `put_kv` and then `finish_kv` (or `fail_kv`). `resume`: sequences begun on another
        worker (EngineCore.make_request); a `migrated` request skips the admission bound.
        `sink`: takes outputs on the event loop, no task woken (OutputQueue); the stream yields
        the rest. It must decline the finished output, which ends the stream.
        """
        if self._dead is not None:
            raise EngineDeadError(f"engine stopped: {self._dead!r}")
        params = params or SamplingParams()
        # Admission first: a refused request costs no grammar compilation and no tokenizing.
        admit = self.admission is not None and not migrated
        ticket = self.admission.reserve(len(prompt) if isinstance(prompt, list) else 0) if admit else None
        try:
            if params.structured_output is not None:
                # Compiling takes milliseconds to seconds: off the event loop; make_request then hits the cache.
                await asyncio.to_thread(self.core.compile_grammar, params)
            request = self.core.make_request(
                prompt, params, request_id, priority, kv_export_from, remote_prefill, kv_by_reference, resume
            )
            stream = _Stream(asyncio.get_running_loop(), OutputQueue(sink))
            with self._lock:
                if self._dead is not None:  # checked under the lock the dying thread takes: no stream is missed
                    raise EngineDeadError(f"engine stopped: {self._dead!r}")
                if request.request_id in self._streams:
                    raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
                self._streams[request.request_id] = stream
        except BaseException:
            if ticket is not None:
                self.admission.release(ticket)
            raise
        if ticket is not None:
            self.admission.bind(ticket, request.request_id)
        self._inbox.put(("add", request))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            with self._lock:
                self._streams.pop(request.request_id, None)
            if ticket is not None:
                self.admission.release(ticket)
            if not finished:
                self._inbox.put(("abort", request.request_id))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def put_kv(self, request_id: str, block: BlockData) -> None:
        self._inbox.put(("put_kv", (request_id, block)))

    def finish_kv(self, request_id: str, first_tokens: list[SampledToken], prefill_cached_tokens: int,
                  prompt_logprobs: list | None = None) -> None:
        self._inbox.put(("finish_kv", (request_id, first_tokens, prefill_cached_tokens, prompt_logprobs)))

    def fail_kv(self, request_id: str, reason: str) -> None:
        self._inbox.put(("fail_kv", (request_id, reason)))

    def release_kv(self, request_id: str) -> None:
        self._inbox.put(("release_kv", request_id))

    async def fence(self, timeout: float = 30.0) -> None:
        """Return once every block put so far is in the cache, its copy finished on the device
        (put_kv may hand the engine a view of a peer's memory, which the peer then reuses)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._inbox.put(("fence", (loop, done)))
        await asyncio.wait_for(done, timeout)

    def stats(self) -> dict[str, int]:
        """Load numbers for routing (read without locking: a snapshot, possibly a step old)."""
        core = self.core
        return {
            "running": core.scheduler.num_running,
            "waiting": core.scheduler.num_waiting + len(core.scheduler.awaiting_kv),
            "free_kv_blocks": core.block_manager.num_free_blocks,
            "total_kv_blocks": core.block_manager.num_blocks,
            "requests": len(core.requests),
        }

    def shutdown(self) -> None:
        self._stopping = True
        self._inbox.put(("stop", None))
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.core.close()  # the other parallel ranks, if any

    # ---- engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        core = self.core
        try:
            while not self._stopping:
                # Block for a command when there is nothing to compute (idle, or only waiting
                # for KV); otherwise drain what arrived during the last step.
                if core.idle or not core.has_unfinished():
                    self._handle(self._inbox.get())
                while not self._inbox.empty():
                    self._handle(self._inbox.get_nowait())
                if self._stopping:
                    break
                self._publish_step(core.step())
                if self.admission is not None:
                    self.admission.release_started(self._still_waiting)
        except BaseException as e:  # noqa: BLE001 - every stream must learn the engine died
            log.exception("engine loop died")
            # INTERNAL for the requests it was running (their own failure), UNAVAILABLE for new ones.
            self._declare_dead(e, EngineFailedError("the engine failed while running this request; the worker is "
                                                    "restarting"))

    def _handle(self, command: tuple[str, object]) -> None:
        kind, arg = command
        self.core.idle = False  # any command may make progress possible: step again
        if kind == "rank_died":
            raise RankDiedError(arg)
        if kind == "add":
            request: Request = arg
            with self._lock:
                wanted = request.request_id in self._streams
            if wanted:  # the caller may have gone away before the engine saw the request
                try:
                    self.core.add(request)
                except InvalidRequestError as e:
                    self._send(request.request_id, e)
                if self.admission is not None:
                    self.admission.seen(request.request_id)
        elif kind == "abort":
            request = self.core.abort(arg)
            if request is not None:
                self._publish(request)
        elif kind == "put_kv":
            self.core.receive_kv(*arg)
        elif kind in ("finish_kv", "fail_kv"):
            method = self.core.finish_kv if kind == "finish_kv" else self.core.fail_kv
            request = method(*arg)
            if request is not None:
                self._publish(request)
        elif kind == "release_kv":
            self.core.release_kv(arg)
        elif kind == "fence":
            self.core.runner.synchronize()
            loop, done = arg
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
        elif kind == "stop":
            self._stopping = True

    def _still_waiting(self, request_id: str) -> bool:
        request = self.core.requests.get(request_id)
        return request is not None and all(s.status == SequenceStatus.WAITING for s in request.seqs)

    def _publish(self, request: Request) -> None:
        self._send(request.request_id, build_output(request, delta=True))

    def _publish_step(self, requests: list[Request]) -> None:
        """A step's deltas, handed to each event loop in one callback: the loop wakes once per
        step, not once per request, and the streams all wake in the same loop iteration, so a
        GenerateStream carries the whole step in one frame (services/decode/mux.py)."""
        outputs = [(request.request_id, build_output(request, delta=True)) for request in requests]
        batches: dict[asyncio.AbstractEventLoop, list[tuple[OutputQueue, object]]] = {}
        with self._lock:
            for request_id, item in outputs:
                stream = self._streams.get(request_id)
                if stream is not None:
                    batches.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(deliver, batch)

    def _send(self, request_id: str, item: object) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)


def deliver(batch: list[tuple[OutputQueue, object]]) -> None:
    """Put each item into its stream's queue (called on the queues' event loop)."""
    for stream_queue, item in batch:
        stream_queue.put_nowait(item)
