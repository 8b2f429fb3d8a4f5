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


def _unwrap_box(box: str, example: dict) -> str:
    """Turn a boxed answer into what MathVista's answer extractor would return for it.

    Drops `$` and `\\text{}`-like wrappers; a bare letter `B`, `(B)` or `B.` stays a letter; numeric
    answers lose units, degree and percent signs and thousands separators (`1,000 \\text{ cm}` -> `1000`).
    """
    text = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", box).replace("$", "").strip()
    if example["question_type"] == "multi_choice":
        letter = re.fullmatch(r"\(?([A-Z])\)?\.?", text)
        return letter.group(1) if letter else text
    if example["answer_type"] in ("integer", "float"):
        text = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\?%|°|(?<=\d),(?=\d{3})", "", text).strip()
        number = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*[A-Za-z]*\.?", text)
        return number.group(1) if number else text
    return text


def mathvista_extraction(response: str, example: dict) -> str:
    """The answer `mathvista_acc` judges: the last box, unwrapped (`_unwrap_box`); "" without one. Written
    as `extraction` in MathVista's result files, so that its scorer reproduces the reward."""
    box = last_boxed(response)
    return _unwrap_box(box, example) if box is not None and box.strip() else ""


def outside_choices(response: str, example: dict) -> bool:
    """True when `example` is a multiple-choice question and the response's answer (`mathvista_extraction`)
    is neither one of its choices (case and surrounding spaces aside) nor a choice's letter: what
    `reward.exact_choice` scores 0, where MathVista's rule takes the most similar choice instead."""
    choices = example.get("choices") or []
    if example.get("question_type") != "multi_choice" or not choices:
        return False
    answer = mathvista_extraction(response, example)
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    return answer not in letters and answer.casefold() not in {str(c).strip().casefold() for c in choices}
