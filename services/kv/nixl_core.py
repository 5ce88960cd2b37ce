"""NIXL in the engine-core process (`--kv-transport nixl` with `--engine-process on`): the agent
lives next to the KV pool it serves, the worker's front keeps the gRPC control stream.

    decode front (gRPC, Prefill stream)              decode core (this module)
      Handshake -> NixlPool ──── nixl_load ────────>   check it, load the peer's agent
      refs of a burst       ──── nixl_read ────────>   one READ into the request's staging room,
                                                       polled here, off the step loop; once DONE
                                                       each block -> inbox (put_kv), then:
      PlacedBlocks, ReleaseKV <─ CoreNixlAnswer ────
      stream over           ──── nixl_end ─────────>   the staging room goes

A prefill core only registers its pool at start (CoreReady.nixl_pool) and exports blocks by
reference; its front ships the refs and relays ReleaseKV (release_kv). Commands carry block refs
as plain fields (CoreBlockRef), never pickles; the peer's metadata is checked here against this
core's layout before NIXL sees it, exactly as in the worker's process (nixl_agent.PoolReader.load).

One thread owns the agent's reads: it posts READs and polls them, so a slow or dead peer stalls
neither the step loop nor the channel's reader.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.v1 import engine_pb2, kv_pb2
from services.engine.kv_transfer import BlockData, BlockRef
from services.kv import wire
from services.kv.nixl_agent import PoolReader, Read, RemotePool

log = logging.getLogger("pdserve.kv")

# Between polls of in-flight READs when none progressed (UCX over shared memory finishes a
# burst in tens of microseconds; a network READ in far more).
POLL_INTERVAL_S = 0.0002


def ref_from_proto(msg: engine_pb2.CoreBlockRef) -> BlockRef:
    scales = torch.tensor(list(msg.scales), dtype=torch.float32).view(-1, 2) if msg.scales else None
    return BlockRef(msg.block_index, msg.block_hash if msg.HasField("block_hash") else None, msg.num_tokens,
                    msg.pool_block, scales)


def ref_to_proto(ref: BlockRef) -> engine_pb2.CoreBlockRef:
    msg = engine_pb2.CoreBlockRef(block_index=ref.block_index, num_tokens=ref.num_tokens, pool_block=ref.pool_block)
    if ref.block_hash is not None:
        msg.block_hash = ref.block_hash
    if ref.scales is not None:
        msg.scales.extend(ref.scales.flatten().tolist())
    return msg


@dataclass
class _Room:
    """A pull's staging room, registered with the agent until the pull ends and no READ into it
    is in flight."""

    tensor: torch.Tensor
    registration: object
    in_flight: int = 0
    ended: bool = False


@dataclass
class _Pending:
    command: engine_pb2.CoreNixlRead
    read: Read
    deadline: float | None


class CoreReads:
    """Decode's NIXL reads in the core process. `put(request_id, block)` hands a block that
    landed to the step loop (as a received KV block); `answer(msg)` tells the front."""

    def __init__(self, reader: PoolReader, put: Callable[[str, BlockData], None],
                 answer: Callable[[engine_pb2.CoreNixlAnswer], None]) -> None:
        self.reader = reader
        self.put = put
        self.answer = answer
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._remotes: dict[str, RemotePool] = {}  # agent name -> the peer's checked pool
        self._rooms: dict[str, _Room] = {}  # request id -> its staging room
        self._pending: list[_Pending] = []
        threading.Thread(target=self._run, name="pdserve-core-nixl", daemon=True).start()

    def submit(self, command: engine_pb2.CoreCommand) -> None:
        """A nixl_* command, from the channel's reader thread."""
        self._commands.put(command)

    def _run(self) -> None:
        while True:
            try:
                command = self._commands.get(timeout=POLL_INTERVAL_S) if self._pending else self._commands.get()
            except queue.Empty:
                command = None
            while command is not None:
                try:
                    self._handle(command)
                except Exception as e:  # noqa: BLE001 - this thread serves every pull: it must not die
                    log.exception("NIXL command %s failed", command.WhichOneof("command"))
                    msg = getattr(command, command.WhichOneof("command"))
                    if isinstance(msg, (engine_pb2.CoreNixlLoad, engine_pb2.CoreNixlRead)):
                        self.answer(engine_pb2.CoreNixlAnswer(id=msg.id, error=f"{type(e).__name__}: {e}"))
                command = None if self._commands.empty() else self._commands.get_nowait()
            self._poll()

    def _handle(self, command: engine_pb2.CoreCommand) -> None:
        kind = command.WhichOneof("command")
        if kind == "nixl_load":
            self._load(command.nixl_load)
        elif kind == "nixl_unload":
            remote = self._remotes.pop(command.nixl_unload, None)
            if remote is not None:
                self.reader.unload(remote)
        elif kind == "nixl_read":
            self._read(command.nixl_read)
        elif kind == "nixl_end":
            room = self._rooms.get(command.nixl_end)
            if room is not None:
                room.ended = True
                self._drop_room(command.nixl_end, room)

    def _load(self, msg: engine_pb2.CoreNixlLoad) -> None:
        old = self._remotes.pop(msg.pool.agent_name, None)
        if old is not None:  # loaded again: the front re-handshook the same peer
            self.reader.unload(old)
        try:
            self._remotes[msg.pool.agent_name] = self.reader.load(msg.pool)
        except wire.PoolError as e:
            self.answer(engine_pb2.CoreNixlAnswer(id=msg.id, error=str(e)))
            return
        self.answer(engine_pb2.CoreNixlAnswer(id=msg.id))

    def _read(self, msg: engine_pb2.CoreNixlRead) -> None:
        remote = self._remotes.get(msg.agent_name)
        if remote is None:
            self.answer(engine_pb2.CoreNixlAnswer(id=msg.id, error=f"no NIXL agent {msg.agent_name!r} loaded"))
            return
        try:
            room = self._room(msg.request_id, msg.num_blocks)
            refs = [ref_from_proto(r) for r in msg.refs]
            read = self.reader.start_read(remote, refs, room.tensor, msg.first)
        except (wire.KVWireError, ValueError, RuntimeError) as e:  # RuntimeError: NIXL refused the READ
            self.answer(engine_pb2.CoreNixlAnswer(id=msg.id, error=str(e)))
            return
        room.in_flight += 1
        deadline = time.monotonic() + msg.timeout_s if msg.timeout_s > 0 else None
        self._pending.append(_Pending(msg, read, deadline))

    def _room(self, request_id: str, num_blocks: int) -> _Room:
        room = self._rooms.get(request_id)
        if room is None:
            if num_blocks < 1:
                raise ValueError(f"a staging room of {num_blocks} blocks")
            tensor, registration = self.reader.staging(num_blocks)
            room = self._rooms[request_id] = _Room(tensor, registration)
        return room

    def _drop_room(self, request_id: str, room: _Room) -> None:
        if room.ended and room.in_flight == 0:
            self.reader.release(room.registration)
            del self._rooms[request_id]

    def _poll(self) -> None:
        still = []
        for pending in self._pending:
            state = self.reader.poll(pending.read)
            stalled = state == "PROC" and pending.deadline is not None and time.monotonic() > pending.deadline
            if state == "PROC" and not stalled:
                still.append(pending)
                continue
            self._finish(pending, state, stalled)
        self._pending = still

    def _finish(self, pending: _Pending, state: str, stalled: bool) -> None:
        msg = pending.command
        try:
            pending.read.handle.release()
        except Exception as e:  # noqa: BLE001 - a failed READ's handle may be gone with its peer
            log.debug("releasing the NIXL READ of request %s: %s", msg.request_id, e)
        room = self._rooms[msg.request_id]
        room.in_flight -= 1
        if state == "DONE":
            for block in pending.read.blocks:  # into the inbox before the answer: ahead of finish_kv
                self.put(msg.request_id, block)
            self.answer(engine_pb2.CoreNixlAnswer(id=msg.id))
        elif stalled:
            self.answer(engine_pb2.CoreNixlAnswer(id=msg.id, stalled=True,
                                                  error=f"a NIXL read did not complete within {msg.timeout_s:g}s"))
        else:
            self.answer(engine_pb2.CoreNixlAnswer(id=msg.id, error=f"NIXL read failed ({state})"))
        self._drop_room(msg.request_id, room)


