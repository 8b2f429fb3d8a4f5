"""build_messages: Qwen-VL chat messages with one image entry per image, at the placeholders."""

import pytest
from PIL import Image

from sapo_ray.data import synthvista
from fixtures import write_geometry3k_fixture
from sapo_ray.data.datasets import load_dataset_split
from sapo_ray.data.prompts import DEFAULT_INSTRUCTION, build_messages


def _image_entries(messages):
    return sum(1 for m in messages for c in m["content"] if isinstance(c, dict) and c["type"] == "image")


def test_default_instruction_is_the_geometry3k_format_prompt():
    assert DEFAULT_INSTRUCTION == (
        "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
        "The reasoning process MUST BE enclosed within <think> </think> tags. "
        "The final answer MUST BE put in \\boxed{}."
    )


def test_synthvista_message_is_image_then_query_and_instruction():
    ex = synthvista.to_example(synthvista.generate(1, seed=0)[0])
    [msg] = build_messages(ex)
    assert msg["role"] == "user"
    assert msg["content"] == [{"type": "image"}, {"type": "text", "text": ex["query"] + "\n" + DEFAULT_INSTRUCTION}]
    assert build_messages(ex, instruction="")[0]["content"][-1]["text"] == ex["query"]


def test_geometry3k_placeholders_become_image_entries_in_place(tmp_path):
    write_geometry3k_fixture(tmp_path, 4)
    for ex in load_dataset_split("geometry3k", tmp_path):
        messages = build_messages(ex, instruction="Box it.")
        assert _image_entries(messages) == len(ex["images"]) == 1
        content = messages[0]["content"]
        assert content[0] == {"type": "image"} and content[1]["text"].startswith("Find x.")
        assert "<image>" not in content[1]["text"] and content[1]["text"].endswith("\nBox it.")


def test_several_placeholders_keep_their_order():
    img = Image.new("RGB", (8, 8))
    ex = {"pid": "p", "query": "Compare <image> and <image>: which is larger?", "images": [img, img]}
    content = build_messages(ex, instruction="")[0]["content"]
    assert [c["type"] for c in content] == ["text", "image", "text", "image", "text"]
    assert [c["text"] for c in content if c["type"] == "text"] == ["Compare ", " and ", ": which is larger?"]
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        build_messages({**ex, "images": [img]})


def test_text_only_example_gets_plain_string_content():
    ex = synthvista.to_example(synthvista.generate(1, seed=0, text_only=True)[0])
    [msg] = build_messages(ex, instruction="")
    assert msg["content"] == ex["query"] and _image_entries([{"content": []}]) == 0
