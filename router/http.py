"""The router's HTTP port, behind the gate (gate.py: header caps, API keys, body cap):
/healthz (also /health, /ping: 200 ready, 503 not), /metrics, the OpenAI-compatible API under
/v1 (openai_api.py, responses_api.py) and vLLM's other endpoints (vllm_api.py)."""

from __future__ import annotations

import os
import threading

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from router.gate import Gate
from router.registry import StaticRegistry
from router.server import RouterServicer
from services.rpc.metrics import exposition


def build_app(registry: StaticRegistry, servicer: RouterServicer | None = None, gate: Gate = Gate()):
    """/healthz and /metrics; with a servicer, also the OpenAI API over the same request path as gRPC."""

    async def healthz(request: Request) -> Response:
        # Without Redis the router still serves (last known fleet, load-only routing): "degraded",
        # still 200, so a frozen Redis never takes every router out of its Service.
        decodes = len(registry.decodes())
        directory = getattr(registry, "directory", None)
        redis_up = directory.up if directory is not None else None
        status = "unavailable" if not decodes else "degraded" if redis_up is False else "ok"
        body = {"status": status, "decode_instances": decodes, "prefill_instances": len(registry.prefills())}
        if redis_up is not None:
            body["redis"] = "up" if redis_up else "down"
        return JSONResponse(body, status_code=200 if decodes else 503)

    scraped = _metrics_registry()

    async def metrics(request: Request) -> Response:
        body, content_type = exposition(scraped)
        return Response(body, headers={"Content-Type": content_type})

    routes = [Route("/healthz", healthz), Route("/health", healthz), Route("/ping", healthz, methods=["GET", "POST"]),
              Route("/metrics", metrics)]
    if servicer is not None:
        from router.openai_api import OpenAIServer
        from router.responses_api import ResponsesServer
        from router.vllm_api import VllmServer
        from services.engine import structured_output

        openai, responses = OpenAIServer(servicer), ResponsesServer(servicer)
        routes += openai.routes() + responses.routes() + VllmServer(openai, responses).routes()
        # xgrammar takes seconds to import: not on the first constrained request's time.
        threading.Thread(target=structured_output.preload, name="xgrammar-import", daemon=True).start()
    return gate.wrap(Starlette(routes=routes))


def _metrics_registry() -> CollectorRegistry:
    """This process's metrics, or, under --router-workers (PROMETHEUS_MULTIPROC_DIR set), every
    worker's merged: a scrape reaches one worker, and must not show only that one's counts."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry
