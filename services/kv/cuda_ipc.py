"""Same-GPU KV transport: decode copies blocks straight out of the prefill worker's KV pool.

At the handshake, a prefill worker exports its whole pool once as a CUDA IPC handle (KVPool:
the fields torch's UntypedStorage._share_cuda_() returns, as plain protobuf bytes and ints;
nothing is unpickled). A decode worker whose own device is that GPU maps the pool once per
peer. From then on, the Prefill stream carries block references (KVBlock.pool_block) instead
of bytes: for each one the decode engine copies the slot's K and V into its own cache on the
device, and afterwards tells prefill it may reuse the slots (ReleaseKV).

    prefill pool  [ .. ][ 7 ][ .. ][ 3 ][ .. ]     prefill holds 7 and 3 until ReleaseKV
                          |         |
    stream        ref(block 2 -> slot 7), ref(block 3 -> slot 3), result
                          v         v
    decode cache  [ 5 ][ 9 ]                       device-to-device copies, then ReleaseKV

The slots a stream names stay allocated on the prefill side from the moment they are named
until ReleaseKV, or until a timeout there when decode never says (it died): a slot is never
reused while decode may still be reading it. Decode says so only after a fence: every copy it
queued has finished on the device.

Peers on another GPU (or on the CPU) get bytes over gRPC as before: this transport falls back
per peer. Mapping a pool on a second GPU would need peer access between the two devices, and
pdserve's placement shows each worker only its own GPU, so that case is not attempted.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable

import grpc
import torch

from pdserve.v1 import kv_pb2, worker_pb2
from services.engine.kv_transfer import BlockData
from services.kv import wire
from services.kv.transport import GrpcKVTransport
from services.kv.wire import PoolError

log = logging.getLogger("pdserve.kv")

RELEASE_TIMEOUT_S = 5.0

def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def export_pool(pool: torch.Tensor) -> kv_pb2.KVPool | None:
    """`pool` ([layers, 2, num_blocks, block_size, heads, dim], on a GPU) as a KVPool; None on the CPU."""
    if pool.device.type != "cuda":
        return None
    if pool.storage_offset() != 0:
        raise ValueError("the KV pool must start its storage")
    device, handle, size, offset, counter, counter_offset, event, event_sync = pool.untyped_storage()._share_cuda_()
    return kv_pb2.KVPool(
        device_uuid=device_uuid(pool.device),
        ipc_handle=handle,
        storage_bytes=size,
        storage_offset=offset,
        ref_counter_handle=counter,
        ref_counter_offset=counter_offset,
        event_handle=event or b"",
        event_sync_required=event_sync,
        dtype=wire.DTYPE_NAMES[pool.dtype],
        shape=list(pool.shape),
        stride=list(pool.stride()),
        pool_id=secrets.randbits(64),
    )


def check_pool(msg: kv_pb2.KVPool, block_shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Raise PoolError unless `msg` is a pool of `block_shape` ([layers, 2, block_size, heads,
    dim]) blocks of `dtype` whose every element lies inside the exported storage."""
    if wire.DTYPES.get(msg.dtype) != dtype:
        raise PoolError(f"pool dtype {msg.dtype!r}, ours {dtype}")
    shape, stride = tuple(msg.shape), tuple(msg.stride)
    layers, kv, block_size, heads, dim = block_shape
    if len(shape) != 6 or len(stride) != 6 or shape[:2] + shape[3:] != (layers, kv, block_size, heads, dim) \
            or shape[2] < 1:
        raise PoolError(f"pool shape {shape} does not hold blocks of {block_shape}")
    last = sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    if min(stride) < 0 or (last + 1) * torch.empty((), dtype=dtype).element_size() > msg.storage_bytes:
        raise PoolError(f"pool shape {shape} with strides {stride} overruns its {msg.storage_bytes}-byte storage")


