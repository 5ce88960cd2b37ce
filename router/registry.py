"""The instances the router can route to, and their load.

Static today (--prefill-peers / --decode-peers); the Redis registry replaces it later behind
the same two calls, `decodes()` and `prefills()`. Load comes from polling each worker's
GetLoad, plus the requests this router has in flight to it (fresher than any poll).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from pdserve.v1 import worker_pb2, worker_pb2_grpc
from services.rpc.server import CHANNEL_OPTIONS

log = logging.getLogger("pdserve.router")


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

    @property
    def queue(self) -> int:
        """Work ahead of a new request here: what the worker reports, or what we sent it."""
        reported = self.load.running + self.load.waiting if self.load is not None else 0
        return max(reported, self.in_flight)


class StaticRegistry:
    def __init__(self, prefill_peers: dict[str, str], decode_peers: dict[str, str], poll_s: float = 0.5) -> None:
        self._channels: list[grpc.aio.Channel] = []
        self.instances: dict[str, Instance] = {}
        for role, peers, stub_type in (
            ("prefill", prefill_peers, worker_pb2_grpc.PrefillWorkerStub),
            ("decode", decode_peers, worker_pb2_grpc.DecodeWorkerStub),
        ):
            for instance_id, address in peers.items():
                channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
                self._channels.append(channel)
                self.instances[instance_id] = Instance(instance_id, role, address, stub_type(channel))
        self.poll_s = poll_s
        self._task: asyncio.Task | None = None

    def decodes(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.role == "decode" and i.healthy]

    def prefills(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.role == "prefill" and i.healthy]

    async def handshake_any(self, role: str, timeout: float = 60.0) -> worker_pb2.HandshakeResponse:
        """The first handshake answered by an instance of `role` (waits for one to come up)."""
        deadline = time.monotonic() + timeout
        while True:
            for inst in (i for i in self.instances.values() if i.role == role):
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
        self._task = asyncio.create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._poll(i) for i in self.instances.values()))
            await asyncio.sleep(self.poll_s)

    async def _poll(self, inst: Instance) -> None:
        try:
            inst.load = await inst.stub.GetLoad(worker_pb2.LoadRequest(), timeout=max(1.0, 2 * self.poll_s))
            if not inst.healthy:
                log.info("%s %s is back", inst.role, inst.instance_id)
            inst.healthy, inst.last_ok = True, time.monotonic()
        except grpc.aio.AioRpcError as e:
            if inst.healthy:
                log.warning("%s %s unreachable: %s", inst.role, inst.instance_id, e.code().name)
            inst.healthy = False

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for channel in self._channels:
            await channel.close()
