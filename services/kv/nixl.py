"""NIXL KV transport: decode reads a prompt's blocks straight out of the prefill worker's KV pool
over UCX (NIXL's UCX backend: shared memory or TCP on one host, RDMA or CUDA transports where
the hardware has them), while the gRPC Prefill stream carries only control.

    prefill pool  [ .. ][ 7 ][ .. ][ 3 ][ .. ]     registered with prefill's agent; 7, 3 held
                          |         |
    stream        ref(block 2 -> slot 7), ref(block 3 -> slot 3), result    (control only)
                          v         v
    decode        NIXL READ of slots 7 and 3 (2 x layers descriptors each) into a registered
                  buffer, then into the decode pool; ReleaseKV frees 7 and 3 on prefill

At the handshake the prefill worker answers a NixlPool: its agent's metadata (UCX address and
the pool's remote keys), where the pool lies and its layout. Decode checks the layout against
its own (dtype, shape, contiguous tokens, every slot inside the registered storage) before
NIXL ever sees the metadata, and that NIXL names the loaded agent as announced; anything else
and that peer's blocks come as bytes over gRPC instead. The blocks' slots are held on the prefill
side exactly as for the same-GPU transport (cuda_ipc.py, KVExport.by_reference): from the
moment a stream names them until ReleaseKV, or until the hold timeout there.

Where the agent lives: with the pool. With the engine in the worker's process (--engine-process
off, or on a GPU with --kv-transport auto, for CUDA IPC) the agent is the worker's and the blocks
land in a staging room here, then go into the engine as received KV (LocalReads). With the engine
core in its own process (--engine-process on, the default) the agent lives in the core, beside
the pool (nixl_core.py): the front keeps the gRPC control stream and forwards the few operations
NIXL needs over the core's channel (load a peer's pool, READ these refs, end of pull), and the
core writes the blocks into its cache itself (EngineCoreReads); no KV crosses that channel.

UCX's data plane is not authenticated: whoever holds the metadata can read the registered pool.
So the metadata travels only inside the (mTLS) Handshake, and UCX's network transports are
bound to one interface (`bind_ucx`): the pod's or loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
import torch

from pdserve.v1 import kv_pb2, worker_pb2
from services.engine.kv_transfer import BlockData, BlockRef
from services.kv import nixl_agent, wire
from services.kv.cuda_ipc import CudaIpcKVTransport
from services.kv.nixl_agent import (NixlTransferError, RegisteredPool, RemotePool, bind_ucx, check_pool,  # noqa: F401
                                    interface_of, new_agent, nixl_api, register_pool)
from services.kv.nixl_core import CoreNixlClient
from services.kv.transport import PeerStalled, PlacedBlock
from services.kv.wire import PoolError

log = logging.getLogger("pdserve.kv")

class PoolReader(nixl_agent.PoolReader):
    """Decode's side in the worker's process: reads awaited on the event loop."""

    # Polls of a transfer's state between yields to the loop: short reads finish within them.
    SPIN = 16

    async def read(self, remote: RemotePool, refs: list[BlockRef], staging: torch.Tensor, first: int,
                   timeout: float | None) -> list[BlockData]:
        """Copy the peer's slots of `refs` into `staging[first:]` with one NIXL READ; raise
        NixlTransferError, or PeerStalled after `timeout` seconds without completion."""
        read = self.start_read(remote, refs, staging, first)
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            spins = 0
            while self.poll(read) == "PROC":
                if deadline is not None and time.monotonic() > deadline:
                    raise PeerStalled(f"a NIXL read did not complete within {timeout:g}s")
                spins += 1
                await asyncio.sleep(0 if spins < self.SPIN else 0.0005)
        finally:
            read.handle.release()
        if read.state != "DONE":
            raise NixlTransferError(f"NIXL read failed ({read.state})")
        return read.blocks


_END = object()


async def _bursts(items):
    """Lists of the items of async iterator `items` that arrived while the consumer was busy
    (at least one each), in order; its exception, if any, after the items before it."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in items:
                queue.put_nowait(item)
            queue.put_nowait(_END)
        except Exception as e:  # noqa: BLE001 - handed to the consumer, in order
            queue.put_nowait(e)

    task = asyncio.create_task(pump())
    try:
        while True:
            burst = [await queue.get()]
            while not queue.empty():
                burst.append(queue.get_nowait())
            end = next((i for i, item in enumerate(burst) if item is _END or isinstance(item, Exception)), None)
            if end is None:
                yield burst
                continue
            if end:
                yield burst[:end]
            if burst[end] is _END:
                return
            raise burst[end]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await items.aclose()


class LocalReads:
    """The agent in this process, beside the engine's pool: a pull's blocks land in a staging
    room registered once per pull, and go out as BlockData for the engine's put_kv."""

    def __init__(self, reader: PoolReader) -> None:
        self.reader = reader

    async def load(self, msg: kv_pb2.NixlPool) -> RemotePool:
        return self.reader.load(msg)

    def unload(self, remote: RemotePool) -> None:
        self.reader.unload(remote)

    def begin(self, request_id: str, num_blocks: int) -> tuple[torch.Tensor, object | None]:
        # Nothing to ship (decode caches every block): nothing to register; a ref is then an error.
        return self.reader.staging(num_blocks) if num_blocks > 0 else (torch.empty(0), None)

    async def read(self, pull, request_id: str, remote: RemotePool, refs: list[BlockRef], first: int,
                   timeout: float | None) -> list[BlockData]:
        return await self.reader.read(remote, refs, pull[0], first, timeout)

    def end(self, pull, request_id: str) -> None:
        if pull[1] is not None:
            self.reader.release(pull[1])


