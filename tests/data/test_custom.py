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


def test_video_columns_decode_files_and_frame_lists_and_bad_videos_are_counted(tmp_path):
    """`data.video_key`: a row's videos, each a file (decoded with PyAV) or a list of frame files, sampled at
    `video_sampling`; `<video>` in the question places it. A corrupt file, a missing one or frames of two
    sizes skip the row as `unreadable_video`; one the processor refuses, as `video_rejected`."""
    from sapo_ray.data.video import VideoSampling
    from tests.models.test_video import _video_file

    frames = [Image.new("RGB", (56, 56), (40 * i, 0, 0)) for i in range(4)]
    (tmp_path / "clip.mp4").write_bytes(_video_file(frames, 4))
    for i, f in enumerate(frames):
        f.save(tmp_path / f"f{i}.png")
    Image.new("RGB", (28, 28)).save(tmp_path / "small.png")
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 64)
    rows = [{"problem": "<video> Which frame is reddest?", "answer": "4", "clips": ["clip.mp4"]},
            {"problem": "Which grew?", "answer": "A", "clips": [[f"f{i}.png" for i in range(4)]]},
            {"problem": "Broken.", "answer": "1", "clips": ["bad.mp4"]},
            {"problem": "Missing.", "answer": "1", "clips": ["gone.mp4"]},
            {"problem": "Mixed sizes.", "answer": "1", "clips": [["f0.png", "small.png"]]},
            {"problem": "Refused.", "answer": "1", "clips": [["small.png", "small.png"]]}]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))

    def refuse_small(video):
        if video.frames[0].size[0] < 56:
            raise ValueError("height:28 and width:28 must be larger than factor:56")

    report = DataReport()
    examples = load_dataset_split("custom", path, "train", report=report, columns={
        "video_key": "clips", "video_sampling": VideoSampling(fps=2.0, max_frames=8), "video_check": refuse_small})
    assert [len(e["videos"]) for e in examples] == [1, 1] and examples[0]["question"] == "Which frame is reddest?"
    assert [len(e["videos"][0].frames) for e in examples] == [2, 4]  # the file: 1 s at 4 fps sampled at 2 fps
    assert examples[1]["videos"][0].fps == 2.0 and "clips" not in examples[0]["columns"]
    assert dict(report.skipped) == {"unreadable_video": 3, "video_rejected": 1}
