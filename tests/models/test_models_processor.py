import importlib.util

import pytest

from sapo_ray.models import (QwenVLProcessor, banned_token_ids, load_processor, load_tokenizer,
                             pixel_limits)
from sapo_ray.models.processor import FrameVideoProcessor
from tests.models.conftest import image, vlm_batch


def test_processor_builds_without_torchvision_and_expands_images(vlm_dir):
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here; this test is about its absence")
    proc = load_processor(vlm_dir)
    assert isinstance(proc, QwenVLProcessor) and isinstance(proc.video_processor, FrameVideoProcessor)
    batch = vlm_batch(proc)
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # 112x112 -> 8x8 patches of 14 px -> 16 tokens after the 2x2 merge
    assert (batch["input_ids"] == pad).sum(1).tolist() == [16, 16]
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]
    assert tuple(batch["pixel_values"].shape) == (128, 3 * 2 * 14 * 14)
    assert batch["mm_token_type_ids"].sum().item() == 32
    # a larger image is resized down to max_pixels: still at most 16 tokens
    big = proc(images=[image(448)], text=["<|vision_start|><|image_pad|><|vision_end|>x"], return_tensors="pt")
    assert (big["input_ids"] == pad).sum().item() == 16


def test_pixel_budget_overrides_the_checkpoints(vlm_dir, lm_dir):
    """data.max_pixels / data.min_pixels reach the image processor (Qwen's smart_resize: sides rounded to
    multiples of 28, scaled into [min_pixels, max_pixels] keeping the aspect ratio); None keeps the checkpoint's."""
    from PIL import Image

    wide, tiny = Image.new("RGB", (500, 300), "white"), Image.new("RGB", (28, 28), "white")
    prompt = ["<|vision_start|><|image_pad|><|vision_end|>x"]
    pad = load_processor(vlm_dir).tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def encode(proc, img):
        out = proc(images=[img], text=prompt, return_tensors="pt")
        return out["image_grid_thw"].tolist(), int((out["input_ids"] == pad).sum())

    default = load_processor(vlm_dir)
    assert pixel_limits(default) == {"min_pixels": 56 * 56, "max_pixels": 112 * 112}  # the checkpoint's
    # 500x300 > 12544 px: scale sqrt(150000 / 12544) = 3.458 -> 84 x 140 px -> 6 x 10 patches -> 15 tokens
    assert encode(default, wide) == ([[1, 6, 10]], 15)
    # max 6272 px: scale 4.890 -> 56 x 84 px -> 4 x 6 patches -> 6 tokens
    smaller = load_processor(vlm_dir, max_pixels=6272)
    assert pixel_limits(smaller) == {"min_pixels": 3136, "max_pixels": 6272}
    assert encode(smaller, wide) == ([[1, 4, 6]], 6)
    # 28x28 = 784 px < min 3136: scaled up by 2 -> 56 x 56 px -> 4 tokens; min 12544: by 4 -> 112 px -> 16 tokens
    assert encode(default, tiny) == ([[1, 4, 4]], 4)
    larger = load_processor(vlm_dir, min_pixels=112 * 112, max_pixels=224 * 224)
    assert pixel_limits(larger) == {"min_pixels": 12544, "max_pixels": 50176}
    assert encode(larger, tiny) == ([[1, 8, 8]], 16)
    assert pixel_limits(load_processor(lm_dir)) is None  # a text model has no pixel budget


def test_chat_template_is_qwen_style(vlm_dir):
    proc = load_processor(vlm_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n")
    # the text-only twin renders string content with the same template
    tok = load_tokenizer(vlm_dir)
    assert tok.apply_chat_template([{"role": "user", "content": "Q?"}], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_splits_digits_and_keeps_think_tokens(tokenizer):
    ids = tokenizer("<think>Step 1: 123 + 45 = 168.</think> \\boxed{168}", add_special_tokens=False)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "<think>" and "</think>" in tokens
    assert all(len(t.lstrip("Ġ")) <= 1 for t in tokens if any(c.isdigit() for c in t))
    assert tokenizer.decode(ids) == "<think>Step 1: 123 + 45 = 168.</think> \\boxed{168}"
    assert 400 <= len(tokenizer) <= 512
    assert tokenizer.decode(tokenizer("MathVista ∠ABC = 30°")["input_ids"]) == "MathVista ∠ABC = 30°"  # bytes fall back


def test_banned_token_ids(vlm_dir):
    proc = load_processor(vlm_dir)
    tok = proc.tokenizer
    banned = banned_token_ids(tok)
    assert banned == banned_token_ids(proc)
    ids = tok.convert_tokens_to_ids
    assert ids("<|im_end|>") not in banned
    for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|endoftext|>"):
        assert ids(t) in banned, t
    assert ids("<think>") not in banned and ids("</think>") not in banned
    assert len(banned) == 13


def test_text_only_dir_gives_a_tokenizer_and_missing_dir_names_the_key(lm_dir, tmp_path):
    tok = load_processor(lm_dir)
    assert not hasattr(tok, "image_processor") and tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    with pytest.raises(FileNotFoundError, match="model.path"):
        load_processor(str(tmp_path / "nope"))


def test_processor_saves_in_stock_format(vlm_dir, tmp_path):
    import json

    load_processor(vlm_dir).save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "processor_config.json"))["processor_class"] == "Qwen2_5_VLProcessor"
    again = load_processor(tmp_path)
    assert again.tokenizer.get_vocab() == load_processor(vlm_dir).tokenizer.get_vocab()
    assert (vlm_batch(again)["input_ids"] == vlm_batch(load_processor(vlm_dir))["input_ids"]).all()
