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

import json
import logging
from pathlib import Path


from sapo_ray.data import synthvista
from sapo_ray.data.report import DataReport, SkipRow
from sapo_ray.data.files import split_files
from sapo_ray.data.schema import UnreadableImageError, decode_image, free_form_example, row_to_example

logger = logging.getLogger(__name__)

DATASETS = ("synthvista", "geometry3k", "mathvista", "custom")
HUB_NAMES = {"geometry3k": "hiyouga/geometry3k", "mathvista": "AI4Math/MathVista"}
FIXTURE_KEY = b"sapo_ray"  # parquet key-value metadata written by tests/data/fixtures.py
MATHVISTA_LICENCE = ("MathVista is a test set: its terms (CC BY-SA 4.0, 'using it for training is prohibited') "
                     "forbid training on it. Use it for evaluation only (data.val_path, for_training=False).")


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


def mathvista_to_example(row: dict, data_source: str = "mathvista", base_dir: Path | None = None) -> dict:
    """Map a MathVista-schema row (``decoded_image`` as struct<bytes, path> or None) to an Example."""
    image = row.get("decoded_image")
    images = [] if image is None else [decode_image(image, base_dir)]
    return row_to_example(row, data_source, images=images)


def _parquet_tables(path: str | Path, split: str, key: str):
    """Yield (table, directory, is_fixture) for the parquet files of ``split`` under ``path``."""
    import pyarrow.parquet as pq

    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{key}={str(path)!r}: no such file or directory. Set {key} to a parquet file "
                                f"or a directory of parquet files (e.g. data/{split}-00000-of-00001.parquet)")
    for file in split_files(root, split, key, (".parquet",)):
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
