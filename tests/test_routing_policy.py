"""Routing policies, recent routes and the router's refusal of mismatched instances: exact choices
on hand-built instances (no processes)."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from pdserve.v1 import worker_pb2
from router.policy import LeastLoadedPolicy, PrefixHits, PrefixPolicy, RoundRobinPolicy, RoutingConfig, make_policy
from router.registry import Instance, RedisRegistry
from router.routing import RecentRoutes, RouteSelector
from services.engine.block_hash import HASH_SCHEME_VERSION, HASH_SEED, hash_blocks
from services.fleet.directory import FleetDirectory
from services.fleet.schema import InstanceRecord

CONFIG = RoutingConfig(remote_prefill_threshold=64, load_penalty=16, imbalance_threshold=4, imbalance_ratio=1.5,
                       prefill_backlog=8)


def inst(instance_id: str, queue: int = 0, role: str = "decode") -> Instance:
    return Instance(instance_id, role, "127.0.0.1:1", stub=None, load=worker_pb2.LoadResponse(running=queue))


def hits(sizes: dict[str, int] | None = None, **tokens: int) -> PrefixHits:
    return PrefixHits({k.replace("_", "-"): v for k, v in tokens.items()}, sizes or {})


def decide(policy, prompt_tokens, decodes, prefills=(), found=None):
    route = policy.route(prompt_tokens, list(decodes), list(prefills), found)
    return (route.decode.instance_id, route.decode_reason,
            route.prefill.instance_id if route.prefill else None, route.prefill_reason)


# ---- prefix --------------------------------------------------------------------------------------


def test_prefix_picks_the_decode_holding_the_longest_prefix_and_prefills_the_short_rest_locally():
    d0, d1, p0 = inst("decode-0"), inst("decode-1"), inst("prefill-0", role="prefill")
    assert decide(PrefixPolicy(CONFIG), 220, [d0, d1], [p0], hits(decode_1=192)) == \
        ("decode-1", "prefix_hit", None, "short_suffix")


def test_prefix_ships_a_long_uncached_rest_from_the_prefill_holding_more_of_it():
    d0, p0, p1 = inst("decode-0"), inst("prefill-0", role="prefill"), inst("prefill-1", role="prefill")
    assert decide(PrefixPolicy(CONFIG), 400, [d0], [p0, p1], hits(decode_0=32, prefill_1=160)) == \
        ("decode-0", "prefix_hit", "prefill-1", "remote")


def test_a_load_penalty_outweighs_a_small_hit():
    busy, idle = inst("decode-0", queue=3), inst("decode-1")
    # decode-0: 32 - 16 x 3 = -16 < decode-1: 0
    assert decide(PrefixPolicy(CONFIG), 40, [busy, idle], [], hits(decode_0=32))[:2] == ("decode-1", "no_hit")
    # decode-0: 192 - 48 = 144 > 0
    assert decide(PrefixPolicy(CONFIG), 200, [busy, idle], [], hits(decode_0=192))[:2] == ("decode-0", "prefix_hit")


def test_the_imbalance_gate_sends_a_hot_prefix_to_the_least_loaded_decode():
    hot, idle = inst("decode-0", queue=4), inst("decode-1")
    # 192 - 64 = 128 still scores best, but 4 - 0 >= 4 and 4 > 1.5 x 0: the gate trips.
    assert decide(PrefixPolicy(CONFIG), 200, [hot, idle], [], hits(decode_0=192))[:2] == ("decode-1", "imbalance")
    almost = inst("decode-0", queue=3)
    assert decide(PrefixPolicy(CONFIG), 200, [almost, idle], [], hits(decode_0=192))[:2] == ("decode-0", "prefix_hit")
    # Both busy: 12 - 8 >= 4, but 12 is not more than 1.5 x 8, so the ratio holds the gate shut.
    assert decide(PrefixPolicy(CONFIG), 200, [inst("decode-0", 12), inst("decode-1", 8)], [],
                  hits(decode_0=192))[:2] == ("decode-0", "prefix_hit")


def test_a_new_prefix_goes_to_the_emptier_cache_then_the_shorter_queue():
    d0, d1 = inst("decode-0"), inst("decode-1")
    assert decide(PrefixPolicy(CONFIG), 200, [d0, d1], [], hits({"decode-0": 13, "decode-1": 0}))[:2] == \
        ("decode-1", "no_hit")
    assert decide(PrefixPolicy(CONFIG), 200, [d0, d1], [], hits({"decode-0": 13, "decode-1": 13}))[:2] == \
        ("decode-0", "no_hit")


def test_without_an_index_prefix_routes_on_load_alone():
    assert decide(PrefixPolicy(CONFIG), 200, [inst("decode-0", 2), inst("decode-1", 1)], [inst("p", role="prefill")],
                  None) == ("decode-1", "no_index", "p", "remote")


def test_a_backlogged_prefill_pool_means_local_prefill():
    busy = inst("prefill-0", queue=8, role="prefill")
    assert decide(PrefixPolicy(CONFIG), 400, [inst("decode-0")], [busy], hits()) == \
        ("decode-0", "no_hit", None, "prefill_backlogged")
    assert decide(PrefixPolicy(CONFIG), 400, [inst("decode-0")], [], hits())[2:] == (None, "no_prefill")


def test_no_decode_instance_means_no_route():
    for name in ("prefix", "round_robin", "least_loaded"):
        assert make_policy(name, CONFIG).route(10, [], [], None) is None


# ---- baselines -----------------------------------------------------------------------------------


def test_round_robin_takes_turns_by_instance_id_whatever_the_hits():
    policy = RoundRobinPolicy(CONFIG)
    decodes = [inst("decode-1"), inst("decode-0", queue=9)]
    assert [decide(policy, 20, decodes, [], hits(decode_1=16))[0] for _ in range(4)] == \
        ["decode-0", "decode-1", "decode-0", "decode-1"]


def test_least_loaded_takes_the_shortest_queue_and_ships_long_prompts():
    policy = LeastLoadedPolicy(CONFIG)
    prefills = [inst("prefill-0", 2, "prefill"), inst("prefill-1", 1, "prefill")]
    assert decide(policy, 200, [inst("decode-0", 1), inst("decode-1", 0)], prefills, hits(decode_0=192)) == \
        ("decode-1", "least_loaded", "prefill-1", "remote")
    assert decide(policy, 64, [inst("decode-0")], prefills)[2:] == (None, "short_suffix")


def test_unknown_policy_and_bad_config_are_refused():
    with pytest.raises(ValueError, match="unknown routing policy 'random'"):
        make_policy("random", CONFIG)
    with pytest.raises(ValueError, match="imbalance_ratio"):
        RoutingConfig(imbalance_ratio=0.5)


def test_the_command_line_offers_every_policy_with_the_config_defaults():
    import argparse

    from router.main import routing_config
    from router.policy import POLICIES
    from services.cli import serve

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    args = parser.parse_args(["router", "--redis", "redis://127.0.0.1:1/0"])
    assert serve.ROUTING_POLICIES == POLICIES and args.routing_policy == "prefix"
    assert routing_config(args) == RoutingConfig()
    assert args.decode_peers == ""  # not needed with --redis


@pytest.mark.parametrize("command", ["router", "prefill", "decode", "serve"])
def test_redis_defaults_to_the_environment_variable(monkeypatch, command):
    import argparse

    from services.cli import serve

    monkeypatch.setenv("PDSERVE_REDIS_URL", "redis://redis.pdserve:6379/0")
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    assert parser.parse_args([command]).redis == "redis://redis.pdserve:6379/0"


# ---- recent routes and hashing -------------------------------------------------------------------


def test_recent_routes_count_as_cached_until_they_expire():
    recent = RecentRoutes(ttl_s=10)
    chain = hash_blocks(list(range(64)), 16)
    recent.add("decode-0", chain[:3], now=100.0)
    assert recent.leading("decode-0", chain, now=105.0) == 3
    assert recent.leading("decode-1", chain, now=105.0) == 0
    assert recent.leading("decode-0", chain, now=111.0) == 0


def test_recent_routes_count_the_hashes_each_instance_was_sent_until_they_expire():
    recent = RecentRoutes(ttl_s=10)
    chain = hash_blocks(list(range(64)), 16)
    recent.add("decode-0", chain[:3], now=100.0)
    recent.add("decode-0", chain[:4], now=104.0)  # re-sent hashes count once
    assert (recent.count("decode-0", now=105.0), recent.count("decode-1", now=105.0)) == (4, 0)
    assert recent.count("decode-0", now=111.0) == 4  # the re-sent ones live on
    assert recent.count("decode-0", now=115.0) == 0


class _LaggingIndex:
    """A prefix index that has not yet heard of anything (workers publish every ~50 ms; a burst
    of requests arrives faster than that)."""

    async def longest_prefixes(self, hashes, records):
        return [(0, 0) for _ in records]


class _Fleet:
    def __init__(self, *instances: Instance) -> None:
        self.instances = instances

    def decodes(self) -> list[Instance]:
        return list(self.instances)

    def prefills(self) -> list[Instance]:
        return []


def test_a_burst_of_new_prefixes_spreads_over_idle_instances_before_the_index_catches_up():
    """Idle instances, four tenants' first requests before any instance publishes: what the router
    just sent counts toward the receiver's cache size, so the emptier cache takes the next prefix
    and the tenants split 2/2 instead of all landing on the first instance by name."""
    d0, d1 = inst("decode-0"), inst("decode-1")
    d0.record, d1.record = record("decode-0"), record("decode-1")
    selector = RouteSelector(_Fleet(d0, d1), PrefixPolicy(CONFIG), _LaggingIndex(), block_size=16)
    prompts = {t: [1000 * t + i for i in range(80)] for t in range(4)}

    async def burst():
        return {t: (await selector.select(p, None)).decode.instance_id for t, p in prompts.items()}

    homes = asyncio.run(burst())
    assert sorted(homes.values()) == ["decode-0", "decode-0", "decode-1", "decode-1"], homes
    # A tenant's second request follows its first (the recent route is a hit there).
    again = asyncio.run(selector.select(prompts[1], None))
    assert (again.decode.instance_id, again.decode_reason) == (homes[1], "prefix_hit")


def test_the_router_hashes_only_the_blocks_a_hit_can_cover_with_the_cache_salt():
    selector = RouteSelector(registry=None, policy=PrefixPolicy(), directory=None, block_size=16)
    assert selector.block_hashes(list(range(48)), None) == hash_blocks(list(range(32)), 16)  # never the last token
    assert selector.block_hashes(list(range(49)), None) == hash_blocks(list(range(48)), 16)
    assert selector.block_hashes(list(range(49)), "tenant-a") == \
        hash_blocks(list(range(48)), 16, first_block_keys=("tenant-a",))


# ---- the registry refuses instances that hash differently ----------------------------------------


def record(instance_id: str, block_size: int = 16, hash_seed: int = HASH_SEED) -> InstanceRecord:
    identity = worker_pb2.ModelIdentity(model="m", block_size=block_size, hash_seed=hash_seed,
                                        hash_scheme_version=HASH_SCHEME_VERSION)
    return InstanceRecord(instance_id, "decode", f"127.0.0.1:{1000 + len(instance_id)}", 1, identity, 512,
                          worker_pb2.LoadResponse())


def test_the_redis_registry_refuses_instances_with_another_block_size_or_seed(caplog):
    async def scenario():
        hashing = worker_pb2.ModelIdentity(block_size=16, hash_seed=HASH_SEED, hash_scheme_version=HASH_SCHEME_VERSION)
        # A directory that never connects (nothing here refreshes it): the registry's age gauge,
        # which /metrics of this whole test process reads, keeps a directory to read.
        directory = FleetDirectory(Redis.from_url("redis://127.0.0.1:1/0"))
        registry = RedisRegistry({}, {}, directory=directory, hashing=hashing)
        registry._sync({"good": record("good"), "big": record("big", block_size=32),
                        "seeded": record("seeded", hash_seed=1)})
        ids = [i.instance_id for i in registry.decodes()]
        await registry.close()
        return ids

    assert asyncio.run(scenario()) == ["good"]
    refusals = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("refusing decode big" in m and "block_size: ours 16, theirs 32" in m for m in refusals)
    assert any("refusing decode seeded" in m and "hash_seed" in m for m in refusals)
