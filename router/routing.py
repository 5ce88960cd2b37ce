"""One routing decision: block hashes -> prefix index -> policy -> metrics.

    prompt ids --hash_blocks--> h0 h1 h2 ... (the blocks a hit can cover: never the last token)
               --one lookup--> leading hashes held, per live instance (Redis, one round-trip)
               + recent routes: hashes this router just sent somewhere count as cached there
                 at once (as hits, and in that instance's cache size), before that instance
                 publishes them, so a burst of a new prefix does not scatter, nor a burst of
                 new prefixes all land on one instance, by accident
               --policy.route--> decode (+ prefill or none), with reasons

Without an index (static peers, or Redis unreachable) the policy gets no hits and routes on
load alone; a lookup never fails a request.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from router import metrics
from router.policy import PrefixHits, Route, RoutingPolicy
from router.registry import Instance, StaticRegistry
from services.engine.block_hash import hash_blocks
from services.fleet.directory import FleetDirectory


class RecentRoutes:
    """Block hashes this router sent to each instance in the last `ttl_s` seconds (longer than
    the index takes to catch up)."""

    def __init__(self, ttl_s: float = 10.0) -> None:
        self.ttl_s = ttl_s
        self._by_instance: dict[str, OrderedDict[int, float]] = {}

    def add(self, instance_id: str, hashes: list[int], now: float) -> None:
        sent = self._by_instance.setdefault(instance_id, OrderedDict())
        for h in hashes:
            sent[h] = now + self.ttl_s
            sent.move_to_end(h)
        self._expire(sent, now)

    def count(self, instance_id: str, now: float) -> int:
        """How many distinct hashes were sent to the instance and have not expired."""
        sent = self._by_instance.get(instance_id)
        if sent is None:
            return 0
        self._expire(sent, now)
        return len(sent)

    @staticmethod
    def _expire(sent: OrderedDict[int, float], now: float) -> None:
        while sent and next(iter(sent.values())) < now:  # oldest first: expiries are in order
            sent.popitem(last=False)

    def leading(self, instance_id: str, hashes: list[int], now: float) -> int:
        sent = self._by_instance.get(instance_id, {})
        for n, h in enumerate(hashes):
            if sent.get(h, 0.0) < now:
                return n
        return len(hashes)


class RouteSelector:
    def __init__(
        self,
        registry: StaticRegistry,
        policy: RoutingPolicy,
        directory: FleetDirectory | None,
        block_size: int,
        recent: RecentRoutes | None = None,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.directory = directory
        self.block_size = block_size
        self.recent = recent or RecentRoutes()

    def block_hashes(self, prompt_token_ids: list[int], cache_salt: str | None) -> list[int]:
        """The hashes of the blocks a prefix hit can cover, exactly as the workers compute them."""
        hit_blocks = (len(prompt_token_ids) - 1) // self.block_size
        return hash_blocks(prompt_token_ids[: hit_blocks * self.block_size], self.block_size,
                           first_block_keys=(cache_salt,) if cache_salt else ())

    async def select(self, prompt_token_ids: list[int], cache_salt: str | None,
                     exclude: set[str] = frozenset()) -> Route | None:
        """The route of one request; decode instances in `exclude` (they refused it) are skipped."""
        decodes = [i for i in self.registry.decodes() if i.instance_id not in exclude]
        prefills = self.registry.prefills()
        if not decodes:
            return None
        hashes, hits = [], None
        if self.policy.uses_index:
            hashes = self.block_hashes(prompt_token_ids, cache_salt)
            hits = await self._hits(hashes, [*decodes, *prefills])
        route = self.policy.route(len(prompt_token_ids), decodes, prefills, hits)
        if route is None:
            return None
        now = time.monotonic()
        self.recent.add(route.decode.instance_id, hashes, now)
        if route.prefill is not None:
            self.recent.add(route.prefill.instance_id, hashes, now)
        name = self.policy.name
        metrics.DECISIONS.labels(name, "decode", route.decode_reason).inc()
        metrics.DECISIONS.labels(name, "prefill", route.prefill_reason).inc()
        metrics.PREDICTED_HIT_TOKENS.inc(route.decode_hit_tokens)
        return route

    async def _hits(self, hashes: list[int], instances: list[Instance]) -> PrefixHits | None:
        if self.directory is None:
            return None
        indexed = [i for i in instances if i.record is not None]
        t0 = time.monotonic()
        answer = await self.directory.longest_prefixes(hashes, [i.record for i in indexed])
        if answer is None:
            return None
        now = time.monotonic()
        metrics.LOOKUP_SECONDS.observe(now - t0)
        tokens, sizes = {}, {}
        for inst, (held, size) in zip(indexed, answer):
            held = max(held, self.recent.leading(inst.instance_id, hashes, now))
            # What we just sent is cached there too, published or not (a lower bound either way).
            size = max(size, self.recent.count(inst.instance_id, now))
            tokens[inst.instance_id], sizes[inst.instance_id] = held * self.block_size, size
        return PrefixHits(tokens, sizes)
