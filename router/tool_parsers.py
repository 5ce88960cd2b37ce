"""Tool-call parsers: the model's text -> OpenAI tool calls, as the text streams in.

    hermes       <tool_call>{"name": "f", "arguments": {...}}</tool_call>, text around it is content
    llama3_json  {"name": "f", "parameters": {...}} (optionally after <|python_tag|>, several
                 separated by ";"), only when the output starts with it; otherwise all content
    required     what tool_choice "required" constrains the output to:
                 [{"name": "f", "parameters": {...}}, ...]
    named        what a named tool_choice constrains the output to: the arguments object alone

Every parser is incremental (`feed` each text delta, then `finish`) and yields events: content
text, a call's start (index, id, name: sent once the name is complete) and fragments of its
arguments (the model's own JSON text, as it arrives). Concatenated, a call's fragments are its
`arguments` string. A non-streamed response runs the same parser over the whole text (`parse`);
there, a call that turns out malformed makes the whole output plain content, as in vLLM. A
stream cannot take back what it sent: there, the rest of a broken call becomes content.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from router.tool_call_scanner import WHITESPACE, ObjectScanner, json_string

# Mirrored in services/cli/serve.py (which must not import the router); a test keeps them equal.
AUTO_PARSERS = ("hermes", "llama3_json")

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class Arguments:
    index: int
    text: str


Event = Content | CallStart | Arguments


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class _Call:
    """One call's events from its scanner: the start once the name is known and the arguments
    have begun, then argument fragments (a JSON-string `arguments` value is sent whole,
    decoded, once complete)."""

    def __init__(self, index: int, argument_keys: tuple[str, ...]) -> None:
        self.index = index
        self.scan = ObjectScanner(argument_keys)
        self.started = False
        self._sent = 0  # characters of the arguments value sent

    def feed(self, text: str) -> list[Event]:
        s = self.scan
        s.feed(text)
        if s.error and not self.started:
            return []
        events: list[Event] = []
        # Started once the arguments have begun as they should (or the object ended without them),
        # so that a call malformed that early is still plain content when streamed.
        if not self.started and s.name is not None and (s.args_start is not None or s.end is not None):
            self.started = True
            events.append(CallStart(self.index, new_call_id(), s.name))
        if not self.started or s.args_start is None:
            if self.started and s.end is not None:  # no arguments at all
                events.append(Arguments(self.index, "{}"))
            return events
        if s.args_is_string:
            if s.args_end is not None and self._sent == 0 and not s.error:
                self._sent = s.args_end - s.args_start
                events.append(Arguments(self.index, json_string(s.text[s.args_start:s.args_end]) or ""))
            return events
        stop = s.args_end if s.args_end is not None else len(s.text)
        piece = s.text[s.args_start + self._sent:stop]
        if piece:
            self._sent += len(piece)
            events.append(Arguments(self.index, piece))
        return events

    @property
    def done(self) -> bool:
        return self.scan.end is not None and not self.scan.error

    @property
    def leftover(self) -> str:
        """Text fed after the object's closing brace."""
        return self.scan.text[self.scan.end:] if self.scan.end is not None else ""


class ToolParser:
    """Feed text deltas, then finish. `broken`: a call was malformed or left unfinished."""

    def __init__(self) -> None:
        self.broken = False
        self.calls = 0  # calls started

    def feed(self, text: str) -> list[Event]:
        raise NotImplementedError

    def finish(self) -> list[Event]:
        return []

    def _feed_call(self, call: _Call, text: str) -> list[Event]:
        events = call.feed(text)
        self.calls += sum(isinstance(e, CallStart) for e in events)
        return events


class HermesParser(ToolParser):
    """<tool_call>{json}</tool_call>, any number, with content around them."""

    def __init__(self) -> None:
        super().__init__()
        self._buffer = ""
        self._call: _Call | None = None
        self._closing = False  # a call's object is done; </tool_call> should follow

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while True:
            if self._call is not None:
                call = self._call
                pending, self._buffer = self._buffer, ""
                events += self._feed_call(call, pending)
                if call.scan.error:
                    events += self._malformed(call)
                elif not call.done:
                    break
                else:
                    self._buffer, self._call, self._closing = call.leftover, None, True
            elif self._closing:
                rest = self._buffer.lstrip(WHITESPACE)
                if _CLOSE.startswith(rest):
                    break  # nothing yet, or the closing tag in part
                self._buffer = rest[len(_CLOSE):] if rest.startswith(_CLOSE) else rest
                self._closing = False  # a missing closing tag is tolerated
            else:
                events += self._text()
                if self._call is None:
                    break
        return events

    def finish(self) -> list[Event]:
        call, self._call = self._call, None
        if call is not None:  # cut off inside a call
            self.broken = True
            return [] if call.started else [Content(_OPEN + call.scan.text)]
        rest, self._buffer = self._buffer, ""
        return [Content(rest)] if rest and not self._closing else []

    def _text(self) -> list[Event]:
        """Content up to the next <tool_call>, holding back what may be the start of one."""
        at = self._buffer.find(_OPEN)
        if at < 0:
            cut = len(self._buffer) - _partial_suffix(self._buffer, _OPEN)
            content, self._buffer = self._buffer[:cut], self._buffer[cut:]
        else:
            content, self._buffer = self._buffer[:at], self._buffer[at + len(_OPEN):]
            self._call = _Call(self.calls, ("arguments", "parameters"))
        return [Content(content)] if content else []

    def _malformed(self, call: _Call) -> list[Event]:
        """What the call consumed becomes content (if nothing of it was sent); the rest is text again."""
        self.broken, self._call = True, None
        text, at = call.scan.text, call.scan.error_at
        self._buffer = text[at:]
        return [] if call.started else [Content(_OPEN + text[:at])]


