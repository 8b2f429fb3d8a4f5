"""Load a dataset split as a list of Examples: SynthVista (generated), Geometry3K, MathVista, or the
user's own files (`custom`, `sapo_ray.data.custom`).

Local data is a parquet file or a directory of parquet files in the hub's schema (``hiyouga/
geometry3k``: ``images`` list<struct<bytes, path>>, ``problem`` with ``<image>`` placeholders,
``answer``; ``AI4Math/MathVista``: MathVista's columns, ``decoded_image`` struct<bytes, path>). In a
directory the files of the split are ``{split}.parquet`` or ``{split}-*.parquet`` at any depth (the
hub's ``data/train-00000-of-00001.parquet`` layout). Without a path the hub is tried by name.

A row whose image cannot be decoded, or without an answer, is skipped and counted in the `DataReport`
(and one warning); it never crashes a run.
Files written by ``tests/data/fixtures.py`` carry a ``sapo_ray`` key in their parquet metadata;
their Examples get pids prefixed ``synthetic-`` and ``metadata["source"] == "synthetic"``.
"""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

from PIL import Image

from sapo_ray.data import synthvista
from sapo_ray.data.report import DataReport, SkipRow
from sapo_ray.data.schema import row_to_example

logger = logging.getLogger(__name__)

DATASETS = ("synthvista", "geometry3k", "mathvista", "custom")
HUB_NAMES = {"geometry3k": "hiyouga/geometry3k", "mathvista": "AI4Math/MathVista"}
KNOWN_SPLITS = ("train", "validation", "val", "test", "testmini")
FIXTURE_KEY = b"sapo_ray"  # parquet key-value metadata written by tests/data/fixtures.py
MATHVISTA_LICENCE = ("MathVista is a test set: its terms (CC BY-SA 4.0, 'using it for training is prohibited') "
                     "forbid training on it. Use it for evaluation only (data.val_path, for_training=False).")


class UnreadableImageError(ValueError):
    """An image in a row could not be decoded (corrupt bytes, missing file)."""


