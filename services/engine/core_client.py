"""A worker's engine with its core in a child process: AsyncEngine's interface, so servicers
do not care which they hold (`--engine-process on`, the default).

    gRPC front (this process)                          engine core (core_process.py)
    servicers -> EngineProcess.generate ── CoreCommands ──> reader thread: make_request
                 writer thread (batches)                    step loop: EngineCore.step()
    streams  <── reader thread: text.py <── CoreOutputs ──  one message per step
                 (detokenize, stop strings)

A step's plain deltas (new tokens, nothing else) travel as packed columns named by a number the
front gave each request (CoreTokens), so the core builds no message per request; finishes,
logprobs and KV facts go as full CoreRequestDeltas. The core's step loop shares no GIL with
gRPC, per-request protobuf or detokenization. The front keeps what
is per stream: admission (admission.py), each sequence's text, and the last load the core
reported (stats). If the child dies (killed, crashed), the socket's end of stream says so at
once: every open stream fails with EngineDeadError (UNAVAILABLE: the router moves it), `death()`
resolves, and the worker goes NOT_SERVING and exits. A step that raised in the child is reported
as such first (EngineFailedError, as with the in-thread engine).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable

import torch

from pdserve.v1 import engine_pb2
from services.engine import errors, loader
from services.engine.admission import Admission, AdmissionLimits
from services.engine.async_engine import EngineStreams, OutputQueue, Sink, deliver
from services.engine.block_manager import CacheListener
from services.engine.config import EngineConfig, EngineLayout
from services.engine.core_channel import DTYPES, Channel, ChannelClosed, block_to_proto
from services.engine.core_outputs import Stream, full_output, plain_news, stream_output
from services.engine.engine import Prompt
from services.engine.errors import EngineDeadError, EngineFailedError, InvalidRequestError
from services.engine.kv_transfer import BlockData
from services.engine.models import ModelConfig
from services.engine.outputs import RequestOutput, SampledToken
from services.engine.sampling_params import SamplingParams
from services.engine.sequence import Resumed
from services.engine.tokenizer import Tokenizer
from services.kv.nixl_core import CoreNixlClient
from services.rpc.convert import logprobs_to_proto, params_to_proto, prompt_logprobs_to_proto

log = logging.getLogger("pdserve.engine")


class EngineProcess(EngineStreams):
    """AsyncEngine's interface over an engine-core child process (see the module docstring)."""

    def __init__(self, config: EngineConfig, admission: Callable[[EngineLayout], AdmissionLimits] | None = None,
                 log_level: str = "info", role: str = "engine", instance_id: str = "",
                 nixl_host: str | None = None) -> None:
        """Starts the child and waits until its model is loaded. `admission`: the bounds of the
        waiting queue (as AsyncEngine's) for the layout the core reports. `nixl_host`: start a
        NIXL agent in the core, next to its pool, UCX bound to this host (services/kv/nixl_core.py)."""
        super().__init__()
        ours, theirs = socket.socketpair()
        argv = [sys.executable, "-m", "services.engine.core_process", "--fd", str(theirs.fileno()),
                "--parent", str(os.getpid()), "--config", _config_json(config), "--log-level", log_level,
                "--role", role, "--instance-id", instance_id]
        if nixl_host is not None:
            argv += ["--nixl-host", nixl_host]
        self.process = subprocess.Popen(argv, pass_fds=[theirs.fileno()])
        theirs.close()
        self._channel = Channel(ours)
        try:  # the front's share (config, tokenizer) while the child loads the model
            source = loader.resolve(config.model, config.load_format, config.preset, config.dummy_seed,
                                    config.tokenizer, config.cache_dir, weights=False)
            self.model_config = ModelConfig.from_hf(source.hf_config)
            self.tokenizer = Tokenizer.load(source.tokenizer_dir) if source.tokenizer_dir else None
            ready = self._channel.recv(engine_pb2.CoreReady)
        except ChannelClosed:
            code = self.process.wait()
            raise errors.ConfigError(f"the engine core process exited ({code}) before it was ready; "
                                     "its error is in the log above") from None
        except BaseException:
            self.process.kill()
            self.process.wait()
            raise
        self.config = config
        self.model_name = ready.model_name
        self._spec: engine_pb2.CoreSpecStats | None = engine_pb2.CoreSpecStats() if ready.speculative else None
        self._step_tokens: collections.deque[int] = collections.deque(maxlen=4096)
        self.layout = EngineLayout(
            device=torch.device(ready.device), dtype=DTYPES[ready.dtype], kv_dtype=DTYPES[ready.kv_cache_dtype],
            num_kv_blocks=ready.num_kv_blocks,
            block_size=ready.block_size, max_model_len=ready.max_model_len, vocab_size=ready.vocab_size,
            eos_token_ids=tuple(ready.eos_token_ids), model_identity=ready.model_identity,
        )
        self.admission = Admission(admission(self.layout)) if admission is not None else None
        self._stats = engine_pb2.CoreStats(free_kv_blocks=ready.num_kv_blocks, total_kv_blocks=ready.num_kv_blocks)
        self._by_handle: dict[int, Stream] = {}  # CoreAdd.handle -> stream
        self._handles = itertools.count(1)
        self._fences: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._fence_ids = itertools.count()
        self._cached: set[int] = set()  # the core's prefix-cache hashes, for a listener that comes late
        self._listener: CacheListener | None = None
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = False
        # NIXL in the core: a prefill core's pool announcement, a decode core's reads.
        self.nixl_pool = ready.nixl_pool if ready.HasField("nixl_pool") else None
        self.nixl = CoreNixlClient(self._command) if ready.nixl else None
        self._held: set[str] = set()  # requests whose blocks the core holds for a peer (by reference)
        threading.Thread(target=self._write, name="pdserve-core-writer", daemon=True).start()
        self._reader = threading.Thread(target=self._read, name="pdserve-core-reader", daemon=True)
        self._reader.start()
        log.info("engine core running in process %d", ready.pid)

    # ---- AsyncEngine's interface ---------------------------------------------------------------

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
        """As AsyncEngine.generate; the core validates the request and reports what it refuses."""
        if self._dead is not None:
            raise EngineDeadError(f"engine stopped: {self._dead!r}")
        if kv_by_reference and self.nixl_pool is None:
            raise InvalidRequestError("KV by reference needs a KV pool registered with NIXL (--kv-transport nixl)")
        params = params or SamplingParams()
        token_ids = self._tokenize(prompt)
        request_id = request_id or uuid.uuid4().hex
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this model has none")
        # A prefill-only request's tokens go to the decode worker: no text here.
        with_text = params.detokenize and kv_export_from is None
        stream = Stream(request_id, asyncio.get_running_loop(), OutputQueue(sink), token_ids, params,
                        self.tokenizer if with_text else None, len(resume) if resume else params.n)
        for r in resume or ():
            stream.text_of(r.index).resume(r.token_ids, r.text_chars)
        admit = self.admission is not None and not migrated
        ticket = self.admission.reserve(len(token_ids)) if admit else None
        try:
            with self._lock:
                if self._dead is not None:
                    raise EngineDeadError(f"engine stopped: {self._dead!r}")
                if request_id in self._streams:
                    raise InvalidRequestError(f"request id {request_id!r} is already in use")
                self._streams[request_id] = stream
                handle = next(self._handles)
                self._by_handle[handle] = stream
        except BaseException:
            if ticket is not None:
                self.admission.release(ticket)
            raise
        if ticket is not None:
            self.admission.bind(ticket, request_id)
        add = engine_pb2.CoreAdd(request_id=request_id, prompt_token_ids=token_ids, params=params_to_proto(params),
                                 priority=priority, remote_prefill=remote_prefill, handle=handle,
                                 kv_by_reference=kv_by_reference,
                                 resume=[engine_pb2.CoreResumed(index=r.index, token_ids=r.token_ids)
                                         for r in resume or ()])
        if kv_export_from is not None:
            add.kv_export_from = kv_export_from
        self._command(add=add)
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
                self._streams.pop(request_id, None)
                self._by_handle.pop(handle, None)
            if ticket is not None:
                self.admission.release(ticket)
            if not finished:
                self._command(abort=request_id)

    def abort(self, request_id: str) -> None:
        self._command(abort=request_id)

    def put_kv(self, request_id: str, block: BlockData) -> None:
        """Bytes over the socket: on the CPU a block is a few KiB to MiB, copied once more here
        (a shared-memory pool would save that copy; not worth its bookkeeping at CPU speeds)."""
        self._command(put_kv=engine_pb2.CorePutKV(request_id=request_id, block=block_to_proto(block)))

    def finish_kv(self, request_id: str, first_tokens: list[SampledToken], prefill_cached_tokens: int,
                  prompt_logprobs: list | None = None) -> None:
        firsts = [engine_pb2.CoreFirstToken(token_id=t.token_id,
                                            logprobs=logprobs_to_proto(t.logprobs) if t.logprobs else None)
                  for t in first_tokens]
        self._command(finish_kv=engine_pb2.CoreFinishKV(
            request_id=request_id, first_tokens=firsts, prefill_cached_tokens=prefill_cached_tokens,
            prompt_logprobs=prompt_logprobs_to_proto(prompt_logprobs or [])))

    def fail_kv(self, request_id: str, reason: str) -> None:
        self._command(fail_kv=engine_pb2.CoreFailKV(request_id=request_id, reason=reason))

    def release_kv(self, request_id: str) -> None:
        self._held.discard(request_id)
        self._command(release_kv=request_id)

    async def fence(self, timeout: float = 30.0) -> None:
        """Once every block put so far is in the core's cache."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        fence_id = next(self._fence_ids)
        self._fences[fence_id] = (loop, done)
        self._command(fence=fence_id)
        try:
            await asyncio.wait_for(done, timeout)
        finally:
            self._fences.pop(fence_id, None)

    def stats(self) -> dict[str, int]:
        """The load as of the core's last message (it sends one whenever the load changed)."""
        s = self._stats
        return {"running": s.running, "waiting": s.waiting, "free_kv_blocks": s.free_kv_blocks,
                "total_kv_blocks": s.total_kv_blocks, "requests": s.requests}

    @property
    def num_preemptions(self) -> int:
        return self._stats.num_preemptions

    def spec_stats(self) -> engine_pb2.CoreSpecStats | None:
        """Speculative decoding's totals as of the core's last report (None: no speculation)."""
        return self._spec

    def drain_step_tokens(self) -> list[int]:
        """Tokens computed by each step since the last call (pdserve:iteration_tokens_total)."""
        steps = self._step_tokens
        return [steps.popleft() for _ in range(len(steps))]

    def has_request(self, request_id: str) -> bool:
        return request_id in self._streams

    def is_held(self, request_id: str) -> bool:
        """Blocks held for a peer's release: the core named some by reference, and no
        release_kv has gone out for them since."""
        return request_id in self._held

    @property
    def kv_cache(self) -> torch.Tensor | None:
        """The KV pool is the child's: nothing here to export over CUDA IPC."""
        return None

    def set_cache_listener(self, listener: CacheListener) -> None:
        """Tell `listener` every prefix-cache change, starting with every hash cached now."""
        with self._lock:
            self._listener = listener
            for block_hash in self._cached:
                listener.stored(block_hash)

    def shutdown(self) -> None:
        self._stopping = True
        self._command(stop=True)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._channel.close()

    # ---- the channel ---------------------------------------------------------------------------

    def _command(self, **kwargs) -> None:
        self._outbox.put(engine_pb2.CoreCommand(**kwargs))

    def _write(self) -> None:
        """Whatever was queued meanwhile goes out as one message."""
        while True:
            batch = [self._outbox.get()]
            while not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            try:
                self._channel.send(engine_pb2.CoreCommands(commands=batch))
            except ChannelClosed:
                return  # the reader sees the end of stream and reports the death
            if any(c.HasField("stop") for c in batch):
                return

    def _read(self) -> None:
        try:
            while True:
                out = self._channel.recv(engine_pb2.CoreOutputs)
                if out.died:
                    self._die(RuntimeError(f"the engine core's step raised: {out.died}"), EngineFailedError(
                        "the engine failed while running this request; the worker is restarting"))
                    return
                self._take(out)
        except ChannelClosed:
            if self._stopping:
                return
            code = self.process.wait()
            cause = EngineDeadError(f"the engine core process exited ({code})")
            self._die(cause, EngineDeadError("the engine core process died; the worker is restarting"))
        except Exception as e:  # noqa: BLE001 - a front that stopped reading would hang every stream
            log.exception("reading the engine core's outputs failed")
            self._die(e, EngineFailedError("the engine failed while running this request; the worker is restarting"))

    def _die(self, cause: BaseException, stream_error: BaseException) -> None:
        log.error("engine core stopped: %s", cause)
        self._declare_dead(cause, stream_error)
        if self.nixl is not None:
            self.nixl.fail(stream_error)
        if self.process.poll() is None:
            self.process.kill()

    def _take(self, out: engine_pb2.CoreOutputs) -> None:
        """One message of the core: outputs to their streams, one callback per event loop."""
        if out.HasField("stats"):
            self._stats = out.stats
        self._step_tokens.extend(out.step_tokens)
        if out.HasField("spec"):
            self._spec = out.spec
        if out.nixl:
            self.nixl.answered(out.nixl)
        if out.cache_stored or out.cache_evicted:
            self._cache_events(out.cache_stored, out.cache_evicted)
        for fence_id in out.fences_done:
            waiter = self._fences.get(fence_id)
            if waiter is not None:
                waiter[0].call_soon_threadsafe(lambda f=waiter[1]: f.done() or f.set_result(None))
        if self.admission is not None and out.started:
            for request_id in out.started:
                self.admission.seen(request_id)
            self.admission.release_started(lambda _: False)
        batches: dict[asyncio.AbstractEventLoop, list[tuple[OutputQueue, object]]] = {}
        with self._lock:
            for err in out.errors:
                stream = self._streams.get(err.request_id)
                if stream is not None:
                    error = getattr(errors, err.kind, InvalidRequestError)(err.message)
                    batches.setdefault(stream.loop, []).append((stream.queue, error))
            plain = plain_news(out.tokens, self._by_handle)
            full = [(d, self._streams.get(d.request_id)) for d in out.requests]
        self._held.update(d.request_id for d in out.requests if d.kv_refs)
        for stream, seqs in plain:
            if not stream.finished:
                output = stream_output(stream, seqs, False, self._stop_sequence)
                batches.setdefault(stream.loop, []).append((stream.queue, output))
        for delta, stream in full:
            if stream is not None and not stream.finished:
                output = full_output(delta, stream, self._stop_sequence)
                batches.setdefault(stream.loop, []).append((stream.queue, output))
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(deliver, batch)

    def _stop_sequence(self, request_id: str, index: int) -> None:
        self._command(stop_sequence=engine_pb2.CoreStopSequence(request_id=request_id, index=index))

    def _cache_events(self, stored, evicted) -> None:
        with self._lock:
            listener = self._listener
            for block_hash in stored:
                self._cached.add(block_hash)
                if listener is not None:
                    listener.stored(block_hash)
            for block_hash in evicted:
                self._cached.discard(block_hash)
                if listener is not None:
                    listener.evicted(block_hash)

    # ---- helpers ---------------------------------------------------------------------------

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: send token ids, or pass --tokenizer")
            return self.tokenizer.encode(prompt)
        return list(prompt)

def _config_json(config: EngineConfig) -> str:
    fields = dataclasses.asdict(config)
    if fields["cache_dir"] is not None:
        fields["cache_dir"] = str(fields["cache_dir"])
    return json.dumps(fields)
