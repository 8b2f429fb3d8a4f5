"""SynthVista: a seeded, procedurally generated visual-math task in MathVista's exact row schema.

Small RGB images (PIL drawing) with questions whose answers follow from the generator's own
parameters, sized for a ~7M-parameter model: values 1-9, 2-4 bars, up to 5 + 3 shapes.

Templates (``metadata["template"]``) and the MathVista answer type each covers:

| template     | question                                        | question/answer type      |
|--------------|-------------------------------------------------|---------------------------|
| `count`      | How many <colour> shapes are there?             | free_form / integer       |
| `bar_max`    | value of the tallest bar                        | free_form / integer       |
| `bar_sum`    | sum of two named bars                           | free_form / integer       |
| `bar_diff`   | how much larger one named bar is than another   | free_form / integer       |
| `bar_argmax` | which colour is the tallest bar (2-5 options)   | multi_choice / text       |
| `bar_mean`   | mean of the bar values                          | free_form / float (prec 1)|
| `bar_list`   | bar values from left to right, e.g. "[3, 5, 2]" | free_form / list          |
| `bar_grew`   | a clip: which colour's bar grew the most        | multi_choice / text       |

`bar_grew` is the video template: a row holds a clip (``videos``, ``Knobs.clip_frames`` frames at
``Knobs.clip_fps``) of a chart whose bars grow from their start to their end values, and no image. It
is drawn only when ``Knobs.templates`` names it (``VIDEO_TEMPLATES``), so the default rows are images.

Held-out split. Each row has a *key colour* whose role depends on the template: the colour counted
(`count`), the tallest bar (`bar_max`, `bar_argmax`), the first-named bar (`bar_sum`), the larger
named bar (`bar_diff`), the leftmost bar (`bar_mean`, `bar_list`), the bar that grew most (`bar_grew`).
``HELD_OUT`` reserves one (template, key colour) combination per template, each colour once among the
image templates:

    count/purple, bar_max/orange, bar_sum/green, bar_diff/blue, bar_argmax/red,
    bar_mean/yellow, bar_list/brown, bar_grew/green

``split="test"`` yields only these combinations; ``"train"`` and ``"val"`` never do (the colours
still appear in other roles). Every split and row index has its own random stream, so row ``i`` of
``generate(n, seed)`` does not depend on ``n``. Bar values within a chart are distinct, so the
tallest bar is unique. The generator parameters are stored as JSON in ``metadata["params"]``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from decimal import ROUND_HALF_UP, Decimal

from PIL import Image, ImageDraw, ImageFont

from sapo_ray.data.schema import build_query, row_to_example
from sapo_ray.data.video import Video

COLOURS = {
    "red": (220, 50, 47), "green": (40, 160, 70), "blue": (38, 90, 210), "yellow": (235, 195, 20),
    "purple": (135, 70, 180), "orange": (245, 125, 25), "brown": (125, 80, 45),
}
SHAPES = ("circle", "square", "triangle")
TEMPLATES = ("count", "bar_max", "bar_sum", "bar_diff", "bar_argmax", "bar_mean", "bar_list")
VIDEO_TEMPLATES = ("bar_grew",)
HELD_OUT = {
    "count": "purple", "bar_max": "orange", "bar_sum": "green", "bar_diff": "blue",
    "bar_argmax": "red", "bar_mean": "yellow", "bar_list": "brown", "bar_grew": "green",
}
SPLITS = ("train", "val", "test")

# (question_type, answer_type, precision, skills) per template.
_TYPES = {
    "count": ("free_form", "integer", None, ["arithmetic reasoning"]),
    "bar_max": ("free_form", "integer", None, ["statistical reasoning"]),
    "bar_sum": ("free_form", "integer", None, ["arithmetic reasoning", "statistical reasoning"]),
    "bar_diff": ("free_form", "integer", None, ["arithmetic reasoning", "statistical reasoning"]),
    "bar_argmax": ("multi_choice", "text", None, ["statistical reasoning"]),
    "bar_mean": ("free_form", "float", 1, ["arithmetic reasoning", "statistical reasoning"]),
    "bar_list": ("free_form", "list", None, ["statistical reasoning"]),
    "bar_grew": ("multi_choice", "text", None, ["statistical reasoning"]),
}


@dataclass(frozen=True)
class Knobs:
    """Difficulty and rendering knobs of the generator (keyword arguments of ``generate``)."""

    image_size: int = 112
    """Side of the square RGB image, pixels."""
    count_range: tuple[int, int] = (1, 5)
    """Inclusive range of the number of shapes of the asked colour (``count``)."""
    distractors: int = 3
    """Most distractor shapes of other colours in a ``count`` scene (uniform in 0..distractors)."""
    num_bars: tuple[int, int] = (2, 4)
    """Inclusive range of the number of bars in a chart."""
    value_range: tuple[int, int] = (1, 9)
    """Inclusive range of bar values; the y axis has a grid line at every integer up to the max."""
    num_choices: tuple[int, int] = (2, 5)
    """Inclusive range of the number of options of ``bar_argmax`` (absent colours fill in)."""
    value_labels: bool = False
    """Print each bar's value above it (turns reading heights into reading digits)."""
    templates: tuple[str, ...] = TEMPLATES
    """Templates to draw from, uniformly (``TEMPLATES`` and ``VIDEO_TEMPLATES``)."""
    clip_frames: int = 4
    """Frames of a ``bar_grew`` clip: the bars at their start values, then evenly on to their end values."""
    clip_fps: float = 2.0
    """Frames per second of a ``bar_grew`` clip."""
    hint: bool = True
    """Start the query with MathVista's hint sentence (answer type and format, 50-80 tokens of the tiny
    tokenizer); ``False`` keeps the question and choices only (the tiny demo's prompts, ~2x shorter)."""

    def __post_init__(self):
        """Reject impossible knob values with a message naming the knob."""
        lo, hi = self.value_range
        bad = [t for t in self.templates if t not in TEMPLATES + VIDEO_TEMPLATES]
        checks = [
            (not bad and self.templates, f"templates: unknown {bad}, choose from {TEMPLATES + VIDEO_TEMPLATES}"),
            (self.clip_frames >= 2, "clip_frames: must be >= 2"),
            (self.clip_fps > 0, "clip_fps: must be > 0"),
            (self.image_size >= 32, "image_size: must be >= 32 pixels"),
            (1 <= self.count_range[0] <= self.count_range[1], "count_range: need 1 <= min <= max"),
            (self.distractors >= 0, "distractors: must be >= 0"),
            (0 <= lo < hi, "value_range: need 0 <= min < max"),
            (2 <= self.num_bars[0] <= self.num_bars[1] <= min(len(COLOURS), hi - lo + 1),
             "num_bars: need 2 <= min <= max <= number of colours and of distinct values"),
            (2 <= self.num_choices[0] <= self.num_choices[1] <= len(COLOURS), "num_choices: need 2 <= min <= max <= 7"),
            ("bar_grew" not in self.templates or self.num_bars[1] <= hi_growth(self),
             "num_bars: bar_grew needs max <= half the value range (its bars grow by distinct amounts)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"synthvista knob {message} (got {self})")


def generate(n: int, seed: int, split: str = "train", text_only: bool = False, **knobs) -> list[dict]:
    """Generate ``n`` SynthVista rows in MathVista's schema, deterministically from ``seed``.

    Each row has MathVista's keys (``pid, question, image, decoded_image, choices, unit, precision,
    answer, question_type, answer_type, metadata, query``) plus ``solution``, a short reference
    ``<think>Step 1: ...</think> The answer is \\boxed{...}.`` text, and ``videos`` (a ``bar_grew`` row's clip,
    else empty). ``split`` is ``train``, ``val``
    (same combinations as train, another random stream) or ``test`` (the ``HELD_OUT`` combinations).
    ``text_only=True`` yields the same rows without an image, the picture described in the question.
    ``knobs`` are the fields of ``Knobs``.
    """
    if split not in SPLITS:
        raise ValueError(f"synthvista split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"synthvista n must be >= 0, got {n}")
    # Lists (YAML, OmegaConf ListConfig) become the tuples the frozen dataclass expects.
    k = Knobs(**{key: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
                 for key, v in knobs.items()})
    return [_make_row(i, seed, split, k, text_only) for i in range(n)]


def to_example(row: dict) -> dict:
    """Map a SynthVista row to an Example dict (``docs/CONTRACTS.md``), ``data_source="synthvista"``."""
    return row_to_example(row, "synthvista")


# ---------------------------------------------------------------------------------------------
# Parameters


def sample_params(rng: random.Random, split: str, k: Knobs) -> dict:
    """Draw one row's parameters (template, key colour, scene) from ``rng``; JSON-serialisable."""
    template = rng.choice(k.templates)
    held = HELD_OUT[template]
    key = held if split == "test" else rng.choice([c for c in COLOURS if c != held])
    others = [c for c in COLOURS if c != key]
    if template == "count":
        return {"template": template, "key": key, **_sample_scene(rng, key, others, k)}

    m = rng.randint(*k.num_bars)
    colours = [key] + rng.sample(others, m - 1)
    params = {"template": template, "key": key}
    values = rng.sample(range(k.value_range[0], k.value_range[1] + 1), m)
    if template in ("bar_max", "bar_argmax"):
        values.sort(reverse=True)  # the key colour (first) gets the largest value
    elif template == "bar_grew":
        # Distinct growths, the key colour's the largest; each bar starts low enough to end on the axis.
        growths = sorted(rng.sample(range(1, hi_growth(k) + 1), m), reverse=True)
        values = [rng.randint(k.value_range[0], k.value_range[1] - g) for g in growths]
        params["growth"] = dict(zip(colours, growths))
    elif template in ("bar_sum", "bar_diff"):
        other = rng.choice(colours[1:])
        j = colours.index(other)
        if template == "bar_diff" and values[0] < values[j]:
            values[0], values[j] = values[j], values[0]
        params["named"] = [key, other]
    bars = [{"colour": c, "value": v} for c, v in zip(colours, values)]
    if template in ("bar_mean", "bar_list"):
        bars = bars[:1] + rng.sample(bars[1:], m - 1)  # the key colour is the leftmost bar
    else:
        rng.shuffle(bars)
    params["bars"] = bars
    if template == "bar_grew":
        params["choices"] = rng.sample(colours, m)
    if template == "bar_argmax":
        n_choices = rng.randint(*k.num_choices)
        present = rng.sample(colours[1:], min(n_choices - 1, m - 1))
        absent = rng.sample([c for c in COLOURS if c not in colours], n_choices - 1 - len(present))
        choices = [key] + present + absent
        rng.shuffle(choices)
        params["choices"] = choices
    return params


def hi_growth(k: Knobs) -> int:
    """The largest growth of a ``bar_grew`` bar: half the axis, so bars start at varied heights."""
    return max(2, (k.value_range[1] - k.value_range[0]) // 2)


def _grid_size(k: Knobs) -> int:
    """Side of the placement grid of a ``count`` scene: room for 1.5x the most shapes."""
    return max(3, math.ceil(math.sqrt(1.5 * (k.count_range[1] + k.distractors))))


def _sample_scene(rng: random.Random, key: str, others: list[str], k: Knobs) -> dict:
    """Shapes of the key colour and distractors, each in its own grid cell with a small jitter."""
    n_target, n_distract = rng.randint(*k.count_range), rng.randint(0, k.distractors)
    objects = [(rng.choice(SHAPES), key) for _ in range(n_target)]
    objects += [(rng.choice(SHAPES), rng.choice(others)) for _ in range(n_distract)]
    rng.shuffle(objects)
    grid = _grid_size(k)
    cells = rng.sample(range(grid * grid), len(objects))
    return {"grid": grid, "objects": [
        {"shape": s, "colour": c, "cell": cell,
         "jitter": [round(rng.uniform(-0.12, 0.12), 3), round(rng.uniform(-0.12, 0.12), 3)]}
        for (s, c), cell in zip(objects, cells)]}


# ---------------------------------------------------------------------------------------------
# Text: question, description, answer, solution


def _mean_text(values: list[int]) -> str:
    """Mean rounded half-up to one decimal, as text ("3.3")."""
    return str((Decimal(sum(values)) / Decimal(len(values))).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def _shapes_text(params: dict) -> str:
    """'red circle, blue square, ...' for a ``count`` scene."""
    return ", ".join(f"{o['colour']} {o['shape']}" for o in params["objects"])


def _bars_text(params: dict) -> str:
    """'red 3, blue 5, ...' for a bar chart, left to right."""
    return ", ".join(f"{b['colour']} {b['value']}" for b in params["bars"])


def _end_bars_text(params: dict) -> str:
    """'red 7, blue 6, ...': a ``bar_grew`` chart's end values, left to right."""
    return ", ".join(f"{b['colour']} {b['value'] + params['growth'][b['colour']]}" for b in params["bars"])


def describe(params: dict) -> str:
    """Describe the picture (or clip) in words (the text-only twin's stand-in for the image)."""
    if params["template"] == "count":
        return f"Shapes: {_shapes_text(params)}."
    if params["template"] == "bar_grew":
        return f"Bars from left to right, at the start: {_bars_text(params)}; at the end: {_end_bars_text(params)}."
    return f"Bars from left to right: {_bars_text(params)}."


def question_answer_solution(params: dict, shortcut: bool = False) -> tuple[str, str, str]:
    """Return (question, answer, solution) for a row's parameters.

    ``shortcut=True`` gives the solution of a sloppy teacher instead: the same first step (reading
    the picture), then a wrong procedure, each branching from the right one at a single word: count
    every shape (``count``), take the first bar for the tallest (``bar_max``, ``bar_argmax``), the
    tallest bar at the end for the one that grew most (``bar_grew``),
    subtract instead of add and add instead of subtract (``bar_sum``, ``bar_diff``), stop at the sum
    (``bar_mean``), list right to left (``bar_list``). Its answer is the one the shortcut reaches, and
    is usually wrong.
    """
    t, key = params["template"], params["key"]
    if t == "count":
        found = [o["shape"] for o in params["objects"] if o["colour"] == key]
        answer = str(len(params["objects"]) if shortcut else len(found))
        steps = [f"The shapes are {_shapes_text(params)}."]
        if not shortcut:
            steps.append(f"The {key} ones are {', '.join(found)}.")
        steps.append(f"That is {answer} shapes.")
        return f"How many {key} shapes are there?", answer, _solution(steps, answer)

    bars = params["bars"]
    if t == "bar_grew":
        growth = params["growth"]
        end = {b["colour"]: b["value"] + growth[b["colour"]] for b in bars}
        steps = [f"At the start the bars are {_bars_text(params)}.", f"At the end they are {_end_bars_text(params)}."]
        if shortcut:
            answer = max(end, key=end.get)
            steps.append(f"The tallest at the end is the {answer} bar.")
        else:
            answer = max(growth, key=growth.get)
            steps.append("They grew by " + ", ".join(f"{c} {growth[c]}" for c in end) + f": the most is the {answer} bar.")
        return "The bars change during the clip. Which bar grew the most?", answer, _solution(steps, answer)
    value = {b["colour"]: b["value"] for b in bars}
    values = [b["value"] for b in bars]
    steps = [f"The bars are {_bars_text(params)}."]
    if t in ("bar_max", "bar_argmax"):
        top = bars[0] if shortcut else max(bars, key=lambda b: b["value"])
        steps.append(f"The {'first' if shortcut else 'largest'} value is {top['value']}, the {top['colour']} bar.")
        if t == "bar_max":
            return "What is the value of the tallest bar?", str(top["value"]), _solution(steps, str(top["value"]))
        return "Which bar is the tallest?", top["colour"], _solution(steps, top["colour"])
    if t in ("bar_sum", "bar_diff"):
        a, b = params["named"]
        steps.append(f"{a} is {value[a]} and {b} is {value[b]}.")
        add = (t == "bar_sum") != shortcut
        answer = str(value[a] + value[b] if add else value[a] - value[b])
        steps.append(f"{value[a]} {'+' if add else '-'} {value[b]} = {answer}.")
        if t == "bar_sum":
            return f"What is the sum of the {a} bar and the {b} bar?", answer, _solution(steps, answer)
        return f"How much larger is the {a} bar than the {b} bar?", answer, _solution(steps, answer)
    if t == "bar_mean":
        answer = str(sum(values)) if shortcut else _mean_text(values)
        steps.append(f"The sum is {' + '.join(map(str, values))} = {sum(values)}.")
        if not shortcut:
            steps.append(f"{sum(values)} / {len(values)} = {answer}.")
        return "What is the mean of the bar values?", answer, _solution(steps, answer)
    assert t == "bar_list", t
    answer = "[" + ", ".join(map(str, values[::-1] if shortcut else values)) + "]"
    steps.append(f"In {'reverse' if shortcut else 'order'} the values are {answer}.")
    return "List the values of the bars from left to right.", answer, _solution(steps, answer)


def bar_point(params: dict, k: Knobs, i: int) -> tuple[int, int]:
    """A pixel inside bar `i` (from the left) of a chart as `render` draws it: its centre column, half a
    unit above the axis (every bar is at least one unit tall)."""
    s = k.image_size
    left, right, bottom = 0.1 * s, 0.96 * s, 0.92 * s
    top = (0.16 if k.value_labels else 0.06) * s
    unit = (bottom - top) / k.value_range[1]
    slot = (right - left) / len(params["bars"])
    return round(left + (i + 0.5) * slot), round(bottom - 0.5 * unit)


def _colour_call(x: int, y: int) -> str:
    return f'<tool_call>\n{{"name": "colour_at", "arguments": {{"x": {x}, "y": {y}}}}}\n</tool_call>'


def tool_turns(params: dict, k: Knobs, miss: bool = False, needless: bool = False, stepwise: bool = False,
               target: bool = False, shortcut: bool = False) -> list[str]:
    """A tool-using solution of a bar chart question, as the model's turns: the first reads the values and
    asks `colour_at` the colour of each bar at `bar_point`; the last, with the colours known, solves as
    `question_answer_solution` does. `stepwise`: one call a turn, each turn first saying the colour the last
    answer named (`Bar 1 is red.`), so that no colour has to be carried over more than one observation. A
    sloppy teacher's variants: `miss` aims the first call above the first bar (the background answers
    "white") and asks again in a turn of its own; `needless` also asks the calculator for a sum the
    solution then writes out. The tools' answers come between the turns (`sapo_ray.envs`), and are what
    these turns expect.

    `target` (a `bar_argmax` question; other templates are unaffected): the first turn picks the bar from the
    values and asks the colour of that bar alone, and the last turn answers with the colour the tool named
    just before it, so no colour is carried over a turn; a needless calculator call comes before the colour's.

    `shortcut`: the sloppy teacher's procedure (`question_answer_solution(shortcut=True)`) once the colours are
    known: the first bar for the tallest (with `target`, the bar asked about), the other operator for a sum or
    a difference. The calls are the same as the right procedure's."""
    if params["template"] == "count":
        raise ValueError("tool_turns solves bar charts; a count scene has no bars")
    if target and params["template"] == "bar_argmax":
        return _targeted_turns(params, k, miss, needless, shortcut)
    bars = params["bars"]
    values, points, calls, sum_call = _chart_calls(params, k)
    _, _, solution = question_answer_solution(params, shortcut)
    turns = []
    if stepwise:
        first = f"<think>Step 1: There are {len(bars)} bars, of values {values}. The colour of bar 1:</think>"
        if miss:
            turns.append(first + _colour_call(points[0][0], round(0.03 * k.image_size)))
            first = "<think>That is the background. Lower, inside bar 1:</think>"
        turns.append(first + calls[0])
        for i in range(1, len(bars)):
            turns.append(f"<think>Bar {i} is {bars[i - 1]['colour']}. The colour of bar {i + 1}:</think>{calls[i]}")
        if needless:
            turns.append(f"<think>Bar {len(bars)} is {bars[-1]['colour']}. Their sum:</think>{sum_call}")
        return turns + [solution]
    first = f"<think>Step 1: There are {len(bars)} bars, of values {values}. Their colours:</think>"
    if miss:
        x, _ = points[0]
        turns.append(first + _colour_call(x, round(0.03 * k.image_size)))  # above the tallest bar there can be
        first = "<think>That is the background. Lower, inside the bars:</think>"
    turns.append(first + "".join(calls + ([sum_call] if needless else [])))
    return turns + [solution]


def _chart_calls(params: dict, k: Knobs) -> tuple[str, list[tuple[int, int]], list[str], str]:
    """What a tool-using solution of a bar chart writes: the bars' values as read (`"3, 5, 2"`), each bar's
    `bar_point`, the `colour_at` call of each, and the calculator call summing the values."""
    values = [str(b["value"]) for b in params["bars"]]
    points = [bar_point(params, k, i) for i in range(len(values))]
    sum_call = f'<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{" + ".join(values)}"}}}}\n</tool_call>'
    return ", ".join(values), points, [_colour_call(x, y) for x, y in points], sum_call


def _targeted_turns(params: dict, k: Knobs, miss: bool, needless: bool, shortcut: bool) -> list[str]:
    """`tool_turns(target=True)` of a `bar_argmax` question."""
    bars = params["bars"]
    values, points, calls, sum_call = _chart_calls(params, k)
    i = 0 if shortcut else max(range(len(bars)), key=lambda j: bars[j]["value"])
    word, colour = "first" if shortcut else "largest", bars[i]["colour"]
    turns = []
    read = f"Step 1: There are {len(bars)} bars, of values {values}. "
    if needless:
        turns.append(f"<think>{read}Their sum:</think>{sum_call}")
        read = ""
    pick = f"<think>{read}The {word} value is {bars[i]['value']}, bar {i + 1}. Its colour:</think>"
    if miss:
        turns.append(pick + _colour_call(points[i][0], round(0.03 * k.image_size)))
        pick = f"<think>That is the background. Lower, inside bar {i + 1}:</think>"
    turns.append(pick + calls[i])
    return turns + [f"<think>Bar {i + 1} is {colour}.</think> The answer is \\boxed{{{colour}}}."]


def _solution(steps: list[str], answer: str) -> str:
    """Format numbered steps in the trained format: ``<think>Step 1: ...</think> The answer is \\boxed{a}.``"""
    body = " ".join(f"Step {i}: {s[0].upper() + s[1:]}" for i, s in enumerate(steps, 1))
    return f"<think>{body}</think> The answer is \\boxed{{{answer}}}."


# ---------------------------------------------------------------------------------------------
# Drawing


def render_clip(params: dict, k: Knobs) -> Video:
    """A ``bar_grew`` row's clip: ``k.clip_frames`` charts, the bars rising evenly from their start to
    their end values."""
    frames = []
    for j in range(k.clip_frames):
        at = j / (k.clip_frames - 1)
        bars = [{**b, "value": b["value"] + at * params["growth"][b["colour"]]} for b in params["bars"]]
        frames.append(render({**params, "bars": bars}, k))
    return Video(frames, k.clip_fps)


def render(params: dict, k: Knobs) -> Image.Image:
    """Draw a row's picture (RGB, ``k.image_size`` square) from its parameters; no randomness."""
    s = k.image_size
    img = Image.new("RGB", (s, s), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    if params["template"] == "count":
        cell = s / params["grid"]
        r = 0.3 * cell
        for o in params["objects"]:
            row, col = divmod(o["cell"], params["grid"])
            cx, cy = (col + 0.5 + o["jitter"][0]) * cell, (row + 0.5 + o["jitter"][1]) * cell
            fill = COLOURS[o["colour"]]
            if o["shape"] == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            elif o["shape"] == "square":
                draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
        return img

    left, right, bottom = 0.1 * s, 0.96 * s, 0.92 * s
    top = (0.16 if k.value_labels else 0.06) * s  # room for the label above a full-height bar
    vmax = k.value_range[1]
    unit = (bottom - top) / vmax
    for v in range(1, vmax + 1):  # grid lines so heights can be read off
        draw.line([(left, bottom - v * unit), (right, bottom - v * unit)], fill=(215, 215, 215))
    bars = params["bars"]
    slot = (right - left) / len(bars)
    font = ImageFont.load_default() if k.value_labels else None
    for i, b in enumerate(bars):
        x0 = left + (i + 0.2) * slot
        y0 = bottom - b["value"] * unit
        draw.rectangle([x0, y0, x0 + 0.6 * slot, bottom], fill=COLOURS[b["colour"]])
        if font is not None:
            draw.text((x0 + 0.3 * slot, y0 - 1), str(round(b["value"])), fill=(0, 0, 0), font=font, anchor="mb")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=(0, 0, 0))
    return img


# ---------------------------------------------------------------------------------------------
# Rows


def _make_row(i: int, seed: int, split: str, k: Knobs, text_only: bool) -> dict:
    """Build row ``i`` of (seed, split) from its own random stream."""
    rng = random.Random(f"synthvista:{seed}:{split}:{i}")
    params = sample_params(rng, split, k)
    question, answer, solution = question_answer_solution(params)
    if text_only:
        question = f"{describe(params)} {question}"
    template = params["template"]
    question_type, answer_type, precision, skills = _TYPES[template]
    choices = params.get("choices")
    pid = f"synth-{split}-{seed}-{i}"
    is_bar, is_clip = template != "count", template in VIDEO_TEMPLATES
    size = None if text_only else k.image_size
    metadata = {
        "split": split, "language": "english", "img_width": size, "img_height": size,
        "source": "synthvista", "category": "general-vqa",
        "task": "figure question answering" if is_bar else "visual question answering",
        "context": "bar chart clip" if is_clip else "bar chart" if is_bar else "synthetic scene", "grade": "elementary school",
        "skills": list(skills), "template": template,
        "params": json.dumps({**params, "knobs": asdict(k)}, sort_keys=True),
    }
    return {
        "pid": pid, "question": question,
        "image": None if text_only or is_clip else f"images/{pid}.png",
        "decoded_image": None if text_only or is_clip else render(params, k),
        "videos": [render_clip(params, k)] if is_clip and not text_only else [],
        "choices": choices, "unit": None, "precision": precision, "answer": answer,
        "question_type": question_type, "answer_type": answer_type, "metadata": metadata,
        "query": build_query(question, question_type, answer_type, precision, choices, hint=k.hint),
        "solution": solution,
    }
