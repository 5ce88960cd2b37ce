"""Moving a prompt's KV from a prefill worker to a decode worker.

`KVTransport` is the decode side's view: ask a peer (named by instance id) to prefill a
prompt, receive its blocks as they are computed, then the first sampled tokens. The gRPC
stream carries the bytes here; on one GPU, cuda_ipc.py's transport carries references over
the same stream and copies device to device. Addresses come from this worker's own
configuration (--prefill-peers) or the fleet registry, never from a request.

A peer that is alive but stalled (frozen, or its engine stuck) must not hold a request for as
long as the client waits: with `progress_timeout`, a pull that receives nothing for that long
raises PeerStalled and cancels the call (the caller bounds the whole pull with `timeout`).
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import torch

from pdserve.v1 import worker_pb2, worker_pb2_grpc
from services.engine.kv_transfer import BlockData
from services.engine.outputs import Logprob, SampledToken
from services.kv import wire
from services.kv.layerwise import BlockAssembler
from services.rpc.convert import prompt_logprobs_from_proto, sampled_token
from services.rpc.security import TLSFiles, internal_channel
from services.rpc.server import CHANNEL_OPTIONS, request_metadata

log = logging.getLogger("pdserve.kv")


class PeerError(Exception):
    """The named prefill peer is unknown or cannot exchange KV with us."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION) -> None:
        super().__init__(message)
        self.code = code


class PeerStalled(Exception):
    """The prefill peer sent nothing within the progress timeout."""


@dataclass(frozen=True)
class PrefillDone:
    first_tokens: list[SampledToken]  # one per sequence, in index order
    cached_tokens: int  # prompt tokens the prefill worker found in its own prefix cache
    # prompt_logprobs, when the request asked: one per prompt token (the first None)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclass(frozen=True)
class PlacedBlock:
    """A block the transport wrote into the engine's cache itself (NIXL reading into an
    engine-core process, services/kv/nixl_core.py): the caller counts it and puts nothing."""

    block_index: int
    nbytes: int


Fence = Callable[[], Awaitable[None]]


class KVTransport(ABC):
    @abstractmethod
    def pull(
        self, peer_id: str, request: worker_pb2.PrefillRequest, timeout: float | None, fence: Fence | None = None
    ) -> AsyncIterator[BlockData | PlacedBlock | PrefillDone]:
        """Blocks as the peer computes them (or, once placed in the engine, PlacedBlocks), then one PrefillDone. Raises PeerError,
        wire.KVWireError (a corrupt block), PeerStalled or grpc.aio.AioRpcError
        (DEADLINE_EXCEEDED after `timeout`).

        `fence` returns once every block handed out so far is in the caller's cache. A
        transport whose blocks are views of the peer's memory awaits it before the peer may
        reuse that memory, so close the iterator (contextlib.aclosing) rather than drop it."""

    def kind_for(self, peer_id: str) -> str:
        """How blocks from `peer_id` travel (after a pull from it began): "grpc", "cuda_ipc" or "nixl"."""
        return "grpc"

    async def close(self) -> None:
        return None


