"""vLLM's `guided_grammar` in Lark form, rewritten into the EBNF xgrammar compiles.

vLLM users write grammars in two dialects: GBNF / xgrammar EBNF (`root ::= "a" | "b"`), which
pass through untouched, and Lark (`start: "a" | "b"`), which this module rewrites:

    name: alt | alt          ->  name ::= alt | alt        (`start` becomes xgrammar's `root`)
        | alt                    (continuation lines join the rule above)
    ?name / !name            ->  name                      (Lark's tree-shaping prefixes)
    [ x ]                    ->  ( x )?                    (Lark's optional; EBNF's [...] is a
                                                            character class)
    "text"  NAME  ( ) | * + ?   unchanged

What has no faithful EBNF spelling here is refused with a 400 naming the construct: regex
terminals (/.../), directives (%import, %ignore ...), ranges ("a".."z"), repeat ranges (~),
case-insensitive literals ("x"i), priorities (rule.2) and templates.
"""

from __future__ import annotations

import re

from services.engine.errors import InvalidRequestError

_RULE = re.compile(r"^\s*[?!]?([A-Za-z_][A-Za-z0-9_]*)\s*(\.\d+)?\s*:(?!:)")
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"i?|/(?:[^/\\]|\\.)+/[a-z]*|[A-Za-z_][A-Za-z0-9_]*|\.\.|::=|[\[\]()|*+?~{},]|\S')


def is_lark(grammar: str) -> bool:
    """Lark defines rules with `name:`; EBNF/GBNF with `name ::=`."""
    return "::=" not in grammar and any(_RULE.match(line) for line in grammar.splitlines())


def lark_to_ebnf(grammar: str) -> str:
    """The EBNF of a Lark grammar (see the module docstring), or InvalidRequestError naming what cannot be rewritten."""
    rules: list[tuple[str, list[str]]] = []
    for number, line in enumerate(grammar.splitlines(), 1):
        text = _strip_comment(line).strip()
        if not text:
            continue
        if text.startswith("%"):
            _refuse(f"the directive {text.split()[0]!r} (line {number})")
        match = _RULE.match(text)
        if match:
            if match.group(2):
                _refuse(f"rule priorities ({match.group(1)}{match.group(2)}, line {number})")
            rules.append((match.group(1), _tokens(text[match.end():], number)))
        elif text.startswith("|") and rules:
            rules[-1][1].extend(_tokens(text, number))
        else:
            _refuse(f"line {number} ({text[:40]!r}), which is neither a rule nor an alternative")
    names = {name for name, _ in rules}
    if "start" not in names:
        raise InvalidRequestError("guided_grammar in Lark form needs a `start` rule")
    return "\n".join(f"{_name(name)} ::= {' '.join(_name(t) if t in names else t for t in body)}"
                     for name, body in rules)


def _tokens(text: str, number: int) -> list[str]:
    out: list[str] = []
    for token in _TOKEN.findall(text):
        if token.startswith("/"):
            _refuse(f"regex terminals ({token[:40]}, line {number})")
        if token.startswith('"') and token.endswith("i"):
            _refuse(f"case-insensitive literals ({token[:40]}, line {number})")
        if token in ("..", "~", "{", "}", ",", "::="):
            _refuse(f"{token!r} (line {number})")
        if token == "[":
            out.append("(")
        elif token == "]":
            out.extend([")", "?"])
        elif token[0].isalnum() or token[0] in '"_()|*+?':
            out.append(token)
        else:
            _refuse(f"{token!r} (line {number})")
    return out


def _strip_comment(line: str) -> str:
    """The line up to a `//` comment outside string literals."""
    in_string, i = False, 0
    while i < len(line):
        ch = line[i]
        if in_string and ch == "\\":
            i += 2  # an escaped character, a quote included
            continue
        if ch == '"':
            in_string = not in_string
        elif not in_string and line.startswith("//", i):
            return line[:i]
        i += 1
    return line


def _name(name: str) -> str:
    return "root" if name == "start" else name


def _refuse(what: str) -> None:
    raise InvalidRequestError(f"guided_grammar is in Lark form, which this server rewrites into EBNF, but not {what}: "
                              "send the grammar as EBNF/GBNF (root ::= ...) instead")
