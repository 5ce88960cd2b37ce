"""The bounds every request meets at the router, cheapest first (flags in services/cli/serve.py).

    HTTP headers (431) -> API key (401) -> body bytes (413) -> JSON, fields (400)
    gRPC metadata, message bytes (grpc core: RESOURCE_EXHAUSTED) -> API key (UNAUTHENTICATED)
    then for both: sequences (prompts x n), prompt characters or token ids, then tokenize,
    then prompt + max_tokens <= the context (INVALID_ARGUMENT / 400)

A request that passes all of them is still bounded in time: --request-timeout is the
deadline of an HTTP request and the longest one a gRPC request gets.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.engine.errors import InvalidRequestError

CHARS_PER_TOKEN_CAP = 32  # default prompt cap: 32 characters per token of context, far above any tokenizer's mean


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 8 << 20
    max_seqs_per_request: int = 256
    max_prompt_chars: int | None = None  # None: CHARS_PER_TOKEN_CAP x max_model_len
    max_header_bytes: int = 16 << 10
    max_header_count: int = 100
    max_concurrent_streams: int = 1024
    request_timeout: float = 600.0
    scheduling_policy: str = "fcfs"  # fcfs: a request's priority must be 0

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_seqs_per_request", "max_header_bytes", "max_header_count",
                     "max_concurrent_streams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError("max_prompt_chars must be >= 1")
        if not self.request_timeout > 0:
            raise ValueError("request_timeout must be > 0")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError("scheduling_policy must be fcfs or priority")

    def prompt_chars(self, max_model_len: int) -> int:
        return self.max_prompt_chars or CHARS_PER_TOKEN_CAP * max_model_len

    def grpc_options(self) -> list[tuple[str, int]]:
        """Server options of the router's client port: grpc core refuses bigger messages and
        metadata itself (RESOURCE_EXHAUSTED), before any of our code runs."""
        return [("grpc.max_receive_message_length", self.max_request_bytes),
                ("grpc.max_metadata_size", self.max_header_bytes),
                ("grpc.absolute_max_metadata_size", self.max_header_bytes),
                ("grpc.max_concurrent_streams", self.max_concurrent_streams)]

    def check_sequences(self, prompts: int, n: int) -> None:
        if prompts * n > self.max_seqs_per_request:
            raise InvalidRequestError(
                f"this request asks for {prompts * n} sequences ({prompts} prompts x n={n}); "
                f"at most {self.max_seqs_per_request} are allowed per request")

    def check_priority(self, priority: int) -> None:
        if priority and self.scheduling_policy != "priority":
            raise InvalidRequestError(f"priority must be 0: this deployment schedules first come, first served "
                                      f"(got priority={priority}; --scheduling-policy priority honours it)")
