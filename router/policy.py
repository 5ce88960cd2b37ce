"""Routing policy: which decode instance serves a request, and which prefill instance (if any)
computes its prompt. A small interface, so the cache-aware policy (Redis prefix index) can
replace the load-only one without touching the router."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from router.registry import Instance


@dataclass(frozen=True)
class Route:
    decode: Instance
    prefill: Instance | None  # None: decode prefills locally


class RoutingPolicy(Protocol):
    def route(self, prompt_token_ids: list[int], decodes: list[Instance], prefills: list[Instance]) -> Route | None:
        """None when no decode instance is available."""


@dataclass
class LeastLoadedPolicy:
    """Decode first: the least loaded decode instance. Then a prefill instance only when the
    uncached part of the prompt exceeds `remote_prefill_threshold` tokens (shorter prompts are
    cheaper to prefill where they decode than to ship). Without a prefix index every prompt
    token counts as uncached."""

    remote_prefill_threshold: int = 64

    def route(self, prompt_token_ids, decodes, prefills):
        if not decodes:
            return None
        decode = min(decodes, key=lambda i: (i.queue, i.instance_id))
        prefill = None
        if prefills and len(prompt_token_ids) > self.remote_prefill_threshold:
            prefill = min(prefills, key=lambda i: (i.queue, i.instance_id))
        return Route(decode, prefill)
