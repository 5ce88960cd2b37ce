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

Where the agent lives: with the pool. A worker whose engine core runs in a child process
(--engine-process on) has its pool there, so `--kv-transport nixl` keeps the core in the worker
process, as CUDA IPC does; the agent then registers the pool the engine computes into, and
nothing goes through the core's socket.

UCX's data plane is not authenticated: whoever holds the metadata can read the registered pool.
So the metadata travels only inside the (mTLS) Handshake, and UCX's network transports are
bound to one interface (`bind_ucx`): the pod's or loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import os
import secrets
import socket
import struct
import time
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from pdserve.v1 import kv_pb2, worker_pb2
from services.engine.kv_transfer import BlockData, BlockRef
from services.kv import wire
from services.kv.cuda_ipc import CudaIpcKVTransport, PoolError
from services.kv.transport import PeerStalled

log = logging.getLogger("pdserve.kv")

_SIOCGIFADDR = 0x8915


class NixlTransferError(wire.KVWireError):
    """A NIXL read failed; the request recomputes locally and the peer is handshaken again."""


def nixl_api():
    """NIXL's Python API (nixl-cu13), or None when it is not installed."""
    try:
        from nixl_cu13 import _api
    except ImportError:
        return None
    return _api


def interface_of(host: str) -> str:
    """The network interface holding `host`'s IPv4 address (a name or an address)."""
    address = socket.gethostbyname(host)
    if ipaddress.ip_address(address).is_loopback:
        return "lo"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address
                continue
            if socket.inet_ntoa(packed[20:24]) == address:
                return name
    raise ValueError(f"no network interface holds {host} ({address})")


def bind_ucx(host: str) -> str:
    """Confine UCX's network transports to the interface of `host` (the pod's or loopback
    address) before the first agent starts; an explicit UCX_NET_DEVICES wins."""
    device = interface_of(host)
    os.environ.setdefault("UCX_NET_DEVICES", device)
    return os.environ["UCX_NET_DEVICES"]


def new_agent(role: str, instance_id: str):
    """This process's NIXL agent with the UCX backend. Its name is unique per start, so a
    restarted worker is never mistaken for the one its peers knew."""
    api = nixl_api()
    if api is None:
        raise RuntimeError("NIXL is not installed (nixl-cu13, in the lock)")
    name = f"{role}-{instance_id}-{secrets.token_hex(8)}"
    agent = api.nixl_agent(name, api.nixl_agent_config(backends=["UCX"]))
    if "UCX" not in agent.backends:
        raise RuntimeError("NIXL has no UCX backend here")
    return agent


def _memory(t: torch.Tensor) -> tuple[str, int]:
    return ("VRAM", t.device.index or 0) if t.device.type == "cuda" else ("DRAM", 0)


@dataclass(frozen=True)
class RegisteredPool:
    """A pool registered with an agent for good (as long as the worker lives), and its
    announcement for the handshake. Holding it holds the agent: an agent that is garbage
    collected closes its UCX endpoints."""

    agent: object
    announcement: kv_pb2.NixlPool


def register_pool(agent, pool: torch.Tensor) -> RegisteredPool:
    """Register `pool` ([layers, 2, num_blocks, block_size, heads, dim]) with `agent`."""
    if not pool.is_contiguous():
        raise ValueError("the KV pool must be contiguous to register it")
    agent.register_memory(pool)
    memory, device_id = _memory(pool)
    return RegisteredPool(agent, kv_pb2.NixlPool(
        agent_name=agent.name,
        agent_metadata=agent.get_agent_metadata(),
        base_address=pool.data_ptr(),
        storage_bytes=pool.numel() * pool.element_size(),
        memory=memory,
        device_id=device_id,
        dtype=wire.DTYPE_NAMES[pool.dtype],
        shape=list(pool.shape),
        stride=list(pool.stride()),
        pool_id=secrets.randbits(64),
    ))


