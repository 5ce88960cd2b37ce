"""The prefill worker: computes prompts' KV and streams it, block by block, to decode workers.

Concurrent Prefill calls share one engine, so their prompts are batched (chunked prefill
under the engine's token budget) and its prefix cache serves all of them. Each call streams
the blocks its caller lacks as soon as their chunk is computed, then the first sampled token
of each of the request's n sequences.
"""

from __future__ import annotations

import logging
import os
import time

import grpc

from pdserve.v1 import worker_pb2, worker_pb2_grpc
from services.engine.async_engine import AsyncEngine
from services.engine.errors import InvalidRequestError, PdserveError
from services.kv import wire
from services.rpc import metrics
from services.rpc.convert import logprobs_to_proto, params_from_proto, reject_unknown_fields
from services.rpc.server import abort_with
from services.rpc.worker import WorkerServicerBase

log = logging.getLogger("pdserve.prefill")

# Test-only: flip one byte of every shipped block after its checksum, to prove corruption is caught.
_CORRUPT_KV = os.environ.get("PDSERVE_TEST_CORRUPT_KV") == "1"


class PrefillServicer(WorkerServicerBase, worker_pb2_grpc.PrefillWorkerServicer):
    role = "prefill"

    async def Prefill(self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        start = time.monotonic()
        try:
            reject_unknown_fields(request)
            params = params_from_proto(request.sampling)
            log.info("request %s: prefill %d tokens for %s, skipping %d blocks", request.request_id,
                     len(request.prompt_token_ids), request.decode_instance, request.skip_blocks)
            stream = self.engine.generate(
                list(request.prompt_token_ids),
                params,
                request_id=request.request_id or None,
                priority=request.priority,
                kv_export_from=request.skip_blocks,
            )
            first: dict[int, worker_pb2.FirstToken] = {}
            async for out in stream:
                for block in out.kv_blocks:
                    msg = wire.encode(block)
                    if _CORRUPT_KV:
                        msg.data = bytes([msg.data[0] ^ 0xFF]) + msg.data[1:]
                    metrics.KV_BLOCKS_SHIPPED.labels("sent").inc()
                    metrics.KV_BYTES_SHIPPED.labels("sent").inc(len(msg.data))
                    yield worker_pb2.PrefillResponse(block=msg)
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
                            first_tokens=[first[i] for i in sorted(first)], cached_tokens=out.num_cached_tokens
                        )
                    )
        except InvalidRequestError as e:
            await abort_with(context, e)
        except PdserveError as e:
            log.exception("prefill failed")
            await abort_with(context, e)
