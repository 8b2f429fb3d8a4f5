"""Answer extraction from model responses: the content of the last `\\boxed{...}`."""

from __future__ import annotations

import re

# `\boxed{` or `\fbox{`, optional spaces before the brace.
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Braces that count for nesting; escaped `\{` / `\}` are matched first so that they are skipped.
_BRACE = re.compile(r"\\[{}]|[{}]")


def last_boxed(text: str | bytes | None) -> str | None:
    """Return the content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, nested braces included.

    "Last" is the box whose opening command starts last, so `\\boxed{\\boxed{1}}` gives `1`. Escaped
    braces (`\\{`, `\\}`) do not count for nesting. Returns None when there is no box or when the last
    one is never closed. Bytes are decoded as UTF-8 with replacement; any other type gives None.
    Linear in len(text): only the braces after the last box are visited in Python.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str) or not text:
        return None
    start = None
    for start in _BOX_OPEN.finditer(text):
        pass
    if start is None:
        return None
    depth = 1
    for brace in _BRACE.finditer(text, start.end()):
        token = brace.group()
        if len(token) == 2:  # escaped brace
            continue
        depth += 1 if token == "{" else -1
        if depth == 0:
            return text[start.end() : brace.start()]
    return None
