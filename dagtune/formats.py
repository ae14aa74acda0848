"""Text formats the models emit, shared by data rendering, evaluation and GGUF checks.

* FunctionGemma calls::

      <start_function_call>call:NAME{city:<escape>Cairo<escape>,days:3,metric:true}<end_function_call>

  Strings are wrapped in ``<escape>`` tokens; numbers, booleans and ``null`` are raw; objects use
  ``{}`` with bare keys and lists use ``[]``.  Parallel calls are several blocks back to back.
* Equations for the extractor: ``<eq>lhs=rhs</eq>`` or ``<eq></eq>`` when a line has none.

Parsers never raise on model output: malformed text gives ``None`` so metrics can count it as a miss.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

START_CALL = "<start_function_call>"
END_CALL = "<end_function_call>"
ESCAPE = "<escape>"
END_OF_TURN = "<end_of_turn>"
START_RESPONSE = "<start_function_response>"
EQ_OPEN = "<eq>"
EQ_CLOSE = "</eq>"

# What may follow the last call: the turn ends, or the model starts hallucinating a tool response
# (FunctionGemma treats <start_function_response> as a stop sequence, so it is legitimately there).
_TRAILERS = (END_OF_TURN, START_RESPONSE, "<eos>", "</s>")

# Function names and object keys are bare words in this format, so they must not contain the
# structural characters; whitespace is excluded too because the parser skips it around tokens, and
# quotes because a JSON-style "key" is a format violation, not a key with quotes in it.
_BARE_WORD = re.compile(r"[^\s{}\[\]:,<>\"']+")
_INT = re.compile(r"-?\d+")
_FLOAT = re.compile(r"-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?")
_RAW_SCALAR = re.compile(r"[^,{}\[\]<]*")
# Recursion guard: garbage such as "[[[[[[..." must come back as None, not RecursionError.
_MAX_DEPTH = 64


class _ParseError(Exception):
    """Internal: raised by the recursive-descent parser, turned into ``None`` at the API edge."""


# --------------------------------------------------------------------------------------------
# FunctionGemma calls
# --------------------------------------------------------------------------------------------


def _format_value(value: Any) -> str:
    # Rows read through pandas carry numpy scalars/arrays; unwrap them without importing numpy.
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        value = value.tolist()
    # bool before int/float: bool is a subclass of int in Python.
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"non-finite float {value!r} has no representation in the call format")
        return json.dumps(value)  # shortest round-tripping repr, e.g. 0.5, 1e-07
    if isinstance(value, str):
        if ESCAPE in value:
            raise ValueError("string values must not contain the <escape> token")
        return f"{ESCAPE}{value}{ESCAPE}"
    if isinstance(value, dict):
        return _format_object(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    raise TypeError(f"unsupported argument type {type(value).__name__}")


def _format_object(obj: dict) -> str:
    parts = []
    for key, val in obj.items():
        if not isinstance(key, str) or not _BARE_WORD.fullmatch(key):
            raise ValueError(f"object key {key!r} cannot be written as a bare FunctionGemma key")
        parts.append(f"{key}:{_format_value(val)}")
    return "{" + ",".join(parts) + "}"


def format_function_call(name: str, arguments: dict[str, Any]) -> str:
    """Render one call as ``<start_function_call>call:NAME{...}<end_function_call>``."""
    if not _BARE_WORD.fullmatch(name or ""):
        raise ValueError(f"invalid function name {name!r}")
    return f"{START_CALL}call:{name}{_format_object(arguments or {})}{END_CALL}"


def format_function_calls(calls: list[dict[str, Any]]) -> str:
    """Render parallel calls (``[{"name":..., "arguments":...}, ...]``) back to back."""
    return "".join(format_function_call(c["name"], c.get("arguments") or {}) for c in calls)


class _CallParser:
    """Recursive-descent parser over one call body ``NAME{...}``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def expect(self, token: str) -> None:
        self.skip_ws()
        if not self.text.startswith(token, self.pos):
            raise _ParseError(f"expected {token!r} at {self.pos}")
        self.pos += len(token)

    def peek(self, token: str) -> bool:
        self.skip_ws()
        return self.text.startswith(token, self.pos)

    def bare_word(self) -> str:
        self.skip_ws()
        m = _BARE_WORD.match(self.text, self.pos)
        if not m:
            raise _ParseError(f"expected a bare word at {self.pos}")
        self.pos = m.end()
        return m.group(0)

    def value(self, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise _ParseError("nesting too deep")
        self.skip_ws()
        if self.text.startswith(ESCAPE, self.pos):
            start = self.pos + len(ESCAPE)
            end = self.text.find(ESCAPE, start)
            if end < 0:
                raise _ParseError("unterminated <escape> string")
            self.pos = end + len(ESCAPE)
            return self.text[start:end]  # verbatim: whitespace inside strings is data
        if self.text.startswith("{", self.pos):
            return self.obj(depth + 1)
        if self.text.startswith("[", self.pos):
            return self.array(depth + 1)
        # Raw scalar: everything up to the next structural character.
        m = _RAW_SCALAR.match(self.text, self.pos)
        raw = m.group(0).strip() if m else ""
        self.pos = m.end() if m else self.pos
        if raw == "true":
            return True
        if raw == "false":
            return False
        if raw == "null":
            return None
        if _INT.fullmatch(raw):
            return int(raw)
        if _FLOAT.fullmatch(raw):
            return float(raw)
        # Unescaped strings are a format violation; counting them as parse failures keeps
        # parse_ok_rate an honest measure of format adherence.
        raise _ParseError(f"invalid raw value {raw!r}")

    def obj(self, depth: int) -> dict[str, Any]:
        self.expect("{")
        out: dict[str, Any] = {}
        if self.peek("}"):
            self.pos += 1
            return out
        while True:
            key = self.bare_word()
            if key in out:
                raise _ParseError(f"duplicate key {key!r}")
            self.expect(":")
            out[key] = self.value(depth)
            if self.peek(","):
                self.pos += 1
                continue
            self.expect("}")
            return out

    def array(self, depth: int) -> list[Any]:
        self.expect("[")
        out: list[Any] = []
        if self.peek("]"):
            self.pos += 1
            return out
        while True:
            out.append(self.value(depth))
            if self.peek(","):
                self.pos += 1
                continue
            self.expect("]")
            return out


def parse_function_calls(text: str | None) -> list[dict[str, Any]] | None:
    """Parse FunctionGemma calls from model output.

    Returns ``[{"name", "arguments"}, ...]``; ``[]`` for a clear no-call (no call markup at all);
    ``None`` for malformed or truncated call markup.  Text before the first call is ignored; after
    the last call only whitespace and end markers (``<end_of_turn>``, ``<start_function_response>``
    and whatever follows them) are accepted.  Never raises.
    """
    if not isinstance(text, str):
        return None
    if START_CALL not in text:
        # A stray end tag without a start is broken markup, not a deliberate plain-text answer.
        return None if END_CALL in text else []
    # One parser over the whole text (not a find() of the end tag) so that a string value which
    # happens to contain "<end_function_call>" is still read correctly.
    p = _CallParser(text)
    p.pos = text.index(START_CALL)
    calls: list[dict[str, Any]] = []
    try:
        while True:
            p.expect(START_CALL)
            p.expect("call:")
            name = p.bare_word()
            arguments = p.obj(1)
            p.expect(END_CALL)  # fails on truncated generations
            calls.append({"name": name, "arguments": arguments})
            if p.peek(START_CALL):
                continue
            rest = text[p.pos :]
            if rest == "" or rest.startswith(_TRAILERS):
                return calls
            return None
    except (_ParseError, ValueError, RecursionError):
        return None


# --------------------------------------------------------------------------------------------
# Equations
# --------------------------------------------------------------------------------------------


def format_eq(eqn: str | None) -> str:
    """``<eq>lhs=rhs</eq>``, or ``<eq></eq>`` when the line has no equation (None or blank)."""
    return f"{EQ_OPEN}{(eqn or '').strip()}{EQ_CLOSE}"


def parse_eq(text: str | None) -> str | None:
    """Inner text of the first ``<eq>...</eq>`` pair, stripped (``''`` for ``<eq></eq>``).

    ``None`` when the tags are missing, unclosed or nested.  Text around the pair is ignored.
    """
    if not isinstance(text, str):
        return None
    start = text.find(EQ_OPEN)
    if start < 0:
        return None
    inner_start = start + len(EQ_OPEN)
    end = text.find(EQ_CLOSE, inner_start)
    if end < 0:
        return None
    inner = text[inner_start:end]
    if EQ_OPEN in inner:
        return None
    return inner.strip()
