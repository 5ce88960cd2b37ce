"""Admission control: a bounded waiting queue, in requests and in prompt tokens.

A worker that accepted everything would queue without end: time to first token grows for
every client while the queue drains. Instead, a request that would take the queue past either
bound is refused at once with OverloadedError (RESOURCE_EXHAUSTED, HTTP 429), before any of
its work is done or any block allocated, and the router tries an instance with room.

    admitted ──reserve()──> queued (counted) ──the engine seats it──> running (not counted)
                                     └── finished, aborted or refused first ─> released

"Queued" is from admission until the scheduler first seats the request (any of its sequences
leaves WAITING) or it ends. Preempted sequences that return to the queue are not counted
again: they were admitted once. Reservations are taken on the event loop and released from
the engine thread, so both sides hold the lock.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from services.engine.errors import ConfigError, OverloadedError


@dataclass(frozen=True)
class AdmissionLimits:
    max_queued_requests: int
    max_queued_tokens: int

    def __post_init__(self) -> None:
        if self.max_queued_requests < 1 or self.max_queued_tokens < 1:
            raise ConfigError("max_queued_requests and max_queued_tokens must be >= 1")

    @classmethod
    def derive(cls, max_num_seqs: int, pool_tokens: int, requests: int | None = None,
               tokens: int | None = None) -> AdmissionLimits:
        """Defaults from the engine: as many queued requests as one step seats, and as many
        queued prompt tokens as the KV pool holds (a queue that could not fit in the pool
        would wait at least one pool turnover)."""
        return cls(requests if requests is not None else max_num_seqs,
                   tokens if tokens is not None else pool_tokens)


@dataclass
class Ticket:
    """One admitted request's place in the queue."""

    tokens: int
    request_id: str | None = None
    seen: bool = False  # the engine thread has taken the request in
    key: int = field(default=0)


class Admission:
    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._tickets: dict[int, Ticket] = {}
        self._by_request: dict[str, Ticket] = {}
        self._tokens = 0
        self._keys = itertools.count()

    @property
    def queued(self) -> tuple[int, int]:
        """(requests, prompt tokens) admitted and not yet seated."""
        with self._lock:
            return len(self._tickets), self._tokens

    def reserve(self, tokens: int) -> Ticket:
        """A place in the queue for a prompt of `tokens`, or OverloadedError."""
        limits = self.limits
        with self._lock:
            if len(self._tickets) + 1 > limits.max_queued_requests:
                raise OverloadedError(f"overloaded: {len(self._tickets)} requests are already waiting "
                                      f"(limit {limits.max_queued_requests}); retry later")
            if self._tokens + tokens > limits.max_queued_tokens and self._tickets:
                # An empty queue admits any prompt: the engine checked it fits the context.
                raise OverloadedError(f"overloaded: {self._tokens} prompt tokens are already waiting, this request "
                                      f"adds {tokens} (limit {limits.max_queued_tokens}); retry later")
            ticket = Ticket(tokens, key=next(self._keys))
            self._tickets[ticket.key] = ticket
            self._tokens += tokens
            return ticket

    def bind(self, ticket: Ticket, request_id: str) -> None:
        with self._lock:
            if ticket.key in self._tickets:
                ticket.request_id = request_id
                self._by_request[request_id] = ticket

    def seen(self, request_id: str) -> None:
        """The engine thread took the request in (from now on its state says whether it waits)."""
        with self._lock:
            ticket = self._by_request.get(request_id)
            if ticket is not None:
                ticket.seen = True

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            self._drop(ticket)

    def release_started(self, still_waiting: Callable[[str], bool]) -> None:
        """Engine thread, after a step: release every seen request that no longer waits."""
        if not self._tickets:
            return
        with self._lock:
            for ticket in [t for t in self._by_request.values() if t.seen]:
                if not still_waiting(ticket.request_id):
                    self._drop(ticket)

    def _drop(self, ticket: Ticket) -> None:
        if self._tickets.pop(ticket.key, None) is not None:
            self._tokens -= ticket.tokens
            if ticket.request_id is not None:
                self._by_request.pop(ticket.request_id, None)