class EngineCoreReads:
    """The agent in the engine-core process, beside its pool (nixl_core.py): the core checks and
    loads peers' pools, runs the READs and writes the blocks into the request's cache slots
    itself; they go out as PlacedBlocks, counted but not put."""

    def __init__(self, client: CoreNixlClient, token_bytes: int) -> None:
        self.client = client
        self.token_bytes = token_bytes  # one token's K and V over all layers: a PlacedBlock's bytes

    async def load(self, msg: kv_pb2.NixlPool) -> RemotePool:
        await self.client.load(msg)
        return RemotePool(msg.agent_name, msg)

    def unload(self, remote: RemotePool) -> None:
        self.client.unload(remote.agent)

    def begin(self, request_id: str, num_blocks: int) -> int:
        return num_blocks  # the core makes the staging room at the first read

    async def read(self, pull: int, request_id: str, remote: RemotePool, refs: list[BlockRef], first: int,
                   timeout: float | None) -> list[PlacedBlock]:
        if first + len(refs) > pull:
            raise wire.KVWireError(f"more blocks than the prompt has ({first + len(refs)} > {pull})")
        answer = await self.client.read(request_id, remote.agent, refs, first, pull, timeout)
        if answer.stalled:
            raise PeerStalled(answer.error)
        if answer.error:
            raise NixlTransferError(answer.error)
        return [PlacedBlock(r.block_index, r.num_tokens * self.token_bytes) for r in refs]

    def end(self, pull: int, request_id: str) -> None:
        self.client.end(request_id)


class NixlKVTransport(CudaIpcKVTransport):
    """gRPC carries control, NIXL the blocks (see the module doc); per peer, CUDA IPC first
    when `cuda_ipc` and the peer's pool is on our GPU, else NIXL when the peer offers a pool
    we can load, else bytes over gRPC. `reads`: where the agent is (LocalReads, EngineCoreReads)."""

    want_nixl_pool = True

    def __init__(self, *args, reads: LocalReads | EngineCoreReads, cuda_ipc: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.want_kv_pool = cuda_ipc
        self.reads = reads
        self._remotes: dict[str, RemotePool] = {}  # peer id -> its pool, loaded into our agent

    async def _handshook(self, peer_id: str, response: worker_pb2.HandshakeResponse) -> None:
        await super()._handshook(peer_id, response)
        self._drop(peer_id)  # a re-handshake means the old metadata is stale
        if peer_id in self._pools or not response.HasField("nixl_pool"):
            return
        try:
            self._remotes[peer_id] = await self.reads.load(response.nixl_pool)
        except PoolError as e:
            log.warning("prefill %s: cannot use its NIXL pool (%s); shipping bytes over gRPC", peer_id, e)
            return
        log.info("prefill %s: KV over NIXL from its %s pool (%d blocks)", peer_id, response.nixl_pool.memory,
                 response.nixl_pool.shape[2])

    def _drop(self, peer_id: str) -> None:
        remote = self._remotes.pop(peer_id, None)
        if remote is not None:
            self.reads.unload(remote)

    def kind_for(self, peer_id: str) -> str:
        return "nixl" if peer_id in self._remotes else super().kind_for(peer_id)

    def forget(self, peer_id: str) -> None:
        self._drop(peer_id)
        super().forget(peer_id)

    async def pull(self, peer_id, request, timeout, fence=None):
        try:
            async with contextlib.aclosing(self._pull(peer_id, request, timeout, fence)) as items:
                async for item in items:
                    yield item
        except grpc.aio.AioRpcError as e:
            # Refused (e.g. restarted at the same address: our pool id is stale) or gone: what we
            # learnt at the handshake may be stale, so the next pull handshakes again.
            if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE):
                self.forget(peer_id)
            raise
        except (NixlTransferError, PeerStalled):
            self.forget(peer_id)  # its agent may be gone
            raise

    async def _pull(self, peer_id, request, timeout, fence):
        stub = await self._stub(peer_id, timeout)
        remote = self._remotes.get(peer_id)
        if remote is None:
            async with contextlib.aclosing(super().pull(peer_id, request, timeout, fence)) as items:
                async for item in items:
                    yield item
            return
        request.kv_by_reference, request.kv_pool_id = True, remote.pool.pool_id
        num_slots = remote.pool.shape[2]
        expected = -(-len(request.prompt_token_ids) // self.block_shape[2]) - request.skip_blocks
        pull = self.reads.begin(request.request_id, expected)
        used = 0
        # A READ that never completes (its peer died mid-transfer) is bounded like a silent stream.
        read_timeout = self.progress_timeout if self.progress_timeout is not None else timeout
        stream = self._stream(stub, request, timeout,
                              lambda msg: wire.decode_slot(msg, num_slots, self.block_shape, self.dtype))
        try:
            async with contextlib.aclosing(_bursts(stream)) as bursts:
                async for burst in bursts:  # the refs that arrived meanwhile: one READ for all of them
                    refs = [item for item in burst if isinstance(item, BlockRef)]
                    if refs:
                        for block in await self.reads.read(pull, request.request_id, remote, refs, used,
                                                           read_timeout):
                            yield block
                        used += len(refs)
                    for item in burst:
                        if not isinstance(item, BlockRef):
                            yield item
        finally:
            self.reads.end(pull, request.request_id)
            # Our copies are done when read() returns: the slots can go back at once.
            await self._release(peer_id, stub, request.request_id, None)

    async def close(self) -> None:
        for peer_id in list(self._remotes):
            self._drop(peer_id)
        await super().close()
