"""OpenAI response bodies and stream chunks, built from the decode workers' GenerateResponses.

    one body, P prompts x n sequences -> choices indexed prompt * n + sequence index
    streaming: one chunk per sequence delta (chat: a first chunk per choice with the role),
               then, with stream_options.include_usage, a chunk with no choices and the usage

Chat with tools (router/tool_calls.py): the text goes through the request's tool-call parser,
so calls come out as `tool_calls` (streamed as OpenAI's tool-call deltas) and the rest as content.

Logprobs come from the raw model distribution (see services/engine/sampler.py). Token strings
are each token decoded alone ("token_id:N" for a model without a tokenizer).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from pdserve.v1 import common_pb2
from router.tool_calls import ToolPlan
from router.tool_parsers import CallStart, Content, Event, ToolCall, ToolParser, parse
from services.engine.tokenizer import Tokenizer

# JSON has no -inf: the floor OpenAI-compatible servers report instead.
_MIN_LOGPROB = -9999.0
# One encoder: json.dumps with separators builds a JSONEncoder per call (per SSE chunk).
_JSON = json.JSONEncoder(separators=(",", ":"))


def sse(body: dict[str, Any]) -> str:
    """One server-sent event carrying `body` as compact JSON."""
    return f"data: {_JSON.encode(body)}\n\n"


@dataclass
class ChoiceState:
    """One sequence's output so far, as the deltas arrive."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[common_pb2.PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text_offset: int = 0  # completions logprobs: characters before the next token
    started: bool = False  # streaming: something was sent for this choice
    tool_parser: ToolParser | None = None  # streaming chat with tools: reads calls out of the text


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, usage: common_pb2.Usage) -> None:
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.cached_tokens += usage.cached_tokens

    def body(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


class TokenStrings:
    """Token id -> its text alone, memoised (logprobs name every token they list)."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = (self._tokenizer.decode([token_id], skip_special_tokens=False) if self._tokenizer
                    else f"token_id:{token_id}")
            if len(self._cache) < 1 << 16:
                self._cache[token_id] = text
        return text


class ResponseFormat:
    """The body and chunk shapes of one endpoint: "completion" or "chat"."""

    def __init__(self, kind: str, response_id: str, model: str, tokens: TokenStrings, top_logprobs: int | None,
                 stop_token_ids: list[int], echo: list[str] | None = None) -> None:
        self.kind = kind
        self.id = response_id
        self.model = model
        self.created = int(time.time())
        self.tokens = tokens
        self.top_logprobs = top_logprobs  # None: no logprobs asked for
        self.stop_token_ids = set(stop_token_ids)
        self.echo = echo  # with echo: each prompt's text (completions), the last message's (chat)
        self.tools: ToolPlan | None = None  # chat with tools: set once the request is prepared
        self._templates: dict[bool, tuple[str, str, str]] = {}  # include_usage -> a text chunk's parts

    # ---- accumulating ------------------------------------------------------------------------

    def apply(self, state: ChoiceState, delta: common_pb2.CompletionDelta) -> None:
        state.text += delta.text
        state.token_ids += delta.token_ids
        state.logprobs += delta.logprobs
        if delta.finish_reason:
            state.finish_reason = delta.finish_reason
            state.stop_reason = self._stop_reason(delta.stop_reason)

    def _stop_reason(self, reason: str) -> str | int | None:
        if not reason:
            return None
        return int(reason) if reason.isdigit() and int(reason) in self.stop_token_ids else reason

    # ---- whole responses -------------------------------------------------------------------

    def response(self, choices: list[ChoiceState], usage: Usage, n: int,
                 prompt_logprobs: dict[int, list[common_pb2.PositionLogprobs]] | None = None) -> dict[str, Any]:
        """The whole body; `prompt_logprobs` (prompt index -> per position), as vLLM returns
        them: per choice on completions, once for the body on chat."""
        body = self._envelope("text_completion" if self.kind == "completion" else "chat.completion")
        body["choices"] = [self._full_choice(c, n) for c in choices]
        if prompt_logprobs:
            shaped = {i: [self._prompt_entry(p) for p in positions] for i, positions in prompt_logprobs.items()}
            if self.kind == "completion":
                for choice in body["choices"]:
                    choice["prompt_logprobs"] = shaped.get(choice["index"] // n)
            else:
                body["prompt_logprobs"] = shaped.get(0)
        body["usage"] = usage.body()
        return body

    def _prompt_entry(self, position: common_pb2.PositionLogprobs) -> dict[str, Any] | None:
        """vLLM's shape: {token id: {logprob, rank, decoded_token}}; None for the first token."""
        if not position.entries:
            return None
        return {str(e.token_id): {"logprob": _finite(e.logprob), "rank": e.rank,
                                  "decoded_token": self.tokens(e.token_id)} for e in position.entries}

    def _full_choice(self, c: ChoiceState, n: int) -> dict[str, Any]:
        logprobs = self._logprobs(c, c.token_ids, c.logprobs)
        if self.kind == "completion":
            text = (self.echo[c.index // n] if self.echo else "") + c.text
            return {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason}
        text = (self.echo[0] if self.echo else "") + c.text  # chat echo: the assistant's last message
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish_reason = c.finish_reason
        if self.tools is not None and self.tools.parser_kind:
            content, calls = parse(self.tools.parser(), c.text)
            message["content"] = (self.echo[0] if self.echo else "") + content if content is not None else None
            if calls:
                message["tool_calls"] = [_call_body(t) for t in calls]
            finish_reason = self.tools.finish_reason(c.finish_reason or "", bool(calls)) or None
        return {"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason,
                "stop_reason": c.stop_reason}

    # ---- streaming -----------------------------------------------------------------------------

    def chunk(self, choices: list[dict[str, Any]], include_usage: bool) -> dict[str, Any]:
        body = self._envelope("text_completion" if self.kind == "completion" else "chat.completion.chunk")
        body["choices"] = choices
        if include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        body = self.chunk([], include_usage=True)
        body["usage"] = usage.body()
        return body

    def role_choice(self, index: int) -> dict[str, Any]:
        """Chat streams open every choice with the assistant's role."""
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta_event(self, state: ChoiceState, delta: common_pb2.CompletionDelta, n: int,
                    include_usage: bool, usage: Usage | None = None) -> str | None:
        """One delta's SSE event, or None if it adds nothing. Streaming keeps in `state` only what
        chunks need (finish, started, the logprobs text offset), not the text or tokens so far.
        The common chunk, text alone, is filled into a template made once per response: the same
        bytes as sse(chunk(...)) for a fraction of the CPU (issue #32). `usage`: the usage so far,
        carried by the chunk (continuous usage stats)."""
        if self.tools is not None and self.tools.parser_kind:
            return self._tool_events(state, delta, include_usage)
        if delta.finish_reason:
            state.finish_reason = delta.finish_reason
            state.stop_reason = self._stop_reason(delta.stop_reason)
        elif self.top_logprobs is None and usage is None and (state.started or not self.echo):
            if not delta.text:
                return None
            state.started = True
            head, mid, tail = self._templates.get(include_usage) or self._template(include_usage)
            return f"{head}{state.index}{mid}{_JSON.encode(delta.text)}{tail}"
        choice = self.delta_choice(state, delta, n)
        if choice is None:
            return None
        chunk = self.chunk([choice], include_usage)
        if usage is not None:
            chunk["usage"] = usage.body()
        return sse(chunk)

    def _template(self, include_usage: bool) -> tuple[str, str, str]:
        """A text chunk as sse(chunk([delta_choice(...)])) renders it, split around index and text."""
        marker = -987654321
        choice = {"index": marker, "text": "\0"} if self.kind == "completion" else \
            {"index": marker, "delta": {"content": "\0"}}
        event = sse(self.chunk([{**choice, "logprobs": None, "finish_reason": None}], include_usage))
        head, _, rest = event.partition(str(marker))
        mid, _, tail = rest.partition(_JSON.encode("\0"))
        self._templates[include_usage] = head, mid, tail
        return head, mid, tail

    def delta_choice(self, state: ChoiceState, delta: common_pb2.CompletionDelta, n: int) -> dict[str, Any] | None:
        """The chunk choice of one delta (already applied to `state`), or None if it adds nothing."""
        if not (delta.text or delta.finish_reason or (self.top_logprobs is not None and delta.token_ids)):
            return None
        logprobs = self._logprobs(state, list(delta.token_ids), list(delta.logprobs))
        finish = {"finish_reason": state.finish_reason, "stop_reason": state.stop_reason} if delta.finish_reason \
            else {"finish_reason": None}
        text = delta.text
        if self.kind == "completion":
            if self.echo and not state.started:
                text = self.echo[state.index // n] + text
            state.started = True
            return {"index": state.index, "text": text, "logprobs": logprobs, **finish}
        if self.echo and not state.started:
            text = self.echo[0] + text
        state.started = True
        return {"index": state.index, "delta": {"content": text} if text else {}, "logprobs": logprobs, **finish}

    def _tool_events(self, state: ChoiceState, delta: common_pb2.CompletionDelta, include_usage: bool) -> str | None:
        """A chat delta with tools: its text through the tool parser, as content and tool-call
        chunks (a call's id and name first, then its argument fragments), then the finish."""
        if state.tool_parser is None:
            state.tool_parser = self.tools.parser()
        parser = state.tool_parser
        events = parser.feed(delta.text)
        if delta.finish_reason:
            events += parser.finish()
        deltas = [_event_delta(e) for e in events]
        logprobs = self._logprobs(state, list(delta.token_ids), list(delta.logprobs))
        if logprobs is not None and not deltas and delta.token_ids:
            deltas.append({})  # the tokens' logprobs still go out
        choices = [{"index": state.index, "delta": d, "logprobs": logprobs if i == 0 else None, "finish_reason": None}
                   for i, d in enumerate(deltas)]
        if delta.finish_reason:
            state.finish_reason = self.tools.finish_reason(delta.finish_reason, parser.calls > 0)
            state.stop_reason = self._stop_reason(delta.stop_reason)
            choices.append({"index": state.index, "delta": {}, "logprobs": None,
                            "finish_reason": state.finish_reason, "stop_reason": state.stop_reason})
        state.started = state.started or bool(choices)
        return "".join(sse(self.chunk([c], include_usage)) for c in choices) or None

    # ---- logprobs -------------------------------------------------------------------------------

    def _logprobs(self, state: ChoiceState, token_ids: list[int],
                  positions: list[common_pb2.PositionLogprobs]) -> dict[str, Any] | None:
        if self.top_logprobs is None:
            return None
        if self.kind == "chat":
            return {"content": [self._chat_entry(t, p) for t, p in zip(token_ids, positions, strict=True)]}
        body: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, position in zip(token_ids, positions, strict=True):
            text = self.tokens(token_id)
            body["tokens"].append(text)
            body["token_logprobs"].append(_chosen(position, token_id))
            body["top_logprobs"].append({self.tokens(e.token_id): _finite(e.logprob) for e in _by_rank(position)})
            body["text_offset"].append(state.text_offset)
            state.text_offset += len(text)
        return body

    def _chat_entry(self, token_id: int, position: common_pb2.PositionLogprobs) -> dict[str, Any]:
        top = [self._chat_token(e.token_id, e.logprob) for e in _by_rank(position)][: self.top_logprobs]
        return {**self._chat_token(token_id, _chosen(position, token_id)), "top_logprobs": top}

    def _chat_token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.tokens(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def _event_delta(event: Event) -> dict[str, Any]:
    """One tool-parser event as a chat chunk's delta."""
    if isinstance(event, Content):
        return {"content": event.text}
    if isinstance(event, CallStart):
        return {"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                "function": {"name": event.name, "arguments": ""}}]}
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}


def _call_body(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _by_rank(position: common_pb2.PositionLogprobs) -> list[common_pb2.TokenLogprob]:
    return sorted(position.entries, key=lambda e: e.rank)


def _chosen(position: common_pb2.PositionLogprobs, token_id: int) -> float:
    return next(_finite(e.logprob) for e in position.entries if e.token_id == token_id)


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _MIN_LOGPROB
