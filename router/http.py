"""The router's HTTP port: /healthz and /metrics (the OpenAI-compatible API joins it later)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from router.registry import StaticRegistry


def build_app(registry: StaticRegistry) -> Starlette:
    async def healthz(request: Request) -> Response:
        decodes = len(registry.decodes())
        body = {"status": "ok" if decodes else "unavailable", "decode_instances": decodes,
                "prefill_instances": len(registry.prefills())}
        return JSONResponse(body, status_code=200 if decodes else 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/healthz", healthz), Route("/metrics", metrics)])
