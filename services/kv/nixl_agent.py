"""NIXL agents and KV pools, with no gRPC: what both places an agent may live share (next to the
pool, so in the worker's process when its engine runs there, else in the engine-core process:
services/kv/nixl_core.py). The transport itself, over the Prefill stream, is nixl.py.

A reader posts one READ per burst of block references into a staging room registered with its
agent, then polls the transfer until it is done; the async wait (nixl.py) and the core's
polling thread (nixl_core.py) are the two ways of polling it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import secrets
import socket
import struct
from dataclasses import dataclass

import numpy as np
import torch

from pdserve.v1 import kv_pb2
from services.engine.kv_transfer import BlockData, BlockRef
from services.kv import wire
from services.kv.wire import PoolError

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
    collected closes its UCX endpoints. `agent` is None in the front of a worker whose agent
    lives in its engine-core process (nixl_core.py), which holds it there."""

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

    def start_read(self, remote: RemotePool, refs: list[BlockRef], staging: torch.Tensor, first: int) -> Read:
        """Post one NIXL READ of the peer's slots of `refs` into `staging[first:]`. Raise
        wire.KVWireError for a slot outside the peer's pool or more blocks than the room holds."""
        pool = remote.pool
        num_slots = pool.shape[2]
        block_size = self.block_shape[2]
        for ref in refs:
            if not 0 <= ref.pool_block < num_slots:
                raise wire.KVWireError(f"block {ref.block_index}: pool slot {ref.pool_block} outside [0, {num_slots})")
            if not 0 < ref.num_tokens <= block_size:
                raise wire.KVWireError(f"block {ref.block_index}: {ref.num_tokens} tokens in blocks of {block_size}")
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
            state = self.agent.transfer(handle)
        except BaseException:
            handle.release()
            raise
        blocks = [BlockData(ref.block_index, ref.block_hash, staging[first + i, :, :, : ref.num_tokens], ref.scales)
                  for i, ref in enumerate(refs)]
        return Read(handle, blocks, state)

    def poll(self, read: Read) -> str:
        """`read`'s state now: "PROC" (in flight), "DONE", or anything else (failed)."""
        if read.state == "PROC":
            try:
                read.state = self.agent.check_xfer_state(read.handle)
            except Exception as e:  # noqa: BLE001 - NIXL's own errors, e.g. the peer's agent unloaded meanwhile
                read.state = f"ERR: {e}"
        return read.state


@dataclass
class Read:
    """A posted READ: its NIXL handle (release it once done or given up), the blocks it fills
    (views of the staging room, valid once DONE) and its last known state."""

    handle: object
    blocks: list[BlockData]
    state: str
