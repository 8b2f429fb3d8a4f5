"""load_dataset_split: fixtures round-trip in the hub schemas, refusals and clear errors."""

import logging

import numpy as np
import pyarrow.parquet as pq
import pytest

from sapo_ray.data import synthvista
from fixtures import write_geometry3k_fixture, write_mathvista_fixture
from sapo_ray.data.datasets import load_dataset_split
from sapo_ray.data.schema import infer_answer_type
from sapo_ray.data.schema import MATHVISTA_KEYS

CONTRACT_KEYS = {"pid", "data_source", "question", "query", "images", "videos", "answer", "question_type", "answer_type",
                 "precision", "choices", "unit", "metadata", "solution"}


def test_geometry3k_fixture_has_the_hub_schema_and_round_trips(tmp_path):
    path = write_geometry3k_fixture(tmp_path / "geo3k", 6)
    schema = pq.read_schema(path)
    assert schema.names == ["images", "problem", "answer", "id", "choices", "ground_truth"]
    assert str(schema.field("images").type) == "list<element: struct<bytes: binary, path: string>>"
    table = pq.read_table(path).to_pylist()

    examples = load_dataset_split("geometry3k", tmp_path / "geo3k", split="train", for_training=True)
    assert len(examples) == 6
    for ex, row in zip(examples, table):
        assert set(ex) == CONTRACT_KEYS and ex["data_source"] == "geometry3k"
        assert ex["pid"].startswith("synthetic-") and ex["metadata"]["source"] == "synthetic"
        assert ex["answer"] == row["answer"] and ex["query"] == row["problem"]
        assert ex["question_type"] == "free_form" and "<image>" not in ex["question"]
        assert len(ex["images"]) == 1 and ex["images"][0].mode == "RGB"
    assert {ex["answer_type"] for ex in examples} <= {"integer", "text"}


def test_mathvista_fixture_has_the_hub_schema_and_round_trips(tmp_path):
    path = write_mathvista_fixture(tmp_path / "mathvista" / "data", 8)
    schema = pq.read_schema(path)
    assert tuple(schema.names) == MATHVISTA_KEYS
    assert str(schema.field("decoded_image").type) == "struct<bytes: binary, path: string>"
    assert str(schema.field("precision").type) == "double"

    examples = load_dataset_split("mathvista", tmp_path / "mathvista", split="testmini")
    source = synthvista.generate(8, seed=0, split="val")
    assert [ex["pid"] for ex in examples] == [f"synthetic-{i}" for i in range(8)]
    for ex, row in zip(examples, source):
        assert set(ex) == CONTRACT_KEYS and ex["data_source"] == "mathvista"
        assert ex["metadata"]["source"] == "synthetic" and ex["metadata"]["split"] == "testmini"
        assert (ex["answer"], ex["query"], ex["choices"], ex["precision"]) == (
            row["answer"], row["query"], row["choices"], row["precision"])
        assert np.array_equal(np.asarray(ex["images"][0]), np.asarray(row["decoded_image"]))


def test_mathvista_is_refused_for_training(tmp_path):
    write_mathvista_fixture(tmp_path, 2)
    with pytest.raises(ValueError, match="MathVista.*forbid training"):
        load_dataset_split("mathvista", tmp_path, split="testmini", for_training=True)
    with pytest.raises(ValueError, match="forbid training"):  # refused before any path is looked at
        load_dataset_split("mathvista", None, split="testmini", for_training=True)


@pytest.mark.parametrize("for_training, key", [(True, "data.train_path"), (False, "data.val_path")])
def test_missing_path_names_the_path_and_the_key(tmp_path, for_training, key):
    missing = tmp_path / "nowhere" / "geo3k"
    with pytest.raises(FileNotFoundError) as err:
        load_dataset_split("geometry3k", missing, split="train", for_training=for_training)
    assert str(missing) in str(err.value) and key in str(err.value)


def test_directory_without_the_split_is_a_clear_error(tmp_path):
    write_geometry3k_fixture(tmp_path, 2, split="train")
    write_geometry3k_fixture(tmp_path, 3, split="test")
    assert len(load_dataset_split("geometry3k", tmp_path, split="test")) == 3
    with pytest.raises(FileNotFoundError, match="split 'validation'.*train-00000-of-00001.parquet"):
        load_dataset_split("geometry3k", tmp_path, split="validation")


def test_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    write_mathvista_fixture(tmp_path / "mv", 6, n_corrupt=2)
    write_geometry3k_fixture(tmp_path / "geo" / "g.parquet", 5, n_corrupt=1)
    with caplog.at_level(logging.WARNING, logger="sapo_ray.data.datasets"):
        mv = load_dataset_split("mathvista", tmp_path / "mv", split="testmini")
        geo = load_dataset_split("geometry3k", tmp_path / "geo" / "g.parquet")
    assert [ex["pid"] for ex in mv] == [f"synthetic-{i}" for i in range(4)] and len(geo) == 4
    assert "skipped 2 of 6 rows" in caplog.text and "synthetic-4" in caplog.text
    assert "skipped 1 of 5 rows" in caplog.text


def test_hub_failure_says_which_key_to_set(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="hiyouga/geometry3k.*set data.train_path"):
        load_dataset_split("geometry3k", split="train", for_training=True)
    with pytest.raises(RuntimeError, match="AI4Math/MathVista.*set data.val_path"):
        load_dataset_split("mathvista", split="testmini")


def test_synthvista_is_generated_with_its_knobs(tmp_path):
    examples = load_dataset_split("synthvista", split="train", n=12, seed=3, image_size=64)
    assert len(examples) == 12 and all(ex["images"][0].size == (64, 64) for ex in examples)
    assert [ex["answer"] for ex in examples] == [r["answer"] for r in synthvista.generate(12, 3, image_size=64)]
    assert len(load_dataset_split("synthvista", n=12, max_samples=5)) == 5
    held = load_dataset_split("synthvista", split="testmini", n=4, text_only=True)
    assert all(ex["images"] == [] and ex["metadata"]["split"] == "test" for ex in held)
    with pytest.raises(TypeError, match="knobs"):
        load_dataset_split("geometry3k", tmp_path, n=3)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset_split("mathverse")


def test_max_samples_keeps_the_first_rows(tmp_path):
    write_geometry3k_fixture(tmp_path, 7)
    examples = load_dataset_split("geometry3k", tmp_path, max_samples=3)
    assert [ex["pid"] for ex in examples] == [f"synthetic-geometry3k-train-{i}" for i in range(3)]


def test_infer_answer_type():
    assert infer_answer_type("12") == ("integer", None)
    assert infer_answer_type("-3") == ("integer", None)
    assert infer_answer_type("2.50") == ("float", 2)
    assert infer_answer_type("2 \\sqrt { 221 }") == ("text", None)


def test_hub_path_converts_a_datasets_split(tmp_path, monkeypatch):
    """Without a path the split comes from ``datasets.load_dataset``; stand it in with the local fixture."""
    import datasets

    path = write_geometry3k_fixture(tmp_path / "hub", 3)
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: real(
        "parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache")))
    examples = load_dataset_split("geometry3k", split="train", for_training=True)
    assert [ex["pid"] for ex in examples] == [f"geometry3k-train-{i}" for i in range(3)]
    assert all(ex["images"][0].mode == "RGB" for ex in examples)
