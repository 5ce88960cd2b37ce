"""The engine-core process: one worker's EngineCore and its step loop, with no gRPC in it.

    python -m services.engine.core_process --fd N --parent PID --config JSON [--role R --instance-id ID]

The worker's front (core_client.py) starts it over a Unix socketpair (fd N) and talks to it in
engine.proto messages: commands in (add, abort, KV, fences), one CoreOutputs out per step with
every request's new tokens. The core samples tokens and applies the token-level stop rules (EOS,
stop tokens, grammars, lengths); text and stop strings are the front's (text.py).

It dies with its parent: PR_SET_PDEATHSIG, and the socket's end of stream, whichever comes
first, so no orphan keeps holding a GPU. A step that raises sends `died` and exits 1.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from google.protobuf.message import Message

from pdserve.v1 import engine_pb2, kv_pb2
from services.engine.config import EngineConfig
from services.engine.core_channel import Channel, ChannelClosed, block_from_proto, block_to_proto
from services.engine.engine import EngineCore
from services.engine.errors import PdserveError
from services.engine.kv_transfer import BlockRef
from services.engine.parallel.driver import RankDiedError
from services.engine.sequence import Request, Resumed, SequenceStatus
from services.engine.spec.config import SpeculativeConfig
from services.kv import nixl_agent
from services.kv.nixl_agent import RegisteredPool
from services.kv.nixl_core import CoreReads, ref_to_proto
from services.rpc.convert import (logprobs_to_proto, params_from_proto, prompt_logprobs_from_proto,
                                  prompt_logprobs_to_proto, sampled_token)

log = logging.getLogger("pdserve.engine")
_PR_SET_PDEATHSIG = 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.engine.core_process")
    p.add_argument("--fd", type=int, required=True, help="this end of the socketpair")
    p.add_argument("--parent", type=int, required=True, help="the front's pid: exit when it is gone")
    p.add_argument("--config", required=True, help="EngineConfig as JSON")
    p.add_argument("--log-level", default="info")
    p.add_argument("--role", default="engine", help="the worker's role (decode, prefill), for its logs")
    p.add_argument("--instance-id", default="", help="the worker's instance id, for its logs")
    p.add_argument("--nixl-host", help="start a NIXL agent next to the KV pool, its UCX bound to this host's "
                                       "interface (services/kv/nixl_core.py)")
    args = p.parse_args(argv)
    _die_with_parent(args.parent)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {args.instance_id or args.role} core %(name)s: %(message)s")
    channel = Channel(socket.socket(fileno=args.fd))
    config = json.loads(args.config)
    if config.get("cache_dir") is not None:
        config["cache_dir"] = Path(config["cache_dir"])
    config["speculative_config"] = SpeculativeConfig.parse(config.get("speculative_config"))
    core = EngineCore(EngineConfig(**config), assemble_text=False)
    layout = core.layout
    loop = CoreLoop(core, channel)
    nixl_pool = loop.start_nixl(args.nixl_host, args.role, args.instance_id) if args.nixl_host else None
    channel.send(engine_pb2.CoreReady(
        device=str(layout.device), dtype=str(layout.dtype).removeprefix("torch."), num_kv_blocks=layout.num_kv_blocks,
        kv_cache_dtype=str(layout.kv_dtype).removeprefix("torch."),
        block_size=layout.block_size, max_model_len=layout.max_model_len, vocab_size=layout.vocab_size,
        eos_token_ids=list(layout.eos_token_ids), model_identity=layout.model_identity, pid=os.getpid(),
        model_name=core.model_name, speculative=core.speculator is not None, nixl_pool=nixl_pool,
        nixl=args.nixl_host is not None,
    ))
    core.watch_ranks(lambda why: loop.inbox.put(("rank_died", why)))  # an idle worker goes down too
    try:
        return loop.run()
    finally:
        core.close()  # the other parallel ranks, if any


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the front dies (Linux), even mid-step."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


class _CacheEvents:
    """The block manager's listener: prefix-cache changes, forwarded with the next message."""

    def __init__(self) -> None:
        self.added: list[int] = []
        self.removed: list[int] = []

    def stored(self, block_hash: int) -> None:
        self.added.append(block_hash)

    def evicted(self, block_hash: int) -> None:
        self.removed.append(block_hash)


