"""What the prefill and decode workers share: identity, handshake, abort, load, engine gauges.

Torch-free at import: it holds an AsyncEngine but never imports engine internals.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc

from pdserve.v1 import common_pb2, worker_pb2
from services.engine.block_hash import HASH_SCHEME_VERSION, HASH_SEED
from services.engine.errors import InvalidRequestError, OverloadedError, PdserveError
from services.engine.sampling_params import SamplingParams
from services.rpc import metrics
from services.rpc.convert import params_from_proto
from services.rpc.security import peer_of
from services.rpc.server import status_of

if TYPE_CHECKING:
    from services.engine.async_engine import AsyncEngine

log = logging.getLogger("pdserve.worker")


def identity_of(engine: AsyncEngine) -> worker_pb2.ModelIdentity:
    cfg, layout = engine.model_config, engine.layout
    return worker_pb2.ModelIdentity(
        model=layout.model_identity,
        dtype=str(layout.dtype).removeprefix("torch."),
        block_size=layout.block_size,
        hash_scheme_version=HASH_SCHEME_VERSION,
        hash_seed=HASH_SEED,
        num_layers=cfg.num_layers,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size,
        kv_cache_dtype=str(layout.kv_dtype).removeprefix("torch."),
    )


def identity_mismatch(ours: worker_pb2.ModelIdentity, theirs: worker_pb2.ModelIdentity) -> str | None:
    """A readable list of what differs, or None when KV can travel between the two."""
    diffs = [
        f"{field.name}: ours {getattr(ours, field.name)!r}, theirs {getattr(theirs, field.name)!r}"
        + (" (start both with the same --kv-cache-dtype)" if field.name == "kv_cache_dtype" else "")
        for field in ours.DESCRIPTOR.fields
        if getattr(ours, field.name) != getattr(theirs, field.name)
    ]
    return "; ".join(diffs) or None


def refusal(err: PdserveError) -> tuple[grpc.StatusCode, str]:
    """The status a worker call ends with for `err`, counting admission refusals."""
    if isinstance(err, OverloadedError):
        metrics.ADMISSION_REJECTIONS.labels("worker").inc()
    return status_of(err), str(err)


class WorkerServicerBase:
    """Handshake, Abort and GetLoad, identical for both roles, and what both check of a request.

    Request ids are scoped by the calling peer (its certificate's name, security.peer_of):
    the engine knows a request as "PEER/ID", so a peer can abort or release only the
    requests it created, whatever ids other peers use.
    """

    role = "worker"

    def __init__(self, engine: AsyncEngine, instance_id: str, scheduling_policy: str = "fcfs") -> None:
        self.engine = engine
        self.instance_id = instance_id
        self.identity = identity_of(engine)
        self.scheduling_policy = scheduling_policy

    @staticmethod
    def engine_id(context: grpc.aio.ServicerContext, request_id: str) -> str:
        """The engine's id of a request the calling peer names `request_id`."""
        return f"{peer_of(context)}/{request_id}"

    def check_request(self, prompt_token_ids, sampling: common_pb2.SamplingParams, priority: int) -> SamplingParams:
        """Re-check what the router checked: workers are reachable by other peers too."""
        if priority and self.scheduling_policy != "priority":
            raise InvalidRequestError(f"priority must be 0 under first-come-first-served scheduling, got {priority}")
        params = params_from_proto(sampling)
        limit = self.engine.layout.max_model_len
        if len(prompt_token_ids) >= limit:
            raise InvalidRequestError(f"prompt has {len(prompt_token_ids)} tokens; the context is {limit}")
        if sampling.HasField("max_tokens") and len(prompt_token_ids) + params.max_tokens > limit:
            raise InvalidRequestError(f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) "
                                      f"exceeds the context of {limit} tokens")
        return params

    async def refuse(self, context: grpc.aio.ServicerContext, err: PdserveError) -> None:
        """End a call with `err`'s status, counting admission refusals."""
        await context.abort(*refusal(err))

    async def Handshake(self, request: worker_pb2.HandshakeRequest, context) -> worker_pb2.HandshakeResponse:
        if request.HasField("identity"):
            mismatch = identity_mismatch(self.identity, request.identity)
            if mismatch:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{self.role} {self.instance_id} cannot exchange KV with {request.role} "
                    f"{request.instance_id}: {mismatch}",
                )
        return worker_pb2.HandshakeResponse(
            instance_id=self.instance_id,
            role=self.role,
            identity=self.identity,
            max_model_len=self.engine.layout.max_model_len,
        )

    async def Abort(self, request: worker_pb2.AbortRequest, context) -> worker_pb2.AbortResponse:
        engine_id = self.engine_id(context, request.request_id)
        found = self.engine.has_request(engine_id)
        self.engine.abort(engine_id)
        return worker_pb2.AbortResponse(found=found)

    def load(self) -> worker_pb2.LoadResponse:
        return worker_pb2.LoadResponse(
            instance_id=self.instance_id,
            role=self.role,
            block_size=self.engine.layout.block_size,
            **self.engine.stats(),
        )

    async def GetLoad(self, request: worker_pb2.LoadRequest, context) -> worker_pb2.LoadResponse:
        return self.load()

    async def export_gauges(self, period_s: float = 1.0) -> None:
        """Keep the engine gauges of /metrics current (runs for the life of the server)."""
        preemptions = 0
        spec_counters = metrics.SpecDecodeCounters() if self.engine.spec_stats() is not None else None
        while True:
            stats = self.engine.stats()
            metrics.RUNNING.set(stats["running"])
            metrics.WAITING.set(stats["waiting"])
            metrics.KV_USAGE.set(1 - stats["free_kv_blocks"] / max(1, stats["total_kv_blocks"]))
            total = self.engine.num_preemptions
            metrics.PREEMPTIONS.inc(total - preemptions)
            preemptions = total
            for tokens in self.engine.drain_step_tokens():
                metrics.ITERATION_TOKENS.observe(tokens)
            if spec_counters is not None:
                spec_counters.export(self.engine.spec_stats())
            await asyncio.sleep(period_s)


def export_cache_config(engine) -> None:
    """pdserve:cache_config_info: the KV cache's configuration as labels (vLLM's cache_config_info);
    `engine`: an AsyncEngine or EngineProcess."""
    layout = engine.layout
    metrics.CACHE_CONFIG.labels(block_size=str(layout.block_size), num_gpu_blocks=str(layout.num_kv_blocks),
                                cache_dtype=str(layout.kv_dtype).removeprefix("torch."),
                                enable_prefix_caching=str(engine.config.enable_prefix_caching).lower()).set(1)
