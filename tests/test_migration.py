"""The router's retry/migration bookkeeping (router/migration.py), without processes."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.v1 import common_pb2
from router.migration import Attempts, Broken, MigrationPolicy, Progress, StallWatch
from services.engine.errors import OverloadedError, UnavailableError, UpstreamError


def delta(index: int, tokens: list[int], text: str, finish: str = "") -> common_pb2.CompletionDelta:
    return common_pb2.CompletionDelta(index=index, token_ids=tokens, text=text, finish_reason=finish)


def test_progress_resumes_each_unfinished_sequence_from_what_the_client_has():
    progress = Progress(3)
    assert progress.resume() == []  # nothing streamed: start afresh, remote prefill and all
    progress.add(common_pb2.GenerateResponse(outputs=[delta(0, [5, 6], "ab"), delta(1, [7], ""), delta(2, [8], "é")]))
    progress.add(common_pb2.GenerateResponse(outputs=[delta(1, [9], "xyz", "stop"), delta(0, [4], "c")]))
    resume = progress.resume()
    assert [(r.index, list(r.token_ids), r.text_chars) for r in resume] == [(0, [5, 6, 4], 3), (2, [8], 1)]
    assert progress.completion_tokens == 6


def test_attempts_migrate_up_to_the_limit_then_fail_with_the_last_error():
    attempts = Attempts(MigrationPolicy(limit=2), n=1)
    attempts.broke("decode-0", Broken("UNAVAILABLE", "decode-0: gone"))
    attempts.broke("decode-1", Broken("UNAVAILABLE", "decode-1: silent", "stalled"))
    assert attempts.migrations == 2 and attempts.exclude() == {"decode-0", "decode-1"}
    with pytest.raises(UpstreamError, match="after 3 attempts") as e:
        attempts.broke("decode-0", Broken("UNAVAILABLE", "decode-0: gone again"))
    assert e.value.grpc_status == "UNAVAILABLE"


def test_the_client_is_told_its_requests_own_failure_not_the_retries_that_found_nothing():
    attempts = Attempts(MigrationPolicy(limit=2), 1)
    attempts.broke("decode-0", Broken("INTERNAL", "decode-0: the engine failed while running this request"))
    attempts.broke("decode-0", Broken("UNAVAILABLE", "decode-0: connection refused"))
    assert attempts.no_route().grpc_status == "INTERNAL"
    with pytest.raises(UpstreamError) as err:
        attempts.broke("decode-0", Broken("UNAVAILABLE", "decode-0: connection refused"))
    assert err.value.grpc_status == "INTERNAL" and "engine failed" in str(err.value)
    only_unreachable = Attempts(MigrationPolicy(limit=0), 1)
    with pytest.raises(UpstreamError) as err:
        only_unreachable.broke("decode-0", Broken("UNAVAILABLE", "decode-0: gone"))
    assert err.value.grpc_status == "UNAVAILABLE"


def test_no_route_says_why():
    assert isinstance(Attempts(MigrationPolicy(), 1).no_route(), UnavailableError)
    refused = Attempts(MigrationPolicy(), 1)
    refused.refused.add("decode-0")
    assert isinstance(refused.no_route(), OverloadedError)
    assert refused.fallback_exclude() == {"decode-0"}  # a refusal is never retried
    broken = Attempts(MigrationPolicy(), 1)
    broken.broke("decode-0", Broken("INTERNAL", "decode-0: engine died"))
    assert broken.no_route().grpc_status == "INTERNAL"


@pytest.mark.parametrize("code, migrates", [
    (grpc.StatusCode.UNAVAILABLE, True), (grpc.StatusCode.INTERNAL, True), (grpc.StatusCode.CANCELLED, True),
    (grpc.StatusCode.INVALID_ARGUMENT, False), (grpc.StatusCode.DEADLINE_EXCEEDED, False),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, False), (grpc.StatusCode.FAILED_PRECONDITION, False),
])
def test_only_failures_of_the_worker_migrate(code, migrates):
    assert MigrationPolicy.migratable(code) is migrates


def test_heartbeats_come_three_times_per_stall_timeout():
    assert MigrationPolicy(stall_timeout=3.0).heartbeat_ms == 1000


class _SilentCall:
    """A call whose next message never comes, until cancelled (as grpc.aio's read behaves)."""

    def __init__(self, messages: list[str]) -> None:
        self.messages, self.cancelled = list(messages), False
        self._pending: asyncio.Future | None = None

    async def read(self):
        if self.messages:
            return self.messages.pop(0)
        self._pending = asyncio.get_running_loop().create_future()
        return await self._pending

    def cancel(self) -> None:
        self.cancelled = True
        if self._pending is not None:
            self._pending.cancel()


def test_stall_watch_breaks_a_call_that_goes_silent_and_not_one_that_talks():
    async def scenario():
        call = _SilentCall(["a", "b"])
        watch = StallWatch(call, 0.2)
        got = [await watch.read(), await watch.read()]
        await asyncio.sleep(0.5)  # time spent away from the read (a slow client) is not a stall
        assert not call.cancelled
        with pytest.raises(Broken) as broken:
            await watch.read()
        watch.close()
        return got, broken.value, call.cancelled

    got, broken, cancelled = asyncio.run(scenario())
    assert got == ["a", "b"] and cancelled and broken.reason == "stalled" and broken.code == "UNAVAILABLE"


def test_stall_watch_counts_no_silence_while_its_shared_stream_has_no_request_open():
    async def scenario():
        call, idle = _SilentCall([]), [True]
        watch = StallWatch(call, 0.2, idle=lambda: idle[0])
        read = asyncio.ensure_future(watch.read())
        await asyncio.sleep(0.5)
        quiet_while_idle = not call.cancelled
        idle[0] = False  # a request opened: silence from now on is a stall
        with pytest.raises(Broken):
            await read
        watch.close()
        return quiet_while_idle, call.cancelled

    assert asyncio.run(scenario()) == (True, True)


def test_a_resumed_requests_cache_hits_past_its_prompt_are_not_prompt_tokens():
    """Found by the soak: a request that migrates back to a decode worker which cached its prompt
    and the output it brings along has more cached tokens than prompt tokens; its last message
    failed (a negative uint) and the request was lost at its very end."""
    from types import SimpleNamespace

    from services.decode.server import DecodeServicer

    servicer = DecodeServicer.__new__(DecodeServicer)  # _finish reads only `out`
    out = SimpleNamespace(prompt_token_ids=list(range(20)), kv_import=None, num_cached_tokens=48)
    response, record = common_pb2.GenerateResponse(), common_pb2.DisaggregationRecord()
    servicer._finish(response, out, record)
    assert response.usage.prompt_tokens == 20 and response.usage.cached_tokens == 20
    assert response.disaggregation.decode_computed_prompt_tokens == 0
