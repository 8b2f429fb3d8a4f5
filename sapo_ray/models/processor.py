"""Processor and tokenizer loading for Qwen-VL-family checkpoints, without torchvision.

The stock Qwen2-VL / Qwen2.5-VL / Qwen3-VL processors build a video processor that needs torchvision
(broken with torch 2.13 CPU here). :class:`QwenVLProcessor` keeps the PIL/numpy image processor and
encodes videos itself from decoded frames (:class:`FrameVideoProcessor`): each frame through the image
processor, then consecutive frames paired into the temporal patches the vision tower embeds.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, PreTrainedTokenizerBase
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

from sapo_ray.data.video import Video

END_OF_TURN = "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
# Qwen3-VL writes each temporal patch's time into the prompt: "<t seconds>" before its own
# `<|vision_start|>...<|vision_end|>` (the format of Qwen's processor, transformers 4.57 and vLLM).
TIMESTAMPS_IN_TEXT = ("Qwen3VLProcessor",)


class FrameVideoProcessor:
    """Qwen-VL's video encoding from decoded frames: every frame resized to one grid (at most
    `max_pixels` per frame, a multiple of `patch_size * merge_size` on each side) and normalised by the
    image processor, frames paired into temporal patches (an odd last frame repeated, as Qwen's video
    processor does). The patches' layout is the one of transformers' Qwen-VL video processors
    (tests/models/test_video.py checks it against their `patchify`)."""

    def __init__(self, image_processor, max_pixels: int | None = None):
        self.image_processor = image_processor
        self.patch_size = image_processor.patch_size
        self.merge_size = image_processor.merge_size
        self.temporal_patch_size = image_processor.temporal_patch_size
        self.max_pixels = max_pixels

    def __call__(self, videos: list[Video]) -> BatchFeature:
        patches, grids = [], []
        for video in videos:
            p, grid = self.encode(video)
            patches.append(p)
            grids.append(grid)
        return BatchFeature({"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids),
                             "video_fps": [v.fps for v in videos]})

    def encode(self, video: Video) -> tuple[torch.Tensor, list[int]]:
        """One video's patches `[t * h * w, C * temporal_patch * patch**2]` and its grid `[t, h, w]`."""
        if not video.frames:
            raise ValueError("a video needs at least one frame")
        if len({f.size for f in video.frames}) > 1:
            raise ValueError(f"a video's frames must share one size, got {sorted({f.size for f in video.frames})}")
        frames = list(video.frames) + [video.frames[-1]] * (-len(video.frames) % self.temporal_patch_size)
        size = {} if self.max_pixels is None else {"size": {"longest_edge": self.max_pixels,
                                                            "shortest_edge": min(self.max_pixels, self._min_pixels())}}
        out = self.image_processor(images=frames, return_tensors="np", **size)
        _, h, w = (int(x) for x in out["image_grid_thw"][0])
        c, tp, ps = 3, self.temporal_patch_size, self.patch_size
        # Each frame's own patches repeat it over the temporal axis; keep one copy of each and pair frames.
        per_frame = out["pixel_values"].reshape(len(frames), h * w, c, tp, ps, ps)[:, :, :, 0]
        t = len(frames) // tp
        paired = per_frame.reshape(t, tp, h * w, c, ps, ps).transpose(0, 2, 3, 1, 4, 5)
        return torch.from_numpy(np.ascontiguousarray(paired).reshape(t * h * w, c * tp * ps * ps)), [t, h, w]

    def _min_pixels(self) -> int:
        return int(self.image_processor.size["shortest_edge"])


