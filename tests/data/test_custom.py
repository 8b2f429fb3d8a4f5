"""data=custom: a user's files by column names, every bad row skipped, counted and listed."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fixtures import CUSTOM_BAD_ROWS, write_custom_jsonl
from sapo_ray.data.datasets import load_dataset_split
from sapo_ray.data.report import DataReport


def _reject_wide(image):
    w, h = image.size
    if max(w, h) / min(w, h) > 200:
        raise ValueError("absolute aspect ratio must be smaller than 200")


def test_jsonl_rows_become_examples_and_bad_rows_are_counted_by_reason(tmp_path):
    path = write_custom_jsonl(tmp_path, 5)
    report = DataReport()
    examples = load_dataset_split("custom", path, "train", for_training=True, report=report,
                                  columns={"image_check": _reject_wide})
    rows = [json.loads(line) for line in path.read_text().splitlines()[:5]]
    assert [ex["answer"] for ex in examples] == [r["answer"] for r in rows]
    assert [ex["query"] for ex in examples] == [r["problem"] for r in rows]
    assert [ex["uid"] for ex in examples] == [f"utrain{i}" for i in range(5)]  # the row's own column, kept
    assert all(ex["columns"] == ["uid"] and len(ex["images"]) == 1 and ex["images"][0].mode == "RGB" for ex in examples)
    assert examples[0]["images"][0].size == Image.open(tmp_path / rows[0]["images"][0]).size
    assert report.rows == 5 + sum(CUSTOM_BAD_ROWS.values()) and report.used == 5
    assert dict(report.skipped) == CUSTOM_BAD_ROWS
    listed = [(r["row"], r["reason"]) for r in report.as_dict()["skipped_rows"]]
    assert listed == [(5, "missing_prompt"), (6, "missing_answer"), (7, "missing_answer"), (8, "unreadable_image"),
                      (9, "unreadable_image"), (10, "image_rejected"), (11, "unparsable_line"), (12, "not_an_object")]
    assert all(r["file"] == str(path) for r in report.skipped_rows)
    assert all(ex["answer"] != "None" for ex in examples)


def test_a_directory_of_splits_json_parquet_and_other_column_names(tmp_path):
    rows = [{"q": "What is 2+3?", "a": 5, "id": "x1"}, {"q": "What is 7-1?", "a": 6.5, "id": "x2"}]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist([{"q": "Name 1.", "a": "one", "id": "y"}]), tmp_path / "test-0.parquet")
    cols = {"prompt_key": "q", "answer_key": "a", "prompt_template": "Solve: {{ content }} ({{ id }})"}
    train = load_dataset_split("custom", tmp_path, "train", columns=cols)
    assert [(e["pid"], e["answer"], e["answer_type"], e["query"]) for e in train] == [
        ("x1", "5", "integer", "Solve: What is 2+3? (x1)"), ("x2", "6.5", "float", "Solve: What is 7-1? (x2)")]
    assert train[0]["images"] == [] and train[0]["data_source"] == "custom"
    test = load_dataset_split("custom", tmp_path, "test", columns=cols)
    assert [e["answer"] for e in test] == ["one"]


def test_no_usable_row_names_the_file_and_the_reasons(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"problem": "hi", "answer": None}) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl.*no usable row in 1 .*1 missing_answer"):
        load_dataset_split("custom", path, "train")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_dataset_split("custom", tmp_path / "nope.jsonl", "train")


def test_a_hub_dataset_written_name_at_split_goes_through_datasets(tmp_path):
    """`name@split` is `datasets.load_dataset(name, split=split)`: a local dataset directory works offline."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    examples = load_dataset_split("custom", f"{tmp_path / 'ds'}@train", "ignored")
    assert [(e["query"], e["answer"]) for e in examples] == [("1+1?", "2")]
    with pytest.raises(RuntimeError, match="could not load split 'nosuch'"):
        load_dataset_split("custom", f"{tmp_path / 'ds'}@nosuch", "train")
