"""Small synthetic parquet files in the exact hub schemas of Geometry3K and MathVista, for tests.

Images are drawn here; nothing is downloaded. Every file carries ``{"synthetic": true}`` under the
``sapo_ray`` key of its parquet metadata (the column schema stays the hub's), so the loaders give
its Examples ``synthetic-`` pids and ``metadata["source"] == "synthetic"``: numbers computed on
them must never be reported as Geometry3K or MathVista scores.
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

from sapo_ray.data import synthvista
from sapo_ray.data.datasets import FIXTURE_KEY
from sapo_ray.data.schema import METADATA_KEYS

CORRUPT_BYTES = b"\x89PNG\r\n\x1a\n-not-really-an-image-"


def _features(kind: str):
    """The hub's ``datasets.Features`` of ``hiyouga/geometry3k`` or ``AI4Math/MathVista``."""
    from datasets import Features, Sequence, Value
    from datasets import Image as ImageFeature

    if kind == "geometry3k":
        return Features({
            "images": Sequence(ImageFeature()), "problem": Value("string"), "answer": Value("string"),
            "id": Value("int64"), "choices": Sequence(Value("string")), "ground_truth": Value("string"),
        })
    string = Value("string")
    metadata = {k: string for k in METADATA_KEYS}
    metadata.update(img_height=Value("int64"), img_width=Value("int64"), skills=Sequence(string))
    return Features({
        "pid": string, "question": string, "image": string, "decoded_image": ImageFeature(),
        "choices": Sequence(string), "unit": string, "precision": Value("float64"), "answer": string,
        "question_type": string, "answer_type": string, "metadata": metadata, "query": string,
    })


def _write(rows: dict[str, list], kind: str, path: str | Path, split: str) -> Path:
    """Write columns with the hub's features and the fixture marker; return the file path."""
    import datasets
    import pyarrow.parquet as pq

    path = Path(path)
    if path.suffix != ".parquet":
        path = path / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = datasets.Dataset.from_dict(rows, features=_features(kind)).data.table
    meta = {**(table.schema.metadata or {}), FIXTURE_KEY: json.dumps({"synthetic": True, "kind": kind}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), path)
    return path


def _png(img: Image.Image) -> bytes:
    """PNG bytes of an image (deterministic)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_geometry3k_fixture(path: str | Path, n: int, split: str = "train", seed: int = 0,
                             n_corrupt: int = 0) -> Path:
    """Write ``n`` right-triangle problems in ``hiyouga/geometry3k``'s schema; return the file.

    ``path`` is a ``.parquet`` file or a directory (then ``{split}-00000-of-00001.parquet`` in it).
    Columns: ``images`` (one PNG diagram), ``problem`` (``"<image>..."``), ``answer`` (the
    hypotenuse: an integer or ``\\sqrt { k }``), ``id``, ``choices`` (four options) and
    ``ground_truth`` (the option letter of the answer). The last ``n_corrupt`` rows get
    undecodable image bytes.
    """
    rng = random.Random(f"geometry3k-fixture:{seed}:{split}")
    cols = {k: [] for k in ("images", "problem", "answer", "id", "choices", "ground_truth")}
    for i in range(n):
        a, b = rng.choice([(3, 4), (6, 8), (5, 12), (2, 3), (1, 2), (4, 7)])
        c2 = a * a + b * b
        c = math.isqrt(c2)
        answer = str(c) if c * c == c2 else f"\\sqrt {{ {c2} }}"
        choices = [answer] + [str(v) for v in rng.sample(range(1, 20), 3) if str(v) != answer][:3]
        while len(choices) < 4:
            choices.append(str(20 + len(choices)))
        rng.shuffle(choices)
        data = CORRUPT_BYTES if i >= n - n_corrupt else _png(_triangle(a, b))
        cols["images"].append([{"bytes": data, "path": None}])
        cols["problem"].append(f"<image>Find x. The legs of the right triangle are {a} and {b}.")
        cols["answer"].append(answer)
        cols["id"].append(i)
        cols["choices"].append(choices)
        cols["ground_truth"].append("ABCD"[choices.index(answer)])
    return _write(cols, "geometry3k", path, split)


def _triangle(a: int, b: int, size: int = 96) -> Image.Image:
    """A right triangle with legs labelled ``a`` and ``b`` and the hypotenuse labelled ``x``."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    scale = 0.7 * size / max(a, b)
    x0, y0 = 0.15 * size, 0.85 * size
    pts = [(x0, y0), (x0 + b * scale, y0), (x0, y0 - a * scale)]
    draw.polygon(pts, outline=(0, 0, 0))
    draw.text((x0 - 10, y0 - a * scale / 2), str(a), fill=(0, 0, 0))
    draw.text((x0 + b * scale / 2, y0 + 2), str(b), fill=(0, 0, 0))
    draw.text((x0 + b * scale / 2 + 3, y0 - a * scale / 2 - 10), "x", fill=(0, 0, 0))
    return img


