"""Retries and migration: one request's attempts across decode instances.

    attempt on decode-0 ── RESOURCE_EXHAUSTED before any token ──> refused: the next best
                      │                                             instance (no migration)
                      ├── the stream broke (UNAVAILABLE: died, reset; INTERNAL; ...) ──┐
                      └── no message for --decode-stall-timeout (decode heartbeats   ──┤
                          while it works, so silence means frozen or gone)             │
    attempt on decode-1 <── migrate: the original prompt + each unfinished sequence's ─┘
                            streamed output (DecodeRequest.resume), admission bound skipped

The client's stream goes on where it stopped: the new decode instance treats the resumed
tokens as output (penalties, min_tokens, stop strings, text and seeded draws continue through
them) and streams only what comes after. A request migrates at most `limit` times (a poison
request that breaks every decode it reaches fails then, with the last error); instances that
failed it are avoided while any other is available.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from pdserve.v1 import common_pb2, worker_pb2
from services.engine.errors import OverloadedError, PdserveError, UnavailableError, UpstreamError

# Statuses after which the request may succeed elsewhere. Not: the request's own fault
# (INVALID_ARGUMENT, FAILED_PRECONDITION, ...), the client's deadline, or a refusal.
_MIGRATABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                         grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED, grpc.StatusCode.DATA_LOSS})


@dataclass(frozen=True)
class MigrationPolicy:
    limit: int = 3  # migrations per request
    stall_timeout: float = 15.0  # seconds without any message from the decode instance

    @property
    def heartbeat_ms(self) -> int:
        """How often decode should speak up while it has nothing to send (a third of the stall
        timeout: a heartbeat or two may be late before the router gives up)."""
        return max(1, int(self.stall_timeout * 1000 / 3))

    @staticmethod
    def migratable(code: grpc.StatusCode) -> bool:
        return code in _MIGRATABLE


class StallWatch:
    """Notices a decode call that sends nothing for `stall_s` while the router waits on it, and
    cancels it (within 1.25 x stall_s). One timer per call that checks four times per period,
    instead of a timeout around every read (asyncio.wait_for makes a task per message: ~50 us
    each on a token's path)."""

    def __init__(self, call, stall_s: float, idle: Callable[[], bool] | None = None) -> None:
        """`idle`: while it says True, silence is no stall (a shared stream with no request open:
        its worker has nothing to say)."""
        self.call, self.stall_s, self.idle = call, stall_s, idle
        self.loop = asyncio.get_running_loop()
        self.waiting_since: float | None = None
        self.stalled = False
        self._timer = self.loop.call_later(stall_s / 4, self._check)

    async def read(self):
        """The call's next message; Broken("stalled") once the watch cancelled it."""
        self.waiting_since = self.loop.time()
        try:
            return await self.call.read()
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            if self.stalled:  # our own cancel, however grpc reports it
                raise Broken("UNAVAILABLE", f"sent nothing for {self.stall_s:g}s", "stalled") from None
            raise
        finally:
            self.waiting_since = None

    def _check(self) -> None:
        if self.idle is not None and self.idle() and self.waiting_since is not None:
            self.waiting_since = self.loop.time()
        since = self.waiting_since
        if since is not None and self.loop.time() - since >= self.stall_s:
            self.stalled = True
            self.call.cancel()
            return
        self._timer = self.loop.call_later(self.stall_s / 4, self._check)

    def close(self) -> None:
        self._timer.cancel()


class Broken(Exception):
    """A decode stream broke or stalled; the request may go on elsewhere. `code` is the gRPC
    status the client gets if it cannot; `reason` labels the migration metric."""

    def __init__(self, code: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason or code.lower()


class Refused(Exception):
    """A decode instance answered RESOURCE_EXHAUSTED before streaming anything."""


@dataclass
class _Sequence:
    token_ids: list[int] = field(default_factory=list)
    text_chars: int = 0
    finished: bool = False


class Progress:
    """What the client has received of each sequence, across attempts."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seqs = {i: _Sequence() for i in range(n)}

    def add(self, response: common_pb2.GenerateResponse) -> int:
        """Record a response on its way to the client; returns how many tokens it carried."""
        count = 0
        for delta in response.outputs:  # on every token's path: each protobuf field read once
            seq, ids = self.seqs[delta.index], delta.token_ids
            seq.token_ids += ids
            seq.text_chars += len(delta.text)
            if delta.finish_reason:
                seq.finished = True
            count += len(ids)
        return count

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs.values())

    def resume(self) -> list[worker_pb2.ResumedSequence]:
        """The unfinished sequences to continue; empty while nothing was streamed (a fresh start)."""
        if not any(s.token_ids or s.text_chars for s in self.seqs.values()):
            return []
        return [worker_pb2.ResumedSequence(index=i, token_ids=s.token_ids, text_chars=s.text_chars)
                for i, s in self.seqs.items() if not s.finished]


class Attempts:
    """One request's tries: which decode instances refused it, which failed it, how often it moved."""

    def __init__(self, policy: MigrationPolicy, n: int) -> None:
        self.policy = policy
        self.progress = Progress(n)
        self.refused: set[str] = set()
        self.failed: list[str] = []  # in order; an instance may fail a request more than once
        self.used: list[str] = []  # decode instances that streamed this request, in order
        self.migrations = 0
        self._last: Broken | None = None
        self._cause: Broken | None = None  # the first break that was not just "unreachable"

    @property
    def migrating(self) -> bool:
        return self.migrations > 0

    def exclude(self) -> set[str]:
        return self.refused | set(self.failed)

    def fallback_exclude(self) -> set[str]:
        """When every instance refused or failed it: try those that failed it again (they may
        have recovered), never those that refused it."""
        return self.refused

    def started(self, instance_id: str) -> None:
        if not self.used or self.used[-1] != instance_id:
            self.used.append(instance_id)

    def broke(self, instance_id: str, error: Broken) -> None:
        """Count a migration, or raise the error the client gets once the limit is spent."""
        self.failed.append(instance_id)
        self._last = error
        if self._cause is None and error.code != "UNAVAILABLE":
            self._cause = error
        if self.migrations >= self.policy.limit:
            error = self._reported()
            raise UpstreamError(error.code, f"{error} (gave up after {self.migrations + 1} attempts; "
                                            f"--migration-limit {self.policy.limit})")
        self.migrations += 1

    def _reported(self) -> Broken:
        """What the client is told when the request cannot go on: its own failure (a decode
        engine that died under it: INTERNAL) rather than the UNAVAILABLE of later tries that
        found no live instance; else the last error."""
        return self._cause or self._last

    def no_route(self) -> PdserveError:
        """The error when no decode instance is left to try."""
        if self._last is not None:
            error = self._reported()
            return UpstreamError(error.code, f"{error}; no other decode instance is available")
        if self.refused:
            return OverloadedError(f"every decode instance is at its admission limit ({len(self.refused)} tried); "
                                   "retry later")
        return UnavailableError("no decode instance is available")
