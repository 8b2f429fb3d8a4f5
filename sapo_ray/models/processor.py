"""Processor and tokenizer loading for Qwen-VL-family checkpoints, without torchvision.

The stock Qwen2-VL / Qwen2.5-VL processors also build a video processor, which needs torchvision
(broken with torch 2.13 CPU here). Training and evaluation use still images only, so
:class:`ImageOnlyQwenVLProcessor` drops the video processor and uses the PIL/numpy image processor.
"""

from __future__ import annotations

import json
import os

from transformers import AutoImageProcessor, AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

END_OF_TURN = "<|im_end|>"


class ImageOnlyQwenVLProcessor(Qwen2_5_VLProcessor):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL processor with images only (no video processor, so no torchvision).

    Image handling is identical for the three families (Qwen3-VL's patches are 16 px, its processor's
    `patch_size` says so): `<|image_pad|>` is expanded to
    `prod(image_grid_thw) / merge_size**2` tokens and `mm_token_type_ids` marks them (the model
    needs those ids to build its 3-D rope positions: pass them to `forward` and `generate`).
    """

    stock_class = "Qwen2_5_VLProcessor"  # written to saved configs, so AutoProcessor works where torchvision does

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

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


def load_processor(path: str, max_pixels: int | None = None, min_pixels: int | None = None):
    """Load the processor of the HF directory `path`.

    For a vision-language directory (one with `preprocessor_config.json` or `processor_config.json`)
    returns an :class:`ImageOnlyQwenVLProcessor` with the PIL image processor; for a text-only
    model returns its tokenizer (which has the same `apply_chat_template` and a `__call__` taking
    `text=`). `max_pixels` / `min_pixels` (`data.max_pixels` / `data.min_pixels`) replace the
    checkpoint's pixel budget per image; None keeps the checkpoint's.
    """
    path = _check_dir(path)
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("preprocessor_config.json", "processor_config.json")):
        return load_tokenizer(path)
    limits = {k: v for k, v in (("max_pixels", max_pixels), ("min_pixels", min_pixels)) if v is not None}
    image_processor = AutoImageProcessor.from_pretrained(path, backend="pil", **limits)
    tokenizer = load_tokenizer(path)
    processor = ImageOnlyQwenVLProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template)
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
