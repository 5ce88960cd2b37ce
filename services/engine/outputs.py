"""What the engine hands back: per request, per sequence, cumulative or as streaming deltas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.engine.sequence import Request


@dataclass(frozen=True)
class Logprob:
    logprob: float  # from the model's raw distribution (before penalties and temperature)
    rank: int  # 1 = the most likely token


@dataclass(frozen=True)
class SampledToken:
    """One token drawn by the sampler, with its logprobs when the request asked for them."""

    token_id: int
    logprobs: dict[int, Logprob] | None


@dataclass
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


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


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
    return RequestOutput(
        request_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids,
        outputs=outputs,
        finished=request.finished,
        num_cached_tokens=request.num_cached_tokens,
    )
