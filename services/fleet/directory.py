"""Reading the fleet: the live instances as last read from Redis, and prefix lookups.

The router and decode workers keep one `FleetDirectory` each, refreshed in the background.
When Redis is unreachable the directory keeps its last snapshot (`up` goes False), so callers
go on serving with the instances they knew; lookups answer None at once until a refresh
succeeds again, and callers then route on load alone.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.asyncio import Redis

from services.fleet import schema
from services.fleet.schema import REDIS_ERRORS, InstanceRecord, stop_if_cancelled
from services.fleet.scripts import Scripts

log = logging.getLogger("pdserve.fleet")


class FleetDirectory:
    def __init__(self, redis: Redis, refresh_s: float = 0.5, timeout_s: float = 0.25) -> None:
        self.redis = redis
        self.scripts = Scripts(redis)
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s  # a lookup slower than this is a miss, not a slow request
        self.records: dict[str, InstanceRecord] = {}
        # Every record ever read: a Redis that restarted empty forgets instances for a heartbeat
        # or two, while routers still name them; a peer is then dialled at its last address
        # (if it is gone, the caller's fallback applies) rather than refused as unknown.
        self.known: dict[str, InstanceRecord] = {}
        self.up = False
        self.last_refresh: float | None = None  # time.monotonic() of the last successful read
        self._unreadable: set[str] = set()

    async def run(self) -> None:
        while True:
            await self.refresh()
            stop_if_cancelled()
            await asyncio.sleep(self.refresh_s)

    async def refresh(self) -> bool:
        """Re-read every live record; on failure keep the last snapshot and answer False."""
        try:
            raw = await asyncio.wait_for(
                self.scripts.list(keys=[schema.INSTANCES], args=[schema.RECORD_PREFIX]), max(1.0, self.timeout_s)
            )
        except REDIS_ERRORS as e:
            self._unreachable(e)
            return False
        records: dict[str, InstanceRecord] = {}
        for instance_id, flat in zip(raw[::2], raw[1::2]):
            record = self._parse(instance_id, flat)
            if record is not None:
                records[instance_id] = record
        if not self.up:
            log.info("fleet directory: Redis answers; %d live instances", len(records))
        self.records, self.up, self.last_refresh = records, True, time.monotonic()
        self.known.update(records)
        return True

    async def resolve(self, instance_id: str) -> InstanceRecord | None:
        """The record of `instance_id`: from the snapshot, else read now (it may have just joined)."""
        record = self.records.get(instance_id)
        if record is not None or not self.up:
            return record or self.known.get(instance_id)
        try:
            flat = await asyncio.wait_for(self.redis.hgetall(schema.record_key(instance_id)), self.timeout_s)
        except REDIS_ERRORS as e:
            self._unreachable(e)
            return self.known.get(instance_id)
        record = self._parse(instance_id, [v for item in flat.items() for v in item]) if flat else None
        if record is not None:
            self.known[instance_id] = record
        return record or self.known.get(instance_id)

    async def longest_prefixes(
        self, hashes: list[int], records: list[InstanceRecord]
    ) -> list[tuple[int, int]] | None:
        """Per record: (how many leading `hashes` its block set holds, its block count), in one
        round-trip. None when Redis cannot answer within the timeout."""
        if not self.up:
            return None
        if not records:
            return []
        try:
            raw = await asyncio.wait_for(
                self.scripts.lookup(keys=[r.blocks_key for r in records], args=[schema.hash_hex(h) for h in hashes]),
                self.timeout_s,
            )
        except REDIS_ERRORS as e:
            self._unreachable(e)
            return None
        return [(int(n), int(size)) for n, size in raw]

    def _parse(self, instance_id: str, flat: list[str]) -> InstanceRecord | None:
        try:
            return InstanceRecord.from_fields(dict(zip(flat[::2], flat[1::2])))
        except ValueError as e:
            if instance_id not in self._unreadable:
                log.error("instance %s: unreadable record in Redis (%s); ignoring it", instance_id, e)
                self._unreadable.add(instance_id)
            return None

    def _unreachable(self, err: BaseException) -> None:
        if self.up:
            log.warning("fleet directory: Redis unreachable (%s: %s); keeping the %d instances last seen",
                        type(err).__name__, err, len(self.records))
        self.up = False