class CoreLoop:
    """AsyncEngine's engine thread, with a socket where the event loops were."""

    def __init__(self, core: EngineCore, channel: Channel) -> None:
        self.core = core
        self.channel = channel
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.events = _CacheEvents()
        core.block_manager.set_listener(self.events)
        self._changed: dict[str, Request] = {}
        self._fences: list[int] = []
        self._errors: list[engine_pb2.CoreRequestError] = []
        self._waiting: set[str] = set()  # added, not yet seated (admission counts them in the front)
        self._handles: dict[str, int] = {}  # request id -> the front's number for it (CoreTokens)
        self._last_stats: engine_pb2.CoreStats | None = None
        self._last_spec: engine_pb2.CoreSpecStats | None = None
        self._stopping = False
        self._nixl: RegisteredPool | CoreReads | None = None  # holds the agent, if any

    def start_nixl(self, host: str, role: str, instance_id: str) -> kv_pb2.NixlPool | None:
        """This core's NIXL agent, next to its pool: a prefill core registers the pool (the
        announcement its front hands out at the handshake); a decode core reads peers' pools
        into it on commands (nixl_core.CoreReads)."""
        pool = self.core.runner.kv_cache
        if self.core.runner.driver is not None:
            raise RuntimeError("NIXL with tensor parallelism: the pool here holds only rank 0's heads")
        device = nixl_agent.bind_ucx(host)
        agent = nixl_agent.new_agent(role, instance_id)
        log.info("NIXL agent %s (UCX on %s)", agent.name, device)
        if role == "prefill":
            self._nixl = nixl_agent.register_pool(agent, pool)
            return self._nixl.announcement
        cfg, layout = self.core.model_config, self.core.layout
        reader = nixl_agent.PoolReader(agent, pool.device, (cfg.num_layers, 2, layout.block_size, cfg.num_kv_heads,
                                                            cfg.head_dim), layout.kv_dtype)
        self._nixl = CoreReads(reader, lambda request_id, block: self.inbox.put(("put_kv", (request_id, block))),
                               lambda answer: self.channel.send(engine_pb2.CoreOutputs(nixl=[answer])))
        return None

    def run(self) -> int:
        threading.Thread(target=self._read, name="pdserve-core-reader", daemon=True).start()
        core = self.core
        try:
            while not self._stopping:
                if core.idle or not core.has_unfinished():
                    self._handle(self.inbox.get())
                while not self.inbox.empty():
                    self._handle(self.inbox.get_nowait())
                if self._stopping:
                    break
                if core.has_unfinished() or core.has_step_in_flight:
                    for request in core.step():
                        self._changed[request.request_id] = request
                self._flush()
        except ChannelClosed:
            return 0  # the front is gone
        except BaseException as e:  # noqa: BLE001 - the front must learn why its core died
            log.exception("engine loop died")
            try:
                self.channel.send(engine_pb2.CoreOutputs(died=repr(e)))
            except ChannelClosed:
                pass
            return 1
        return 0

    # ---- commands (reader thread, then the loop) ---------------------------------------------

    def _read(self) -> None:
        """Decode commands as they come; make requests here (tokenizing, grammar compiling),
        off the step loop. The end of stream stops the loop."""
        try:
            while True:
                for command in self.channel.recv(engine_pb2.CoreCommands).commands:
                    self._decode(command)
        except ChannelClosed:
            self.inbox.put(("stop", None))

    def _decode(self, command: engine_pb2.CoreCommand) -> None:
        kind = command.WhichOneof("command")
        if kind == "add":
            self._make(command.add)
        elif kind == "put_kv":
            self.inbox.put((kind, (command.put_kv.request_id, block_from_proto(command.put_kv.block))))
        elif kind == "finish_kv":
            msg = command.finish_kv
            firsts = [sampled_token(t.token_id, t.logprobs) for t in msg.first_tokens]
            prompt = prompt_logprobs_from_proto(msg.prompt_logprobs)
            self.inbox.put((kind, (msg.request_id, firsts, msg.prefill_cached_tokens, prompt)))
        elif kind == "fail_kv":
            self.inbox.put((kind, (command.fail_kv.request_id, command.fail_kv.reason)))
        elif kind == "stop_sequence":
            self.inbox.put((kind, (command.stop_sequence.request_id, command.stop_sequence.index)))
        elif kind is not None and kind.startswith("nixl_"):
            self._nixl_command(command)
        elif kind is not None:
            self.inbox.put((kind, getattr(command, kind)))

    def _nixl_command(self, command: engine_pb2.CoreCommand) -> None:
        reads = self._nixl
        if isinstance(reads, CoreReads):
            reads.submit(command)
            return
        kind = command.WhichOneof("command")
        msg = getattr(command, kind)
        if isinstance(msg, Message) and msg.id:  # a load or read: say why nothing will happen
            self.channel.send(engine_pb2.CoreOutputs(nixl=[engine_pb2.CoreNixlAnswer(
                id=msg.id, error="this engine core reads no KV over NIXL")]))

    def _make(self, add: engine_pb2.CoreAdd) -> None:
        try:
            request = self.core.make_request(
                list(add.prompt_token_ids), params_from_proto(add.params), add.request_id, add.priority,
                add.kv_export_from if add.HasField("kv_export_from") else None, add.remote_prefill,
                add.kv_by_reference and isinstance(self._nixl, RegisteredPool),
                [Resumed(r.index, list(r.token_ids)) for r in add.resume] or None,
            )
        except (PdserveError, RecursionError) as e:
            self.inbox.put(("error", (add.request_id, e)))
            return
        self.inbox.put(("add", (request, add.handle)))

    def _handle(self, command: tuple[str, object]) -> None:
        kind, arg = command
        core = self.core
        core.idle = False  # any command may make progress possible: step again
        if kind == "add":
            request, handle = arg
            try:
                core.add(request)
                self._waiting.add(request.request_id)
                self._handles[request.request_id] = handle
            except PdserveError as e:
                self._error(request.request_id, e)
        elif kind == "error":
            self._error(*arg)
        elif kind == "abort":
            self._publish(core.abort(arg))
        elif kind == "put_kv":
            core.receive_kv(*arg)
        elif kind == "finish_kv":
            self._publish(core.finish_kv(*arg))
        elif kind == "fail_kv":
            self._publish(core.fail_kv(*arg))
        elif kind == "stop_sequence":
            self._publish(core.stop_sequence(*arg))
        elif kind == "release_kv":
            core.release_kv(arg)
        elif kind == "rank_died":
            raise RankDiedError(arg)
        elif kind == "fence":
            core.runner.synchronize()
            self._fences.append(arg)
        elif kind == "stop":
            self._stopping = True

    def _error(self, request_id: str, e: BaseException) -> None:
        kind = type(e).__name__ if isinstance(e, PdserveError) else "InvalidRequestError"
        message = "the structured output constraint is nested too deeply" if isinstance(e, RecursionError) else str(e)
        self._errors.append(engine_pb2.CoreRequestError(request_id=request_id, kind=kind, message=message))

    def _publish(self, request: Request | None) -> None:
        if request is not None:
            self._changed[request.request_id] = request

    # ---- outputs -------------------------------------------------------------------------------

    def _flush(self) -> None:
        """One message with everything new since the last: deltas, errors, fences, cache events,
        seated requests; nothing at all when nothing changed (an idle core stays quiet)."""
        out = engine_pb2.CoreOutputs(errors=self._errors, fences_done=self._fences, cache_stored=self.events.added,
                                     cache_evicted=self.events.removed, started=self._seated())
        self._deltas(out)
        stats = self._stats()
        if stats != self._last_stats:
            out.stats.CopyFrom(stats)
            self._last_stats = stats
        steps = self.core.scheduler.step_tokens
        while steps:
            out.step_tokens.append(steps.popleft())
        spec = self._spec_stats()
        if spec is not None and spec != self._last_spec:
            out.spec.CopyFrom(spec)
            self._last_spec = spec
        self._changed, self._errors, self._fences = {}, [], []
        self.events.added, self.events.removed = [], []
        if out.ByteSize():
            self.channel.send(out)

    def _deltas(self, out: engine_pb2.CoreOutputs) -> None:
        """Each changed request's delta: plain new tokens into the columns, the rest in full."""
        handles, seq_index, counts, token_ids = [], [], [], []
        for request in self._changed.values():
            handle = self._handles.get(request.request_id)
            if handle is None or not _plain(request):
                out.requests.append(_delta(request))
                if request.finished:
                    self._handles.pop(request.request_id, None)
                continue
            for seq in request.seqs:
                num_out = seq.num_read_back_tokens
                if num_out > seq.num_emitted_tokens:
                    if request.first_token_time is None:
                        request.first_token_time = time.monotonic()
                    handles.append(handle)
                    seq_index.append(seq.index)
                    counts.append(num_out - seq.num_emitted_tokens)
                    token_ids += seq.output_token_ids_from(seq.num_emitted_tokens)
                    seq.num_emitted_tokens = num_out
        if handles:
            out.tokens.handles[:] = handles
            out.tokens.seq_index[:] = seq_index
            out.tokens.counts[:] = counts
            out.tokens.token_ids[:] = token_ids

    def _seated(self) -> list[str]:
        seated = []
        for request_id in list(self._waiting):
            request = self.core.requests.get(request_id)
            if request is None or any(s.status != SequenceStatus.WAITING for s in request.seqs):
                self._waiting.discard(request_id)
                seated.append(request_id)
        return seated

    def _spec_stats(self) -> engine_pb2.CoreSpecStats | None:
        if self.core.speculator is None:
            return None
        s = self.core.speculator.stats
        return engine_pb2.CoreSpecStats(num_drafts=s.num_drafts, num_draft_tokens=s.num_draft_tokens,
                                        num_accepted_tokens=s.num_accepted_tokens,
                                        accepted_per_pos=s.accepted_per_pos)

    def _stats(self) -> engine_pb2.CoreStats:
        scheduler, blocks = self.core.scheduler, self.core.block_manager
        return engine_pb2.CoreStats(running=scheduler.num_running,
                                    waiting=scheduler.num_waiting + len(scheduler.awaiting_kv),
                                    free_kv_blocks=blocks.num_free_blocks, total_kv_blocks=blocks.num_blocks,
                                    requests=len(self.core.requests), num_preemptions=scheduler.num_preemptions)


