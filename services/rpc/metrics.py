"""Prometheus metrics, named after vLLM's (vllm:X -> pdserve:X) so dashboards adapt easily.

Each process exposes its own registry over HTTP (`/metrics`); the router serves it on its
--http-port, workers on --metrics-port.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

TTFT = Histogram("pdserve:time_to_first_token_seconds", "Time to first token", buckets=_LATENCY)
ITL = Histogram("pdserve:inter_token_latency_seconds", "Time between consecutive output tokens", buckets=_ITL)
E2E = Histogram("pdserve:e2e_request_latency_seconds", "End-to-end request latency", buckets=_LATENCY)
REQUESTS = Counter("pdserve:request_success", "Finished requests", ["finished_reason"])
PROMPT_TOKENS = Counter("pdserve:prompt_tokens", "Prompt tokens of finished requests")
GENERATION_TOKENS = Counter("pdserve:generation_tokens", "Generated tokens of finished requests")

RUNNING = Gauge("pdserve:num_requests_running", "Sequences in the running batch")
WAITING = Gauge("pdserve:num_requests_waiting", "Sequences waiting (incl. for remote KV)")
KV_USAGE = Gauge("pdserve:kv_cache_usage_perc", "Fraction of KV blocks held by sequences")
PREEMPTIONS = Counter("pdserve:num_preemptions", "Sequences preempted (recomputed later)")
PREFIX_HITS = Counter("pdserve:prefix_cache_hits", "Prompt tokens served from the prefix cache")
PREFIX_QUERIES = Counter("pdserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache")

KV_BLOCKS_SHIPPED = Counter("pdserve:kv_blocks_shipped", "KV blocks sent (prefill) or received (decode)", ["direction"])
KV_BYTES_SHIPPED = Counter("pdserve:kv_bytes_shipped", "KV bytes sent (prefill) or received (decode)", ["direction"])
KV_TRANSFER = Histogram("pdserve:kv_transfer_seconds", "Decode's call to prefill until the last block is in its cache",
                        buckets=_LATENCY)
KV_FALLBACKS = Counter("pdserve:kv_transfer_fallbacks", "Remote prefills that fell back to local prefill")

ADMISSION_REJECTIONS = Counter("pdserve:admission_rejections",
                               "Requests refused as overloaded: by a worker's full waiting queue (where=worker), "
                               "or to the client once every decode instance refused (where=router)", ["where"])

STREAM_FRAMES = Counter("pdserve:stream_frames", "Frames a decode worker sent on GenerateStream, each with "
                        "many requests' responses (heartbeats not counted)")
STREAM_RESPONSES = Counter("pdserve:stream_responses", "Responses a decode worker sent inside GenerateStream frames")


def serve_metrics(host: str, port: int) -> None:
    """Expose this process's metrics on http://host:port/metrics (a daemon thread)."""
    if port:
        start_http_server(port, addr=host)


class StreamTimer:
    """TTFT, inter-token latency and e2e latency of one streamed request, into the histograms."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()
        self.first: float | None = None
        self.count = 0
        self.done = False

    def tokens(self, count: int) -> bool:
        """Record a message carrying `count` new tokens; True if it carried the first ones."""
        if not count:
            return False
        self.count += count
        now = time.monotonic()
        first = self.first is None
        if first:
            self.first = now
            TTFT.observe(now - self.start)
        else:
            ITL.observe(now - self.last)
        self.last = now
        return first

    def finished(self, finish_reasons: list[str]) -> None:
        self.done = True
        E2E.observe(time.monotonic() - self.start)
        GENERATION_TOKENS.inc(self.count)
        for reason in finish_reasons:
            if reason:
                REQUESTS.labels(reason).inc()

    def aborted(self) -> None:
        """The stream ended before the request finished (the caller cancelled or left): counted,
        as vLLM does, as finish reason "abort", with the tokens it got."""
        if not self.done:
            self.done = True
            GENERATION_TOKENS.inc(self.count)
            REQUESTS.labels("abort").inc()