def check_pool(msg: kv_pb2.NixlPool, block_shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Raise PoolError unless `msg` describes a pool of `block_shape` ([layers, 2, block_size,
    heads, dim]) blocks of `dtype`, each token's K or V contiguous, inside its storage."""
    if not msg.agent_name or not msg.agent_metadata:
        raise PoolError("no NIXL agent metadata")
    if msg.memory not in ("DRAM", "VRAM"):
        raise PoolError(f"unknown memory kind {msg.memory!r}")
    if wire.DTYPES.get(msg.dtype) != dtype:
        raise PoolError(f"pool dtype {msg.dtype!r}, ours {dtype}")
    shape, stride = tuple(msg.shape), tuple(msg.stride)
    layers, kv, block_size, heads, dim = block_shape
    if len(shape) != 6 or len(stride) != 6 or shape[:2] + shape[3:] != (layers, kv, block_size, heads, dim) \
            or shape[2] < 1:
        raise PoolError(f"pool shape {shape} does not hold blocks of {block_shape}")
    if stride[3:] != (heads * dim, dim, 1):
        raise PoolError(f"pool strides {stride}: a block's tokens are not contiguous")
    last = sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    if min(stride) < 0 or (last + 1) * dtype.itemsize > msg.storage_bytes or msg.base_address == 0:
        raise PoolError(f"pool shape {shape} with strides {stride} overruns its {msg.storage_bytes}-byte storage")


@dataclass(frozen=True)
class RemotePool:
    agent: str  # the peer's agent name, as loaded into ours
    pool: kv_pb2.NixlPool


class PoolReader:
    """Decode's side: the peers' pools loaded into this process's agent, and block reads out of them."""

    # Polls of a transfer's state between yields to the loop: short reads finish within them.
    SPIN = 16

    def __init__(self, agent, device: torch.device, block_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.agent = agent
        self.device = device
        self.block_shape = block_shape
        self.dtype = dtype

    def load(self, msg: kv_pb2.NixlPool) -> RemotePool:
        """Check the peer's pool and load its agent; raise PoolError when unusable."""
        check_pool(msg, self.block_shape, self.dtype)
        try:
            name = self.agent.add_remote_agent(msg.agent_metadata)
        except Exception as e:  # noqa: BLE001 - NIXL raises its own (nixlBind) errors for bad metadata
            raise PoolError(f"NIXL refused the agent metadata: {e}") from e
        name = name.decode() if isinstance(name, bytes) else name
        if name != msg.agent_name:
            self.agent.remove_remote_agent(name)
            raise PoolError(f"the metadata names agent {name!r}, the handshake {msg.agent_name!r}")
        return RemotePool(name, msg)

    def unload(self, remote: RemotePool) -> None:
        try:
            self.agent.remove_remote_agent(remote.agent)
        except Exception as e:  # noqa: BLE001 - already gone: nothing to drop
            log.debug("removing NIXL agent %s: %s", remote.agent, e)

    def _descriptors(self, base: int, strides: tuple[int, ...], device_id: int,
                     refs: list[BlockRef], slots: list[int]) -> np.ndarray:
        """One (address, bytes, device) row per block, layer and K/V: that block's first num_tokens tokens."""
        layers = self.block_shape[0]
        element = self.dtype.itemsize
        layer_kv = np.arange(layers * 2)
        rows = []
        for ref, slot in zip(refs, slots, strict=True):
            offsets = (layer_kv // 2) * strides[0] + (layer_kv % 2) * strides[1] + slot * strides[2]
            lengths = np.full(layers * 2, ref.num_tokens * strides[3] * element)
            rows.append(np.stack([base + offsets * element, lengths, np.full(layers * 2, device_id)], axis=1))
        return np.concatenate(rows).astype(np.uint64)

    def staging(self, num_blocks: int) -> tuple[torch.Tensor, object]:
        """Room for a pull's `num_blocks` blocks, registered with our agent (registered once per
        pull, not per read): the tensor and its registration, for `release`."""
        layers, kv, block_size, heads, dim = self.block_shape
        tensor = torch.empty((num_blocks, layers, kv, block_size, heads, dim), dtype=self.dtype, device=self.device)
        return tensor, self.agent.register_memory(tensor)

    def release(self, registration) -> None:
        """Deregister a staging buffer; the blocks handed out of it stay valid (torch owns the memory)."""
        self.agent.deregister_memory(registration)

    async def read(self, remote: RemotePool, refs: list[BlockRef], staging: torch.Tensor, first: int,
                   timeout: float | None) -> list[BlockData]:
        """Copy the peer's slots of `refs` into `staging[first:]` with one NIXL READ; raise
        NixlTransferError, or PeerStalled after `timeout` seconds without completion."""
        pool = remote.pool
        num_slots = pool.shape[2]
        for ref in refs:
            if not 0 <= ref.pool_block < num_slots:
                raise wire.KVWireError(f"block {ref.block_index}: pool slot {ref.pool_block} outside [0, {num_slots})")
        if first + len(refs) > staging.shape[0]:
            raise wire.KVWireError(f"more blocks than the prompt has ({first + len(refs)} > {staging.shape[0]})")
        s = staging.stride()
        memory, device_id = _memory(staging)
        local = self._descriptors(staging.data_ptr(), (s[1], s[2], s[0], s[3]), device_id, refs,
                                  list(range(first, first + len(refs))))
        remote_rows = self._descriptors(pool.base_address, tuple(pool.stride), pool.device_id, refs,
                                        [r.pool_block for r in refs])
        handle = self.agent.initialize_xfer("READ", self.agent.get_xfer_descs(local, memory),
                                            self.agent.get_xfer_descs(remote_rows, pool.memory), remote.agent)
        try:
            await self._wait(handle, timeout)
        finally:
            handle.release()
        return [BlockData(ref.block_index, ref.block_hash, staging[first + i, :, :, : ref.num_tokens], ref.scales)
                for i, ref in enumerate(refs)]

    async def _wait(self, handle, timeout: float | None) -> None:
        state = self.agent.transfer(handle)
        deadline = None if timeout is None else time.monotonic() + timeout
        spins = 0
        while state == "PROC":
            if deadline is not None and time.monotonic() > deadline:
                raise PeerStalled(f"a NIXL read did not complete within {timeout:g}s")
            spins += 1
            await asyncio.sleep(0 if spins < self.SPIN else 0.0005)
            state = self.agent.check_xfer_state(handle)
        if state != "DONE":
            raise NixlTransferError(f"NIXL read failed ({state})")


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


class NixlKVTransport(CudaIpcKVTransport):
    """gRPC carries control, NIXL the blocks (see the module doc); per peer, CUDA IPC first
    when `cuda_ipc` and the peer's pool is on our GPU, else NIXL when the peer offers a pool
    we can load, else bytes over gRPC."""

    want_nixl_pool = True

    def __init__(self, *args, reader: PoolReader, cuda_ipc: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.want_kv_pool = cuda_ipc
        self.reader = reader
        self._remotes: dict[str, RemotePool] = {}  # peer id -> its pool, loaded into our agent

    def _handshook(self, peer_id: str, response: worker_pb2.HandshakeResponse) -> None:
        super()._handshook(peer_id, response)
        self._drop(peer_id)  # a re-handshake means the old metadata is stale
        if peer_id in self._pools or not response.HasField("nixl_pool"):
            return
        try:
            self._remotes[peer_id] = self.reader.load(response.nixl_pool)
        except PoolError as e:
            log.warning("prefill %s: cannot use its NIXL pool (%s); shipping bytes over gRPC", peer_id, e)
            return
        log.info("prefill %s: KV over NIXL from its %s pool (%d blocks)", peer_id, response.nixl_pool.memory,
                 response.nixl_pool.shape[2])

    def _drop(self, peer_id: str) -> None:
        remote = self._remotes.pop(peer_id, None)
        if remote is not None:
            self.reader.unload(remote)

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
        # Nothing to ship (decode caches every block): nothing to register; a ref is then an error.
        staging, registration = self.reader.staging(expected) if expected > 0 else (torch.empty(0), None)
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
                        for block in await self.reader.read(remote, refs, staging, used, read_timeout):
                            yield block
                        used += len(refs)
                    for item in burst:
                        if not isinstance(item, BlockRef):
                            yield item
        finally:
            if registration is not None:
                self.reader.release(registration)
            # Our copies are done when read() returns: the slots can go back at once.
            await self._release(peer_id, stub, request.request_id, None)

    async def close(self) -> None:
        for peer_id in list(self._remotes):
            self._drop(peer_id)
        await super().close()
