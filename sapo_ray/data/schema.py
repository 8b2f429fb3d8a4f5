"""MathVista's row schema, its ``query`` construction, and the mapping of a row to an Example.

The schema is the one of ``AI4Math/MathVista`` on the hub (``testmini.json`` plus the hub's
``decoded_image`` and ``query`` columns). ``build_query`` reproduces the stored ``query`` column
(zero-shot, hint texts of MathVista's ``build_query.py``, but the hint first):
``Hint: ...\nQuestion: ...[ (Unit: u)][\nChoices:\n(A) ...]``.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

from PIL import Image

# Top-level keys of a MathVista row on the hub, in the hub's column order.
MATHVISTA_KEYS = (
    "pid", "question", "image", "decoded_image", "choices", "unit", "precision", "answer",
    "question_type", "answer_type", "metadata", "query",
)
# Keys of MathVista's ``metadata`` struct (alphabetical, as stored on the hub).
METADATA_KEYS = (
    "category", "context", "grade", "img_height", "img_width", "language", "skills", "source",
    "split", "task",
)


def mathvista_hint(question_type: str, answer_type: str, precision: int | None) -> str:
    """Return MathVista's answer-format hint for a question of this type (``build_query.py``)."""
    if question_type == "multi_choice":
        return "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
    if answer_type == "integer":
        return ("Hint: Please answer the question requiring an integer answer and provide the final value, "
                "e.g., 1, 2, 3, at the end.")
    if answer_type == "float" and precision == 1:
        return ("Hint: Please answer the question requiring a floating-point number with one decimal place and "
                "provide the final value, e.g., 1.2, 1.3, 1.4, at the end.")
    if answer_type == "float" and precision == 2:
        return ("Hint: Please answer the question requiring a floating-point number with two decimal places and "
                "provide the final value, e.g., 1.23, 1.34, 1.45, at the end.")
    if answer_type == "list":
        return ("Hint: Please answer the question requiring a Python list as an answer and provide the final list, "
                "e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.")
    # MathVista has no hint for other cases (e.g. float precision 3); keep a generic one.
    return "Hint: Please answer the question and provide the final answer at the end."


def build_query(question: str, question_type: str, answer_type: str, precision: int | None,
                choices: list[str] | None = None, unit: str | None = None, hint: bool = True) -> str:
    """Build MathVista's ``query`` text: hint, question (with unit), then lettered choices, stripped.

    ``hint=False`` leaves the hint sentence out (the answer format it states is then the model's to know).
    """
    lines = ([mathvista_hint(question_type, answer_type, precision)] if hint else []) + [f"Question: {question}"]
    if unit:
        lines[-1] += f" (Unit: {unit})"
    if choices:
        lines.append("Choices:")
        lines += [f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(choices)]
    return "\n".join(lines).strip()


def as_precision(value: Any) -> int | None:
    """Normalise MathVista's ``precision`` (int in the JSON, float64 on the hub, NaN/None) to int or None."""
    if value is None or value != value:  # None or NaN
        return None
    return int(value)


def row_to_example(row: dict, data_source: str, images: list | None = None) -> dict:
    """Map a MathVista-schema row to an Example dict (``docs/CONTRACTS.md``).

    ``images`` overrides the row's ``decoded_image`` (already decoded PIL images, RGB); a row's
    ``videos`` (decoded ``Video`` clips, synthvista's ``bar_grew``) carry over.
    """
    if images is None:
        image = row.get("decoded_image")
        images = [] if image is None else [image.convert("RGB") if image.mode != "RGB" else image]
    choices = row.get("choices")
    return {
        "pid": str(row["pid"]),
        "data_source": data_source,
        "question": row["question"],
        "query": row.get("query") or build_query(row["question"], row["question_type"], row["answer_type"],
                                                 as_precision(row.get("precision")), choices, row.get("unit")),
        "images": images,
        "videos": list(row.get("videos") or []),
        "answer": str(row["answer"]),
        "question_type": row["question_type"],
        "answer_type": row["answer_type"],
        "precision": as_precision(row.get("precision")),
        "choices": list(choices) if choices is not None else None,
        "unit": row.get("unit") or None,
        "metadata": dict(row.get("metadata") or {}),
        "solution": row.get("solution"),
    }


class UnreadableImageError(ValueError):
    """An image in a row could not be decoded (corrupt bytes, missing file)."""


def free_form_example(pid: str, data_source: str, problem: str, query: str, images: list, answer: str,
                      metadata: dict, videos: list | None = None) -> dict:
    """An Example of a free-form question: `problem` with `<image>` / `<video>` placeholders (kept in the
    query, dropped from the question), the answer's type inferred from its text."""
    answer_type, precision = infer_answer_type(answer)
    question = problem.replace("<image>", "").replace("<video>", "").strip()
    return {
        "pid": pid, "data_source": data_source, "question": question, "query": query,
        "images": images, "videos": list(videos or []), "answer": answer, "question_type": "free_form", "answer_type": answer_type,
        "precision": precision, "choices": None, "unit": None, "metadata": metadata, "solution": None,
    }


def infer_answer_type(answer: str) -> tuple[str, int | None]:
    """Guess (answer_type, precision) of a free-form answer: integer, float (decimals) or text."""
    if re.fullmatch(r"-?\d+", answer):
        return "integer", None
    if m := re.fullmatch(r"-?\d*\.(\d+)", answer):
        return "float", len(m.group(1))
    return "text", None


def cell_bytes(value, base_dir: Path | None) -> bytes | None:
    """The bytes of a file cell: struct<bytes, path> (a dict), raw bytes, or a path relative to ``base_dir``;
    None when it has neither bytes nor a path (a missing file raises OSError)."""
    if isinstance(value, (str, Path)):
        value = {"path": str(value)}
    data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
    if data is None and path:
        file = Path(path) if base_dir is None or Path(path).is_absolute() else base_dir / path
        data = file.read_bytes()
    return data or None


def decode_image(value, base_dir: Path | None) -> Image.Image:
    """Decode an image cell (struct<bytes, path>, raw bytes, a path relative to ``base_dir``, or PIL) to
    an RGB PIL image."""
    try:
        if isinstance(value, Image.Image):
            img = value
        else:
            data = cell_bytes(value, base_dir)
            if data is None:
                raise UnreadableImageError("image has neither bytes nor a readable path")
            img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except UnreadableImageError:
        raise
    except (OSError, ValueError, TypeError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"{type(err).__name__}: {err}") from err
