"""Where the agent demo's episodes branch: from a run's dumped validation episodes (`trainer.dump_generations=true`,
RUN_DIR/generations/val_step_*.jsonl), per decoding (sampled, greedy) and question, the accuracy and how often
the episode took the sloppy teacher's procedure at its branch point (`synthvista.tool_turns(shortcut=True)`):
the first bar instead of the largest for the tallest-bar question, the other operator for a sum or a
difference (`warm_start_bench.took_shortcut`, which reads a tool episode's transcript as it reads a response).
The numbers of benchmarks/RESULTS.md, "The agent demo on the tallest-bar question".

    python benchmarks/branch_choices.py RUN_DIR/generations/val_step_000000.jsonl [...]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

from warm_start_bench import took_shortcut  # the word where the two procedures branch

# Each question's wording (synthvista.question_answer_solution).
QUESTIONS = {"Which bar is the tallest?": "bar_argmax", "What is the sum of": "bar_sum", "How much larger is": "bar_diff"}


def template(prompt: str) -> str | None:
    return next((t for words, t in QUESTIONS.items() if words in prompt), None)


def count(path: str) -> dict:
    """{decoding: {template: {episodes, accuracy, sloppy}}} of one dump."""
    tally: dict = defaultdict(lambda: defaultdict(lambda: {"episodes": 0, "accuracy": 0.0, "sloppy": 0}))
    for line in open(path):
        row = json.loads(line)
        name = template(row["prompt"])
        if name is None:
            continue
        cell = tally[row["sampling"]][name]
        cell["episodes"] += 1
        cell["accuracy"] += row["acc"]
        cell["sloppy"] += took_shortcut(row["transcript"], {"template": name})
    return {decoding: {name: {"episodes": c["episodes"], "accuracy": round(c["accuracy"] / c["episodes"], 3),
                              "sloppy": round(c["sloppy"] / c["episodes"], 3)}
                       for name, c in sorted(cells.items())}
            for decoding, cells in tally.items()}


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(json.dumps({"dump": path, **count(path)}))
