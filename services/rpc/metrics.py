"""Prometheus metrics, named after vLLM's (vllm:X -> pdserve:X) so dashboards adapt easily.

Each process exposes its own registry over HTTP (`/metrics`); the router serves it on its
--http-port, workers on --metrics-port. Every pdserve series carries a `model_name` label (the
served model's name, set once at start-up), as vLLM's carry theirs.

The exposition is always the classic text format, version 0.0.4, whatever the scraper's Accept
header asks: in it `pdserve:` names are valid as they are. prometheus_client's own server
answers Prometheus's default Accept header (OpenMetrics first) with `escaping=underscores`,
which renames every `pdserve:x` to `pdserve_x`: dashboards, the chart's ServiceMonitor and
the autoscaling rule would then find no worker data.
"""

from __future__ import annotations

import socket
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

TTFT = Histogram("pdserve:time_to_first_token_seconds", "Time to first token", buckets=_LATENCY)
ITL = Histogram("pdserve:inter_token_latency_seconds", "Time between consecutive output tokens", buckets=_ITL)
E2E = Histogram("pdserve:e2e_request_latency_seconds", "End-to-end request latency", buckets=_LATENCY)
REQUESTS = Counter("pdserve:request_success", "Finished requests", ["finished_reason"])
PROMPT_TOKENS = Counter("pdserve:prompt_tokens", "Prompt tokens of finished requests")
GENERATION_TOKENS = Counter("pdserve:generation_tokens", "Generated tokens of finished requests")

# Workers set these; a router with --router-workers (prometheus_client's multiprocess mode)
# defines them too, by importing this module: "livesum" keeps it at one series, not one per pid.
RUNNING = Gauge("pdserve:num_requests_running", "Sequences in the running batch", multiprocess_mode="livesum")
WAITING = Gauge("pdserve:num_requests_waiting", "Sequences waiting (incl. for remote KV)", multiprocess_mode="livesum")
KV_USAGE = Gauge("pdserve:kv_cache_usage_perc", "Fraction of KV blocks held by sequences", multiprocess_mode="livesum")
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

# Speculative decoding (decode workers with --speculative-config), with vLLM's names.
SPEC_DRAFTS = Counter("pdserve:spec_decode_num_drafts", "Sequence-steps that verified drafts")
SPEC_DRAFT_TOKENS = Counter("pdserve:spec_decode_num_draft_tokens", "Draft tokens proposed and verified")
SPEC_ACCEPTED_TOKENS = Counter("pdserve:spec_decode_num_accepted_tokens", "Draft tokens the target accepted")
SPEC_ACCEPTED_PER_POS = Counter("pdserve:spec_decode_num_accepted_tokens_per_pos",
                                "Draft tokens accepted at each draft position (0 first); divided by "
                                "spec_decode_num_drafts: the acceptance rate per position", ["position"])

STREAM_FRAMES = Counter("pdserve:stream_frames", "Frames a decode worker sent on GenerateStream, each with "
                        "many requests' responses (heartbeats not counted)")
STREAM_RESPONSES = Counter("pdserve:stream_responses", "Responses a decode worker sent inside GenerateStream frames")

# Per finished request on a decode worker, as vLLM's request_*_time_seconds: waiting for a seat
# (queue), seated until its first token (prefill, local or remote), first token to the end
# (decode), seated to the end (inference); and its prompt and generated token counts.
_PHASE = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
QUEUE_TIME = Histogram("pdserve:request_queue_time_seconds", "Time a request waited before its first step",
                       buckets=_PHASE)
PREFILL_TIME = Histogram("pdserve:request_prefill_time_seconds", "First step until the first token", buckets=_PHASE)
DECODE_TIME = Histogram("pdserve:request_decode_time_seconds", "First token until the request finished", buckets=_PHASE)
INFERENCE_TIME = Histogram("pdserve:request_inference_time_seconds", "First step until the request finished",
                           buckets=_PHASE)
REQUEST_PROMPT_TOKENS = Histogram("pdserve:request_prompt_tokens", "Prompt tokens per finished request",
                                  buckets=_TOKENS)
REQUEST_GENERATION_TOKENS = Histogram("pdserve:request_generation_tokens", "Generated tokens per finished request",
                                      buckets=_TOKENS)
ITERATION_TOKENS = Histogram("pdserve:iteration_tokens_total", "Tokens computed per engine step",
                             buckets=(1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384))
CACHE_CONFIG = Gauge("pdserve:cache_config_info", "The KV cache's configuration, in labels (value 1)",
                     ["block_size", "num_gpu_blocks", "cache_dtype", "enable_prefix_caching"],
                     multiprocess_mode="max")

_model_name: str | None = None


def observe_request(times: tuple[float, float | None, float | None], finished: float, prompt_tokens: int,
                    generation_tokens: int) -> None:
    """A finished request's phases (see QUEUE_TIME ...) and token counts; `times` is (arrival,
    first scheduled, first token), a phase it never reached is left out."""
    arrival, scheduled, first_token = times
    REQUEST_PROMPT_TOKENS.observe(prompt_tokens)
    REQUEST_GENERATION_TOKENS.observe(generation_tokens)
    if scheduled is None:
        return
    QUEUE_TIME.observe(scheduled - arrival)
    INFERENCE_TIME.observe(finished - scheduled)
    if first_token is not None:
        PREFILL_TIME.observe(first_token - scheduled)
        DECODE_TIME.observe(finished - first_token)