class QwenVLProcessor(Qwen2_5_VLProcessor):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL processor without torchvision: the PIL image processor and
    :class:`FrameVideoProcessor`.

    Image handling is identical for the three families (Qwen3-VL's patches are 16 px, its processor's
    `patch_size` says so): `<|image_pad|>` is expanded to `prod(image_grid_thw) / merge_size**2` tokens.
    A video's `<|video_pad|>` is expanded to `prod(video_grid_thw) / merge_size**2` tokens, with
    `second_per_grid_ts` for Qwen2-VL / Qwen2.5-VL (their RoPE spaces temporal patches by time), or per
    temporal patch `<t seconds><|vision_start|>` + its tokens + `<|vision_end|>` for Qwen3-VL. The model
    needs `mm_token_type_ids` (1 on image, 2 on video placeholders) to build its 3-D RoPE positions.
    """

    stock_class = "Qwen2_5_VLProcessor"  # written to saved configs, so AutoProcessor works where torchvision does

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, video_max_pixels: int | None = None,
                 **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
        # Set after the stock constructor, which only takes its own (torchvision) video processor class.
        self.video_processor = FrameVideoProcessor(image_processor, video_max_pixels)

    def __call__(self, images=None, text=None, videos: list[Video] | None = None, **kwargs):
        if videos is not None and self.stock_class in TIMESTAMPS_IN_TEXT:
            # Each temporal patch brings its own start and end tokens: the template's pair around the video goes.
            pair = f"{VISION_START}{self.video_token}{VISION_END}"
            text = [t.replace(pair, self.video_token) for t in ([text] if isinstance(text, str) else text)]
        return super().__call__(images=images, text=text, videos=videos, **kwargs)

    def _process_videos(self, videos: list[Video], **kwargs):
        data = self.video_processor(videos)
        fps, grids = data.pop("video_fps"), data["video_grid_thw"].tolist()
        tp, merge = self.video_processor.temporal_patch_size, self.video_processor.merge_size ** 2
        if self.stock_class in TIMESTAMPS_IN_TEXT:
            # A temporal patch's time: the mean of its frames' times (Qwen3-VL's processor).
            replacements = ["".join(f"<{(k * tp + (tp - 1) / 2) / rate:.1f} seconds>{VISION_START}"
                                    + self.video_token * (h * w // merge) + VISION_END for k in range(t))
                            for (t, h, w), rate in zip(grids, fps)]
        else:
            data["second_per_grid_ts"] = torch.tensor([tp / rate for rate in fps])
            replacements = [self.video_token * (t * h * w // merge) for t, h, w in grids]
        return data, replacements

    def save_pretrained(self, save_directory, **kwargs):
        """Save like the stock processor (its class name in `processor_config.json` / `tokenizer_config.json`)."""
        files = super().save_pretrained(save_directory, **kwargs)
        for name in ("processor_config.json", "tokenizer_config.json"):
            file = os.path.join(save_directory, name)
            if os.path.isfile(file):
                with open(file) as f:
                    cfg = json.load(f)
                cfg["processor_class"] = self.stock_class
                with open(file, "w") as f:
                    json.dump(cfg, f, indent=2)
        return files


def _check_dir(path: str) -> str:
    """`path` as a directory (`bundled:NAME` = `sapo_ray/assets/NAME`), or a clear error naming `model.path`."""
    path = os.fspath(path)
    if path.startswith("bundled:"):
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", path[len("bundled:"):])
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"model directory {path!r} does not exist; set the config key `model.path` to a local "
            "Hugging Face model directory (e.g. sapo_ray/assets/tiny-vlm or a Qwen2.5-VL-3B-Instruct download)"
        )
    return path


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer of the HF directory `path` (chat template included)."""
    return AutoTokenizer.from_pretrained(_check_dir(path))


def load_processor(path: str, max_pixels: int | None = None, min_pixels: int | None = None,
                   video_max_pixels: int | None = None):
    """Load the processor of the HF directory `path`.

    For a vision-language directory (one with `preprocessor_config.json` or `processor_config.json`)
    returns a :class:`QwenVLProcessor` with the PIL image processor; for a text-only
    model returns its tokenizer (which has the same `apply_chat_template` and a `__call__` taking
    `text=`). `max_pixels` / `min_pixels` (`data.max_pixels` / `data.min_pixels`) replace the
    checkpoint's pixel budget per image; None keeps the checkpoint's. `video_max_pixels`
    (`data.video_max_pixels`) bounds each video frame; None gives frames the images' budget.
    """
    path = _check_dir(path)
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("preprocessor_config.json", "processor_config.json")):
        return load_tokenizer(path)
    limits = {k: v for k, v in (("max_pixels", max_pixels), ("min_pixels", min_pixels)) if v is not None}
    image_processor = AutoImageProcessor.from_pretrained(path, backend="pil", **limits)
    tokenizer = load_tokenizer(path)
    processor = QwenVLProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template,
                                video_max_pixels=video_max_pixels)
    stock = getattr(image_processor, "processor_class", None) or tokenizer.init_kwargs.get("processor_class")
    if stock in ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor"):
        processor.stock_class = stock
    return processor


def pixel_limits(processor) -> dict[str, int] | None:
    """`{"min_pixels", "max_pixels"}` the processor resizes images to (both, the checkpoint's defaults filled
    in), for an engine that runs its own image processor (vLLM's `mm_processor_kwargs`); None without images."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return None
    return {"min_pixels": int(image_processor.size["shortest_edge"]),
            "max_pixels": int(image_processor.size["longest_edge"])}


def banned_token_ids(tokenizer) -> list[int]:
    """Ids generation must never sample: every special token (added-special included) except the
    end-of-turn token `<|im_end|>` (or the tokenizer's eos when it has no `<|im_end|>`).

    The rollout engine passes these as a logit mask (`bad_words_ids`/`suppress_tokens`); the
    learner must mask the same ids when it recomputes log-probs. Non-special added tokens such as
    `<think>` stay allowed.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # accept a processor
    end = tokenizer.get_vocab().get(END_OF_TURN, tokenizer.eos_token_id)
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return sorted(i for i in special if i is not None and i != end)
