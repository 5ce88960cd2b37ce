"""The fleet registry and prefix index against a real redis-server on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import redis

from pdserve.v1 import worker_pb2
from services.cli.stack import free_port
from services.engine.block_hash import HASH_SCHEME_VERSION, HASH_SEED, hash_blocks
from services.fleet import schema
from services.fleet.directory import FleetDirectory
from services.fleet.events import CacheEventLog
from services.fleet.member import FleetMember, FleetTiming
from services.fleet.redis_server import RedisServer
from services.fleet.schema import FleetMismatchError, InstanceRecord

FAST = FleetTiming(heartbeat_s=0.1, ttl_s=0.5, publish_s=0.02)
CHAIN = hash_blocks(list(range(96)), 16)  # 6 blocks


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with RedisServer(free_port(), log_path=tmp_path_factory.mktemp("redis") / "redis.log") as s:
        yield s


@pytest.fixture
def url(server):
    if not server.alive():
        server.start()
    redis.Redis.from_url(server.url).flushall()
    return server.url


def identity(**changes) -> worker_pb2.ModelIdentity:
    fields = dict(model="dummy:tiny-llama:seed=0", dtype="float32", block_size=16, hash_scheme_version=HASH_SCHEME_VERSION,
                  hash_seed=HASH_SEED, num_layers=2, num_kv_heads=2, head_dim=16, vocab_size=1000)
    return worker_pb2.ModelIdentity(**{**fields, **changes})


def member(url: str, instance_id: str, role: str = "decode", hashes=(), timing=FAST, load=None, **changes):
    events = CacheEventLog()
    for h in hashes:
        events.stored(h)
    record = InstanceRecord(instance_id, role, f"127.0.0.1:{5000 + len(instance_id)}", 0, identity(**changes), 512,
                            worker_pb2.LoadResponse())
    loads = load or (lambda: worker_pb2.LoadResponse(running=1, waiting=2, free_kv_blocks=30, total_kv_blocks=32))
    return FleetMember(schema.connect(url), record, loads, events, timing)


def members_of(url: str) -> dict[str, InstanceRecord]:
    async def read():
        directory = FleetDirectory(schema.connect(url))
        assert await directory.refresh()
        return directory.records

    return asyncio.run(read())


def block_set(url: str, instance_id: str, epoch: int) -> set[int]:
    return {int(h, 16) for h in redis.Redis.from_url(url, decode_responses=True).smembers(
        schema.blocks_key(instance_id, epoch))}


async def run_for(seconds: float, *members: FleetMember) -> None:
    tasks = [asyncio.create_task(m.run()) for m in members]
    await asyncio.sleep(seconds)
    for t in tasks:
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await t


# ---- registry --------------------------------------------------------------------------------


def test_a_registered_instance_is_listed_with_its_address_epoch_and_load(url):
    m = member(url, "decode-0")
    assert asyncio.run(m.join())
    record = members_of(url)["decode-0"]
    assert (record.role, record.address, record.epoch, record.max_model_len) == ("decode", "127.0.0.1:5008", 1, 512)
    assert (record.load.running, record.load.waiting, record.load.free_kv_blocks) == (1, 2, 30)
    assert record.identity == identity()


def test_an_instance_without_heartbeats_drops_out_after_its_ttl(url):
    asyncio.run(member(url, "decode-0").join())
    assert list(members_of(url)) == ["decode-0"]
    time.sleep(FAST.ttl_s + 0.2)
    assert members_of(url) == {}
    assert redis.Redis.from_url(url).smembers(schema.INSTANCES) == set()  # the listing pruned it


def test_heartbeats_keep_an_instance_listed_and_refresh_its_load(url):
    running = iter(range(100))
    m = member(url, "decode-0", load=lambda: worker_pb2.LoadResponse(running=next(running)))

    async def scenario():
        assert await m.join()
        await run_for(FAST.ttl_s * 3, m)

    asyncio.run(scenario())
    assert members_of(url)["decode-0"].load.running > 5  # renewed many times, past three TTLs


def test_leave_removes_the_record_and_block_set_at_once(url):
    m = member(url, "decode-0", hashes=CHAIN)

    async def scenario():
        await m.join()
        await m.leave()

    asyncio.run(scenario())
    assert members_of(url) == {} and block_set(url, "decode-0", 1) == set()


@pytest.mark.parametrize("field, value", [("block_size", 32), ("hash_seed", 7), ("hash_scheme_version", 99),
                                          ("model", "dummy:tiny-llama:seed=1"), ("dtype", "bfloat16")])
def test_a_mismatched_instance_is_rejected_naming_the_field(url, field, value):
    asyncio.run(member(url, "decode-0").join())
    with pytest.raises(FleetMismatchError) as err:
        asyncio.run(member(url, "decode-1", **{field: value}).join())
    theirs = getattr(identity(), field)
    assert f"{field} is '{value}' here but '{theirs}' on live instance decode-0" in str(err.value)
    assert list(members_of(url)) == ["decode-0"]


def test_a_mismatched_instance_may_join_once_the_old_fleet_is_gone(url):
    asyncio.run(member(url, "decode-0").join())
    time.sleep(FAST.ttl_s + 0.2)
    assert asyncio.run(member(url, "decode-1", block_size=32).join())


# ---- prefix index ------------------------------------------------------------------------------


def test_join_resyncs_every_hash_the_cache_already_holds(url):
    asyncio.run(member(url, "decode-0", hashes=CHAIN).join())
    assert block_set(url, "decode-0", 1) == set(CHAIN)


def test_stored_and_evicted_hashes_are_published_in_batches(url):
    m = member(url, "decode-0", hashes=CHAIN[:2])

    async def scenario():
        await m.join()
        for h in CHAIN[2:]:
            m.events.stored(h)
        m.events.evicted(CHAIN[0])
        m.events.stored(CHAIN[5])  # stored twice: published once
        await run_for(FAST.publish_s * 5, m)

    asyncio.run(scenario())
    assert block_set(url, "decode-0", 1) == set(CHAIN[1:])


def test_a_restarted_worker_gets_a_new_epoch_and_never_inherits_the_old_block_set(url):
    old, new = member(url, "decode-0", hashes=CHAIN), member(url, "decode-0")

    async def scenario():
        await old.join()
        await new.join()
        await run_for(FAST.heartbeat_s * 3, old)  # the old process's heartbeat finds the record taken

    asyncio.run(scenario())
    assert (old.epoch, new.epoch, old.registered, new.registered) == (1, 2, False, True)
    assert members_of(url)["decode-0"].epoch == 2
    assert block_set(url, "decode-0", 2) == set()


def test_longest_prefix_lookup_finds_exact_leading_lengths_on_every_instance(url):
    other = hash_blocks(list(range(500, 596)), 16)
    fleet = [member(url, "decode-0", hashes=CHAIN[:5]),
             member(url, "decode-1", hashes=[*CHAIN[:2], CHAIN[3], *other]),  # a gap after block 1
             member(url, "prefill-0", role="prefill")]

    async def scenario():
        for m in fleet:
            await m.join()
        directory = FleetDirectory(schema.connect(url))
        await directory.refresh()
        records = [directory.records[i] for i in ("decode-0", "decode-1", "prefill-0")]
        return (await directory.longest_prefixes(CHAIN, records), await directory.longest_prefixes(other[:3], records),
                await directory.longest_prefixes([], records))

    full, partial, empty = asyncio.run(scenario())
    assert full == [(5, 5), (2, 9), (0, 0)]
    assert partial == [(0, 5), (3, 9), (0, 0)]
    assert empty == [(0, 5), (0, 9), (0, 0)]


@pytest.mark.parametrize("blocking", [True, False])
def test_a_burst_of_lookups_waits_for_the_routers_pool_instead_of_failing(url, blocking):
    """The router's client (a blocking pool) answers every lookup of a burst larger than its
    pool; redis-py's default pool fails the excess with "Too many connections" (the negative
    control), which would send those requests to load-only routing."""
    m = member(url, "decode-0", hashes=CHAIN[:4])

    async def scenario():
        await m.join()
        client = schema.connect(url, blocking_pool=blocking, max_connections=4)
        if not blocking:
            client.connection_pool.max_connections = 4
        directory = FleetDirectory(client)
        await directory.refresh()
        records = [directory.records["decode-0"]]
        answers = await asyncio.gather(*(directory.longest_prefixes(CHAIN, records) for _ in range(64)))
        await client.aclose()
        await m.leave()
        return answers

    answers = asyncio.run(scenario())
    if blocking:
        assert answers == [[(4, 4)]] * 64
    else:
        assert None in answers


def test_a_worker_re_registers_and_resyncs_after_redis_lost_its_data(url):
    m = member(url, "decode-0", hashes=CHAIN[:3])

    async def scenario():
        await m.join()
        redis.Redis.from_url(url).flushall()  # what a restarted Redis without persistence looks like
        m.events.stored(CHAIN[3])
        await run_for(FAST.heartbeat_s * 4, m)

    asyncio.run(scenario())
    assert m.registered and members_of(url)["decode-0"].epoch == 1
    assert block_set(url, "decode-0", 1) == set(CHAIN[:4])


def test_a_worker_rides_out_a_redis_outage_and_resyncs_when_it_returns(server):
    url = server.url
    redis.Redis.from_url(url).flushall()
    m = member(url, "decode-0", hashes=CHAIN[:2])

    async def scenario():
        await m.join()
        task = asyncio.create_task(m.run())
        server.kill()
        await asyncio.sleep(0.3)
        m.events.evicted(CHAIN[0])
        m.events.stored(CHAIN[4])  # changes while Redis is down
        await asyncio.sleep(0.3)
        assert not m.registered and not task.done()
        server.start()
        deadline = time.monotonic() + 10
        while not m.registered and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(scenario())
    assert m.registered
    assert block_set(url, "decode-0", 1) == {CHAIN[1], CHAIN[4]}


def test_a_lookup_while_redis_is_down_answers_none_and_does_not_hang(server, url):
    """Each Redis call gives up after its own 1 s timeout: the lookups and the refresh end
    (a generous bound catches a hang; nothing here is timed)."""
    asyncio.run(member(url, "decode-0", hashes=CHAIN).join())
    directory = FleetDirectory(schema.connect(url))

    async def scenario():
        assert await directory.refresh()
        server.kill()
        answers = [await directory.longest_prefixes(CHAIN, list(directory.records.values())) for _ in range(3)]
        return answers, await directory.refresh()

    try:
        answers, refreshed = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    finally:
        server.start()
    assert answers == [None, None, None] and refreshed is False and not directory.up
    assert list(directory.records) == ["decode-0"]  # the last known registry is kept
