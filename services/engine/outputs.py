"""What the engine hands back: per request, per sequence, cumulative or as streaming deltas."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.engine.kv_transfer import BlockData, KVImport
    from services.engine.sequence import Request


@dataclass(frozen=True)
class Logprob:
    logprob: float  # from the model's raw distribution (before penalties and temperature)
    rank: int  # 1 = the most likely token


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs twice as much, and one is built per token per step
class SampledToken:
    """One token drawn by the sampler, with its logprobs when the request asked for them (read-only by convention)."""

    token_id: int
    logprobs: dict[int, Logprob] | None


@dataclass(slots=True)  # slots: one of each per token per request on the serving path
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # KV transfer (kv_transfer.py). Prefill side: blocks read out since the last output.
    kv_blocks: list[BlockData] = field(default_factory=list)
    # Decode side: set once, when the prompt's blocks are allocated and its KV may be pulled
    # (the value is how many leading blocks this worker already holds).
    kv_pull_from_block: int | None = None
    kv_import: KVImport | None = None
    # prompt_logprobs: one entry per prompt token (the first None), on the first output with
    # tokens (and on every whole, non-delta output).
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # Once finished: (arrival, first scheduled, first token) in time.monotonic (None: never got there).
    times: tuple[float, float | None, float | None] | None = None


def build_output(request: Request, delta: bool) -> RequestOutput:
    """Snapshot of `request`; with `delta`, only what was not handed out before.

    Streaming text withholds its last `max(len(stop)) - 1` characters while a sequence runs,
    since they may turn out to be the start of a stop string, which is never emitted.
    """
    holdback = max((len(s) for s in request.params.stop), default=1) - 1
    outputs: list[CompletionOutput] = []
    for seq in request.seqs:
        tokens = seq.output_token_ids
        text_end = len(seq.text) if seq.finished else max(seq.num_emitted_chars, len(seq.text) - holdback)
        start_tok = seq.num_emitted_tokens if delta else 0
        start_chr = seq.num_emitted_chars if delta else 0
        if delta and start_tok == len(tokens) and start_chr == text_end and seq.reported_finish == seq.finished:
            continue  # nothing new for this sequence
        outputs.append(
            CompletionOutput(
                index=seq.index,
                token_ids=tokens[start_tok:],
                text=seq.text[start_chr:text_end],
                logprobs=seq.logprobs[start_tok:] if seq.logprobs is not None else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
        )
        if delta:
            seq.num_emitted_tokens = len(tokens)
            seq.num_emitted_chars = text_end
            seq.reported_finish = seq.finished
    if request.first_token_time is None and any(c.token_ids for c in outputs):
        request.first_token_time = time.monotonic()
    out = RequestOutput(
        request_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids,
        outputs=outputs,
        finished=request.finished,
        num_cached_tokens=request.num_cached_tokens,
        kv_import=request.kv_import,
    )
    if request.prompt_logprobs is not None and (not delta or (
            not request.prompt_logprobs_sent and any(c.token_ids for c in outputs))):
        out.prompt_logprobs = request.prompt_logprobs
        request.prompt_logprobs_sent = True
    if out.finished:
        out.times = (request.arrival_time, request.scheduled_time, request.first_token_time)
    if request.kv_export is not None and request.kv_export.ready:
        out.kv_blocks, request.kv_export.ready = request.kv_export.ready, []
    imp = request.kv_import
    if imp is not None and imp.state == "waiting" and not imp.announced:
        imp.announced = True
        out.kv_pull_from_block = imp.num_cached_blocks
    return out