class GrpcKVTransport(KVTransport):
    want_kv_pool = False  # ask prefill for its KV pool at the handshake (cuda_ipc.py)
    want_nixl_pool = False  # ask for its NIXL agent and pool (nixl.py)

    def __init__(
        self,
        peers: dict[str, str],
        instance_id: str,
        identity: worker_pb2.ModelIdentity,
        block_shape: tuple[int, ...],
        dtype: torch.dtype,
        resolve: Callable[[str], Awaitable[str | None]] | None = None,
        tls: TLSFiles | None = None,
        progress_timeout: float | None = None,
    ) -> None:
        """`peers`: static id -> address; `resolve`: the address of any other id (the fleet registry);
        `tls`: the internal credentials prefill workers require (None: plaintext);
        `progress_timeout`: the longest wait for the peer's next message (None: no limit)."""
        self.peers = peers
        self.progress_timeout = progress_timeout
        self.tls = tls
        self.resolve = resolve
        self.instance_id = instance_id
        self.identity = identity
        self.block_shape = block_shape  # [layers, 2, block_size, kv_heads, head_dim]
        self.dtype = dtype
        self._stubs: dict[str, tuple[str, worker_pb2_grpc.PrefillWorkerStub]] = {}  # id -> (address, stub)
        self._channels: list[grpc.aio.Channel] = []
        self._checked: set[str] = set()
        self._lock = asyncio.Lock()

    async def _address(self, peer_id: str) -> str | None:
        address = self.peers.get(peer_id)
        if address is None and self.resolve is not None:
            address = await self.resolve(peer_id)
        return address

    async def _stub(self, peer_id: str, timeout: float | None) -> worker_pb2_grpc.PrefillWorkerStub:
        async with self._lock:
            address = await self._address(peer_id)
            if address is None:
                raise PeerError(f"unknown prefill instance {peer_id!r}", grpc.StatusCode.INVALID_ARGUMENT)
            if self._stubs.get(peer_id, ("", None))[0] != address:  # new, or restarted elsewhere
                channel = internal_channel(address, self.tls, CHANNEL_OPTIONS)
                self._channels.append(channel)
                self._stubs[peer_id] = (address, worker_pb2_grpc.PrefillWorkerStub(channel))
                self._checked.discard(peer_id)
            stub = self._stubs[peer_id][1]
            if peer_id not in self._checked:
                await self._handshake(peer_id, address, stub, timeout)
                self._checked.add(peer_id)
            return stub

    async def _handshake(
        self, peer_id: str, address: str, stub: worker_pb2_grpc.PrefillWorkerStub, timeout: float | None
    ) -> None:
        request = worker_pb2.HandshakeRequest(instance_id=self.instance_id, role="decode", identity=self.identity,
                                              want_kv_pool=self.want_kv_pool, want_nixl_pool=self.want_nixl_pool)
        try:
            response = await stub.Handshake(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise PeerError(e.details()) from e
            raise
        log.info("handshake with prefill %s (%s) ok", peer_id, address)
        await self._handshook(peer_id, response)

    async def _handshook(self, peer_id: str, response: worker_pb2.HandshakeResponse) -> None:
        """What a subclass learns from the peer's handshake answer."""

    def _decode_bytes(self, msg) -> wire.LayerPiece:
        return wire.decode_piece(msg, self.block_shape, self.dtype)

    async def pull(self, peer_id, request, timeout, fence=None):
        stub = await self._stub(peer_id, timeout)
        async for item in self._stream(stub, request, timeout, self._decode_bytes):
            yield item

    async def _stream(self, stub, request, timeout, decode_block: Callable[..., BlockData | wire.LayerPiece]):
        """The Prefill call: each block through `decode_block`, then the PrefillDone. Blocks
        that come as layer pieces (a peer streaming layer-wise) are handed out once whole; one
        still incomplete at the PrefillDone raises wire.KVWireError."""
        call = stub.Prefill(request, timeout=timeout, metadata=request_metadata(request.request_id))
        assembler = BlockAssembler(self.block_shape[0])
        try:
            while True:
                try:
                    response = await asyncio.wait_for(call.read(), self.progress_timeout)
                except asyncio.TimeoutError:
                    raise PeerStalled(f"prefill sent nothing for {self.progress_timeout:g}s") from None
                if response is grpc.aio.EOF:
                    return
                if response.HasField("block") or response.HasField("blocks"):
                    msgs = [response.block] if response.HasField("block") else response.blocks.blocks
                    for msg in msgs:
                        item = decode_block(msg)
                        if isinstance(item, wire.LayerPiece):
                            item = assembler.add(item)
                        if item is not None:
                            yield item
                else:
                    assembler.check_complete()
                    result = response.result
                    tokens = sorted(result.first_tokens, key=lambda t: t.index)
                    yield PrefillDone(
                        [sampled_token(t.token_id, t.logprobs if t.HasField("logprobs") else None) for t in tokens],
                        result.cached_tokens,
                        prompt_logprobs_from_proto(result.prompt_logprobs),
                    )
        finally:
            call.cancel()  # no-op when it completed; aborts the prefill when we stop early

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