def set_model_name(name: str) -> None:
    """The `model_name` label of every pdserve series this process exposes (once, at start-up)."""
    global _model_name
    _model_name = name


class ModelNameLabel(Collector):
    """`registry`'s metrics, with model_name added to every pdserve series."""

    def __init__(self, registry: Collector) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            if _model_name is not None and family.name.startswith("pdserve:"):
                family.samples = [s._replace(labels={**s.labels, "model_name": _model_name}) for s in family.samples]
            yield family


def exposition(registry: Collector = REGISTRY) -> tuple[bytes, str]:
    """(body, content type) of a scrape: text format 0.0.4, names as they are, model_name added."""
    return generate_latest(ModelNameLabel(registry)), CONTENT_TYPE_PLAIN_0_0_4


class _MetricsHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body, content_type = exposition()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - scrapes are not worth a log line each
        pass


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class SpecDecodeCounters:
    """Adds the engine's speculative-decoding totals (SpecStats) to the counters, as deltas."""

    def __init__(self) -> None:
        self._seen: tuple[int, int, int, list[int]] = (0, 0, 0, [])

    def export(self, stats) -> None:
        drafts, tokens, accepted, per_pos = self._seen
        SPEC_DRAFTS.inc(stats.num_drafts - drafts)
        SPEC_DRAFT_TOKENS.inc(stats.num_draft_tokens - tokens)
        SPEC_ACCEPTED_TOKENS.inc(stats.num_accepted_tokens - accepted)
        for pos, total in enumerate(stats.accepted_per_pos):
            SPEC_ACCEPTED_PER_POS.labels(position=str(pos)).inc(total - (per_pos[pos] if pos < len(per_pos) else 0))
        self._seen = (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens, list(stats.accepted_per_pos))


def serve_metrics(host: str, port: int) -> None:
    """Expose this process's metrics on http://host:port/metrics (any path; a daemon thread)."""
    if port:
        server_class = _IPv6Server if ":" in host else ThreadingHTTPServer
        server = server_class((host, port), _MetricsHandler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()


class StreamTimer:
    """TTFT, inter-token latency and e2e latency of one streamed request, into the histograms.

    Inter-token gaps (one per `tokens` call: per message on the router, per engine output on
    a decode worker) are bucketed here and added to ITL when the stream ends (`flush`, also
    by `finished` and `aborted`): a Histogram.observe per message took a lock, and in
    prometheus multiprocess mode (router workers) an mmap write, on every token's path. The
    histogram means what it did; its samples arrive when each request ends instead of live."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()
        self.first: float | None = None
        self.count = 0
        self.done = False
        self._gaps = [0] * (len(_ITL) + 1)  # per ITL bucket, +Inf last
        self._gaps_sum = 0.0

    def tokens(self, count: int) -> bool:
        """Record a message carrying `count` new tokens; True if it carried the first ones."""
        if not count:
            return False
        self.count += count
        now = time.monotonic()
        if self.first is None:
            self.first = self.last = now
            TTFT.observe(now - self.start)
            return True
        gap = now - self.last
        self.last = now
        self._gaps[bisect_left(_ITL, gap)] += 1  # Histogram.observe's bucket: the first bound >= gap
        self._gaps_sum += gap
        return False

    def flush(self) -> None:
        """The gaps seen so far into ITL (idempotent: each gap is added once)."""
        if any(self._gaps):
            observe_bucketed(ITL, self._gaps, self._gaps_sum)
            self._gaps = [0] * len(self._gaps)
            self._gaps_sum = 0.0

    def finished(self, finish_reasons: list[str]) -> None:
        self.done = True
        self.flush()
        E2E.observe(time.monotonic() - self.start)
        GENERATION_TOKENS.inc(self.count)
        for reason in finish_reasons:
            if reason:
                REQUESTS.labels(reason).inc()

    def aborted(self) -> None:
        """The stream ended before the request finished (the caller cancelled or left): counted,
        as vLLM does, as finish reason "abort", with the tokens it got."""
        self.flush()
        if not self.done:
            self.done = True
            GENERATION_TOKENS.inc(self.count)
            REQUESTS.labels("abort").inc()


def observe_bucketed(histogram: Histogram, counts: list[int], total: float) -> None:
    """Observations already sorted into `histogram`'s buckets (counts[i] fell in bucket i, +Inf
    last; `total` their sum), added with one update per bucket used. prometheus_client has no
    bulk observe: this writes what its Histogram.observe writes (per-bucket counts, the sum), so
    a scrape, single process or multiprocess, reads the same (tests/test_stream_metrics.py
    checks it against observe)."""
    buckets = histogram._buckets  # noqa: SLF001 - see above
    if len(counts) != len(buckets):
        raise ValueError(f"{len(counts)} counts for {len(buckets)} buckets")
    for bucket, count in zip(buckets, counts):
        if count:
            bucket.inc(count)
    histogram._sum.inc(total)  # noqa: SLF001
