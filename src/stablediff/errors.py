"""The one error for a bad file, and how text from a stranger's file is parsed and shown.

Every reader of a file we may not have written (weight files, their metadata, diffusers and
transformers configs, tokenizer files, PNG parameter chunks) turns its own failures into
:class:`BadFileError` where it parses, naming the file and the field; the command line prints it
as one line. Anything else that escapes is a bug in our code, and shows its traceback.
docs/reliability.md lists the hostile inputs the tests try and what each gets.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

__all__ = ["BadFileError", "MAX_JSON_DEPTH", "json_depth", "load_json", "printable"]

# Our own JSON (specs, configs, PNG records, optimizer state) nests a handful of levels; deeper
# nesting would only serve to exhaust Python's recursion in code that walks the result.
MAX_JSON_DEPTH = 64


class BadFileError(ValueError):
    """A file is missing, unreadable, malformed, unsafe, or asks for sizes no real model has.

    The message starts with the file (and names the field when there is one).
    """


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def load_json(text: str | bytes, where: str) -> Any:
    """``json.loads`` for a stranger's text: bad syntax or UTF-8, ``NaN``/``Infinity``, integers
    longer than Python converts, and nesting deeper than ``MAX_JSON_DEPTH`` all raise
    :class:`BadFileError` naming ``where``."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise BadFileError(f"{where} is JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise BadFileError(f"{where} is not valid JSON: {err}") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise BadFileError(f"{where} is JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    return value


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, ``[1]`` is 1), computed without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


# Format characters that reorder or hide text on a terminal (bidirectional overrides and isolates).
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str, keep: str = "\n\t") -> str:
    """``text`` safe to print on a terminal: control characters (C0, DEL, C1) and bidirectional
    overrides are shown escaped (``\\x1b``, ``\\x9b``, ``\\u202e``); characters in ``keep`` stay."""
    out = []
    for ch in text:
        if ch in keep or not (ch in _BIDI or unicodedata.category(ch) == "Cc"):
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return "".join(out)