def _plain(request: Request) -> bool:
    """Only new tokens to say: no finish (of any sequence), no logprobs (of the output or the
    prompt), no KV to ship or announce."""
    imp = request.kv_import
    return (request.params.logprobs is None and request.params.prompt_logprobs is None
            and request.kv_export is None
            and (imp is None or imp.announced or imp.state != "waiting")
            # the usual case first: nothing finished, so no finish reported or to report
            and (request.num_finished == 0
                 or not request.finished and all(s.reported_finish == s.finished for s in request.seqs)))


def _delta(request: Request) -> engine_pb2.CoreRequestDelta:
    """What `request` has new since its last delta: tokens (no text: the front's), finishes,
    KV blocks to ship, the start of a KV pull, the KV import's facts."""
    msg = engine_pb2.CoreRequestDelta(request_id=request.request_id, finished=request.finished,
                                      num_cached_tokens=request.num_cached_tokens)
    for seq in request.seqs:
        num_out = seq.num_read_back_tokens
        if seq.num_emitted_tokens == num_out and seq.reported_finish == seq.finished:
            continue
        if num_out > seq.num_emitted_tokens and request.first_token_time is None:
            request.first_token_time = time.monotonic()
        delta = msg.seqs.add(index=seq.index, token_ids=seq.output_token_ids_from(seq.num_emitted_tokens),
                             finish_reason=seq.finish_reason or "")
        if seq.logprobs is not None:
            delta.logprobs.extend(logprobs_to_proto(p) for p in seq.logprobs[seq.num_emitted_tokens:])
        if isinstance(seq.stop_reason, int):
            delta.stop_token_id = seq.stop_reason
        seq.num_emitted_tokens, seq.reported_finish = num_out, seq.finished
    if request.prompt_logprobs is not None and not request.prompt_logprobs_sent and any(d.token_ids for d in msg.seqs):
        msg.prompt_logprobs.extend(prompt_logprobs_to_proto(request.prompt_logprobs))
        request.prompt_logprobs_sent = True
    if request.finished:
        msg.arrival_time = request.arrival_time
        if request.scheduled_time is not None:
            msg.scheduled_time = request.scheduled_time
        if request.first_token_time is not None:
            msg.first_token_time = request.first_token_time
    exp = request.kv_export
    if exp is not None and exp.ready:
        for block in exp.ready:  # refs: held in the pool for a NIXL reader, until release_kv
            if isinstance(block, BlockRef):
                msg.kv_refs.append(ref_to_proto(block))
            else:
                msg.kv_blocks.append(block_to_proto(block))
        exp.ready = []
    imp = request.kv_import
    if imp is not None:
        if imp.state == "waiting" and not imp.announced:
            imp.announced = True
            msg.kv_pull_from_block = imp.num_cached_blocks
        msg.kv_import.CopyFrom(engine_pb2.CoreKVImport(
            state=imp.state, num_cached_blocks=imp.num_cached_blocks, num_prompt_blocks=imp.num_prompt_blocks,
            prefill_cached_tokens=imp.prefill_cached_tokens, computed_locally=imp.computed_locally,
            allocated_at=imp.allocated_at, failure=imp.failure or "", bytes_received=imp.bytes_received))
        if imp.completed_at is not None:
            msg.kv_import.completed_at = imp.completed_at
    return msg


if __name__ == "__main__":
    sys.exit(main())