def write_mathvista_fixture(path: str | Path, n: int, split: str = "testmini", seed: int = 0,
                            n_corrupt: int = 0) -> Path:
    """Write ``n`` rows in ``AI4Math/MathVista``'s exact schema (SynthVista content); return the file.

    pids are ``synthetic-{i}`` and ``metadata.source`` is ``synthetic``; images are PNG bytes in
    ``decoded_image``. The last ``n_corrupt`` rows get undecodable image bytes.
    """
    rows = synthvista.generate(n, seed, split="val")
    cols = {k: [] for k in _features("mathvista")}
    for i, row in enumerate(rows):
        pid = f"synthetic-{i}"
        data = CORRUPT_BYTES if i >= n - n_corrupt else _png(row["decoded_image"])
        meta = {k: row["metadata"][k] for k in METADATA_KEYS}
        meta.update(source="synthetic", split=split)
        values = {**row, "pid": pid, "image": f"images/{pid}.png", "metadata": meta,
                  "decoded_image": {"bytes": data, "path": None},
                  "precision": None if row["precision"] is None else float(row["precision"])}
        for k in cols:
            cols[k].append(values[k])
    return _write(cols, "mathvista", path, split)


# Bad rows of every kind `write_custom_jsonl` adds, with the reason each is counted under.
CUSTOM_BAD_ROWS = {"missing_prompt": 1, "missing_answer": 2, "unreadable_image": 2, "image_rejected": 1,
                   "unparsable_line": 1, "not_an_object": 1}


def write_custom_jsonl(directory: str | Path, n: int, split: str = "train", seed: int = 0) -> Path:
    """`{split}.jsonl` in a user's layout: synthvista questions as `problem`, their answers as `answer`,
    the picture in `images/` referenced by a relative path in `images` and a `uid` column of the row's
    own, then one bad row of each kind counted in `CUSTOM_BAD_ROWS` (in that order, after the good ones)."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(synthvista.generate(n, seed, "train" if split == "train" else "val")):
        name = f"images/{split}-{i}.png"
        row["decoded_image"].save(directory / name)
        lines.append(json.dumps({"problem": row["query"], "answer": row["answer"], "images": [name],
                                 "uid": f"u{split}{i}"}))
    (directory / "images" / "corrupt.png").write_bytes(b"\x89PNG not an image")
    Image.new("RGB", (6000, 28), "white").save(directory / "images" / "strip.png")  # aspect ratio 214 > 200
    good = json.loads(lines[0])
    lines += [
        json.dumps({**good, "problem": None}),
        json.dumps({**good, "answer": None}),
        json.dumps({k: v for k, v in good.items() if k != "answer"}),
        json.dumps({**good, "images": ["images/corrupt.png"]}),
        json.dumps({**good, "images": ["images/missing.png"]}),
        json.dumps({**good, "images": ["images/strip.png"]}),
        '{"problem": "cut short',
        json.dumps(["a", "list"]),
    ]
    path = directory / f"{split}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
