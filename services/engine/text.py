"""Output text in the front: incremental detokenization, stop strings, streamed deltas.

With the engine core in its own process (core_process.py) the core only samples tokens; the
worker's front turns them into text here, off the engine's step (vLLM's front end does the
same). A stop string found here finishes the sequence at once; the core learns it afterwards
and may have computed a few tokens more, which are dropped here. The rules are the engine's
(engine.py `_on_token`, outputs.py `build_output`), so the text is identical either way:

  * a token's text is added before any stop rule looks at it;
  * a token the core finished on ("stop": EOS, a stop token, a grammar; "abort") is not
    searched for stop strings; one it finished on for "length" is, and a stop string wins;
  * stop strings count only from `min_tokens` output tokens on;
  * while a sequence runs, its last `max(len(stop)) - 1` characters are held back.
"""

from __future__ import annotations

from services.engine.outputs import CompletionOutput, Logprob
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import IncrementalDetokenizer


def find_stop_string(text: str, stops: tuple[str, ...], text_before: int) -> tuple[int, str] | None:
    """The earliest stop string in `text` that overlaps what came after `text_before`
    characters (only such a match can be new): (where it starts, which one), or None."""
    longest = max(len(s) for s in stops)
    search_from = max(0, text_before - longest + 1)
    best: tuple[int, str] | None = None
    for stop in stops:
        at = text.find(stop, search_from)
        if at != -1 and (best is None or at < best[0]):
            best = (at, stop)
    return best


class SequenceText:
    """One sequence's output as the front streams it."""

    def __init__(self, index: int, params: SamplingParams, detokenizer: IncrementalDetokenizer | None) -> None:
        self.index = index
        self.params = params
        self.detokenizer = detokenizer
        self.text = ""
        self.num_output_tokens = 0  # resumed output included
        self.num_emitted_chars = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.reported_finish = False
        self.stopped_here = False  # by a stop string, before the core knew
        self.holdback = max((len(s) for s in params.stop), default=1) - 1  # characters a stop string may yet claim

    def resume(self, token_ids: list[int], text_chars: int) -> None:
        """Output streamed elsewhere (migration): its text advances, nothing is sent again."""
        for token in token_ids:
            self._detokenize(token)
        self.num_output_tokens = len(token_ids)
        self.num_emitted_chars = min(text_chars, len(self.text))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def feed(self, token_ids: list[int], logprobs: list[dict[int, Logprob]] | None, finish_reason: str | None,
             stop_reason: int | None) -> CompletionOutput | None:
        """The core's new tokens of this sequence (and its finish, if any); the delta to stream."""
        if self.finished:  # a stop string ended it here: what the core computed since is dropped
            return None
        params, kept = self.params, 0
        for token in token_ids:
            kept += 1
            self.num_output_tokens += 1
            text_before = len(self.text)
            self._detokenize(token)
            core_stopped_here = kept == len(token_ids) and finish_reason not in (None, "length")
            if (params.stop and self.detokenizer is not None and not core_stopped_here
                    and self.num_output_tokens >= params.min_tokens and self._stop_string(text_before)):
                break
        if not self.finished and finish_reason is not None:
            self.finish_reason, self.stop_reason = finish_reason, stop_reason
        if logprobs is not None:
            logprobs = logprobs[:kept]
        return self._delta(token_ids[:kept], logprobs)

    def _detokenize(self, token: int) -> None:
        if self.detokenizer is not None:
            self.text += self.detokenizer.step(token)

    def _stop_string(self, text_before: int) -> bool:
        found = find_stop_string(self.text, self.params.stop, text_before)
        if found is None:
            return False
        at, stop = found
        self.text = self.text[: at + len(stop)] if self.params.include_stop_str_in_output else self.text[:at]
        self.finish_reason, self.stop_reason, self.stopped_here = "stop", stop, True
        return True

    def _delta(self, token_ids: list[int], logprobs: list[dict[int, Logprob]] | None) -> CompletionOutput | None:
        text_end = len(self.text) if self.finished else max(self.num_emitted_chars, len(self.text) - self.holdback)
        if not token_ids and text_end == self.num_emitted_chars and self.reported_finish == self.finished:
            return None
        out = CompletionOutput(self.index, token_ids, self.text[self.num_emitted_chars:text_end], logprobs,
                               self.finish_reason, self.stop_reason)
        self.num_emitted_chars, self.reported_finish = text_end, self.finished
        return out