def load_dataset_split(name: str, path: str | Path | None = None, split: str = "train",
                       max_samples: int | None = None, for_training: bool = False,
                       report: DataReport | None = None, columns: dict | None = None, **knobs) -> list[dict]:
    """Load one split of ``name`` (``synthvista``, ``geometry3k``, ``mathvista``, ``custom``) as Examples.

    ``path``: a parquet file or directory; ``None`` generates SynthVista (``knobs``: ``n``
    (default ``max_samples`` or 1000), ``seed`` (default 0), ``text_only`` and the generator's
    ``Knobs``) or loads the hub dataset by name. ``for_training`` selects which config key an
    error names (``data.train_path`` / ``data.val_path``) and is refused for MathVista.
    ``max_samples`` keeps the first rows (before corrupt ones are skipped). ``report`` receives the
    counts of rows read, used and skipped by reason. ``columns``: ``custom``'s keyword arguments
    (``prompt_key``, ``answer_key``, ``image_key``, ``prompt_template``, ``image_check``).
    """
    report = report if report is not None else DataReport()
    name = name.lower()
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    if name == "mathvista" and for_training:
        raise ValueError(f"refusing to load mathvista for training. {MATHVISTA_LICENCE}")
    key = "data.train_path" if for_training else "data.val_path"
    if name == "custom":
        if path is None:
            raise ValueError(f"data=custom needs {key}: a .jsonl/.json/.parquet file, a directory of them, or name@split")
        from sapo_ray.data.custom import load_custom

        return load_custom(str(path), split, key, report, max_samples=max_samples, **(columns or {}))
    if knobs and (name != "synthvista" or path is not None):
        raise TypeError(f"generator knobs {sorted(knobs)} only apply to synthvista without a path")

    if name == "synthvista" and path is None:
        n = knobs.pop("n", max_samples if max_samples is not None else 1000)
        if max_samples is not None:
            n = min(n, max_samples)
        seed = knobs.pop("seed", 0)
        split = {"validation": "val", "testmini": "test"}.get(split, split)
        examples = [synthvista.to_example(r) for r in synthvista.generate(n, seed, split, **knobs)]
        report.rows += len(examples)
        report.used += len(examples)
        return examples

    sources = _hub_tables(name, split, key) if path is None else _parquet_tables(path, split, key)
    examples, skipped, seen = [], [], 0
    for table, base_dir, synthetic in sources:
        if max_samples is not None:
            table = table.slice(0, max(0, max_samples - seen))
        for index, row in enumerate(table.to_pylist(), start=seen):
            report.rows += 1
            try:
                if row.get("answer") is None:
                    raise SkipRow("missing_answer", "column 'answer' is missing or null")
                try:
                    ex = (geometry3k_to_example(row, split, index, base_dir) if name == "geometry3k"
                          else mathvista_to_example(row, name, base_dir))
                except UnreadableImageError as err:
                    raise SkipRow("unreadable_image", str(err)) from None
            except SkipRow as skip:
                report.skip(str(base_dir or HUB_NAMES[name]), index, skip.reason, skip.detail)
                skipped.append(f"{row.get('pid', row.get('id', index))}: {skip}")
                continue
            if synthetic:
                ex["metadata"]["source"] = "synthetic"
                if not ex["pid"].startswith("synthetic-"):
                    ex["pid"] = f"synthetic-{ex['pid']}"
            examples.append(ex)
        seen += table.num_rows
    if skipped:
        logger.warning("%s/%s: skipped %d of %d rows (unreadable images, no answer): %s", name, split, len(skipped),
                       seen, "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    report.used += len(examples)
    return examples


def geometry3k_to_example(row: dict, split: str = "train", index: int = 0, base_dir: Path | None = None) -> dict:
    """Map a ``hiyouga/geometry3k`` row (``images``, ``problem``, ``answer``[, ``id``]) to an Example.

    The query keeps the ``<image>`` placeholders (``build_messages`` puts the images there); the
    question drops them. Free-form; the answer type is inferred from the answer text.
    """
    images = [decode_image(img, base_dir) for img in row.get("images") or []]
    problem = row["problem"]
    width, height = (images[0].size if images else (None, None))
    return free_form_example(f"geometry3k-{split}-{row.get('id', index)}", "geometry3k", problem, problem, images,
                             str(row["answer"]).strip(), {
                                 "split": split, "language": "english", "img_width": width, "img_height": height,
                                 "source": "geometry3k", "category": "math-targeted-vqa",
                                 "task": "geometry problem solving", "context": "geometry diagram",
                                 "grade": "high school", "skills": ["geometry reasoning", "algebraic reasoning"]})


def free_form_example(pid: str, data_source: str, problem: str, query: str, images: list, answer: str,
                      metadata: dict) -> dict:
    """An Example of a free-form question: `problem` with `<image>` placeholders (kept in the query,
    dropped from the question), the answer's type inferred from its text."""
    answer_type, precision = infer_answer_type(answer)
    return {
        "pid": pid, "data_source": data_source, "question": problem.replace("<image>", "").strip(), "query": query,
        "images": images, "answer": answer, "question_type": "free_form", "answer_type": answer_type,
        "precision": precision, "choices": None, "unit": None, "metadata": metadata, "solution": None,
    }


def mathvista_to_example(row: dict, data_source: str = "mathvista", base_dir: Path | None = None) -> dict:
    """Map a MathVista-schema row (``decoded_image`` as struct<bytes, path> or None) to an Example."""
    image = row.get("decoded_image")
    images = [] if image is None else [decode_image(image, base_dir)]
    return row_to_example(row, data_source, images=images)


def infer_answer_type(answer: str) -> tuple[str, int | None]:
    """Guess (answer_type, precision) of a free-form answer: integer, float (decimals) or text."""
    if re.fullmatch(r"-?\d+", answer):
        return "integer", None
    if m := re.fullmatch(r"-?\d*\.(\d+)", answer):
        return "float", len(m.group(1))
    return "text", None


def decode_image(value, base_dir: Path | None) -> Image.Image:
    """Decode an image cell (struct<bytes, path>, raw bytes, a path relative to ``base_dir``, or PIL) to
    an RGB PIL image."""
    try:
        if isinstance(value, Image.Image):
            img = value
        else:
            if isinstance(value, (str, Path)):
                value = {"path": str(value)}
            data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
            if data is None and path:
                file = Path(path) if base_dir is None or Path(path).is_absolute() else base_dir / path
                data = file.read_bytes()
            if not data:
                raise UnreadableImageError("image has neither bytes nor a readable path")
            img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except UnreadableImageError:
        raise
    except (OSError, ValueError, TypeError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"{type(err).__name__}: {err}") from err


def _parquet_tables(path: str | Path, split: str, key: str):
    """Yield (table, directory, is_fixture) for the parquet files of ``split`` under ``path``."""
    import pyarrow.parquet as pq

    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{key}={str(path)!r}: no such file or directory. Set {key} to a parquet file "
                                f"or a directory of parquet files (e.g. data/{split}-00000-of-00001.parquet)")
    if root.is_file():
        files = [root]
    else:
        every = sorted(root.rglob("*.parquet"))
        files = [f for f in every if f.stem == split or f.stem.startswith(f"{split}-")]
        if not files and not any(f.stem.split("-")[0] in KNOWN_SPLITS for f in every):
            files = every  # unsplit directory: take all files
        if not files:
            found = ", ".join(str(f.relative_to(root)) for f in every) or "none"
            raise FileNotFoundError(f"{key}={str(path)!r}: no parquet file for split {split!r} "
                                    f"(want {split}.parquet or {split}-*.parquet; found: {found})")
    for file in files:
        table = pq.read_table(file)
        meta = table.schema.metadata or {}
        yield table, file.parent, bool(json.loads(meta.get(FIXTURE_KEY, b"{}")).get("synthetic"))


def _hub_tables(name: str, split: str, key: str):
    """Yield the hub dataset's split as one raw arrow table (images undecoded)."""
    hub_name = HUB_NAMES[name]
    try:
        import datasets

        ds = datasets.load_dataset(hub_name, split=split)
    except Exception as err:  # no network, no such split, ...: say what to configure
        raise RuntimeError(f"could not load {name} split {split!r} from the hub ({hub_name}): "
                           f"{type(err).__name__}: {err}. Without hub access, download the parquet files and set "
                           f"{key} to the file or directory.") from err
    yield ds.with_format("arrow")[:], None, False
