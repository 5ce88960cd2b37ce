"""A worker's side of the fleet, wired together: its prefix cache mirrored through the block
manager's listener, its registration and index publishing (FleetMember), and for a decode
worker the directory that resolves prefill instance ids to addresses.

    fleet = WorkerFleet(url, servicer, directory)   # before serving: the listener sees every block
    await fleet.join(address)                        # after binding: raises FleetMismatchError
    ... serve ...
    await fleet.leave()                              # draining: routers stop sending work
    await fleet.close()
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from services.fleet.directory import FleetDirectory
from services.fleet.events import CacheEventLog
from services.fleet.member import FleetMember, FleetTiming
from services.fleet.schema import InstanceRecord, connect

if TYPE_CHECKING:
    from services.rpc.worker import WorkerServicerBase


class WorkerFleet:
    def __init__(
        self,
        url: str,
        servicer: WorkerServicerBase,
        directory: FleetDirectory | None = None,
        timing: FleetTiming = FleetTiming(),
    ) -> None:
        self.servicer = servicer
        self.directory = directory
        self.redis = directory.redis if directory is not None else connect(url)
        self.events = CacheEventLog()
        servicer.engine.set_cache_listener(self.events)
        self.timing = timing
        self.member: FleetMember | None = None
        self._tasks: list[asyncio.Task] = []

    async def join(self, address: str) -> bool:
        """Register as `address` and start heartbeats; False while Redis is unreachable (retried)."""
        s = self.servicer
        record = InstanceRecord(s.instance_id, s.role, address, 0, s.identity, s.engine.layout.max_model_len,
                                s.load())
        self.member = FleetMember(self.redis, record, s.load, self.events, self.timing)
        joined = await self.member.join()
        self._tasks.append(asyncio.create_task(self.member.run()))
        if self.directory is not None:
            self._tasks.append(asyncio.create_task(self.directory.run()))
        return joined

    async def leave(self) -> None:
        await _stop(self._tasks[:1])  # first the member's loop, which would register again
        if self.member is not None:
            await self.member.leave()

    async def close(self) -> None:
        await _stop(self._tasks)
        await self.redis.aclose()


async def _stop(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def prefill_resolver(directory: FleetDirectory):
    """For the KV transport: a prefill instance id -> its registered address (None if unknown)."""

    async def resolve(instance_id: str) -> str | None:
        record = await directory.resolve(instance_id)
        return record.address if record is not None and record.role == "prefill" else None

    return resolve
