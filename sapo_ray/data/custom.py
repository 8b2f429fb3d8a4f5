"""A user's own dataset (`data=custom`): local files or a hub dataset, mapped to Examples by column names.

`data.train_path` / `data.val_path` name

- a `.jsonl` (one JSON object per line), `.json` (a list of objects) or `.parquet` file;
- a directory of such files: those of the split (`{split}.*` or `{split}-*.*`, at any depth), or all of
  them when no file is named after a split;
- a hub dataset `name@split` (`datasets.load_dataset(name, split=split)`; a local directory written
  that way works offline).

Columns (EasyR1's / verl's names by default): `data.prompt_key` (the question, `problem`),
`data.answer_key` (the gold answer, `answer`) and `data.image_key` (`images`: a list, or one item, of
image paths relative to the file, raw bytes, or `{"bytes": ...}` / `{"path": ...}` dicts as parquet
exports hold them; a row without the column is text-only) and `data.video_key` (`videos`, as EasyR1's:
a list of videos, each a file in any of those forms, decoded with PyAV, or a list of frames; sampled at
`data.video_fps`, at most `data.max_frames`). `<image>` (`<video>`) in the question marks where each
image (video) goes (as in Geometry3K); without it they come first. `data.prompt_template` (a Jinja
template, inline or a file, as EasyR1's `format_prompt`) renders the query from `content` (the question)
and the row's columns. The row's other columns stay in the Example under their own names (an Example
key wins a clash), so reward functions and generation dumps see them.

Rows that cannot be used are skipped, counted by reason and listed by file and row in the run's
`data_report.json` (`DataReport`); a null answer is a skipped row, never the string "None".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

from sapo_ray.data.files import split_files
from sapo_ray.data.report import DataReport, SkipRow
from sapo_ray.data.schema import UnreadableImageError, decode_image, free_form_example
from sapo_ray.data.video import UnreadableVideoError, VideoSampling, decode_video

FILE_TYPES = (".jsonl", ".json", ".parquet")
# The keys every Example has (docs of `sapo_ray.data.schema.row_to_example`); a row's columns never replace them.
EXAMPLE_KEYS = ("pid", "data_source", "question", "query", "images", "videos", "answer", "question_type", "answer_type",
                "precision", "choices", "unit", "metadata", "solution", "columns")


def load_custom(path: str, split: str, key: str, report: DataReport, prompt_key: str = "problem",
                answer_key: str = "answer", image_key: str = "images", prompt_template: str | None = None,
                image_check: Callable | None = None, max_samples: int | None = None, video_key: str = "videos",
                video_sampling: VideoSampling = VideoSampling(), video_check: Callable | None = None) -> list[dict]:
    """The usable rows of `path` as Examples (`key` is the config key an error names)."""
    template = _template(prompt_template)
    examples = []
    for file, index, row in _rows(path, split, key, report):
        if max_samples is not None and len(examples) >= max_samples:
            break
        report.rows += 1
        try:
            examples.append(to_example(row, index, file, prompt_key, answer_key, image_key, template, image_check,
                                       video_key, video_sampling, video_check))
        except SkipRow as skip:
            report.skip(file, index, skip.reason, skip.detail)
    report.used += len(examples)
    if not examples:
        raise ValueError(f"{key}={path!r}: no usable row in {report.rows} ({report.summary()}); "
                         f"columns looked up: data.prompt_key={prompt_key!r}, data.answer_key={answer_key!r}, "
                         f"data.image_key={image_key!r}, data.video_key={video_key!r}")
    return examples


def to_example(row: dict, index: int, file: str, prompt_key: str, answer_key: str, image_key: str,
               template=None, image_check: Callable | None = None, video_key: str = "videos",
               video_sampling: VideoSampling = VideoSampling(), video_check: Callable | None = None) -> dict:
    """One row as an Example; raises `SkipRow` with the reason it cannot be used."""
    if not isinstance(row, dict):
        raise SkipRow("not_an_object", f"a {type(row).__name__}, not a JSON object")
    prompt = row.get(prompt_key)
    if not isinstance(prompt, str) or not prompt.strip():
        raise SkipRow("missing_prompt", f"column {prompt_key!r} is {_show(prompt)}")
    answer = row.get(answer_key)
    if answer is None or isinstance(answer, float) and answer != answer or not str(answer).strip():
        raise SkipRow("missing_answer", f"column {answer_key!r} is {_show(answer)}")
    answer = str(answer).strip()
    base_dir = Path(file).parent if Path(file).exists() else None
    images = []
    for cell in _cells(row.get(image_key)):
        try:
            images.append(decode_image(cell, base_dir))
        except UnreadableImageError as err:
            raise SkipRow("unreadable_image", str(err)) from None
        _check(image_check, images[-1], "image_rejected")
    videos = []
    # As EasyR1's `videos`: a list of videos, each a file or a list of frames (or one video file alone).
    for cell in _cells(row.get(video_key)):
        try:
            videos.append(decode_video(cell, base_dir, video_sampling.fps, video_sampling.max_frames))
        except UnreadableVideoError as err:
            raise SkipRow("unreadable_video", str(err)) from None
        _check(video_check, videos[-1], "video_rejected")
    used = (prompt_key, answer_key, image_key, video_key)
    columns = {k: v for k, v in row.items() if k not in used and k not in EXAMPLE_KEYS}
    query = template.render(content=prompt, **row) if template is not None else prompt
    pid = row.get("pid", row.get("id"))
    pid = str(pid) if pid is not None else f"{Path(file).stem}-{index}"
    example = free_form_example(pid, "custom", prompt, query, images, answer, {"source": str(file), "row": index},
                                videos)
    return {**columns, **example, "columns": sorted(columns)}


def _cells(value) -> list:
    """A column's cell as a list of items: none, one, or each of a list."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check(check: Callable | None, item, reason: str) -> None:
    if check is not None:
        try:
            check(item)
        except Exception as err:  # the processor's own words: aspect ratio, size, ...
            raise SkipRow(reason, f"{type(err).__name__}: {err}") from None