class CoreNixlClient:
    """The front's end (core_client.EngineProcess.nixl): the transport's few NIXL operations,
    forwarded to the core as commands, their answers awaited on the caller's event loop.
    `command(**fields)` queues one CoreCommand."""

    def __init__(self, command: Callable[..., None]) -> None:
        self._command = command
        self._ids = itertools.count(1)
        self._waiters: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._dead: BaseException | None = None

    async def load(self, pool: kv_pb2.NixlPool) -> None:
        """Load a peer's pool into the core's agent; raise wire.PoolError when the core refuses it."""
        answer = await self._ask(lambda i: self._command(nixl_load=engine_pb2.CoreNixlLoad(id=i, pool=pool)))
        if answer.error:
            raise wire.PoolError(answer.error)

    def unload(self, agent_name: str) -> None:
        self._command(nixl_unload=agent_name)

    async def read(self, request_id: str, agent_name: str, refs: list[BlockRef], first: int, num_blocks: int,
                   timeout: float | None) -> engine_pb2.CoreNixlAnswer:
        """One READ of `refs` into the request's cache, through its staging room at `first`."""
        return await self._ask(lambda i: self._command(nixl_read=engine_pb2.CoreNixlRead(
            id=i, request_id=request_id, agent_name=agent_name, first=first, num_blocks=num_blocks,
            refs=[ref_to_proto(r) for r in refs], timeout_s=timeout or 0.0)))

    def end(self, request_id: str) -> None:
        self._command(nixl_end=request_id)

    async def _ask(self, send: Callable[[int], None]) -> engine_pb2.CoreNixlAnswer:
        if self._dead is not None:
            raise self._dead
        loop = asyncio.get_running_loop()
        answer_id = next(self._ids)
        future = loop.create_future()
        self._waiters[answer_id] = (loop, future)
        try:
            send(answer_id)
            return await future
        finally:
            self._waiters.pop(answer_id, None)

    def answered(self, answers) -> None:
        """The core's answers (the front's reader thread)."""
        for answer in answers:
            waiter = self._waiters.get(answer.id)
            if waiter is not None:
                waiter[0].call_soon_threadsafe(lambda f=waiter[1], a=answer: f.done() or f.set_result(a))

    def fail(self, error: BaseException) -> None:
        """The core is gone: every wait ends with `error`."""
        self._dead = error
        for loop, future in list(self._waiters.values()):
            loop.call_soon_threadsafe(lambda f=future: f.done() or f.set_exception(error))
