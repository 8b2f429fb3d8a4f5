"""A run's data: the training prompts' loader and the validation examples, with what was kept and
skipped of each (`data_report.json` in the run directory)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sapo_ray.data.datasets import load_dataset_split
from sapo_ray.data.prompt_loader import PromptLoader
from sapo_ray.data.report import DataReport
from sapo_ray.data.video import VideoSampling
from sapo_ray.utils import derive_seed


@dataclass
class RunData:
    loader: PromptLoader  # the training prompts, `data.prompts_per_step` at a time
    val_examples: list[dict]
    reports: dict[str, DataReport]  # "train" and "val"


def load_run_data(cfg, processor, run_dir: Path) -> RunData:
    """The run's training and validation data as `cfg.data` describes it; rows whose images or videos
    `processor` rejects (or any, for a text-only model) are skipped and reported."""
    d = cfg.data
    has_vision = hasattr(processor, "image_processor")

    def check_image(image) -> None:
        """Raise what the model's processor raises for `image` (too small, an aspect ratio over 200, ...)."""
        if not has_vision:
            raise ValueError("the model takes text only")
        processor.image_processor(images=[image], return_tensors="pt")

    def check_video(video) -> None:
        """Raise what the model's processor raises for `video` (frames too small, ...)."""
        if not has_vision:
            raise ValueError("the model takes text only")
        processor.video_processor([video])

    def generator_knobs(name: str, path: str | None, **knobs) -> dict:
        """Generator arguments when `name` is generated (synthvista without a path), else none. A text-only
        model gets the rows that describe the image in words."""
        if name != "synthvista" or path is not None:
            return {}
        templates = {} if d.templates is None else {"templates": list(d.templates)}
        return {**knobs, "image_size": d.image_size, "hint": d.hint, **templates,
                **({} if has_vision else {"text_only": True})}

    reports = {"train": DataReport(), "val": DataReport()}
    columns = {"prompt_key": d.prompt_key, "answer_key": d.answer_key, "image_key": d.image_key,
               "prompt_template": d.prompt_template, "image_check": check_image, "video_key": d.video_key,
               "video_sampling": VideoSampling(d.video_fps, d.max_frames), "video_check": check_video}
    try:
        train = load_dataset_split(d.train, d.train_path, d.train_split, for_training=True, report=reports["train"],
                                   columns=columns, **generator_knobs(d.train, d.train_path, n=d.train_size,
                                                                      seed=derive_seed(cfg.seed, "data/train")))
        val = load_dataset_split(d.val, d.val_path, d.val_split, max_samples=d.val_size, report=reports["val"],
                                 columns=columns, **generator_knobs(d.val, d.val_path, seed=derive_seed(0, "data/val")))
    finally:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "data_report.json").write_text(json.dumps({k: r.as_dict() for k, r in reports.items()}, indent=1))
    return RunData(PromptLoader(train, d.prompts_per_step, seed=derive_seed(cfg.seed, "loader")), val, reports)
