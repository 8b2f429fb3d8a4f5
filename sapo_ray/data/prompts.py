"""The instruction of the paper's setup and Qwen-VL chat messages for an Example."""

from __future__ import annotations

import re

# Geometry3K instruction of verl's ``examples/data_preprocess/geo3k.py`` and EasyR1's geo3k recipes
# (the setup the SAPO paper trains with): answer format `<think>...</think> ... \boxed{...}`.
DEFAULT_INSTRUCTION = (
    r"You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    r"The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in \boxed{}."
)
# A short variant for tiny models with a short context.
SHORT_INSTRUCTION = r"Think inside <think> </think>, then put the final answer in \boxed{}."
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
_PLACEHOLDERS = {"image": IMAGE_PLACEHOLDER, "video": VIDEO_PLACEHOLDER}


def build_messages(example: dict, instruction: str = DEFAULT_INSTRUCTION) -> list[dict]:
    """Return Qwen-VL chat messages for an Example: one user turn, images and videos then text.

    The text is ``query + "\\n" + instruction`` (just ``query`` when ``instruction`` is empty).
    One ``{"type": "image"}`` entry per image in ``example["images"]`` and one ``{"type": "video"}``
    per video in ``example["videos"]``, in order (pass them to the processor separately). ``<image>``
    (``<video>``) placeholders in the query (Geometry3K) are replaced by the entries at their positions;
    without placeholders they come first, images before videos. An example without either (the
    text-only twin) gets a plain string content, which both the Qwen2 and the Qwen2-VL chat templates
    accept.
    """
    text = f"{example['query']}\n{instruction}" if instruction else example["query"]
    counts = {kind: len(example.get(f"{kind}s") or []) for kind in _PLACEHOLDERS}
    holders = {kind: text.count(mark) for kind, mark in _PLACEHOLDERS.items()}
    for kind, n in counts.items():
        if n and holders[kind] not in (0, n):
            raise ValueError(f"example {example.get('pid')!r}: {holders[kind]} {_PLACEHOLDERS[kind]} placeholders "
                             f"but {n} {kind}s; they must match (or the query has none)")
    if not any(counts.values()):
        return [{"role": "user", "content": text.replace(IMAGE_PLACEHOLDER, "").replace(VIDEO_PLACEHOLDER, "")}]
    content = [{"type": kind} for kind, n in counts.items() if not holders[kind] for _ in range(n)]
    for part in re.split(f"({IMAGE_PLACEHOLDER}|{VIDEO_PLACEHOLDER})", text):
        kind = next((k for k, mark in _PLACEHOLDERS.items() if part == mark), None)
        if kind is not None and counts[kind]:
            content.append({"type": kind})
        elif kind is None and part.strip():
            content.append({"type": "text", "text": part})
    return [{"role": "user", "content": content}]
