"""An incremental scanner of one tool-call JSON object, `{"name": ..., "arguments": ...}`, as
a model writes it: the tool-call parsers (router/tool_parsers.py) learn from it when the name
is complete, where the arguments value starts and ends, and where the object ends, without
re-reading the text at every delta.
"""

from __future__ import annotations

import json

WHITESPACE = " \t\r\n"


class ObjectScanner:
    """Follows one JSON object `{"name": ..., "arguments": ...}` as its text arrives: the name
    once its string is complete, where the arguments value starts and ends, where the object
    ends. Structure is checked as it goes (an error as soon as the text cannot be such an
    object); the finished object is checked by json.loads."""

    def __init__(self, argument_keys: tuple[str, ...]) -> None:
        self.argument_keys = argument_keys
        self.text = ""
        self.name: str | None = None
        self.args_start: int | None = None
        self.args_end: int | None = None
        self.end: int | None = None  # just past the closing brace
        self.error = False
        self.error_at = 0  # where the text stopped making sense
        self._depth = 0
        self._expect = "open"  # at depth 1: key, colon, value, scalar, after
        self._in_string = self._escape = False
        self._key: str | None = None
        self._value_start = 0
        self._string_start = 0

    def feed(self, text: str) -> None:
        start = len(self.text)
        self.text += text
        i = start
        while i < len(self.text) and self.end is None and not self.error:
            if self._step(self.text[i], i):
                i += 1

    def _step(self, c: str, i: int) -> bool:
        """Consume character `c` at `i`; False: look at it again in the new state."""
        if self._in_string:
            if self._escape:
                self._escape = False
            elif c == "\\":
                self._escape = True
            elif c == '"':
                self._in_string = False
                if self._depth == 1 and self._expect == "key":
                    self._key, self._expect = json_string(self.text[self._string_start:i + 1]), "colon"
                    if self._key is None:
                        self._fail(i)
                elif self._depth == 1:
                    self._value_end(i + 1)
            return True
        if self._depth > 1:
            if c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 1:
                    self._value_end(i + 1)
            return True
        if self._expect == "scalar":
            if c in WHITESPACE or c in ",}":
                self._value_end(i)
                return False
            return True
        if c in WHITESPACE:
            return True
        expect = self._expect
        if expect == "open" and c == "{":
            self._depth, self._expect = 1, "key"
        elif expect == "key" and c == '"':
            self._in_string, self._string_start = True, i
        elif expect == "colon" and c == ":":
            self._expect = "value"
        elif expect == "value":
            self._value_start = i
            if self._key in self.argument_keys:
                if c not in '{"':
                    self._fail(i)  # arguments are an object (or one as a JSON string)
                    return True
                self.args_start = i
            if c == '"':
                self._in_string, self._string_start = True, i
            elif c in "{[":
                self._depth = 2
            else:
                self._expect = "scalar"
        elif expect == "after" and c == ",":
            self._expect = "key"
        elif expect in ("after", "key") and c == "}":
            self._depth, self.end = 0, i + 1
            self._check()
        else:
            self._fail(i)
        return True

    def _fail(self, at: int) -> None:
        self.error, self.error_at, self.end = True, at, None

    def _value_end(self, end: int) -> None:
        self._expect = "after"
        if self._key in self.argument_keys:
            self.args_end = end
            if self.args_is_string and json_string(self.text[self._value_start:end]) is None:
                self._fail(end)
        elif self._key == "name":
            name = json_string(self.text[self._value_start:end])
            if not name:
                self._fail(end)
            else:
                self.name = name

    def _check(self) -> None:
        try:
            obj = json.loads(self.text[:self.end])
        except ValueError:
            self._fail(self.end)
            return
        args = next((obj[k] for k in self.argument_keys if k in obj), {})
        if not isinstance(obj.get("name"), str) or not isinstance(args, dict | str):
            self._fail(self.end)

    @property
    def args_is_string(self) -> bool:
        return self.args_start is not None and self.text[self.args_start] == '"'


def json_string(text: str) -> str | None:
    """A JSON string literal's value; None if `text` is not one (a bad escape, a raw newline)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, str) else None
