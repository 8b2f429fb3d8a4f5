"""Model, processor and critic loading by path (any HF directory), plus the tiny offline models.

`load_policy(path)` / `load_processor(path)` / `ValueModel.from_pretrained(path)` take the config key
`model.path`: `sapo_ray/assets/tiny-vlm` (default, Qwen2.5-VL family), `sapo_ray/assets/tiny-lm`
(text-only twin) or a real checkpoint such as Qwen2.5-VL-3B-Instruct.
"""

from pathlib import Path

from sapo_ray.models.loading import build_from_config, freeze_vision_tower, is_vision_config, load_policy
from sapo_ray.models.processor import (QwenVLProcessor, banned_token_ids, load_processor, load_tokenizer,
                                      pixel_limits)
from sapo_ray.models.value import ValueModel

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY_VLM = str(ASSETS / "tiny-vlm")
TINY_LM = str(ASSETS / "tiny-lm")

__all__ = [
    "ASSETS", "TINY_LM", "TINY_VLM", "QwenVLProcessor", "ValueModel", "banned_token_ids",
    "build_from_config", "freeze_vision_tower", "is_vision_config", "load_policy", "load_processor", "load_tokenizer",
    "pixel_limits",
]
