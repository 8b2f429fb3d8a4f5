"""MathVista's official answer normalisation and score breakdown, reimplemented.

Follows lupantech/MathVista `evaluation/calculate_score.py`: an extracted answer is normalised to the
answer type (a multi-choice answer becomes one of the choices, a number is rounded), then compared
with the gold answer string by plain equality. `score_results` reproduces the layout and the string
formatting of the published `scores_*.json` files.

CLI: `python -m sapo_ray.reward.mathvista OUTPUT.json` prints the breakdown of a MathVista output file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from sapo_ray.reward.extract import last_boxed, mathvista_extraction

# Breakdown keys of the official score files, in their order; `skills` holds a list per problem.
SCORE_KEYS = ("question_type", "answer_type", "language", "source", "category", "task", "context", "grade", "skills")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between `a` and `b` (insertions, deletions, substitutions cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def most_similar_choice(prediction: str, choices: list[str]) -> str:
    """The choice with the smallest edit distance to `prediction`; the first one on ties."""
    distances = [edit_distance(prediction, choice) for choice in choices]
    return choices[distances.index(min(distances))]


def normalize_extracted_answer(
    extraction: Any, choices: list[str] | None, question_type: str, answer_type: str, precision: int | None
) -> str | None:
    """Normalise an extracted answer to MathVista's gold format; None when it cannot be read.

    - multi_choice: a letter (`B` or `(B) ...`) selects that choice, anything else becomes the most
      similar choice by edit distance (so the result is always one of `choices`).
    - integer: `str(int(float(x)))`, i.e. truncated toward zero.
    - float: `str(round(float(x), precision))`.
    - list: `str(x)`.
    Other answer types are returned unchanged. Deviation from the official code: a multi-choice
    question without choices gives None instead of crashing.
    """
    if question_type == "multi_choice":
        if not choices:
            return None
        extraction = extraction.strip() if isinstance(extraction, str) else str(extraction)
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        if extraction in letters:
            return choices[letters.index(extraction)]
        return most_similar_choice(extraction, choices)
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(precision)))
        if answer_type == "list":
            return str(extraction)
    except (TypeError, ValueError, OverflowError):
        return None
    return extraction


def safe_equal(prediction: Any, answer: Any) -> bool:
    """True iff `prediction == answer`; False when the comparison itself raises."""
    try:
        return bool(prediction == answer)
    except Exception:
        return False


def judge(item: dict, extraction: Any) -> tuple[str | None, bool]:
    """(normalised prediction, correct?) for one MathVista problem dict and its extracted answer."""
    prediction = normalize_extracted_answer(
        extraction, item.get("choices"), item["question_type"], item["answer_type"], item.get("precision")
    )
    return prediction, safe_equal(prediction, item["answer"])


def extract_answer(item: dict) -> str:
    """Rule-based answer extraction from `item["response"]` (the official one asks GPT-4 instead).

    In order: the last `\\boxed{}`; the whole response when it is one of the choices; else the text
    after the last "answer is" (or the whole response), of which numeric answers keep the last
    number and multi-choice ones a lone letter `B` / `(B)`; else "".
    """
    response = (item.get("response") or "").strip()
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed.strip()
    if not response:
        return ""
    if item["question_type"] == "multi_choice" and response in (item.get("choices") or []):
        return response
    stated = re.findall(r"answer is:?\s*(.+?)(?:\.?\s*$|\.\s|\n)", response, flags=re.IGNORECASE | re.MULTILINE)
    text = stated[-1].strip().strip('"$*') if stated else response
    if item["answer_type"] in ("integer", "float"):
        if _is_number(text):
            return text
        numbers = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
        return numbers[-1] if numbers else ""
    if item["question_type"] == "multi_choice":
        letter = re.fullmatch(r"\(?([A-Za-z])\)?[.:]?", text)
        if letter:
            return letter.group(1).upper()
    return text if stated else ""


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _breakdown(items: list[dict], key: str) -> dict[str, dict]:
    """Accuracy per value of `key` (first-appearance order, then sorted by accuracy, descending)."""
    tally: dict[str, list[int]] = {}
    for item in items:
        if key not in item:
            continue
        for value in item[key] if key == "skills" else [item[key]]:
            counts = tally.setdefault(value, [0, 0])
            counts[0] += bool(item["true_false"])
            counts[1] += 1
    rows = {
        value: {"accuracy": f"{correct / total * 100:.2f}", "correct": correct, "total": total}
        for value, (correct, total) in tally.items()
    }
    return dict(sorted(rows.items(), key=lambda row: float(row[1]["accuracy"]), reverse=True))


def score_results(results: dict[str, dict]) -> dict[str, dict]:
    """Score a MathVista output file (pid -> problem with `answer`, `extraction` or `response`, ...).

    Each problem is judged from its `extraction` (rule-based `extract_answer` when the key is
    missing). Returns the official `scores_*.json` layout: `average` {accuracy, correct, total},
    then for each of SCORE_KEYS (read from the problem or its `metadata`) a dict value -> {accuracy,
    correct, total} sorted by accuracy. Accuracies are percentage strings as the published files
    store them: `str(round(acc, 2))` for the average, two decimals for the breakdowns.
    """
    if not results:
        raise ValueError("score_results: no problems to score")
    items = []
    for pid, item in results.items():
        missing = [k for k in ("answer", "question_type", "answer_type") if k not in item]
        if missing:
            raise ValueError(f"problem {pid!r} lacks {missing}; add them from MathVista's testmini.json")
        extraction = item["extraction"] if "extraction" in item else extract_answer(item)
        _, correct = judge(item, extraction)
        items.append({**item, **item.get("metadata", {}), "true_false": correct})
    correct = sum(item["true_false"] for item in items)
    accuracy = str(round(correct / len(items) * 100, 2))
    scores = {"average": {"accuracy": accuracy, "correct": correct, "total": len(items)}}
    for key in SCORE_KEYS:
        if any(key in item for item in items):
            scores[key] = _breakdown(items, key)
    return scores


# The problem fields a result file carries (MathVista's `testmini.json` keys, without the image).
RESULT_KEYS = ("question", "query", "answer", "question_type", "answer_type", "precision", "choices", "unit", "metadata")


def result_file(records: list[tuple[dict, str]]) -> dict[str, dict]:
    """MathVista's output-file layout (pid -> problem with `response` and `extraction`) for
    `(example, response)` pairs, one per problem; `score_results` scores it as the trainer's reward does."""
    return {example["pid"]: {**{k: example.get(k) for k in RESULT_KEYS}, "pid": example["pid"], "response": response,
                             "extraction": mathvista_extraction(response, example)}
            for example, response in records}


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: print the score breakdown of a MathVista output file as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output_file", type=Path, help="MathVista output JSON (pid -> problem with response)")
    args = parser.parse_args(argv)
    results = json.loads(args.output_file.read_text())
    json.dump(score_results(results), sys.stdout, indent=4, ensure_ascii=False)
    print()


if __name__ == "__main__":
    main()
