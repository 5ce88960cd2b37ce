"""The prefill worker: computes prompts' KV and streams it, block by block, to decode workers.

Concurrent Prefill calls share one engine, so their prompts are batched (chunked prefill
under the engine's token budget) and its prefix cache serves all of them. Each call streams
the blocks its caller lacks as soon as their chunk is computed, then the first sampled token
of each of the request's n sequences.

A decode worker on the same GPU asks for this worker's KV pool at the handshake and then for
blocks by reference (services/kv/cuda_ipc.py): the stream names pool slots instead of carrying
bytes, and every slot it names stays allocated until that decode worker's ReleaseKV, or until
KV_HOLD_TIMEOUT_S after the stream ended when it never comes. A decode worker elsewhere reads
the same slots over NIXL (services/kv/nixl.py) when this worker registered its pool with a NIXL
agent (`nixl_pool`) and announces it at the handshake.

With --kv-layerwise on, the engine hands out a chunk's blocks as layer pieces while the chunk's
forward still runs (services/engine/kv_transfer.py); each piece goes out at once, so the bytes of
layer l travel while layers l+1.. compute, and the decode side assembles them
(services/kv/layerwise.py).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from pdserve.v1 import kv_pb2, worker_pb2, worker_pb2_grpc
from services.engine.errors import InvalidRequestError, OverloadedError, PdserveError
from services.kv import cuda_ipc, nixl, wire
from services.rpc import metrics
from services.rpc.convert import logprobs_to_proto, prompt_logprobs_to_proto, reject_unknown_fields
from services.rpc.server import abort_with
from services.rpc.worker import WorkerServicerBase

log = logging.getLogger("pdserve.prefill")

KV_HOLD_TIMEOUT_S = 60.0  # blocks shipped by reference are freed this long after the stream, at the latest
# The blocks of one engine step share a message up to this many bytes of KV (references: all of them).
BATCH_BYTES = 4 << 20


def _blocks_response(batch: list[kv_pb2.KVBlock]) -> worker_pb2.PrefillResponse:
    if len(batch) == 1:
        return worker_pb2.PrefillResponse(block=batch[0])
    return worker_pb2.PrefillResponse(blocks=worker_pb2.KVBlocks(blocks=batch))


class PrefillServicer(WorkerServicerBase, worker_pb2_grpc.PrefillWorkerServicer):
    role = "prefill"
    _kv_pool: kv_pb2.KVPool | None | bool = False  # False: not exported yet

    def __init__(self, *args, nixl_pool: nixl.RegisteredPool | None = None, **kwargs) -> None:
        """`nixl_pool`: this worker's pool as registered with its NIXL agent (None: no NIXL)."""
        super().__init__(*args, **kwargs)
        self._nixl = nixl_pool  # holds the agent
        self.nixl_pool = nixl_pool.announcement if nixl_pool is not None else None

    async def Handshake(self, request: worker_pb2.HandshakeRequest, context) -> worker_pb2.HandshakeResponse:
        response = await super().Handshake(request, context)
        pool = self.kv_pool() if request.want_kv_pool else None
        if pool is not None:
            response.kv_pool.CopyFrom(pool)
        if request.want_nixl_pool and self.nixl_pool is not None:
            response.nixl_pool.CopyFrom(self.nixl_pool)
        return response

    def kv_pool(self) -> kv_pb2.KVPool | None:
        """This worker's KV pool as a CUDA IPC handle (exported once); None on the CPU."""
        if self._kv_pool is False:
            self._kv_pool = cuda_ipc.export_pool(pool) if (pool := self.engine.kv_cache) is not None else None
        return self._kv_pool

    async def ReleaseKV(self, request: worker_pb2.ReleaseKVRequest, context) -> worker_pb2.ReleaseKVResponse:
        engine_id = self.engine_id(context, request.request_id)
        held = self.engine.is_held(engine_id)
        self.engine.release_kv(engine_id)
        return worker_pb2.ReleaseKVResponse(released=held)

    async def Prefill(self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        start = time.monotonic()
        by_reference = request.kv_by_reference
        engine_id = self.engine_id(context, request.request_id) if request.request_id else None
        try:
            reject_unknown_fields(request)
            if by_reference and not request.request_id:
                raise InvalidRequestError("kv_by_reference needs a request_id (ReleaseKV names it)")
            pool_ids = {p.pool_id for p in (self.kv_pool(), self.nixl_pool) if p is not None} if by_reference else ()
            if by_reference and not pool_ids:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"prefill {self.instance_id} has no KV pool on a GPU or over NIXL to ship "
                                    "references into")
            if by_reference and request.kv_pool_id not in pool_ids:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"prefill {self.instance_id}: the KV pool this request names is not ours "
                                    "(restarted since the handshake?): handshake again")
            params = self.check_request(request.prompt_token_ids, request.sampling, request.priority)
            log.info("request %s: prefill %d tokens for %s, skipping %d blocks", request.request_id,
                     len(request.prompt_token_ids), request.decode_instance, request.skip_blocks)
            stream = self.engine.generate(
                list(request.prompt_token_ids),
                params,
                request_id=engine_id,
                priority=request.priority,
                kv_export_from=request.skip_blocks,
                kv_by_reference=by_reference,
            )
            first: dict[int, worker_pb2.FirstToken] = {}
            prompt_logprobs = []
            async for out in stream:
                if out.prompt_logprobs is not None:
                    prompt_logprobs = prompt_logprobs_to_proto(out.prompt_logprobs)
                batch, batch_bytes = [], 0
                for block in out.kv_blocks:
                    if by_reference:
                        msg = wire.encode_ref(block, self.identity.num_layers, self.identity.num_kv_heads,
                                              self.identity.head_dim, self.engine.layout.kv_dtype, block.scales)
                        nbytes = self._block_bytes(block.num_tokens)
                    else:
                        msg = wire.encode(block)
                        nbytes = len(msg.data)
                    if by_reference or block.layer_start == 0:  # a block once, not once per layer piece
                        metrics.KV_BLOCKS_SHIPPED.labels("sent").inc()
                    metrics.KV_BYTES_SHIPPED.labels("sent").inc(nbytes)
                    if batch and batch_bytes + len(msg.data) > BATCH_BYTES:
                        yield _blocks_response(batch)
                        batch, batch_bytes = [], 0
                    batch.append(msg)
                    batch_bytes += len(msg.data)
                if batch:
                    yield _blocks_response(batch)
                for c in out.outputs:
                    if c.token_ids and c.index not in first:
                        token = worker_pb2.FirstToken(index=c.index, token_id=c.token_ids[0])
                        if c.logprobs:
                            token.logprobs.CopyFrom(logprobs_to_proto(c.logprobs[0]))
                        first[c.index] = token
                if out.finished:
                    metrics.PREFIX_HITS.inc(out.num_cached_tokens)
                    metrics.PREFIX_QUERIES.inc(len(out.prompt_token_ids))
                    metrics.PROMPT_TOKENS.inc(len(out.prompt_token_ids))
                    metrics.E2E.observe(time.monotonic() - start)
                    if len(first) != params.n:  # aborted before sampling
                        await context.abort(grpc.StatusCode.ABORTED, "prefill was aborted")
                    yield worker_pb2.PrefillResponse(
                        result=worker_pb2.PrefillResult(
                            first_tokens=[first[i] for i in sorted(first)], cached_tokens=out.num_cached_tokens,
                            prompt_logprobs=prompt_logprobs,
                        )
                    )
        except (InvalidRequestError, OverloadedError) as e:
            await self.refuse(context, e)
        except PdserveError as e:
            log.exception("prefill failed")
            await abort_with(context, e)
        except RecursionError:  # a grammar nested too deeply to compile
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the structured output constraint is nested too deeply")
        finally:
            if by_reference and engine_id:  # in case the caller never releases
                asyncio.get_running_loop().call_later(KV_HOLD_TIMEOUT_S, self.engine.release_kv, engine_id)

    def _block_bytes(self, num_tokens: int) -> int:
        ident = self.identity
        element = self.engine.layout.kv_dtype.itemsize
        return ident.num_layers * 2 * num_tokens * ident.num_kv_heads * ident.head_dim * element
