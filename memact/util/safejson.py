"""JSON from untrusted text (model output, request bodies, server replies): bounded and total.

``json.loads`` recurses once per nesting level (about 1,000 levels of ``[`` raise
``RecursionError``) and refuses integers over 4,300 digits with a ``ValueError``; model output
and HTTP bodies can hold either. :func:`parse_json` checks size and depth with a linear scan
first and turns every failure into an error message, so a caller gets a value or a reason,
never an exception.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 64  # far above any tool call or request memact reads (they nest 3-5 levels)
MAX_CHARS = 1 << 24


# The characters that can change the nesting: brackets, and quotes and backslashes for strings.
_SIGNIFICANT = re.compile(r'[\[\]{}"\\]')


def nesting_depth(text: str) -> int:
    """The deepest ``[``/``{`` nesting of ``text``, brackets inside JSON strings ignored."""
    depth = deepest = 0
    in_string = escaped = False
    last = -2
    for match in _SIGNIFICANT.finditer(text):
        ch, pos = match.group(), match.start()
        if escaped and pos != last + 1:
            escaped = False  # the escape applied to an ordinary character in between
        last = pos
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(depth - 1, 0)
    return deepest


def parse_json(text: str | bytes, max_depth: int = MAX_DEPTH, max_chars: int = MAX_CHARS,
               what: str = "JSON") -> tuple[Any, str | None]:
    """``(value, None)`` for valid JSON within the bounds, else ``(None, reason)``; never raises.

    ``what`` names the text in the reason (``malformed tool-call JSON (Expecting value at char 42)``).
    """
    try:
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8")
        if not isinstance(text, str):
            return None, f"expected {what} text, got {type(text).__name__}"
        if len(text) > max_chars:
            return None, f"{what} of {len(text)} characters is over the limit of {max_chars}"
        depth = nesting_depth(text)
        if depth > max_depth:
            return None, f"{what} nested {depth} levels deep is over the limit of {max_depth}"
        return json.loads(text), None
    except json.JSONDecodeError as err:
        return None, f"malformed {what} ({err.msg} at char {err.pos})"
    except UnicodeDecodeError as err:
        return None, f"{what} is not UTF-8 ({err.reason} at byte {err.start})"
    except (ValueError, RecursionError, TypeError) as err:  # huge integers, lone surrogates, ...
        return None, f"unreadable {what} ({type(err).__name__}: {str(err)[:200]})"
