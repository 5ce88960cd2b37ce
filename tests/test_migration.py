"""The router's retry/migration bookkeeping (router/migration.py), without processes."""

from __future__ import annotations

import grpc
import pytest

from pdserve.v1 import common_pb2
from router.migration import Attempts, Broken, MigrationPolicy, Progress
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
