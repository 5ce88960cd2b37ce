"""One benchmark request on the wire: the GenerateRequest built from a workload's spec, and
the timing of its response stream as a RequestRecord. Shared by the locust user (sync
stubs under gevent) and `pdserve bench serve` (grpc.aio), so both measure the same way.

Definitions (vLLM's benchmark uses the same ones):
    TTFT  request sent -> first message that carries a token
    ITL   gap between consecutive token-carrying messages
    TPOT  (e2e - TTFT) / (output tokens - 1): mean time per output token after the first
    e2e   request sent -> stream closed
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from loadtest.workloads import RequestSpec, parse_params, typed_kwargs
from pdserve.v1 import common_pb2, router_pb2
from services.engine.sampling_params import SamplingParams
from services.rpc.convert import params_to_proto


# Greedy and ignore_eos, so every request produces exactly the tokens its workload asks for.
DEFAULT_SAMPLING = SamplingParams(temperature=0.0, ignore_eos=True)


def parse_sampling(text: str, base: SamplingParams = DEFAULT_SAMPLING) -> SamplingParams:
    """`base` with the KEY=VALUE,... overrides of `text` ("temperature=0.8,top_p=0.9,seed=1");
    max_tokens comes from the workload."""
    overrides = typed_kwargs(SamplingParams, parse_params(text), "sampling")
    if "max_tokens" in overrides:
        raise ValueError("max_tokens comes from the workload (its output length parameters)")
    return replace(base, **overrides)


def to_request(spec: RequestSpec, params: SamplingParams) -> router_pb2.GenerateRequest:
    """`params` with the spec's max_tokens, and the spec's prompt as token ids or text."""
    sampling = params_to_proto(replace(params, max_tokens=spec.max_tokens))
    if spec.token_ids is not None:
        return router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=spec.token_ids), sampling=sampling)
    return router_pb2.GenerateRequest(text=spec.text, sampling=sampling)


@dataclass(frozen=True)
class SLO:
    """Service-level objectives for goodput; an unset bound always holds."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"SLO {name} must be > 0, got {value}")

    @property
    def is_set(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None


@dataclass
class RequestRecord:
    """What one request measured. Times in seconds; `error` is the gRPC status name of a
    failed request (its latencies are then None). The rest comes from the final message:
    `cached_tokens` is usage.cached_tokens as the server reports it (decode's plus prefill's
    hits, so a prompt both hold counts twice); the disaggregation record gives whether prefill
    ran remotely, each side's prefix-cache hits, the KV bytes shipped and `kv_transfer_ms`
    (decode's call to prefill until the last block is in decode's cache: prefill compute and
    shipping, overlapped), and the decode instance. Fields added later have defaults, so older
    results still load."""

    kind: str
    prompt_tokens: int = 0
    output_tokens: int = 0
    arrival_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    remote_prefill: bool = False
    cached_tokens: int = 0
    decode_cached_tokens: int = 0
    prefill_cached_tokens: int = 0
    kv_bytes_shipped: int = 0
    kv_transfer_ms: float = 0.0
    kv_transport: str = ""  # "grpc" or "cuda_ipc" for a remote prefill
    error: str | None = None
    decode_instance: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e_s is not None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def meets(self, slo: SLO) -> bool:
        """Completed within both bounds (a one-token answer has no TPOT to miss)."""
        if not self.ok or self.ttft_s is None:
            return False
        if slo.ttft_ms is not None and self.ttft_s * 1e3 > slo.ttft_ms:
            return False
        tpot = self.tpot_s
        return slo.tpot_ms is None or tpot is None or tpot * 1e3 <= slo.tpot_ms

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RequestRecord:
        return cls(**data)


class StreamTimer:
    """Times one streamed Generate call: create it just before sending, feed it every
    response, then call `finish()` or `fail(code)`."""

    def __init__(self, spec: RequestSpec, arrival_s: float = 0.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.record = RequestRecord(spec.kind, prompt_tokens=spec.prompt_len or 0, arrival_s=arrival_s)
        self.start = clock()
        self._last: float | None = None

    def on_response(self, response: common_pb2.GenerateResponse) -> None:
        now = self.clock()
        tokens = sum(len(o.token_ids) for o in response.outputs)
        if tokens:
            if self._last is None:
                self.record.ttft_s = now - self.start
            else:
                self.record.itl_s.append(now - self._last)
            self._last = now
            self.record.output_tokens += tokens
        if response.finished:
            self.record.prompt_tokens = response.usage.prompt_tokens or self.record.prompt_tokens
            self.record.cached_tokens = response.usage.cached_tokens
            d = response.disaggregation
            self.record.remote_prefill = d.remote_prefill
            self.record.decode_cached_tokens = d.decode_cached_tokens
            self.record.prefill_cached_tokens = d.prefill_cached_tokens
            self.record.kv_bytes_shipped = d.kv_bytes_shipped
            self.record.decode_instance = d.decode_instance
            self.record.kv_transfer_ms = d.kv_transfer_ms
            self.record.kv_transport = d.kv_transport

    def finish(self) -> RequestRecord:
        """The stream closed with OK; one that carried no token counts as failed (NO_TOKENS)."""
        if self.record.ttft_s is None:
            return self.fail("NO_TOKENS")
        self.record.e2e_s = self.clock() - self.start
        return self.record

    def fail(self, code: str) -> RequestRecord:
        self.record.error = code
        self.record.ttft_s = None
        return self.record
