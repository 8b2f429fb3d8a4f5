"""Tiny models built once per session (random weights, tokenizer trained on a little SynthVista text)."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

from sapo_ray.models import tiny


@pytest.fixture(scope="session")
def tokenizer():
    return tiny.build_tokenizer(tiny.tokenizer_corpus(n=200))


@pytest.fixture(scope="session")
def vlm_dir(tmp_path_factory, tokenizer):
    return tiny.build_tiny_vlm(str(tmp_path_factory.mktemp("tiny-vlm")), seed=0, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory, tokenizer):
    return tiny.build_tiny_lm(str(tmp_path_factory.mktemp("tiny-lm")), seed=0, tokenizer=tokenizer)


def image(size: int = 112, colour=(200, 30, 30)) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).rectangle([size // 4, size // 3, size // 2, size - 5], fill=colour)
    return img


def vlm_batch(processor, queries=("How many red bars are there?", "Which bar is the tallest? Choices: (A) red (B) blue")):
    """A left-padded two-row batch (different prompt lengths), one image each."""
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in queries]
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
    return processor(images=[image(), image(colour=(30, 30, 200))], text=texts, return_tensors="pt", padding=True,
                     padding_side="left")