def open_pool(msg: kv_pb2.KVPool, block_shape: tuple[int, ...], dtype: torch.dtype,
              device: torch.device) -> torch.Tensor | None:
    """Map a peer's pool into this process; None when it lives on another GPU than `device`."""
    if device.type != "cuda" or msg.device_uuid != device_uuid(device):
        return None
    check_pool(msg, block_shape, dtype)
    index = device.index if device.index is not None else torch.cuda.current_device()
    storage = torch.UntypedStorage._new_shared_cuda(
        index, msg.ipc_handle, msg.storage_bytes, msg.storage_offset, msg.ref_counter_handle,
        msg.ref_counter_offset, msg.event_handle, msg.event_sync_required,
    )
    return torch.empty(0, dtype=dtype, device=torch.device("cuda", index)).set_(
        storage, 0, tuple(msg.shape), tuple(msg.stride))


PoolOpener = Callable[[kv_pb2.KVPool], torch.Tensor | None]


class CudaIpcKVTransport(GrpcKVTransport):
    """gRPC carries the control stream; K and V move device to device (see the module doc).

    `device` is this worker's cache device. `open` maps a handshake's KVPool (tests of the
    protocol on the CPU pass their own); by default, `open_pool` on `device`."""

    want_kv_pool = True

    def __init__(self, *args, device: torch.device, open: PoolOpener | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._open = open or (lambda msg: open_pool(msg, self.block_shape, self.dtype, device))
        self._pools: dict[str, tuple[torch.Tensor, int]] = {}  # peer id -> its mapped pool and pool id

    async def _handshook(self, peer_id: str, response: worker_pb2.HandshakeResponse) -> None:
        self._pools.pop(peer_id, None)  # a restarted peer has a new pool; the old mapping goes
        if not response.HasField("kv_pool"):
            return
        try:
            pool = self._open(response.kv_pool)
        except (PoolError, RuntimeError) as e:  # RuntimeError: the CUDA driver refused the handle
            log.warning("prefill %s: cannot map its KV pool (%s); shipping bytes", peer_id, e)
            return
        if pool is not None:
            self._pools[peer_id] = (pool, response.kv_pool.pool_id)
            log.info("prefill %s: KV by reference from its pool on this GPU (%d blocks)", peer_id, pool.shape[2])

    def kind_for(self, peer_id: str) -> str:
        return "cuda_ipc" if peer_id in self._pools else "grpc"

    def forget(self, peer_id: str) -> None:
        """Drop the peer's mapping; the next pull handshakes (and maps its pool) again."""
        self._pools.pop(peer_id, None)
        self._checked.discard(peer_id)

    async def pull(self, peer_id, request, timeout, fence=None):
        stub = await self._stub(peer_id, timeout)
        mapped = self._pools.get(peer_id)
        if mapped is None:
            async for item in self._stream(stub, request, timeout, self._decode_bytes):
                yield item
            return
        pool, pool_id = mapped
        request.kv_by_reference, request.kv_pool_id = True, pool_id
        handed_out = 0
        try:
            async for item in self._stream(
                stub, request, timeout, lambda msg: wire.decode_ref(msg, pool, self.block_shape, self.dtype)
            ):
                handed_out += isinstance(item, BlockData)
                yield item
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:  # e.g. restarted at the same address
                self.forget(peer_id)
            raise
        finally:
            await self._release(peer_id, stub, request.request_id, fence if handed_out else None)

    async def _release(self, peer_id: str, stub, request_id: str,
                       fence: Callable[[], Awaitable[None]] | None) -> None:
        """Once our copies are done, let the peer reuse the slots. If we cannot say so, the
        peer frees them at its hold timeout."""
        try:
            if fence is not None:
                await fence()
            await stub.ReleaseKV(worker_pb2.ReleaseKVRequest(request_id=request_id), timeout=RELEASE_TIMEOUT_S)
        except (asyncio.TimeoutError, grpc.aio.AioRpcError) as e:
            log.warning("request %s: could not release the KV held by prefill %s (%s); it frees it itself "
                        "after its hold timeout", request_id, peer_id, e)
