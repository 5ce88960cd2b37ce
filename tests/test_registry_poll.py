"""The router's load polls (router/registry.py): a worker that refuses the connection is
unreachable at once; one whose answer is only late (its front busy at saturation) stays in
the pool until SLOW_POLLS_TO_FAIL polls in a row are late."""

from __future__ import annotations

import asyncio

import grpc

from pdserve.v1 import worker_pb2
from router.registry import SLOW_POLLS_TO_FAIL, StaticRegistry


class ScriptedStub:
    """GetLoad answers from a script: a status code raises that error, None answers."""

    def __init__(self, script: list[grpc.StatusCode | None]) -> None:
        self.script = list(script)

    async def GetLoad(self, request, timeout=None):  # noqa: N802 - the gRPC method's name
        code = self.script.pop(0)
        if code is None:
            return worker_pb2.LoadResponse(running=3)
        raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="scripted")


def healthy_after_each(script: list[grpc.StatusCode | None]) -> list[bool]:
    async def run() -> list[bool]:
        registry = StaticRegistry({}, {"d": "127.0.0.1:1"})
        inst = registry.instances["d"]
        inst.stub = ScriptedStub(script)
        seen = []
        for _ in script:
            await registry._poll(inst)
            seen.append(inst.healthy)
        await registry.close()
        return seen

    return asyncio.run(run())


LATE, GONE = grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE


def test_late_polls_below_the_threshold_keep_a_worker_in_the_pool():
    script = [LATE] * (SLOW_POLLS_TO_FAIL - 1) + [None] + [LATE] * (SLOW_POLLS_TO_FAIL - 1)
    assert all(healthy_after_each(script))  # an answer in between starts the count again


def test_late_polls_in_a_row_take_a_worker_out_until_it_answers():
    seen = healthy_after_each([LATE] * SLOW_POLLS_TO_FAIL + [None])
    assert seen == [True] * (SLOW_POLLS_TO_FAIL - 1) + [False, True]


def test_a_refused_connection_takes_a_worker_out_at_once():
    assert healthy_after_each([GONE, LATE, None]) == [False, False, True]