class JsonCallsParser(ToolParser):
    """JSON call objects one after another, between `separators` (and whitespace).

    llama3_json (`detect`): only an output that starts with `{` (or <|python_tag|>) holds
    calls; anything else is all content. required: the output is an array of calls."""

    def __init__(self, separators: str, detect: bool) -> None:
        super().__init__()
        self._separators = separators + WHITESPACE
        self._mode = "undecided" if detect else "calls"
        self._buffer = ""
        self._raw = ""  # everything fed, for an output that turns out not to be calls
        self._call: _Call | None = None

    def feed(self, text: str) -> list[Event]:
        self._raw += text
        if self._mode == "content":
            return [Content(text)] if text else []
        self._buffer += text
        if self._mode == "undecided":
            head = self._buffer.lstrip(WHITESPACE)
            if not head or _PYTHON_TAG.startswith(head):
                return []
            if not (head.startswith(_PYTHON_TAG) or head.startswith("{")):
                return self._as_content()
            self._mode, self._buffer = "calls", head.removeprefix(_PYTHON_TAG)
        return self._calls()

    def _calls(self) -> list[Event]:
        events: list[Event] = []
        while True:
            if self._call is None:
                rest = self._buffer.lstrip(self._separators)
                if not rest:
                    self._buffer = ""
                    return events
                if rest[0] != "{":
                    return events + self._broken(rest)
                self._call, self._buffer = _Call(self.calls, ("parameters", "arguments")), rest
            call = self._call
            pending, self._buffer = self._buffer, ""
            events += self._feed_call(call, pending)
            if call.scan.error:
                return events + self._broken(call.scan.text[call.scan.error_at:])
            if not call.done:
                return events
            self._buffer, self._call = call.leftover, None

    def finish(self) -> list[Event]:
        if self._mode == "content":
            return []
        if self._call is not None:  # cut off inside a call
            self.broken = True
        return [] if self.calls else self._as_content()  # nothing sent yet: all of it is content

    def _broken(self, rest: str) -> list[Event]:
        self.broken = True
        if not self.calls:
            return self._as_content()
        self._mode = "content"
        return [Content(rest)]

    def _as_content(self) -> list[Event]:
        self._mode, self._call = "content", None
        return [Content(self._raw)] if self._raw else []


class NamedParser(ToolParser):
    """A named tool_choice: the output is the named function's arguments, nothing else."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        if not self.calls:
            self.calls = 1
            events.append(CallStart(0, new_call_id(), self._name))
        if text:
            events.append(Arguments(0, text))
        return events

    def finish(self) -> list[Event]:
        return [] if self.calls else self.feed("")


class FirstCallOnly(ToolParser):
    """parallel_tool_calls=false under auto: of the calls a model writes, the first one only
    (the text around them stays content)."""

    def __init__(self, inner: ToolParser) -> None:
        super().__init__()
        self._inner = inner

    def feed(self, text: str) -> list[Event]:
        return self._keep(self._inner.feed(text))

    def finish(self) -> list[Event]:
        return self._keep(self._inner.finish())

    def _keep(self, events: list[Event]) -> list[Event]:
        self.broken, self.calls = self._inner.broken, min(self._inner.calls, 1)
        return [e for e in events if isinstance(e, Content) or e.index == 0]


def make_parser(kind: str, function: str | None = None) -> ToolParser:
    """A parser for one sequence: an auto parser's name, "required", or "named" (of `function`)."""
    if kind == "hermes":
        return HermesParser()
    if kind == "llama3_json":
        return JsonCallsParser(";", detect=True)
    if kind == "required":
        return JsonCallsParser("[,]", detect=False)
    if kind == "named" and function:
        return NamedParser(function)
    raise ValueError(f"unknown tool-call parser {kind!r}")


def parse(parser: ToolParser, text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole output -> (content, calls). A malformed call makes it all content."""
    events = parser.feed(text) + parser.finish()
    if parser.broken:
        return text, []
    content, calls = collect(events)
    if not calls:
        return text, []
    return content.strip() or None, calls


def collect(events: list[Event]) -> tuple[str, list[ToolCall]]:
    """Events -> the content text and the calls they add up to."""
    content: list[str] = []
    calls: list[ToolCall] = []
    for event in events:
        if isinstance(event, Content):
            content.append(event.text)
        elif isinstance(event, CallStart):
            calls.append(ToolCall(event.id, event.name))
        else:
            calls[event.index].arguments += event.text
    return "".join(content), calls


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
