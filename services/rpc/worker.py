"""What the prefill and decode workers share: identity, handshake, abort, load, engine gauges.

Torch-free at import: it holds an AsyncEngine but never imports engine internals.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc

from pdserve.v1 import worker_pb2
from services.engine.block_hash import HASH_SCHEME_VERSION, HASH_SEED
from services.rpc import metrics

if TYPE_CHECKING:
    from services.engine.async_engine import AsyncEngine

log = logging.getLogger("pdserve.worker")


def identity_of(engine: AsyncEngine) -> worker_pb2.ModelIdentity:
    core = engine.core
    cfg = core.model_config
    return worker_pb2.ModelIdentity(
        model=core.layout.model_identity,
        dtype=str(core.layout.dtype).removeprefix("torch."),
        block_size=core.layout.block_size,
        hash_scheme_version=HASH_SCHEME_VERSION,
        hash_seed=HASH_SEED,
        num_layers=cfg.num_layers,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size,
    )


def identity_mismatch(ours: worker_pb2.ModelIdentity, theirs: worker_pb2.ModelIdentity) -> str | None:
    """A readable list of what differs, or None when KV can travel between the two."""
    diffs = [
        f"{field.name}: ours {getattr(ours, field.name)!r}, theirs {getattr(theirs, field.name)!r}"
        for field in ours.DESCRIPTOR.fields
        if getattr(ours, field.name) != getattr(theirs, field.name)
    ]
    return "; ".join(diffs) or None


class WorkerServicerBase:
    """Handshake, Abort and GetLoad, identical for both roles."""

    role = "worker"

    def __init__(self, engine: AsyncEngine, instance_id: str) -> None:
        self.engine = engine
        self.instance_id = instance_id
        self.identity = identity_of(engine)

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
            max_model_len=self.engine.core.layout.max_model_len,
        )

    async def Abort(self, request: worker_pb2.AbortRequest, context) -> worker_pb2.AbortResponse:
        found = request.request_id in self.engine.core.requests
        self.engine.abort(request.request_id)
        return worker_pb2.AbortResponse(found=found)

    def load(self) -> worker_pb2.LoadResponse:
        return worker_pb2.LoadResponse(
            instance_id=self.instance_id,
            role=self.role,
            block_size=self.engine.core.layout.block_size,
            **self.engine.stats(),
        )

    async def GetLoad(self, request: worker_pb2.LoadRequest, context) -> worker_pb2.LoadResponse:
        return self.load()

    async def export_gauges(self, period_s: float = 1.0) -> None:
        """Keep the engine gauges of /metrics current (runs for the life of the server)."""
        preemptions = 0
        while True:
            stats = self.engine.stats()
            metrics.RUNNING.set(stats["running"])
            metrics.WAITING.set(stats["waiting"])
            metrics.KV_USAGE.set(1 - stats["free_kv_blocks"] / max(1, stats["total_kv_blocks"]))
            total = self.engine.core.scheduler.num_preemptions
            metrics.PREEMPTIONS.inc(total - preemptions)
            preemptions = total
            await asyncio.sleep(period_s)
