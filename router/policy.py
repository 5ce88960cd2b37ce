"""Routing policies: which decode instance serves a request, and which prefill instance (if
any) computes its prompt. Pure functions of the instances' load and, for `prefix`, of what the
prefix index says each instance holds; the router does the lookups (routing.py).

    prefix (default)  decode: max(cached prompt tokens - load_penalty x queue), unless that
                      instance is overloaded next to the least loaded one (the imbalance gate:
                      one hot prefix must not starve the rest); then prefill: max(its own
                      cached tokens - load_penalty x queue)
    least_loaded      decode and prefill: the shortest queue
    round_robin       decode and prefill: in turn

Every policy prefills locally (no prefill instance) when the prompt's uncached part is at most
`remote_prefill_threshold` tokens (shipping costs more than computing), or when the chosen
prefill instance has `prefill_backlog` requests queued (decode would wait longer for it than
it takes to compute the prompt itself). Each decision carries a reason, for the metrics.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol

from router.registry import Instance

POLICIES = ("prefix", "round_robin", "least_loaded")


@dataclass(frozen=True)
class RoutingConfig:
    remote_prefill_threshold: int = 64  # tokens
    load_penalty: float = 16.0  # cached tokens one queued request is worth
    imbalance_threshold: int = 8  # queue difference (requests) that trips the imbalance gate ...
    imbalance_ratio: float = 1.5  # ... when the busier queue is also this many times the shorter one
    prefill_backlog: int = 16  # a prefill queue this long: prefill locally instead

    def __post_init__(self) -> None:
        if min(self.remote_prefill_threshold, self.load_penalty, self.imbalance_threshold) < 0:
            raise ValueError(f"routing thresholds must be >= 0: {self}")
        if self.imbalance_ratio < 1 or self.prefill_backlog < 1:
            raise ValueError(f"need imbalance_ratio >= 1 and prefill_backlog >= 1: {self}")


@dataclass(frozen=True)
class PrefixHits:
    """What the prefix index says about one prompt: per instance id, how many leading prompt
    tokens it holds, and how many blocks it caches in all (the emptier cache takes a new prefix)."""

    tokens: dict[str, int]
    sizes: dict[str, int]

    def of(self, inst: Instance) -> int:
        return self.tokens.get(inst.instance_id, 0)

    def size(self, inst: Instance) -> int:
        return self.sizes.get(inst.instance_id, 0)


@dataclass(frozen=True)
class Route:
    decode: Instance
    prefill: Instance | None  # None: decode prefills locally
    decode_reason: str
    prefill_reason: str
    decode_hit_tokens: int = 0  # what the index said the decode instance holds


class RoutingPolicy(Protocol):
    name: str
    uses_index: bool  # whether the router should look the prompt up in the prefix index

    def route(
        self, num_prompt_tokens: int, decodes: list[Instance], prefills: list[Instance], hits: PrefixHits | None
    ) -> Route | None:
        """None when no decode instance is available. `hits` is None without a prefix index."""


def _least_loaded(instances: list[Instance]) -> Instance:
    return min(instances, key=lambda i: (i.queue, i.instance_id))


def _prefill(config: RoutingConfig, uncached: int, pick: Instance | None) -> tuple[Instance | None, str]:
    if pick is None:
        return None, "no_prefill"
    if uncached <= config.remote_prefill_threshold:
        return None, "short_suffix"
    if pick.queue >= config.prefill_backlog:
        return None, "prefill_backlogged"
    return pick, "remote"


@dataclass
class LeastLoadedPolicy:
    config: RoutingConfig = RoutingConfig()
    name = "least_loaded"
    uses_index = False

    def route(self, num_prompt_tokens, decodes, prefills, hits=None):
        if not decodes:
            return None
        prefill, why = _prefill(self.config, num_prompt_tokens, _least_loaded(prefills) if prefills else None)
        return Route(_least_loaded(decodes), prefill, "least_loaded", why)


@dataclass
class RoundRobinPolicy:
    config: RoutingConfig = RoutingConfig()
    name = "round_robin"
    uses_index = False

    def __post_init__(self) -> None:
        self._turns = {"decode": itertools.count(), "prefill": itertools.count()}

    def _next(self, role: str, instances: list[Instance]) -> Instance:
        ordered = sorted(instances, key=lambda i: i.instance_id)
        return ordered[next(self._turns[role]) % len(ordered)]

    def route(self, num_prompt_tokens, decodes, prefills, hits=None):
        if not decodes:
            return None
        prefill, why = _prefill(self.config, num_prompt_tokens, self._next("prefill", prefills) if prefills else None)
        return Route(self._next("decode", decodes), prefill, "round_robin", why)


@dataclass
class PrefixPolicy:
    config: RoutingConfig = RoutingConfig()
    name = "prefix"
    uses_index = True

    def route(self, num_prompt_tokens, decodes, prefills, hits):
        if not decodes:
            return None
        if hits is None:  # no index (Redis down): load alone
            decode, why = _least_loaded(decodes), "no_index"
            hits = PrefixHits({}, {})
        else:
            decode, why = self._decode(decodes, hits)
        cached = hits.of(decode)
        prefill = min(prefills, key=lambda p: (-self._score(p, hits), p.queue, p.instance_id)) if prefills else None
        prefill, prefill_why = _prefill(self.config, num_prompt_tokens - cached, prefill)
        return Route(decode, prefill, why, prefill_why, cached)

    def _score(self, inst: Instance, hits: PrefixHits) -> float:
        return hits.of(inst) - self.config.load_penalty * inst.queue

    def _decode(self, decodes: list[Instance], hits: PrefixHits) -> tuple[Instance, str]:
        # Ties (no instance holds the prefix, or several do): the emptier cache, then the shorter queue.
        best = min(decodes, key=lambda d: (-self._score(d, hits), hits.size(d), d.queue, d.instance_id))
        least = min(decodes, key=lambda d: (d.queue, -hits.of(d), d.instance_id))
        high, low = best.queue, least.queue
        if high - low >= self.config.imbalance_threshold and high > self.config.imbalance_ratio * low:
            return least, "imbalance"
        return best, "prefix_hit" if hits.of(best) > 0 else "no_hit"


def make_policy(name: str, config: RoutingConfig) -> RoutingPolicy:
    policies = {"prefix": PrefixPolicy, "round_robin": RoundRobinPolicy, "least_loaded": LeastLoadedPolicy}
    if name not in policies:
        raise ValueError(f"unknown routing policy {name!r} (one of {', '.join(POLICIES)})")
    return policies[name](config)
