"""A worker's membership in the fleet: registration, TTL heartbeat, prefix-index publishing.

    join()   register (new epoch), then resync: the block set := every hash the cache holds
    run()    every publish_s: the net stored/evicted changes, one script call per batch
             every heartbeat_s: load into the record, renew the record's and block set's TTL
             when a write answers "not registered" (record expired, Redis restarted empty) or
             Redis is unreachable: keep serving, keep mirroring the cache locally, and
             register + resync when Redis answers again
    leave()  on graceful shutdown: record and block set deleted at once (no TTL wait)

A mismatched identity (another model, block size, hash seed or hash scheme than the live
instances) is rejected by the registration script: `join` raises FleetMismatchError, so a
misconfigured worker fails at start-up with the fields that differ.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram
from redis.asyncio import Redis

from pdserve.v1 import worker_pb2
from services.fleet import schema
from services.fleet.events import CacheEventLog
from services.fleet.schema import REDIS_ERRORS, FleetMismatchError, InstanceRecord, stop_if_cancelled
from services.fleet.scripts import Scripts

log = logging.getLogger("pdserve.fleet")

REGISTERED = Gauge("pdserve:fleet_registered", "1 while this worker's record and block set are in Redis")
INDEX_LAG = Histogram("pdserve:prefix_index_lag_seconds", "From a prefix-cache change to its publication in Redis",
                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
INDEX_CHANGES = Counter("pdserve:prefix_index_changes", "Block hashes published to the prefix index", ["kind"])
RESYNCS = Counter("pdserve:prefix_index_resyncs", "Full resyncs of this worker's block set")


@dataclass(frozen=True)
class FleetTiming:
    heartbeat_s: float = 1.0
    ttl_s: float = 3.0  # a dead instance drops out of the registry within this
    publish_s: float = 0.05  # index changes wait at most this long (plus one round-trip)

    def __post_init__(self) -> None:
        if not (0 < self.publish_s and 0 < self.heartbeat_s < self.ttl_s):
            raise ValueError(f"need 0 < publish_s and 0 < heartbeat_s < ttl_s, got {self}")

    @property
    def ttl_ms(self) -> int:
        return int(self.ttl_s * 1000)


class FleetMember:
    def __init__(
        self,
        redis: Redis,
        record: InstanceRecord,
        load: Callable[[], worker_pb2.LoadResponse],
        events: CacheEventLog,
        timing: FleetTiming = FleetTiming(),
    ) -> None:
        """`record` is this instance as it registers (its epoch is assigned by Redis on join)."""
        self.redis = redis
        self.scripts = Scripts(redis)
        self.record = record
        self.load = load
        self.events = events
        self.timing = timing
        self.epoch: int | None = None
        self.registered = False
        self._reachable = True
        self._next_beat = 0.0
        self._refusal: str | None = None  # the last refusal logged (each is logged once)

    @property
    def instance_id(self) -> str:
        return self.record.instance_id

    def _keys(self) -> list[str]:
        return [schema.record_key(self.instance_id), schema.blocks_key(self.instance_id, self.epoch or 0)]

    async def join(self) -> bool:
        """Register now. False when Redis is unreachable (run() keeps trying); raises FleetMismatchError."""
        try:
            await self._register()
        except REDIS_ERRORS as e:
            self._unreachable(e)
        return self.registered

    async def run(self) -> None:
        """Heartbeat and publish for the life of the worker; never raises for Redis trouble."""
        while True:
            stop_if_cancelled()
            try:
                if not self.registered:
                    await self._register()
                else:
                    await self._publish()
                    if time.monotonic() >= self._next_beat:
                        await self._heartbeat()
            except FleetMismatchError as e:
                self._refused(str(e))
            except REDIS_ERRORS as e:
                self._unreachable(e)
            await asyncio.sleep(self.timing.publish_s if self.registered else self.timing.heartbeat_s)

    async def leave(self) -> None:
        """Drop out of the registry now (graceful shutdown); a no-op when Redis is unreachable."""
        if self.epoch is None:
            return
        try:
            await self.scripts.leave(keys=[schema.INSTANCES, *self._keys()], args=[self.instance_id, self.epoch])
            log.info("%s left the fleet", self.instance_id)
        except REDIS_ERRORS:
            pass  # the record expires by its TTL
        self.registered = False
        REGISTERED.set(0)

    # ---- internals -------------------------------------------------------------------------

    async def _register(self) -> None:
        if self.epoch is None:
            self.epoch = int(await self.redis.incr(schema.epoch_key(self.instance_id)))
        record = dataclasses.replace(self.record, epoch=self.epoch, load=self.load())
        pairs = [v for item in {**record.static_fields(), **record.load_fields()}.items() for v in item]
        answer = await self.scripts.register(
            keys=[schema.INSTANCES, schema.record_key(self.instance_id), schema.epoch_key(self.instance_id)],
            args=[self.instance_id, self.epoch, self.timing.ttl_ms, schema.RECORD_PREFIX,
                  len(schema.IDENTITY_FIELDS), *schema.IDENTITY_FIELDS, *pairs],
        )
        if answer[0] == "mismatch":
            _, other, name, theirs, ours = answer
            raise FleetMismatchError(
                f"{record.role} {self.instance_id} cannot join the fleet: {name} is {ours!r} here but {theirs!r} "
                f"on live instance {other} (every instance must serve the same model with the same block size, "
                "hash seed and hash scheme; use another Redis for another model)"
            )
        if answer[0] == "superseded":
            self._refused(f"{self.instance_id}: a newer process (epoch {answer[1]} > ours {self.epoch}) holds this "
                          "instance id; not registering while it is alive")
            return
        await self._resync()
        self.registered, self._reachable, self._refusal = True, True, None
        self._next_beat = time.monotonic() + self.timing.heartbeat_s
        REGISTERED.set(1)
        log.info("registered %s %s at %s (epoch %d, %d cached blocks)", record.role, self.instance_id,
                 record.address, self.epoch, len(self.events))

    async def _resync(self) -> None:
        hashes = [schema.hash_hex(h) for h in self.events.snapshot()]
        if not await self.scripts.resync(keys=self._keys(), args=[self.epoch, self.timing.ttl_ms, *hashes]):
            self._lost("record gone during resync")
        RESYNCS.inc()

    async def _publish(self) -> None:
        changes = self.events.drain()
        if changes.resync:
            await self._resync()
            return
        if not changes.added and not changes.removed:
            return
        added = [schema.hash_hex(h) for h in changes.added]
        removed = [schema.hash_hex(h) for h in changes.removed]
        ok = await self.scripts.publish(keys=self._keys(),
                                        args=[self.epoch, self.timing.ttl_ms, len(added), *added, *removed])
        if not ok:
            self._lost("record expired or Redis restarted")  # the next register resyncs everything
            return
        INDEX_LAG.observe(time.monotonic() - changes.oldest)
        INDEX_CHANGES.labels("stored").inc(len(added))
        INDEX_CHANGES.labels("evicted").inc(len(removed))

    async def _heartbeat(self) -> None:
        pairs = [v for item in schema.load_fields(self.load()).items() for v in item]
        if not await self.scripts.heartbeat(keys=self._keys(), args=[self.epoch, self.timing.ttl_ms, *pairs]):
            self._lost("record expired or Redis restarted")
        self._next_beat = time.monotonic() + self.timing.heartbeat_s

    def _refused(self, message: str) -> None:
        if message != self._refusal:
            log.error("%s", message)
            self._refusal = message

    def _lost(self, why: str) -> None:
        if self.registered:
            log.warning("%s: no longer registered (%s); registering again", self.instance_id, why)
        self.registered = False
        REGISTERED.set(0)

    def _unreachable(self, err: BaseException) -> None:
        if self._reachable:
            log.warning("%s: Redis unreachable (%s: %s); serving on, will register and resync when it is back",
                        self.instance_id, type(err).__name__, err)
        self._reachable = False
        self.registered = False
        REGISTERED.set(0)