def _show(value) -> str:
    return "missing or null" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"


def _template(spec: str | None):
    if not spec:
        return None
    import jinja2

    file = Path(spec).expanduser()
    text = file.read_text() if file.is_file() else spec
    if "{{" not in text:
        raise ValueError(f"data.prompt_template={spec!r} is neither a file nor a Jinja template using {{{{ content }}}}")
    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False).from_string(text)


def _rows(path: str, split: str, key: str, report: DataReport) -> Iterator[tuple[str, int, dict]]:
    """`(file, row index in the file, row)` for every row under `path`."""
    root = Path(path).expanduser()
    if not root.exists() and "@" in path:
        yield from _hub_rows(path, key)
        return
    if not root.exists():
        raise FileNotFoundError(f"{key}={path!r}: no such file or directory (a .jsonl, .json or .parquet file, a "
                                "directory of them, or a hub dataset written name@split)")
    for file in split_files(root, split, key, FILE_TYPES):
        for index, row in _file_rows(file, report):
            yield str(file), index, row


def _file_rows(file: Path, report: DataReport) -> Iterator[tuple[int, dict]]:
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(file).to_pylist())
    elif file.suffix == ".json":
        try:
            rows = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: not valid JSON ({err}); a .json file holds a list of rows, "
                             ".jsonl one row per line") from None
        if not isinstance(rows, list):
            raise ValueError(f"{file}: a .json file must hold a list of rows, not a {type(rows).__name__}")
        yield from enumerate(rows)
    else:
        with file.open() as lines:
            for index, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    report.rows += 1
                    report.skip(str(file), index, "unparsable_line", str(err))
                    continue
                yield index, row


def _hub_rows(spec: str, key: str) -> Iterator[tuple[str, int, dict]]:
    name, _, split = spec.rpartition("@")
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # no network, no such dataset or split: say what to configure
        raise RuntimeError(f"{key}={spec!r}: could not load split {split!r} of {name!r} with datasets.load_dataset: "
                           f"{type(err).__name__}: {err}. Without hub access, download the files and set {key} to "
                           "the file or directory.") from err
    for index, row in enumerate(ds):
        yield spec, index, row
