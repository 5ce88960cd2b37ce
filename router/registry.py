"""The instances the router can route to, and their load.

    StaticRegistry  --prefill-peers / --decode-peers
    RedisRegistry   the same, plus every instance registered in the fleet registry (Redis),
                    refreshed in the background; instances whose block hashing differs from
                    the router's are refused, loudly

Load comes from polling each instance's GetLoad (also how an unreachable one is noticed
within a poll), plus the requests this router has in flight to it (fresher than any poll).
When Redis is unreachable the Redis registry keeps the instances it last saw: an instance
leaves only once it is both gone from Redis and unreachable, so a Redis restart (records
briefly gone until workers re-register) never empties the router.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from pdserve.v1 import worker_pb2, worker_pb2_grpc
from router import metrics
from router.decode_stream import DecodeStream
from services.fleet.directory import FleetDirectory
from services.fleet.schema import InstanceRecord, hash_mismatch, stop_if_cancelled
from services.rpc.security import TLSFiles, internal_channel
from services.rpc.server import CHANNEL_OPTIONS

log = logging.getLogger("pdserve.router")

_STUBS = {"prefill": worker_pb2_grpc.PrefillWorkerStub, "decode": worker_pb2_grpc.DecodeWorkerStub}
# A worker that refuses or drops the connection is unreachable at once; one whose answer is only
# late (DEADLINE_EXCEEDED: its front busy streaming at saturation) after this many late polls in
# a row. On an H100 at saturation one poll came late (logged) while the worker streamed on; such
# a poll marked the only decode worker down, and requests arriving until the next answered poll
# had nowhere to go: UNAVAILABLE (issue #32, 2026-12-05).
SLOW_POLLS_TO_FAIL = 3


@dataclass
class Instance:
    instance_id: str
    role: str  # "prefill" | "decode"
    address: str
    stub: object = field(repr=False)
    load: worker_pb2.LoadResponse | None = None
    in_flight: int = 0  # requests this router sent and that have not finished
    healthy: bool = True
    last_ok: float = 0.0
    slow_polls: int = 0  # GetLoad polls in a row that ran out of time (SLOW_POLLS_TO_FAIL)
    record: InstanceRecord | None = None  # its fleet registration (None: a static peer, not indexed)
    stream: DecodeStream | None = field(default=None, repr=False)  # decode: this router's shared stream, made on use

    @property
    def queue(self) -> int:
        """Work ahead of a new request here: what the worker reports, or what we sent it."""
        reported = self.load.running + self.load.waiting if self.load is not None else 0
        return max(reported, self.in_flight)


class StaticRegistry:
    def __init__(self, prefill_peers: dict[str, str], decode_peers: dict[str, str], poll_s: float = 0.5,
                 tls: TLSFiles | None = None) -> None:
        """`tls`: the internal credentials workers require (security.py); None: plaintext."""
        self.tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._retired: list[grpc.aio.Channel] = []
        self.instances: dict[str, Instance] = {}
        for role, peers in (("prefill", prefill_peers), ("decode", decode_peers)):
            for instance_id, address in peers.items():
                self._add(instance_id, role, address)
        self.poll_s = poll_s
        self._tasks: list[asyncio.Task] = []

    def decodes(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.role == "decode" and i.healthy]

    def prefills(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.role == "prefill" and i.healthy]

    async def discover(self) -> None:
        """Bring the instance list up to date now (static peers: nothing to do)."""

    async def handshake_any(self, role: str, timeout: float = 60.0) -> worker_pb2.HandshakeResponse:
        """The first handshake answered by an instance of `role` (waits for one to come up)."""
        deadline = time.monotonic() + timeout
        while True:
            await self.discover()
            for inst in [i for i in self.instances.values() if i.role == role]:
                try:
                    return await inst.stub.Handshake(
                        worker_pb2.HandshakeRequest(instance_id="router", role="router"), timeout=2.0
                    )
                except grpc.aio.AioRpcError:
                    continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {role} instance answered within {timeout:.0f}s")
            await asyncio.sleep(0.5)

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._poll_forever()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for channel in [*self._channels.values(), *self._retired]:
            await channel.close()

    # ---- internals -------------------------------------------------------------------------

    def _add(self, instance_id: str, role: str, address: str, record: InstanceRecord | None = None) -> Instance:
        self._retire(instance_id)
        channel = internal_channel(address, self.tls, CHANNEL_OPTIONS)
        self._channels[instance_id] = channel
        inst = Instance(instance_id, role, address, _STUBS[role](channel), record=record,
                        load=record.load if record is not None else None)
        self.instances[instance_id] = inst
        return inst

    def _retire(self, instance_id: str) -> None:
        # Closed at shutdown, not now: calls still streaming through it must finish.
        self.instances.pop(instance_id, None)
        channel = self._channels.pop(instance_id, None)
        if channel is not None:
            self._retired.append(channel)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._poll(i) for i in list(self.instances.values())))
            for role in _STUBS:
                metrics.INSTANCES.labels(role).set(sum(1 for i in self.instances.values()
                                                       if i.role == role and i.healthy))
            await asyncio.sleep(self.poll_s)

    async def _poll(self, inst: Instance) -> None:
        try:
            inst.load = await inst.stub.GetLoad(worker_pb2.LoadRequest(), timeout=max(1.0, 2 * self.poll_s))
            if not inst.healthy:
                log.info("%s %s is back", inst.role, inst.instance_id)
            inst.healthy, inst.last_ok, inst.slow_polls = True, time.monotonic(), 0
        except grpc.aio.AioRpcError as e:
            late = e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            inst.slow_polls = inst.slow_polls + 1 if late else 0
            if late and inst.slow_polls < SLOW_POLLS_TO_FAIL:
                log.info("%s %s answered no load poll in time (%d in a row)", inst.role, inst.instance_id,
                         inst.slow_polls)
                return
            if inst.healthy:
                log.warning("%s %s unreachable: %s", inst.role, inst.instance_id, e.code().name)
            inst.healthy = False


class RedisRegistry(StaticRegistry):
    def __init__(
        self,
        prefill_peers: dict[str, str],
        decode_peers: dict[str, str],
        directory: FleetDirectory,
        hashing: worker_pb2.ModelIdentity,
        poll_s: float = 0.5,
        tls: TLSFiles | None = None,
    ) -> None:
        """`hashing`: the router's block size, hash seed and hash scheme; instances must match."""
        super().__init__(prefill_peers, decode_peers, poll_s, tls)
        self.directory = directory
        self.hashing = hashing
        self._refused: set[tuple[str, int]] = set()
        metrics.REGISTRY_AGE.set_function(self._age)

    def start(self) -> None:
        super().start()
        self._tasks.append(asyncio.create_task(self._refresh_forever()))

    async def discover(self) -> None:
        if await self.directory.refresh():
            self._sync(self.directory.records)
        metrics.REDIS_UP.set(int(self.directory.up))

    async def _refresh_forever(self) -> None:
        while True:
            await self.discover()
            stop_if_cancelled()
            await asyncio.sleep(self.directory.refresh_s)

    def _sync(self, records: dict[str, InstanceRecord]) -> None:
        for instance_id, record in records.items():
            if record.role not in _STUBS or not self._compatible(record):
                continue
            inst = self.instances.get(instance_id)
            if inst is None or inst.address != record.address or inst.role != record.role:
                if inst is None:
                    log.info("%s %s joined at %s", record.role, instance_id, record.address)
                else:
                    log.info("%s %s moved to %s", record.role, instance_id, record.address)
                self._add(instance_id, record.role, record.address, record)
            else:
                inst.record = record  # a new epoch after a restart: a new block set to look up
        for inst in list(self.instances.values()):
            if inst.record is not None and inst.instance_id not in records and not inst.healthy:
                log.info("%s %s left", inst.role, inst.instance_id)
                self._retire(inst.instance_id)

    def _compatible(self, record: InstanceRecord) -> bool:
        mismatch = hash_mismatch(self.hashing, record.identity)
        if mismatch is None:
            return True
        if (record.instance_id, record.epoch) not in self._refused:
            self._refused.add((record.instance_id, record.epoch))
            metrics.REFUSED.inc()
            log.error("refusing %s %s: it hashes blocks differently from this router (%s); its prefix hits "
                      "could never be found. Start it (or the router) with the same --block-size and pdserve "
                      "version.", record.role, record.instance_id, mismatch)
        return False

    def _age(self) -> float:
        last = self.directory.last_refresh
        return -1.0 if last is None else time.monotonic() - last
